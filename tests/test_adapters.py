"""The adapter registry against tiny random-initialised models of every family (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from engramflow.editors.adapters import ADAPTERS, UnknownModelType, adapter_for

D_MODEL, D_MLP, VOCAB = 32, 64, 128
_LLAMA = dict(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=D_MLP, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=0)
CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=D_MODEL, n_inner=D_MLP, n_head=2, vocab_size=VOCAB,
                                 n_positions=64, bos_token_id=0, eos_token_id=0),
    "gptj": lambda: T.GPTJConfig(n_layer=2, n_embd=D_MODEL, n_inner=D_MLP, n_head=2, vocab_size=VOCAB,
                                 n_positions=64, rotary_dim=8, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2,
                                        intermediate_size=D_MLP, vocab_size=VOCAB, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0),
    "llama": lambda: T.LlamaConfig(**_LLAMA),
    "mistral": lambda: T.MistralConfig(**_LLAMA),
    "qwen2": lambda: T.Qwen2Config(**_LLAMA),
}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


def test_every_registered_family_has_a_tiny_model_here() -> None:
    assert set(CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_path_resolves(model_type: str) -> None:
    model = tiny(model_type)
    a = adapter_for(model)
    assert a.model_type == model_type
    assert a.n_layers(model) == 2
    for layer in range(2):
        a.block(model, layer)
        a.mlp_module(model, layer)
        a.attn_module(model, layer)
        for name in a.mlp_in:
            model.get_submodule(f"{a.block_name(layer)}.{name}")
    assert a.embed_module(model) is model.get_input_embeddings()
    assert a.unembed_module(model) is model.get_output_embeddings()
    a.final_norm_module(model)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_down_weight_is_d_model_by_d_mlp(model_type: str) -> None:
    model = tiny(model_type)
    a = adapter_for(model)
    assert tuple(a.down_weight(model, 1).shape) == (D_MODEL, D_MLP)
    assert (a.d_model(model), a.d_mlp(model)) == (D_MODEL, D_MLP)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_down_weight_maps_mlp_hidden_to_the_residual_stream(model_type: str) -> None:
    """down_weight is in nn.Linear orientation: the module's output is W x (+ bias)."""
    model = tiny(model_type)
    a = adapter_for(model)
    module = a.mlp_out_module(model, 0)
    x = torch.randn(3, D_MLP)
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    with torch.no_grad():
        torch.testing.assert_close(module(x), x @ a.down_weight(model, 0).T + bias)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_add_to_down_weight_changes_the_forward_output(model_type: str) -> None:
    model = tiny(model_type)
    a = adapter_for(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
        W = a.down_weight(model, 1).clone()
        delta = torch.randn(D_MODEL, D_MLP, dtype=torch.float64)
        a.add_to_down_weight(model, 1, delta)
        after = model(ids).logits
    torch.testing.assert_close(a.down_weight(model, 1), W + delta.float())
    assert (after - before).abs().max() > 1e-3


def test_unknown_model_type_names_it() -> None:
    with pytest.raises(UnknownModelType, match="'mamba'.*known types: gpt2"):
        adapter_for("mamba")
