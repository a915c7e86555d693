"""Where things live inside each model family.

One registry from `config.model_type` to module paths: transformer blocks, the MLP's input and
output projections, attention, final norm, unembedding and embeddings. Editing works on the MLP
output projection W of shape [d_model, d_mlp] in nn.Linear orientation; GPT-2 stores it as a
Conv1D whose weight is the transpose, which `down_weight` and `add_to_down_weight` hide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnknownModelType(ValueError):
    pass


@dataclass(frozen=True)
class Adapter:
    model_type: str
    blocks: str  # ModuleList of transformer blocks
    mlp: str  # relative to a block
    mlp_in: tuple[str, ...]  # relative to a block: projections into the MLP hidden space
    mlp_out: str  # relative to a block: the edited projection (hidden -> d_model)
    attn: str  # relative to a block
    final_norm: str
    unembed: str
    embed: str
    conv1d: bool = False  # GPT-2's Conv1D keeps weight as [in, out]

    # --- names -------------------------------------------------------------------------------
    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp}"

    def attn_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn}"

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    # --- modules -----------------------------------------------------------------------------
    def n_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.blocks))

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.block_name(layer))

    def mlp_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.mlp_name(layer))

    def attn_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.attn_name(layer))

    def mlp_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.mlp_out_name(layer))

    def embed_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def unembed_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.unembed)

    # --- the edited weight, always [d_model, d_mlp] --------------------------------------------
    def down_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The MLP output projection's weight as [d_out, d_in] (a view, not a copy)."""
        weight = self.mlp_out_module(model, layer).weight
        return weight.T if self.conv1d else weight

    @torch.no_grad()
    def add_to_down_weight(self, model: nn.Module, layer: int, delta: torch.Tensor) -> None:
        """W += delta, with delta given as [d_out, d_in] in any dtype/device."""
        weight = self.mlp_out_module(model, layer).weight
        delta = delta.to(device=weight.device, dtype=weight.dtype)
        weight.add_(delta.T if self.conv1d else delta)

    def d_mlp(self, model: nn.Module) -> int:
        return self.down_weight(model, 0).shape[1]

    def d_model(self, model: nn.Module) -> int:
        return self.down_weight(model, 0).shape[0]


_LLAMA_LIKE = dict(
    blocks="model.layers",
    mlp="mlp",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn="self_attn",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
)

ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        model_type="gpt2",
        blocks="transformer.h",
        mlp="mlp",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attn="attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        conv1d=True,
    ),
    "gptj": Adapter(
        model_type="gptj",
        blocks="transformer.h",
        mlp="mlp",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        attn="attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": Adapter(
        model_type="gpt_neox",
        blocks="gpt_neox.layers",
        mlp="mlp",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # `embed_out` before transformers 5
        embed="gpt_neox.embed_in",
    ),
    "llama": Adapter(model_type="llama", **_LLAMA_LIKE),
    "mistral": Adapter(model_type="mistral", **_LLAMA_LIKE),
    "qwen2": Adapter(model_type="qwen2", **_LLAMA_LIKE),
}


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a model (by its `config.model_type`) or a model-type string."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise UnknownModelType(
            f"model type {model_type!r} has no adapter; known types: {known}. "
            "Add an entry to editors.adapters.ADAPTERS."
        ) from None
