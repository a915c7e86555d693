"""The mathematics of engramflow in plain torch: no Prefect, no Ray.

    artifact = editors.edit(model, tok, requests, method="memit", stats=corpus_or_moments)
    with artifact.applied(model): ...        # or artifact.apply(model) / artifact.revert(model)
    rows = editors.evaluate(editors.EvalContext(model, tok, edited=requests), ["counterfact", "fluency"])

Names are imported on first use, so importing this package (the CLI does, for --help) costs no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from engramflow.editors.artifacts import Artifact
    from engramflow.editors.cache import RequestCache
    from engramflow.editors.methods.base import Stats

# public name -> module that defines it
_LAZY = {
    "Artifact": "artifacts", "from_safetensors": "artifacts", "to_safetensors": "artifacts",
    "Delta": "delta", "RequestCache": "cache",
    "EVALUATORS": "evaluation", "EvalContext": "evaluation", "Evaluator": "evaluation", "evaluate": "evaluation",
    "get_evaluator": "evaluation", "summarize": "evaluation",
    "Hparams": "hparams", "load_preset": "hparams",
    "Method": "methods", "METHODS": "methods", "get_method": "methods",
    "Request": "requests", "RequestError": "requests", "as_requests": "requests",
    "SecondMoment": "covariance", "layer_stats": "covariance", "partial_stats": "covariance",
    "reduce_stats": "covariance", "shard_texts": "covariance",
    "SolverError": "solver", "solve": "solver",
}

__all__ = [*_LAZY, "edit", "precompute"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        if name in ("METHODS", "EVALUATORS"):
            module.load_all()
        return getattr(module, name)
    try:  # a submodule, e.g. `editors.hparams`
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def edit(
    model: nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]], method: str = "memit",
    hparams: Any = None, stats: Stats = None, *, cache: RequestCache | None = None,
    state: Artifact | None = None, history: Sequence[Artifact] = (), stats_cache_dir: str | Path | None = None,
) -> Artifact:
    """Edit `requests` (mappings with prompt, subject, target_new) into an artifact; the model is left
    exactly as it was. `hparams`: None for the model's preset, a preset model name, a mapping of
    overrides, or resolved settings. `stats`: per-layer SecondMoment (or C) or a corpus (path or list
    of texts) to compute them from, cached in `stats_cache_dir`, for methods that need statistics.
    `cache`: per-request results (targets, experts) are read from and written to it. `state`: the
    previous artifact of a method whose artifacts replace each other (SCEN's bank), to continue it.
    `history`: the stacked artifacts already applied to `model`, oldest first (AlphaEdit keeps the keys
    of its earlier edits)."""
    from engramflow.editors.methods import get_method
    from engramflow.editors.requests import as_requests

    m = get_method(method)
    hp = m.hparams(model, hparams)
    return m.edit(model, tok, as_requests(requests), hp, stats=stats, cache=cache, state=state, history=history,
                  stats_cache_dir=stats_cache_dir)


def precompute(
    model: nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]], cache: RequestCache,
    method: str = "memit", hparams: Any = None,
) -> int:
    """Compute into `cache` the per-request work `edit` would do for `requests` on this model (so
    shards of one batch can be computed by separate workers before the edit); returns the work done,
    0 when all was cached or the method has none to share."""
    from engramflow.editors.methods import get_method
    from engramflow.editors.requests import as_requests

    m = get_method(method)
    return m.precompute(model, tok, as_requests(requests), m.hparams(model, hparams), cache)
