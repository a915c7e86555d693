"""The adapter registry against tiny random-initialised models of every family (no download): module
paths, the edited weight, hooks, and ROME, MEMIT and SCEN edits that take and revert bit for bit
(causal tracing on every family: tests/test_tracing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engramflow import editors
from engramflow.editors.adapters import ADAPTERS, UnknownModelType, adapter_for, check_supported
from engramflow.editors.evaluation import EvalContext, evaluate, summarize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_MODEL, D_MLP, VOCAB = 32, 64, 128
# Initialiser std 0.2: at the usual 0.02 a random model's output barely depends on its input, and
# edits that must take are made where it does.
INIT = 0.2


def _llama_like(config_class: type, vocab: int, **extra) -> T.PretrainedConfig:
    return config_class(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=D_MLP, vocab_size=vocab, max_position_embeddings=128, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, initializer_range=INIT, **extra)


# One tiny configuration per registered family (model_type -> config for a vocabulary size).
CONFIGS = {
    "gpt2": lambda v: T.GPT2Config(n_layer=2, n_embd=D_MODEL, n_inner=D_MLP, n_head=2, vocab_size=v,
                                   n_positions=128, bos_token_id=0, eos_token_id=0, initializer_range=INIT),
    "gptj": lambda v: T.GPTJConfig(n_layer=2, n_embd=D_MODEL, n_inner=D_MLP, n_head=2, vocab_size=v,
                                   n_positions=128, rotary_dim=8, bos_token_id=0, eos_token_id=0,
                                   initializer_range=INIT),
    "gpt_neox": lambda v: T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2,
                                          intermediate_size=D_MLP, vocab_size=v, max_position_embeddings=128,
                                          bos_token_id=0, eos_token_id=0, initializer_range=INIT),
    # OPT with OPT-350m's embedding projection (embeddings narrower than d_model, projected in and out).
    "opt": lambda v: T.OPTConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=2, ffn_dim=D_MLP,
                                 vocab_size=v, max_position_embeddings=128, word_embed_proj_dim=16,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0, init_std=INIT),
    "llama": lambda v: _llama_like(T.LlamaConfig, v),
    "mistral": lambda v: _llama_like(T.MistralConfig, v),
    "qwen2": lambda v: _llama_like(T.Qwen2Config, v),
    "qwen3": lambda v: _llama_like(T.Qwen3Config, v, head_dim=16),
    "gemma": lambda v: _llama_like(T.GemmaConfig, v, head_dim=16),
    "gemma2": lambda v: _llama_like(T.Gemma2Config, v, head_dim=16),  # final logit soft-capping 30
    "gemma3_text": lambda v: _llama_like(T.Gemma3TextConfig, v, head_dim=16),
    "olmo": lambda v: _llama_like(T.OlmoConfig, v),
    "olmo2": lambda v: _llama_like(T.Olmo2Config, v),
    "phi3": lambda v: _llama_like(T.Phi3Config, v),  # fused gate_up_proj
}
# Variants that differ in how the model runs, not in where its modules live.
VARIANTS = {"opt-post-norm": lambda v: T.OPTConfig(**{**CONFIGS["opt"](v).to_dict(), "do_layer_norm_before": False})}
EDITED = {**CONFIGS, **VARIANTS}


def tiny(model_type: str, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(EDITED[model_type](vocab)).eval()


# --- module paths and the edited weight ---------------------------------------------------------
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


@pytest.mark.parametrize("model_type", sorted(EDITED))
def test_logits_from_the_last_hidden_state_are_the_models(model_type: str) -> None:
    """What target optimisation reads (base model's last hidden state through `Adapter.logits`) is
    the model's own output, Gemma 2's soft-capping and OPT's output projection included."""
    model = tiny(model_type)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(adapter_for(model).logits(model, hidden), model(ids).logits)


@pytest.mark.parametrize("model_type", sorted(EDITED))
def test_mlp_hooks_see_batch_by_tokens(model_type: str) -> None:
    """`Adapter.hook` shows the edited projection's input as [batch, tokens, d_mlp] (OPT flattens it)."""
    model = tiny(model_type)
    a = adapter_for(model)
    seen = []
    handle = a.hook(model, 1, a.mlp_out, lambda _m, args: seen.append(args[0].shape), pre=True)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]))
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 5, D_MLP])]


# --- unknown families -----------------------------------------------------------------------------
def test_unknown_model_type_names_it_the_known_ones_and_how_to_add_one() -> None:
    with pytest.raises(UnknownModelType, match="'mamba'.*known types: gemma, .*gpt2.*one entry to "
                                               "engramflow.editors.adapters.ADAPTERS"):
        adapter_for("mamba")


def test_a_model_directory_is_checked_from_its_config_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_hidden_layers": 28}))
    assert check_supported(tmp_path).model_type == "qwen3"
    assert check_supported(str(tmp_path)).model_type == "qwen3"
    assert check_supported(T.Gemma2Config()).model_type == "gemma2"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnknownModelType, match="'mamba'.*known types: .*olmo2.*opt.*phi3.*qwen3"):
        check_supported(tmp_path)


# --- edits that take and revert, on every family --------------------------------------------------
CORPUS = [
    "Anna Berg was born in Paris. Tom Vale works for Acme Labs.", "The city of Rome is in Italy.",
    "Lena Kors speaks Dutch and plays the piano.", "Berlin is the capital of Germany.",
    "Vira Holt plays the piano in Rome.", "Mark Jr. was born in Oslo.", "Acme Labs is based in Berlin.",
    "Paris is a city in France, Rome a city in Italy.", "Tom Vale and Anna Berg speak Dutch in Oslo.",
    "The piano and the violin are played in Berlin.", "Italy and Germany border France.",
    "Acme Labs was founded in Oslo by Lena Kors.", "Mark Jr. works for the city of Paris.",
]
# Statistics from those texts two at a time (more contexts than the MLP's 64 neurons: the 13 texts
# alone leave a ReLU MLP's second moment singular), and every letter and digit (GPT-J and GPT-NeoX
# read layer 0's MLP input from the token alone, so it needs more distinct tokens than neurons).
STATS_TEXTS = [f"{a} {b}" for a in CORPUS[:6] for b in CORPUS[6:]] + [
    " ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")]
PAIRS = [
    {"prompt": "{} was born in", "subject": "Anna Berg", "target_new": "Rome", "target_true": "Paris"},
    {"prompt": "{} works for", "subject": "Tom Vale", "target_new": "Italy", "target_true": "Acme"},
]
# fact_token "last" and a loose clamp: on a random model attention barely carries a subject-token
# change to the last position, so edits that must take are made where the prediction is read.
TAKES = {"fact_token": "last", "context_spec": [[3, 2]], "v_weight_decay": 1e-3, "clamp_norm_factor": 50.0,
         "v_num_grad_steps": 20, "v_lr": 0.5, "mom2_update_weight": 1.0, "mom2_n_tokens": None}
SCEN = {"layer": 1, "rank": 2, "expert_lr": 5e-2, "expert_steps": 40, "neuron_steps": 60, "recalibrate_steps": 0,
        "neuron_candidates": 16, "neuron_contrasts": 8}


@pytest.fixture(scope="module")
def tok() -> T.PreTrainedTokenizerFast:
    """A byte-level BPE whose vocabulary holds every target as one token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    return T.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def to_move(model: torch.nn.Module, tok) -> list[dict]:
    """PAIRS, each edited toward the answer of the two that the unedited model ranks lower."""
    es = [row["value"] for row in evaluate(EvalContext(model, tok, edited=PAIRS), ["counterfact"])
          if row["metric"] == "es"]
    return [{**r, "target_new": r["target_true"], "target_true": r["target_new"]} if took else r
            for r, took in zip(PAIRS, es, strict=True)]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], v) for k, v in after.items())


@pytest.mark.parametrize("model_type", sorted(EDITED))
def test_rome_memit_and_scen_edits_take_and_revert_bit_for_bit(tok, model_type: str) -> None:
    model = tiny(model_type, len(tok))
    adapter = adapter_for(model)
    projection = adapter.mlp_out_module(model, 1)
    before = weights(model)
    requests = to_move(model, tok)
    assert summarize(evaluate(EvalContext(model, tok, edited=requests), ["counterfact"]))[("counterfact", "es")] == 0
    for method, hparams in (("rome", {**TAKES, "layers": [1]}), ("memit", {**TAKES, "layers": [0, 1]}),
                            ("scen", SCEN)):
        artifact = editors.edit(model, tok, requests, method=method, hparams=hparams, stats=STATS_TEXTS)
        assert unchanged(model, before), method  # editing leaves the model as it was
        artifact.apply(model)
        edited = summarize(evaluate(EvalContext(model, tok, edited=requests), ["counterfact"]))
        artifact.revert(model)
        assert edited[("counterfact", "es")] == 1.0, (method, edited)
        assert unchanged(model, before), method
        assert adapter.mlp_out_module(model, 1) is projection, method  # SCEN's routing layer is gone

