"""ROME, EMMET, MEMIT and AlphaEdit: one preservation–memorization solver (Gupta et al. 2024), a
constraint and a layer spreading each.

| name      | constraint    | projection | how a batch is edited                                      |
|-----------|---------------|------------|------------------------------------------------------------|
| rome      | equality      | –          | one request after another, each a rank-1 update            |
| emmet     | equality      | –          | all requests at once, spread over `layers`                 |
| memit     | least squares | –          | all requests at once, spread over `layers`                 |
| alphaedit | least squares | null space | all requests at once, spread over `layers`                 |
Settings live in the YAML presets (`editors/presets/<method>-<model>.yaml`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.cache import RequestCache
from engramflow.editors.covariance import SecondMoment, layer_stats
from engramflow.editors.delta import Delta
from engramflow.editors.hparams import Hparams
from engramflow.editors.keys import context_prefixes, prefix_weights
from engramflow.editors.methods import register
from engramflow.editors.methods.base import PresetMethod, StatisticsSpec, Stats
from engramflow.editors.requests import Request
from engramflow.editors.solver import Constraint, null_space_projector, solve
from engramflow.editors.spreading import spread
from engramflow.editors.targets import Targets, cached_targets


@dataclass(frozen=True)
class LocateAndEdit(PresetMethod):
    """A closed-form edit of the MLP output projection at `hp.layers` toward optimised target values."""

    constraint: Constraint = "least_squares"
    project: bool = False  # AlphaEdit's null-space projection, preserving the keys of its earlier edits too
    sequential: bool = False  # ROME: one request at a time
    # How keys average over the context prefixes (keys.prefix_weights): MEMIT's reference averages within
    # groups (bare prompt, prefixes), ROME's over all. ROME also divides by the bare prompt's key.
    grouped_keys: bool = True
    bare_denominator: bool = False

    artifact: ClassVar[type[Delta]] = Delta

    def statistics(self, hp: Hparams) -> StatisticsSpec:
        return StatisticsSpec(list(hp.layers), hp.mom2_n_tokens, hp.mom2_n_samples, hp.mom2_exclude_edited)

    def edit(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: Hparams, *, stats: Stats = None,
             cache: RequestCache | None = None, state: Delta | None = None,
             history: Sequence[Any] = (), stats_cache_dir: str | Path | None = None) -> Delta:
        prefixes = context_prefixes(model, tok, hp.context_spec, hp.seed)
        subjects = [r.subject for r in requests] if hp.mom2_exclude_edited else []
        solve_layer = self._layer_solver(model, tok, hp, stats, stats_cache_dir, subjects, history)
        batches = [[r] for r in requests] if self.sequential else [list(requests)]
        # ROME's later requests are optimised against the earlier ones' updates, weights that no
        # key of the cache names: only batch methods read and fill it.
        cache = None if self.sequential else cache
        delta = Delta({})
        for batch in batches:
            # Later requests of a sequential run see the earlier updates (through hooks).
            with delta.overlaid(model):
                part = self.edit_batch(model, tok, batch, hp, prefixes, solve_layer, cache)
            for layer, (U, V) in part.factors.items():
                delta.add_factors(layer, U, V)
            for layer, K in part.keys.items():
                delta.keys[layer] = torch.cat([delta.keys[layer], K], 1) if layer in delta.keys else K
        delta.algorithm = self.name
        delta.request_ids = [r.request_id for r in requests]
        delta.meta = {"layers": hp.layers, "model_type": model.config.model_type,
                      "frobenius_norms": delta.frobenius_norms()}
        return delta

    def precompute(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: Hparams,
                   cache: RequestCache) -> int:
        """Optimise into `cache` the targets `edit` on these weights would read; each request's target is
        optimised on its own prompts, so disjoint shards of a batch can be computed by separate workers.
        Nothing to do for ROME, whose later requests are optimised against the earlier ones' updates."""
        if not self.shardable:
            return 0
        prefixes = context_prefixes(model, tok, hp.context_spec, hp.seed)
        return batch_targets(model, tok, requests, hp, prefixes, cache).steps

    def edit_batch(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: Hparams,
                   prefixes: Sequence[str], solve_layer: Callable, target_cache: RequestCache | None = None,
                   ) -> Delta:
        """Targets at the last edited layer for the whole batch (those `target_cache` holds are read from
        it), then the update spread over the layers."""
        t = batch_targets(model, tok, requests, hp, prefixes, target_cache)
        return spread(model, tok, requests, hp.layers, t.h + t.delta, prefixes, solve_layer,
                      fact_token=hp.fact_token, batch_size=hp.chunk_size,
                      key_weights=prefix_weights(hp.context_spec, self.grouped_keys),
                      bare_keys=self.bare_denominator, keep_keys=self.project)

    def _layer_solver(self, model: nn.Module, tok, hp: Hparams, stats: Stats, cache_dir: str | Path | None,
                      exclude: Sequence[str], history: Sequence[Any]) -> Callable:
        moments = resolve_stats(model, tok, hp, stats, cache_dir, exclude)
        adapter = adapter_for(model)
        projectors = ({layer: projector_for(moments[layer], hp.nullspace_threshold, layer) for layer in hp.layers}
                      if self.project else {})
        # AlphaEdit's K_p: the keys its earlier edits wrote, which later edits must not move.
        earlier = {layer: [a.keys[layer] for a in history if layer in getattr(a, "keys", {})] for layer in hp.layers}

        def solve_layer(layer: int, K: torch.Tensor, R: torch.Tensor, K_bare: torch.Tensor | None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
            U, V = solve(
                adapter.down_weight(model, layer), moments[layer].C, K, R, self.constraint,
                mom2_weight=hp.alphaedit_l2 if self.project else hp.mom2_update_weight,
                emmet_lambda=hp.emmet_lambda, projector=projectors.get(layer), K_exact=K_bare,
                preserved=torch.cat(earlier[layer], 1) if self.project and earlier[layer] else None, layer=layer,
            )
            return U.float(), V.float()

        return solve_layer


def projector_for(moment: SecondMoment, threshold: float, layer: int) -> torch.Tensor:
    """AlphaEdit's projector for a layer, computed once per (statistics object, threshold)."""
    key = ("projector", threshold)
    if key not in moment.cache:
        moment.cache[key] = null_space_projector(moment.C, threshold, layer)
    return moment.cache[key]


def resolve_stats(model: nn.Module, tok, hp: Hparams, stats: Stats, cache_dir: str | Path | None,
                  exclude: Sequence[str] = ()) -> dict[int, SecondMoment]:
    """Second moments for hp.layers: given per layer (SecondMoment or a C matrix), or computed from
    a corpus (file path or list of texts) without the texts that mention any of `exclude`."""
    if stats is None:
        raise ValueError("this algorithm needs covariance statistics: pass stats= (per-layer second "
                         "moments from engramflow.editors.covariance, or a corpus to compute them from)")
    if isinstance(stats, Mapping):
        missing = [layer for layer in hp.layers if layer not in stats]
        if missing:
            raise ValueError(f"stats have no second moment for layers {missing} (have {sorted(stats)})")
        return {layer: s if isinstance(s, SecondMoment) else SecondMoment(s.double(), 1)
                for layer, s in stats.items() if layer in hp.layers}
    return layer_stats(model, tok, hp.layers, stats, max_tokens=hp.mom2_n_tokens, max_samples=hp.mom2_n_samples,
                       exclude=exclude, cache_dir=cache_dir)


def batch_targets(model: nn.Module, tok, requests: Sequence[Request], hp: Hparams, prefixes: Sequence[str],
                  target_cache: RequestCache | None = None) -> Targets:
    """Targets at the last edited layer for `requests` (those `target_cache` holds are read from it)."""
    return cached_targets(
        model, tok, requests, max(hp.layers), prefixes, target_cache, v_num_grad_steps=hp.v_num_grad_steps,
        v_lr=hp.v_lr, v_weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
        clamp_norm_factor=hp.clamp_norm_factor, fact_token=hp.fact_token, chunk_size=hp.chunk_size,
    )


register(LocateAndEdit("rome", needs_stats=True, constraint="equality", sequential=True, grouped_keys=False,
                       bare_denominator=True))
register(LocateAndEdit("emmet", needs_stats=True, shardable=True, constraint="equality"))
register(LocateAndEdit("memit", needs_stats=True, shardable=True, constraint="least_squares"))
register(LocateAndEdit("alphaedit", needs_stats=True, shardable=True, constraint="least_squares", project=True))
