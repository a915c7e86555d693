"""Stage 1: one expert per fact, a delta on the MLP output projection W [d_model, d_mlp] of one layer,
trained on that request alone (so experts of a batch can be trained apart, on any worker)."""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.cache import RequestCache
from engramflow.editors.covariance import model_fingerprint
from engramflow.editors.keys import eval_mode
from engramflow.editors.requests import Request
from engramflow.editors.scen.config import EXPERT_FIELDS, ScenConfig
from engramflow.editors.scen.prompts import prompt_target_ids


@dataclass
class Expert:
    """One fact's delta on W [d_model, d_mlp]: B @ A, or a dense matrix for `expert_kind='full'`."""

    request_id: str
    layer: int
    a: torch.Tensor | None  # [r, d_mlp]
    b: torch.Tensor | None  # [d_model, r]
    dense: torch.Tensor | None = None  # [d_model, d_mlp]
    nll: float = math.nan  # mean target NLL after training
    steps: int = 0
    seconds: float = 0.0

    def delta(self) -> torch.Tensor:
        """The expert's delta as a dense [d_model, d_mlp] matrix."""
        if self.dense is not None:
            return self.dense
        assert self.a is not None and self.b is not None
        return self.b @ self.a

    def nbytes(self) -> int:
        """Bytes this expert stores (its factors, or its dense matrix)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the expert stores: {"a", "b"} factors or {"dense"}, on the CPU."""
        parts = {"a": self.a, "b": self.b, "dense": self.dense}
        return {k: v.detach().contiguous().cpu() for k, v in parts.items() if v is not None}

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d_mlp], B [d_model, r]); a dense expert is truncated to its best rank-r approximation."""
        if self.dense is None:
            assert self.a is not None and self.b is not None
            return self.a, self.b
        u, s, vh = torch.linalg.svd(self.dense, full_matrices=False)
        return vh[:rank], u[:, :rank] * s[:rank]


@contextmanager
def expert_applied(model: nn.Module, layer: int, delta_fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the layer's output projection returns W h + delta_fn(h) (a forward hook; the
    weights are never written)."""
    module = adapter_for(model).mlp_out_module(model, layer)
    handle = module.register_forward_hook(lambda _m, args, out: out + delta_fn(args[0]).to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def target_nll(model: nn.Module, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Mean NLL of the target tokens (those after the prompt), teacher-forced."""
    logits = model(input_ids=ids, use_cache=False).logits[0, n_prompt - 1 : -1].float()
    return F.cross_entropy(logits, ids[0, n_prompt:])


def train_expert(model: nn.Module, tok: Any, request: Mapping[str, Any], layer: int, config: ScenConfig) -> Expert:
    """Stage 1: fit one expert to one request (loss on the target tokens only, Adam). The model is
    left untouched: its weights and their .grad are never written."""
    start = time.perf_counter()
    request = Request.from_mapping(request)
    adapter = adapter_for(model)
    weight = adapter.down_weight(model, layer)
    d_model, d_mlp = weight.shape
    device = weight.device
    ids, n_prompt = prompt_target_ids(tok, request.prompt, request.target_new)
    ids = ids.to(device)
    # Seeded by the request so that the same fact gives the same expert on any worker.
    rid = request.request_id
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(rid.encode()))

    params: list[torch.Tensor]
    if config.expert_kind == "lora":
        # LoRA initialisation: A small and random, B zero, so training starts from the base layer.
        a = (torch.randn(config.rank, d_mlp, generator=gen) / math.sqrt(d_mlp)).to(device).requires_grad_()
        b = torch.zeros(d_model, config.rank, device=device, requires_grad=True)
        params = [a, b]

        def delta_fn(h: torch.Tensor) -> torch.Tensor:
            return (h.float() @ a.T) @ b.T
    else:
        dense = torch.zeros(d_model, d_mlp, device=device, requires_grad=True)
        params = [dense]

        def delta_fn(h: torch.Tensor) -> torch.Tensor:
            return h.float() @ dense.T

    opt = torch.optim.Adam(params, lr=config.expert_lr)
    steps, nll = 0, math.nan
    with eval_mode(model), expert_applied(model, layer, delta_fn):
        for steps in range(config.expert_steps + 1):
            loss = target_nll(model, ids, n_prompt)
            nll = loss.item()
            if steps == config.expert_steps or (config.expert_stop_nll is not None and nll < config.expert_stop_nll):
                break
            # autograd.grad, not backward(): gradients reach only the expert, never the model's .grad.
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
    seconds = time.perf_counter() - start
    if config.expert_kind == "lora":
        return Expert(rid, layer, a.detach().cpu(), b.detach().cpu(), nll=nll, steps=steps, seconds=seconds)
    expert = Expert(rid, layer, None, None, dense=dense.detach().cpu(), nll=nll, steps=steps, seconds=seconds)
    if config.expert_kind == "svd":
        a_r, b_r = expert.factors(config.rank)
        return Expert(rid, layer, a_r.contiguous(), b_r.contiguous(), nll=nll, steps=steps, seconds=seconds)
    return expert


def cached_experts(model: nn.Module, tok: Any, requests: Sequence[Request], layer: int, config: ScenConfig,
                   cache: RequestCache | None) -> tuple[list[Expert], int]:
    """Stage-1 experts for `requests`, read from `cache` where it holds them, else trained and put
    there; and how many were trained. The key is everything that determines an expert: the weights,
    the layer, the stage-1 settings and the request (its id seeds the expert)."""
    if cache is None:
        return [train_expert(model, tok, r, layer, config) for r in requests], len(requests)
    fingerprint = model_fingerprint(model)
    settings = [[name, getattr(config, name)] for name in EXPERT_FIELDS]
    experts, trained = [], 0
    for r in requests:
        key = cache.key("scen-expert", fingerprint, layer, settings, r.prompt, r.subject, r.target_new, r.request_id)
        hit = cache.get(key)
        if hit is None:
            expert = train_expert(model, tok, r, layer, config)
            cache.put(key, {**expert.tensors(), "stats": torch.tensor([expert.nll, expert.steps, expert.seconds],
                                                                      dtype=torch.float64)})
            trained += 1
        else:
            nll, steps, seconds = hit.pop("stats").tolist()
            expert = Expert(r.request_id, layer, hit.get("a"), hit.get("b"), dense=hit.get("dense"), nll=nll,
                            steps=int(steps), seconds=seconds)
        experts.append(expert)
    return experts, trained


def experts_to_tensors(experts: Sequence[Expert]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Trained experts (before indexing) in safetensors form: how parallel workers hand them over."""
    tensors = {f"{i}.{k}": v for i, e in enumerate(experts) for k, v in e.tensors().items()}
    meta = {"experts": json.dumps([{"request_id": e.request_id, "layer": e.layer, "nll": e.nll, "steps": e.steps,
                                    "seconds": e.seconds} for e in experts])}
    return tensors, meta


def experts_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> list[Expert]:
    """Inverse of `experts_to_tensors`."""
    return [Expert(a=tensors.get(f"{i}.a"), b=tensors.get(f"{i}.b"), dense=tensors.get(f"{i}.dense"), **info)
            for i, info in enumerate(json.loads(meta["experts"]))]
