"""The Editor facade on the tiny organism: edits that take and are scored, exact reverts, sequential
edits that keep the method's history and state, EasyEdit files, and no pipeline underneath."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engramflow import editors
from engramflow.data.ingest import load_requests
from engramflow.data.world import named_world
from engramflow.editor import Editor
from engramflow.editors.adapters import UnknownModelType
from engramflow.editors.scen import attached

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Fewer target steps than the organism's presets (200): these edits take on the tiny organism all the same.
QUICK = {"v_num_grad_steps": 60}


@pytest.fixture(scope="module")
def requests() -> list[dict]:
    return load_requests("world-tiny", "world")[0]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], v) for k, v in after.items())


def test_sequential_edits_take_are_scored_and_revert_bit_for_bit(tiny_organism: Path, requests) -> None:
    editor = Editor.from_pretrained(tiny_organism, method="memit", hparams=QUICK)
    assert editor.settings["preset"] == "memit-organism"
    unedited = snapshot(editor.model)
    first = editor.edit(requests[:4], sequential=True, batch_size=2, stats="world-tiny")
    assert len(first.artifacts) == 2 and first.model is editor.model
    assert first.before["counterfact/es"] == 0.0 and first.metrics["counterfact/es"] >= 0.75
    assert {"counterfact/ps", "counterfact/ns", "counterfact/s"} <= set(first.metrics)
    assert {r["request_id"] for r in first.rows} == {r["request_id"] for r in requests[:4]}
    after_first = snapshot(editor.model)
    assert not same(editor.model, unedited)  # the edits are in the model
    second = editor.edit(requests[4:6], stats="world-tiny")
    assert second.before["counterfact/es"] == 0.0 and second.metrics["counterfact/es"] == 1.0
    second.revert()
    assert same(editor.model, after_first)
    first.revert()
    assert same(editor.model, unedited) and editor.applied == []


def test_alphaedit_sequential_edits_preserve_the_earlier_ones(tiny_organism: Path, requests) -> None:
    """The second call's delta is AlphaEdit's with the first call's delta as history, computed on the
    model with it applied: what the pipeline computes for batch 2."""
    editor = Editor.from_pretrained(tiny_organism, method="alphaedit", hparams=QUICK)
    hp = editor.hparams
    moments = editors.layer_stats(editor.model, editor.tok, hp.layers, named_world("world-tiny").corpus_text()
                                  .splitlines(), max_tokens=hp.mom2_n_tokens)
    first = editor.edit(requests[:2], stats=moments)
    second = editor.edit(requests[2:4])
    second.revert()  # the model as the second call found it
    with_history = editors.edit(editor.model, editor.tok, requests[2:4], "alphaedit", hp, moments,
                                history=first.artifacts)
    alone = editors.edit(editor.model, editor.tok, requests[2:4], "alphaedit", hp, moments)
    (layer,) = second.artifacts[0].layers
    assert torch.equal(second.artifacts[0].matrix(layer), with_history.matrix(layer))
    assert not torch.allclose(with_history.matrix(layer), alone.matrix(layer))
    editor.revert()


def test_scen_sequential_edits_grow_one_bank_and_revert_to_the_previous_bank(tiny_organism: Path, requests):
    editor = Editor.from_pretrained(tiny_organism, method="scen")
    unedited = snapshot(editor.model)
    projection = editor.model.get_submodule("model.layers.1.mlp.down_proj")
    first = editor.edit(requests[:2])
    second = editor.edit(requests[2:4])
    bank = second.artifacts[0]
    assert bank.request_ids == [r["request_id"] for r in requests[:4]]  # the first call's experts kept
    assert attached(editor.model).bank is bank and second.metrics["counterfact/es"] == 1.0
    second.revert()
    assert attached(editor.model).bank is first.artifacts[0]
    first.revert()
    assert same(editor.model, unedited) and editor.model.get_submodule("model.layers.1.mlp.down_proj") is projection


def test_unsequential_batches_are_each_edited_into_the_model_as_it_was(tiny_organism: Path, requests) -> None:
    editor = Editor.from_pretrained(tiny_organism, method="rome", hparams=QUICK)
    unedited = snapshot(editor.model)
    result = editor.edit(requests[:3], sequential=False, batch_size=1, stats="world-tiny")
    assert same(editor.model, unedited) and editor.applied == []
    assert len(result.artifacts) == 3 and result.metrics["counterfact/es"] >= 2 / 3
    assert sorted({r["request_id"] for r in result.rows}) == sorted(r["request_id"] for r in requests[:3])


def test_requests_without_target_true_are_scored_like_zsre(tiny_organism: Path, requests) -> None:
    editor = Editor.from_pretrained(tiny_organism, method="memit", hparams=QUICK)
    bare = [{k: v for k, v in r.items() if k != "target_true"} for r in requests[:2]]
    result = editor.edit(bare, stats="world-tiny")
    assert result.metrics["zsre/efficacy"] == 1.0 and result.before["zsre/efficacy"] < 1.0
    assert result.metrics["zsre/locality"] is not None  # against the unedited model's answers
    result.revert()


def test_an_easyedit_file_names_the_method_and_the_model(tiny_organism: Path, tmp_path: Path, requests) -> None:
    path = tmp_path / "memit.yaml"
    path.write_text(json.dumps({
        "alg_name": "MEMIT", "model_name": str(tiny_organism), "device": 0, "stats_dir": "./data/stats",
        "layers": [0], "v_num_grad_steps": 60, "v_lr": "2.0", "v_loss_layer": 1, "clamp_norm_factor": 10,
        "v_weight_decay": 0.1, "mom2_update_weight": 250, "mom2_n_samples": 1000,
        "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "mom2_dataset": "wikipedia"}))
    editor = Editor.from_hparams(path)
    assert editor.method.name == "memit" and editor.hparams.mom2_n_samples == 1000
    assert editor.settings["preset"] == "EasyEdit MEMIT hparams over memit-organism"
    result = editor.edit(requests[:2], stats="world-tiny")
    assert result.metrics["counterfact/es"] == 1.0
    result.revert()


def test_an_unknown_family_fails_before_any_weight_loads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 4}))
    with pytest.raises(UnknownModelType, match="'mamba'.*known types: .*qwen3.*one entry"):
        Editor.from_pretrained(tmp_path)  # no weights there: a load would fail otherwise


def test_methods_that_need_statistics_say_so(tiny_organism: Path, requests) -> None:
    editor = Editor.from_pretrained(tiny_organism, method="memit")
    with pytest.raises(ValueError, match="memit needs preservation statistics: pass stats="):
        editor.edit(requests[:1])


def test_the_facade_imports_no_pipeline() -> None:
    code = ("import sys, engramflow.editor, engramflow.editors.methods as m; m.load_all(); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'ray', 'prefect_ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
