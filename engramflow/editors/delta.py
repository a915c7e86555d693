"""An edit as data: per layer, low-rank factors with ΔW = U Vᵀ on the MLP output projection (an
`Artifact` that model versions stack).

Applying adds U Vᵀ (rounded to the weight's dtype) to W and keeps the original W; reverting copies it
back, because (W + ΔW) − ΔW ≠ W in floating point. Reverts are last-in-first-out: a revert refuses
if the weight changed since this delta was applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.artifacts import Artifact


class DeltaError(RuntimeError):
    pass


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class Delta(Artifact):
    """Low-rank weight updates: factors[layer] = (U [d_out, r], V [d_in, r]), ΔW = U Vᵀ."""

    format: ClassVar[str] = "engramflow.delta/1"
    stacks: ClassVar[bool] = True

    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    algorithm: str = ""
    request_ids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # The edit keys per layer ([d_in, n]), kept by methods whose later edits must preserve these
    # (AlphaEdit's K_p); empty otherwise.
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    # id(weight tensor) -> (original weight, digest of the weight after applying)
    _applied: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    @property
    def method_name(self) -> str:
        return self.algorithm

    def edit_records(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """One delta carries its whole batch: every request shares its layers and its norm."""
        norm = sum(v * v for v in self.frobenius_norms().values()) ** 0.5
        return {rid: {"layers": self.layers, "norm": norm} for rid in request_ids}

    def add_factors(self, layer: int, U: torch.Tensor, V: torch.Tensor) -> None:
        """ΔW[layer] += U Vᵀ, by concatenating factors (ranks add)."""
        if layer in self.factors:
            U0, V0 = self.factors[layer]
            U, V = torch.cat([U0, U.to(U0)], 1), torch.cat([V0, V.to(V0)], 1)
        self.factors[layer] = (U, V)

    def matrix(self, layer: int) -> torch.Tensor:
        """ΔW at `layer` as a dense [d_out, d_in] matrix."""
        U, V = self.factors[layer]
        return U @ V.T

    def frobenius_norms(self) -> dict[int, float]:
        """‖U Vᵀ‖_F per layer, from the r×r Gram matrices: ‖UVᵀ‖² = tr((UᵀU)(VᵀV))."""
        out = {}
        for layer, (U, V) in self.factors.items():
            U, V = U.double(), V.double()
            out[layer] = float(torch.trace((U.T @ U) @ (V.T @ V)).clamp(min=0).sqrt())
        return out

    # --- applying ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """W += U Vᵀ at every layer of this delta, remembering the original weights."""
        adapter = adapter_for(model)
        for layer in self.layers:
            weight = adapter.mlp_out_module(model, layer).weight
            if id(weight) in self._applied:
                raise DeltaError(f"layer {layer}: delta already applied to this model; revert it first")
        for layer in self.layers:
            weight = adapter.mlp_out_module(model, layer).weight
            original = weight.detach().clone()
            adapter.add_to_down_weight(model, layer, self.matrix(layer))
            self._applied[id(weight)] = (original, _digest(weight))

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """W += U Vᵀ for good: no copy of the original weights is kept (a version may stack many deltas)."""
        adapter = adapter_for(model)
        for layer in self.layers:
            adapter.add_to_down_weight(model, layer, self.matrix(layer))

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Restore the weights this delta changed, bit for bit."""
        adapter = adapter_for(model)
        weights = {layer: adapter.mlp_out_module(model, layer).weight for layer in self.layers}
        for layer, weight in weights.items():
            if id(weight) not in self._applied:
                raise DeltaError(f"layer {layer}: this delta is not applied to this model")
            if _digest(weight) != self._applied[id(weight)][1]:
                raise DeltaError(f"layer {layer}: weight changed since this delta was applied; "
                                 "revert later deltas first")
        for weight in weights.values():
            weight.copy_(self._applied.pop(id(weight))[0])

    @contextlib.contextmanager
    def overlaid(self, model: nn.Module) -> Iterator[nn.Module]:
        """Forward passes see W + U Vᵀ through hooks (output += (x V) Uᵀ); the weights are not
        touched. Used while an edit is being computed, so the caller's model never changes."""
        adapter = adapter_for(model)

        def hook_for(U: torch.Tensor, V: torch.Tensor):
            def hook(_module, args, output):
                x = args[0]
                return output + ((x.to(V.dtype) @ V) @ U.T).to(output.dtype)
            return hook

        handles = []
        for layer, (U, V) in self.factors.items():
            weight = adapter.down_weight(model, layer)
            handles.append(adapter.mlp_out_module(model, layer).register_forward_hook(
                hook_for(U.to(weight.device), V.to(weight.device))))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    # --- storing -------------------------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The factors as named tensors plus string metadata: the safetensors form, for a file or
        the content-addressed store."""
        tensors = {}
        for layer, (U, V) in self.factors.items():
            tensors[f"layer.{layer}.U"] = U.detach().contiguous().cpu()
            tensors[f"layer.{layer}.V"] = V.detach().contiguous().cpu()
        for layer, K in self.keys.items():
            tensors[f"layer.{layer}.K"] = K.detach().contiguous().cpu()
        header = {
            "algorithm": self.algorithm,
            "layers": json.dumps(self.layers),
            "request_ids": json.dumps(self.request_ids),
            "frobenius_norms": json.dumps(self.frobenius_norms()),
            "meta": json.dumps(self.meta),
        }
        return tensors, header

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> Delta:
        layers = json.loads(header["layers"])
        factors = {layer: (tensors[f"layer.{layer}.U"], tensors[f"layer.{layer}.V"]) for layer in layers}
        keys = {layer: tensors[f"layer.{layer}.K"] for layer in layers if f"layer.{layer}.K" in tensors}
        return cls(factors, algorithm=header["algorithm"], request_ids=json.loads(header["request_ids"]),
                   meta=json.loads(header["meta"]), keys=keys)
