"""The routing layer: the edited MLP output projection plus every expert and indexing neuron.

At the first forward of a prompt all neurons are read at the last prompt token with one matmul;
a row whose strongest neuron exceeds the routing threshold (`route_theta`, by default theta) uses
that expert's delta (rank-r factors, or the dense matrix of a full bank) for the rest of the sequence
(prompt and generated tokens), every other row keeps the original weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from engramflow.editors.scen.bank import ExpertBank

NO_EXPERT = -1


class ScenLayer(nn.Module):
    """Wraps the base down-projection (nn.Linear or GPT-2 Conv1D) of one layer."""

    def __init__(self, base: nn.Module, bank: ExpertBank, layer: int) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.layer = layer
        self.routes: torch.Tensor | None = None  # [batch] expert index per row, NO_EXPERT for none
        self.scores: torch.Tensor | None = None  # [batch, n_experts] neuron activations of that decision
        self._fresh = True
        self._read_at: torch.Tensor | None = None  # [batch] token index to read the neurons at
        self.read_override: torch.Tensor | None = None  # set by `reading_at` for teacher forcing
        self.last_input_ids: torch.Tensor | None = None  # to recognise generation without a KV cache
        self._version = -1
        self._tensors: dict[str, torch.Tensor] = {}

    def begin_prompt(self, read_at: torch.Tensor | None) -> None:
        """Called before the first forward of a new prompt: routing is decided at the next forward."""
        self._fresh = True
        self._read_at = read_at

    def _bank_tensors(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        # Cached copies in the model's device/dtype, refreshed when the bank changes. Neurons stay in
        # float32 so that scores near theta do not depend on the model's precision.
        key = (self.bank.version, like.device, like.dtype)
        if self._version != key:
            bank = self.bank
            self._tensors = {
                "neuron_w": bank.neuron_w.to(like.device, torch.float32),
                "neuron_b": bank.neuron_b.to(like.device, torch.float32),
                **{k: t.to(like.device, like.dtype) for k, t in bank.expert_tensors().items()},
            }
            self._version = key
        return self._tensors

    @torch.no_grad()
    def _decide(self, h: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, seq = h.shape[0], h.shape[1]
        read_at = self._read_at
        if read_at is None:
            read_at = torch.full((batch,), seq - 1, device=h.device)
        read_at = read_at.to(h.device).clamp(max=seq - 1)
        h_read = h[torch.arange(batch, device=h.device), read_at].float()  # [batch, d_mlp]
        scores = torch.sigmoid(h_read @ tensors["neuron_w"].T + tensors["neuron_b"])  # [batch, n]
        self.scores = scores
        if scores.shape[1] == 0:
            return torch.full((batch,), NO_EXPERT, device=h.device, dtype=torch.long)
        best, idx = scores.max(dim=1)
        return torch.where(best > self.bank.route_theta, idx, torch.full_like(idx, NO_EXPERT))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        # [tokens, d_mlp]: an unbatched call, or a family that flattens the batch's tokens (OPT), whose
        # rows are the model input's [batch, seq].
        flat = h.dim() == 2
        if flat:
            ids = self.last_input_ids
            shape = tuple(ids.shape) if ids is not None and ids.numel() == h.shape[0] else (1, h.shape[0])
            h, out = h.view(*shape, h.shape[-1]), out.view(*shape, out.shape[-1])
        tensors = self._bank_tensors(h)
        if self._fresh:
            self.routes = self._decide(h, tensors)
            self._fresh = False
        elif self.routes is None or self.routes.shape[0] != h.shape[0]:
            raise RuntimeError(
                f"SCEN layer {self.layer}: a continued forward with batch {h.shape[0]} but routing was "
                f"decided for {None if self.routes is None else self.routes.shape[0]} rows; pass "
                "the KV cache as a keyword so the layer can tell a new prompt from a continuation"
            )
        rows = (self.routes != NO_EXPERT).nonzero().squeeze(1)
        if rows.numel():
            idx = self.routes[rows]
            if "dense" in tensors:
                delta = torch.einsum("ktm,kdm->ktd", h[rows], tensors["dense"][idx])  # [k, seq, d_model]
            else:
                z = torch.einsum("ktm,krm->ktr", h[rows], tensors["a"][idx])  # [k, seq, r]
                delta = torch.einsum("ktr,kdr->ktd", z, tensors["b"][idx])  # [k, seq, d_model]
            out = out.index_add(0, rows, delta.to(out.dtype))
        return out.reshape(-1, out.shape[-1]) if flat else out
