"""FT: a constrained fine-tuning baseline. Adam on the NLL of `target_new` over the context prefixes,
updating one layer's MLP output projection, with ‖ΔW‖_F bounded after every step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.cache import RequestCache
from engramflow.editors.delta import Delta
from engramflow.editors.hparams import Hparams
from engramflow.editors.keys import context_prefixes, eval_mode
from engramflow.editors.methods import register
from engramflow.editors.methods.base import PresetMethod, Stats
from engramflow.editors.requests import Request
from engramflow.editors.targets import PromptChunk, build_prompts, length_groups


@dataclass(frozen=True)
class FineTune(PresetMethod):
    artifact: ClassVar[type[Delta]] = Delta

    def edit(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: Hparams, *, stats: Stats = None,
             cache: RequestCache | None = None, state: Delta | None = None,
             history: Sequence[Any] = (), stats_cache_dir: str | Path | None = None) -> Delta:
        prefixes = context_prefixes(model, tok, hp.context_spec, hp.seed)
        delta = fine_tune(model, tok, requests, hp, prefixes)
        delta.algorithm = self.name
        delta.request_ids = [r.request_id for r in requests]
        delta.meta = {"layers": hp.layers, "model_type": model.config.model_type,
                      "frobenius_norms": delta.frobenius_norms()}
        return delta


register(FineTune("ft"))


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
