"""Algorithms = constraint + spreading + defaults, in one registry.

| name      | constraint    | projection | how a batch is edited                                      |
|-----------|---------------|------------|------------------------------------------------------------|
| rome      | equality      | –          | one request after another, each a rank-1 update            |
| emmet     | equality      | –          | all requests at once, spread over `layers`                 |
| memit     | least squares | –          | all requests at once, spread over `layers`                 |
| alphaedit | least squares | null space | all requests at once, spread over `layers`                 |
| ft        | –             | –          | fine-tune one layer's down-projection, ‖ΔW‖_F bounded       |
Defaults live in the YAML presets (`editors/presets/<algorithm>-<model>.yaml`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.covariance import Corpus, SecondMoment, layer_stats
from engramflow.editors.delta import Delta
from engramflow.editors.hparams import Hparams
from engramflow.editors.keys import Request, context_prefixes, eval_mode
from engramflow.editors.solver import Constraint, null_space_projector, solve
from engramflow.editors.spreading import spread
from engramflow.editors.targets import (
    PromptChunk,
    TargetCache,
    Targets,
    build_prompts,
    cached_targets,
    length_groups,
)

Stats = Mapping[int, SecondMoment | torch.Tensor] | Corpus | None


@dataclass(frozen=True)
class Algorithm:
    name: str
    constraint: Constraint | None  # None: gradient fine-tuning, no closed form
    project: bool = False  # AlphaEdit's null-space projection
    sequential: bool = False  # ROME: one request at a time

    @property
    def batch_targets(self) -> bool:
        """Whether a batch's targets are optimised on the unedited weights, request by request (so they
        can be precomputed in shards): not ROME's, which see the earlier requests' updates; FT has none."""
        return self.constraint is not None and not self.sequential

    def run(self, model: nn.Module, tok, requests: Sequence[Request], hp: Hparams, stats: Stats,
            cache_dir: str | Path | None = None, target_cache: TargetCache | None = None) -> Delta:
        prefixes = context_prefixes(model, tok, hp.context_spec, hp.seed)
        if self.constraint is None:
            delta = fine_tune(model, tok, requests, hp, prefixes)
        else:
            solve_layer = self._layer_solver(model, tok, hp, stats, cache_dir)
            batches = [[r] for r in requests] if self.sequential else [list(requests)]
            # ROME's later requests are optimised against the earlier ones' updates, weights that no
            # key of the cache names: only batch algorithms read and fill it.
            cache = None if self.sequential else target_cache
            delta = Delta({})
            for batch in batches:
                # Later requests of a sequential run see the earlier updates (through hooks).
                with delta.overlaid(model):
                    part = edit_batch(model, tok, batch, hp, prefixes, solve_layer, cache)
                for layer, (U, V) in part.factors.items():
                    delta.add_factors(layer, U, V)
        delta.algorithm = self.name
        delta.request_ids = [r.request_id for r in requests]
        delta.meta = {"layers": hp.layers, "model_type": model.config.model_type,
                      "frobenius_norms": delta.frobenius_norms()}
        return delta

    def _layer_solver(self, model: nn.Module, tok, hp: Hparams, stats: Stats,
                      cache_dir: str | Path | None) -> Callable:
        moments = resolve_stats(model, tok, hp, stats, cache_dir)
        adapter = adapter_for(model)
        projectors = ({layer: projector_for(moments[layer], hp.nullspace_threshold, layer) for layer in hp.layers}
                      if self.project else {})

        def solve_layer(layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            U, V = solve(
                adapter.down_weight(model, layer), moments[layer].C.to(K.device), K, R, self.constraint,
                mom2_weight=hp.alphaedit_l2 if self.project else hp.mom2_update_weight,
                emmet_lambda=0.0 if self.sequential else hp.emmet_lambda,
                projector=projectors.get(layer), layer=layer,
            )
            return U.float(), V.float()

        return solve_layer


ALGORITHMS: dict[str, Algorithm] = {
    "rome": Algorithm("rome", "equality", sequential=True),
    "emmet": Algorithm("emmet", "equality"),
    "memit": Algorithm("memit", "least_squares"),
    "alphaedit": Algorithm("alphaedit", "least_squares", project=True),
    "ft": Algorithm("ft", None),
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}") from None


def projector_for(moment: SecondMoment, threshold: float, layer: int) -> torch.Tensor:
    """AlphaEdit's projector for a layer, computed once per (statistics object, threshold)."""
    key = ("projector", threshold)
    if key not in moment.cache:
        moment.cache[key] = null_space_projector(moment.C, threshold, layer)
    return moment.cache[key]


def resolve_stats(model: nn.Module, tok, hp: Hparams, stats: Stats,
                  cache_dir: str | Path | None) -> dict[int, SecondMoment]:
    """Second moments for hp.layers: given per layer (SecondMoment or a C matrix), or computed from
    a corpus (file path or list of texts)."""
    if stats is None:
        raise ValueError("this algorithm needs covariance statistics: pass stats= (per-layer second "
                         "moments from engramflow.editors.covariance, or a corpus to compute them from)")
    if isinstance(stats, Mapping):
        missing = [layer for layer in hp.layers if layer not in stats]
        if missing:
            raise ValueError(f"stats have no second moment for layers {missing} (have {sorted(stats)})")
        return {layer: s if isinstance(s, SecondMoment) else SecondMoment(s.double(), 1)
                for layer, s in stats.items() if layer in hp.layers}
    return layer_stats(model, tok, hp.layers, stats, max_tokens=hp.mom2_n_tokens, cache_dir=cache_dir)


def batch_targets(model: nn.Module, tok, requests: Sequence[Request], hp: Hparams, prefixes: Sequence[str],
                  target_cache: TargetCache | None = None) -> Targets:
    """Targets at the last edited layer for `requests` (those `target_cache` holds are read from it)."""
    return cached_targets(
        model, tok, requests, max(hp.layers), prefixes, target_cache, v_num_grad_steps=hp.v_num_grad_steps,
        v_lr=hp.v_lr, v_weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
        clamp_norm_factor=hp.clamp_norm_factor, fact_token=hp.fact_token, chunk_size=hp.chunk_size,
    )


def precompute_targets(model: nn.Module, tok, requests: Sequence[Request], algorithm: str, hp: Hparams,
                       target_cache: TargetCache) -> int:
    """Optimise into `target_cache` the targets that `Algorithm.run` on these weights would read for
    `requests`; returns the optimisation steps taken (0 when all were cached). Each request's target
    is optimised on its own prompts, so disjoint shards of a batch can be precomputed by separate
    workers and the edit then only reads them. Nothing to do for algorithms without batch targets:
    ROME's later requests are optimised against the earlier ones' updates, and FT has none."""
    if not get_algorithm(algorithm).batch_targets:
        return 0
    prefixes = context_prefixes(model, tok, hp.context_spec, hp.seed)
    return batch_targets(model, tok, requests, hp, prefixes, target_cache).steps


def edit_batch(model: nn.Module, tok, requests: Sequence[Request], hp: Hparams, prefixes: Sequence[str],
               solve_layer: Callable, target_cache: TargetCache | None = None) -> Delta:
    """Targets at the last edited layer for the whole batch (those `target_cache` holds are read from
    it), then the spread update."""
    t = batch_targets(model, tok, requests, hp, prefixes, target_cache)
    return spread(model, tok, requests, hp.layers, t.h + t.delta, prefixes, solve_layer,
                  fact_token=hp.fact_token, batch_size=hp.chunk_size)


def fine_tune(model: nn.Module, tok, requests: Sequence[Request], hp: Hparams, prefixes: Sequence[str]) -> Delta:
    """FT: Adam on the NLL of target_new over the context prefixes, updating ΔW of the single layer
    in hp.layers, with ‖ΔW‖_F ≤ ft_norm_bound · ‖W₀‖_F after every step."""
    if len(hp.layers) != 1:
        raise ValueError(f"ft edits one layer; got layers {hp.layers}")
    (layer,) = hp.layers
    adapter = adapter_for(model)
    W0 = adapter.down_weight(model, layer)
    device = W0.device
    dW = torch.zeros(W0.shape, device=device, requires_grad=True)  # [d_out, d_in]
    max_norm = hp.ft_norm_bound * float(W0.detach().float().norm())
    p = build_prompts(tok, requests, prefixes, hp.fact_token)
    rewrite = [i for i, kl in enumerate(p.is_kl) if not kl]
    chunks = [PromptChunk.build(p, g, device)
              for g in length_groups(rewrite, [len(p.seqs[i]) for i in rewrite], hp.chunk_size)]
    n_tokens = sum(len(c.t_id) for c in chunks)
    unembed = adapter.unembed_module(model)
    opt = torch.optim.Adam([dW], lr=hp.ft_lr)

    def hook(_module, args, output):
        return output + (args[0].float() @ dW.T).to(output.dtype)

    handle = adapter.mlp_out_module(model, layer).register_forward_hook(hook)
    try:
        with eval_mode(model):
            for _ in range(hp.ft_steps):
                grad = torch.zeros_like(dW)
                for c in chunks:
                    hidden = c.final_hidden(model)
                    logp = unembed(hidden[c.t_seq, c.t_pos]).float().log_softmax(-1)
                    nll = -logp.gather(1, c.t_id[:, None]).sum() / n_tokens
                    grad += torch.autograd.grad(nll, [dW])[0]
                opt.zero_grad()
                dW.grad = grad
                opt.step()
                with torch.no_grad():
                    norm = float(dW.norm())
                    if norm > max_norm:
                        dW.mul_(max_norm / norm)
    finally:
        handle.remove()
    dW = dW.detach()
    # ΔW as factors of rank min(d_out, d_in): an identity on the smaller side.
    d_out, d_in = dW.shape
    if d_out <= d_in:
        U, V = torch.eye(d_out, device=device), dW.T.contiguous()
    else:
        U, V = dW.clone(), torch.eye(d_in, device=device)
    return Delta({layer: (U, V)})
