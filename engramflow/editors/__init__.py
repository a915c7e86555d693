"""The mathematics of engramflow in plain torch: no Prefect, no Ray.

    delta = editors.edit(model, tok, requests, algorithm="memit", stats=corpus_or_moments)
    with delta.applied(model): ...        # or delta.apply(model) / delta.revert(model)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from engramflow.editors.algorithms import ALGORITHMS, Stats, get_algorithm
from engramflow.editors.algorithms import precompute_targets as _precompute_targets
from engramflow.editors.covariance import SecondMoment, layer_stats, partial_stats, reduce_stats, shard_texts
from engramflow.editors.delta import Delta
from engramflow.editors.hparams import Hparams, load_preset, resolve
from engramflow.editors.keys import normalise_requests
from engramflow.editors.solver import SolverError, solve
from engramflow.editors.targets import TargetCache

__all__ = [
    "ALGORITHMS", "Delta", "Hparams", "SecondMoment", "SolverError", "TargetCache", "edit", "layer_stats",
    "load_preset", "partial_stats", "precompute_targets", "reduce_stats", "shard_texts", "solve",
]


def edit(
    model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], algorithm: str = "memit",
    hparams: Hparams | Mapping[str, Any] | str | None = None, stats: Stats = None,
    cache_dir: str | Path | None = None, target_cache: TargetCache | None = None,
) -> Delta:
    """Compute the edit of `requests` (mappings with prompt, subject, target_new) as a Delta; the
    model is left exactly as it was. `hparams`: None for the model's preset, a preset model name,
    a mapping of overrides, or Hparams. `stats`: per-layer SecondMoment (or C) or a corpus (path
    or list of texts) to compute them from, cached in `cache_dir`; `ft` needs none. `target_cache`:
    optimised targets are read from and written to it (batch algorithms; see TargetCache)."""
    algo = get_algorithm(algorithm)
    hp = resolve(algorithm, model, hparams)
    return algo.run(model, tok, normalise_requests(requests), hp, stats, cache_dir, target_cache)


def precompute_targets(
    model: nn.Module, tok, requests: Sequence[Mapping[str, Any]], target_cache: TargetCache,
    algorithm: str = "memit", hparams: Hparams | Mapping[str, Any] | str | None = None,
) -> int:
    """Optimise into `target_cache` the targets `edit` would compute for `requests` on this model (so
    shards of one batch can be optimised by separate workers before the edit); returns the steps
    taken, 0 when all were cached or the algorithm has no batch targets (rome, ft)."""
    hp = resolve(algorithm, model, hparams)
    return _precompute_targets(model, tok, normalise_requests(requests), algorithm, hp, target_cache)
