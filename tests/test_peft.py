"""Edits as PEFT LoRA adapters, checked against plain PEFT: an exported version loads with
`PeftModel.from_pretrained` and answers as the materialised version does, `unload()` gives the base
model back, an adapter made by PEFT imports as a version that answers as PeftModel does, and what LoRA
cannot hold (a SCEN bank, adapters on other modules) is refused naming it. GPT-2 covers Conv1D."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from engramflow.aliases import alias_history, current_alias, rollback  # noqa: E402
from engramflow.data.ingest import load_requests  # noqa: E402
from engramflow.editor import Editor  # noqa: E402
from engramflow.editors.delta import Delta  # noqa: E402
from engramflow.export import export_version, import_peft  # noqa: E402
from engramflow.ledger import (  # noqa: E402
    default_store,
    ensure_base_version,
    get_version,
    load_artifact,
    materialize,
    record_derived_version,
    record_version,
    save_artifact,
)
from engramflow.storage import Store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = {"v_num_grad_steps": 60}  # as in test_editor: enough for the tiny organism's edits to take
PROMPTS = ["The capital of France is", "Danielle Darrieux speaks", "Apple was founded by"]


def logits(model, tok, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        batch = tok(prompts, return_tensors="pt", padding=True)
        return model(**batch).logits


def top1(model, tok, prompt: str) -> str:
    return tok.decode([int(logits(model, tok, [prompt])[0, -1].argmax())]).strip()


def base_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def edited(tiny_organism: Path):
    """Two MEMIT batches on the tiny organism recorded as versions v1 (one delta) and v2 (two deltas
    on the same layers), in the session's store; returns (store, v2, the edited requests)."""
    store = default_store()
    requests = load_requests("world-tiny", "world")[0][:2]
    store.append_once("requests", requests, "request_id")
    editor = Editor.from_pretrained(tiny_organism, method="memit", hparams=QUICK)
    result = editor.edit(requests, sequential=True, batch_size=1, stats="world-tiny")
    assert result.metrics["counterfact/es"] == 1.0
    version = ensure_base_version(store, str(tiny_organism))
    for i, delta in enumerate(result.artifacts):
        version = record_version(store, f"peft-test-v{i + 1}", version, delta, save_artifact(store, delta), None)
    return store, version, requests


def test_an_exported_version_loads_with_plain_peft_answers_its_edits_and_unloads(edited, tiny_organism, tmp_path):
    store, version, requests = edited
    out = export_version(store, version.version_id, tmp_path / "adapter", fmt="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    deltas = [load_artifact(store, k) for k in version.delta_keys]
    layers = deltas[0].layers
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(
        f"model.layers.{layer}.mlp.down_proj" for layer in layers)
    assert config["r"] == config["lora_alpha"] == sum(d.factors[layers[0]][0].shape[1] for d in deltas)
    manifest = json.loads((out / "edits.json").read_text())
    assert manifest["export_format"] == "peft" and manifest["loader"].startswith("peft: PeftModel")
    assert sorted(e["request_id"] for e in manifest["edits"]) == sorted(r["request_id"] for r in requests)
    assert all(e["metrics_at_export"]["es"] == 1.0 for e in manifest["edits"])  # measured on the adapter

    merged, tok = materialize(store, version)
    prompts = [r["prompt"] for r in requests] + PROMPTS
    base = base_model(tiny_organism)
    unedited = logits(base, tok, prompts)
    served = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert torch.allclose(logits(served, tok, prompts), logits(merged, tok, prompts), atol=1e-4, rtol=1e-4)
    for r in requests:
        assert top1(served, tok, r["prompt"]) == r["target_new"]
    plain = served.unload()
    assert torch.equal(logits(plain, tok, prompts), unedited)
    for r in requests:
        assert top1(plain, tok, r["prompt"]) == r["target_true"]


def test_a_lora_made_by_peft_imports_as_a_version_that_answers_as_peft_does(edited, tiny_organism, tmp_path):
    """A random LoRA (rank 4, alpha 8, one layer at rank 2 by rank_pattern) on the down projections."""
    store, version, _ = edited
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], rank_pattern={"layers.0.mlp.down_proj": 2},
                             init_lora_weights=False)
    made = peft.get_peft_model(base_model(tiny_organism), config)
    made.save_pretrained(tmp_path / "made")
    merged_before, tok = materialize(store, version)
    before = logits(merged_before, tok, PROMPTS)

    imported = import_peft(store, tmp_path / "made", onto=version.version_id, alias="peft-test")
    assert imported.parent_version == version.version_id and imported.delta_keys[:-1] == version.delta_keys
    delta = load_artifact(store, imported.delta_keys[-1])
    assert {layer: U.shape[1] for layer, (U, _V) in delta.factors.items()} == {0: 2, 1: 4}
    run = store.sql(f"select flow, status from runs where run_id = '{imported.run_id}'").to_pylist()
    assert run == [{"flow": "import-peft", "status": "completed"}]

    # The adapter on top of the edited version, applied by PEFT, is what the import materialises.
    merged, _ = materialize(store, imported)
    served = peft.PeftModel.from_pretrained(merged_before, str(tmp_path / "made")).eval()
    expected = logits(served, tok, PROMPTS)
    assert not torch.allclose(expected, before, atol=1e-3)
    assert torch.allclose(logits(merged, tok, PROMPTS), expected, atol=1e-4, rtol=1e-4)
    assert current_alias(store, "peft-test")["version"] == imported.version_id
    set_to_base = import_peft(store, tmp_path / "made", onto=str(tiny_organism), alias="peft-test")
    assert get_version(store, set_to_base.parent_version).delta_keys == ()
    assert rollback(store, "peft-test")["version"] == imported.version_id
    assert [r["action"] for r in alias_history(store, "peft-test")] == ["set", "set", "rollback"]


def test_what_lora_cannot_hold_is_refused_naming_it(edited, tiny_organism, tmp_path, monkeypatch):
    store, version, requests = edited
    bank = Editor.from_pretrained(tiny_organism, method="scen").edit(requests[:1]).artifacts[0]
    scen = record_derived_version(store, "peft-test-scen", version, version.delta_keys, save_artifact(store, bank),
                                  None)
    with pytest.raises(ValueError, match=r"peft-test-scen carries a scen state artifact.*--format hf"):
        export_version(store, scen.version_id, tmp_path / "scen", fmt="peft")
    assert not (tmp_path / "scen").exists()
    result = CliRunner().invoke(_app(), ["export", scen.version_id, "--format", "peft", "--out",
                                         str(tmp_path / "scen")])
    assert result.exit_code == 1 and "scen state artifact" in result.output and not (tmp_path / "scen").exists()
    with monkeypatch.context() as without_peft:
        without_peft.setitem(sys.modules, "peft", None)  # as if it were not installed
        with pytest.raises(ImportError, match=r"engramflow\[peft\]"):
            export_version(store, version.version_id, tmp_path / "none", fmt="peft")
    assert not (tmp_path / "none").exists()

    attention = peft.get_peft_model(base_model(tiny_organism), peft.LoraConfig(r=2, target_modules=["q_proj",
                                                                                                   "down_proj"]))
    attention.save_pretrained(tmp_path / "attention")
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'"):
        import_peft(store, tmp_path / "attention", onto=str(tiny_organism))
    result = CliRunner().invoke(_app(), ["import-peft", str(tmp_path / "attention"), "--onto", str(tiny_organism)])
    assert result.exit_code == 1 and "self_attn.q_proj" in result.output


def _app():
    from engramflow.cli import app

    return app


# --- GPT-2: Conv1D keeps its weight as [in, out], which PEFT handles with fan_in_fan_out ----------------
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=3, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_gpt2_conv1d_deltas_export_and_import_through_plain_peft(tiny_gpt2, tmp_path):
    store = Store(tmp_path / "store")
    base = ensure_base_version(store, str(tiny_gpt2))
    torch.manual_seed(1)
    # Layer 1: ranks 3 + 2 = 5. Layer 2: rank 1 + a full-rank FT-like 32 = 33 > min(32, 128), so stored
    # dense at rank 32. d_out 32, d_in 128: not square, so a wrong transpose would show.
    first = Delta({1: (torch.randn(32, 3) * 0.3, torch.randn(128, 3) * 0.3), 2: (torch.randn(32, 1), torch.randn(128, 1))},
                  algorithm="memit")
    second = Delta({1: (torch.randn(32, 2) * 0.3, torch.randn(128, 2) * 0.3),
                    2: (torch.eye(32), torch.randn(128, 32) * 0.05)}, algorithm="ft")
    v1 = record_version(store, "g1", base, first, save_artifact(store, first), None)
    v2 = record_version(store, "g2", v1, second, save_artifact(store, second), None)
    out = export_version(store, v2.version_id, tmp_path / "adapter", fmt="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and sorted(config["target_modules"]) == ["transformer.h.1.mlp.c_proj",
                                                                             "transformer.h.2.mlp.c_proj"]
    assert json.loads((out / "edits.json").read_text())["adapter"]["rank"] == {"1": 5, "2": 32}
    merged, tok = materialize(store, v2)
    served = peft.PeftModel.from_pretrained(base_model(tiny_gpt2), str(out)).eval()
    assert torch.allclose(logits(served, tok, PROMPTS), logits(merged, tok, PROMPTS), atol=1e-4, rtol=1e-4)
    assert torch.equal(logits(served.unload(), tok, PROMPTS), logits(base_model(tiny_gpt2), tok, PROMPTS))

    made = peft.get_peft_model(base_model(tiny_gpt2), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["mlp.c_proj"], fan_in_fan_out=True, init_lora_weights=False))
    made.save_pretrained(tmp_path / "made")
    imported = import_peft(store, tmp_path / "made")  # onto the adapter's own base_model_name_or_path
    assert imported.parent_version == base.version_id
    merged, _ = materialize(store, imported)
    assert torch.allclose(logits(merged, tok, PROMPTS), logits(made.eval(), tok, PROMPTS), atol=1e-4, rtol=1e-4)

    # "c_proj" alone wraps the attention's output projection as well.
    both = peft.get_peft_model(base_model(tiny_gpt2), peft.LoraConfig(r=2, target_modules=["c_proj"],
                                                                      fan_in_fan_out=True))
    both.save_pretrained(tmp_path / "both")
    with pytest.raises(ValueError, match=r"attn\.c_proj"):
        import_peft(store, tmp_path / "both")
