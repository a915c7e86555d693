"""Where things live inside each model family.

One registry from `config.model_type` to module paths: transformer blocks, the MLP's input and
output projections, attention, final norm, unembedding and embeddings. Editing works on the MLP
output projection W of shape [d_model, d_mlp] in nn.Linear orientation; GPT-2 stores it as a
Conv1D whose weight is the transpose, which `down_weight` and `add_to_down_weight` hide.

Adding a family is one entry in `ADAPTERS` (most decoder-only families since Llama name their modules
as Llama does: `Adapter("name", **_LLAMA_LIKE)`), plus its tiny model in tests/test_adapters.py.
`check_supported` tells from a model's config alone, before any work, whether its family has one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UnknownModelType(ValueError):
    pass


@dataclass(frozen=True)
class Adapter:
    model_type: str
    blocks: str  # ModuleList of transformer blocks
    mlp: str  # relative to a block: the module whose output is the MLP's contribution (causal tracing)
    mlp_in: tuple[str, ...]  # relative to a block: projections into the MLP hidden space
    mlp_out: str  # relative to a block: the edited projection (hidden -> d_model)
    attn: str  # relative to a block
    final_norm: str
    unembed: str
    embed: str
    conv1d: bool = False  # GPT-2's Conv1D keeps weight as [in, out]
    flat_tokens: bool = False  # OPT runs its MLP on [batch·tokens, d]; `hook` shows it [batch, tokens, d]

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

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the base model's last hidden state, as the model's own head computes
        them: the unembedding, then Gemma 2's final soft-capping where the config asks for it."""
        logits = self.unembed_module(model)(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # --- hooks that see [batch, tokens, ...] in every family ---------------------------------------
    def hook(self, model: nn.Module, layer: int, name: str, fn: Callable[..., Any], pre: bool = False) -> _Handles:
        """Register `fn` on module `name` (relative to block `layer`, e.g. `self.mlp_out`) as a forward
        hook (module, args, output) -> new output or None, or with `pre` a forward pre-hook (module, args)
        -> None; its tensors are [batch, tokens, ...] even where the family flattens the tokens."""
        module = model.get_submodule(f"{self.block_name(layer)}.{name}")
        if not self.flat_tokens:
            return _Handles([module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)])
        shape: list[torch.Size] = []

        def block_input(_block: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            shape[:] = [hidden.shape[:-1]]

        def by_token(x: Any) -> Any:
            return x.view(*shape[0], x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() == 2 else x

        def pre_hook(m: nn.Module, args: tuple) -> None:
            fn(m, tuple(map(by_token, args)))

        def post_hook(m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            new = fn(m, tuple(map(by_token, args)), by_token(output))
            return None if new is None else new.reshape(output.shape)

        return _Handles([
            self.block(model, layer).register_forward_pre_hook(block_input, with_kwargs=True),
            module.register_forward_pre_hook(pre_hook) if pre else module.register_forward_hook(post_hook),
        ])

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


class _Handles:
    """Hook handles removed together."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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

# Phi-3 fuses the gate and up projections into one; the edited projection is still down_proj.
_PHI3 = {**_LLAMA_LIKE, "mlp_in": ("mlp.gate_up_proj",)}

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
    # OPT has no MLP module: fc1/fc2 sit on the decoder layer, and fc2's output is the MLP's contribution.
    "opt": Adapter(
        model_type="opt",
        blocks="model.decoder.layers",
        mlp="fc2",
        mlp_in=("fc1",),
        mlp_out="fc2",
        attn="self_attn",
        final_norm="model.decoder.final_layer_norm",  # absent in OPT-350m (post-norm), which no stage reads
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
        flat_tokens=True,
    ),
    "llama": Adapter(model_type="llama", **_LLAMA_LIKE),
    "mistral": Adapter(model_type="mistral", **_LLAMA_LIKE),
    "qwen2": Adapter(model_type="qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter(model_type="qwen3", **_LLAMA_LIKE),
    "gemma": Adapter(model_type="gemma", **_LLAMA_LIKE),
    "gemma2": Adapter(model_type="gemma2", **_LLAMA_LIKE),
    "gemma3_text": Adapter(model_type="gemma3_text", **_LLAMA_LIKE),  # Gemma3ForCausalLM (the text models)
    "olmo": Adapter(model_type="olmo", **_LLAMA_LIKE),
    "olmo2": Adapter(model_type="olmo2", **_LLAMA_LIKE),
    "phi3": Adapter(model_type="phi3", **_PHI3),
}

HOW_TO_ADD = ("To add a family, add one entry to engramflow.editors.adapters.ADAPTERS naming its module paths "
              "(blocks, MLP output projection, attention, final norm, embeddings; a family that names its "
              "modules as Llama does is `Adapter(model_type=..., **_LLAMA_LIKE)`) and a tiny model of it to "
              "tests/test_adapters.py.")


def adapter_for(model_or_type: nn.Module | Any) -> Adapter:
    """The adapter for a model, a transformers config (by its `model_type`) or a model-type string."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ADAPTERS))
        raise UnknownModelType(
            f"model type {model_type!r} has no adapter; known types: {known}. {HOW_TO_ADD}"
        ) from None


def check_supported(model: nn.Module | Any | str | os.PathLike[str]) -> Adapter:
    """The adapter for a model, its transformers config, or a model directory or hub id (only its config
    is read); UnknownModelType naming the known families and how to add one otherwise."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if (path / "config.json").is_file():
            return adapter_for(_ModelType(json.loads((path / "config.json").read_text()).get("model_type")))
        from transformers import AutoConfig

        return adapter_for(AutoConfig.from_pretrained(str(model)))
    return adapter_for(model)


@dataclass(frozen=True)
class _ModelType:
    """A config.json's model_type, read without transformers."""

    model_type: str | None
