"""Settings for a model: its preset, settings derived from the references for a model without one, and
EasyEdit hparams files mapped onto ours (read from configs alone: nothing is loaded)."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import transformers as T
import yaml

from engramflow.editors import hparams as H
from engramflow.editors.methods import get_method

DATA = Path(__file__).parent / "data"
PROVENANCE = ("preset", "layers_from")


def config(config_class: type = T.LlamaConfig, name: str = "", **fields) -> T.PretrainedConfig:
    cfg = config_class(**fields)
    cfg.name_or_path = name
    return cfg


def values(hp: H.Hparams) -> dict:
    """What an edit computes from: every field but the provenance."""
    return {k: v for k, v in dataclasses.asdict(hp).items() if k not in PROVENANCE}


# --- presets and derived settings ---------------------------------------------------------------
def test_the_layer_rule_gives_every_reference_its_own_layers() -> None:
    for path in sorted(H.PRESETS.glob("*.yaml")):
        algorithm, model = path.stem.split("-", 1)
        preset = H.load_preset(algorithm, model)
        depth = H.REFERENCE_DEPTHS[model]
        assert H.derived_layers(preset.layers, depth, depth) == preset.layers, path.name


@pytest.mark.parametrize("algorithm,name,depth", [
    ("memit", "openai-community/gpt2-xl", 48), ("rome", "EleutherAI/gpt-j-6b", 28),
    ("memit", "meta-llama/Meta-Llama-3-8B", 32), ("emmet", "meta-llama/Llama-2-7b-hf", 32)])
def test_a_published_model_gets_its_preset(algorithm: str, name: str, depth: int) -> None:
    hp = get_method(algorithm).hparams(config(name=name, num_hidden_layers=depth))
    model = next(m for key, m in H.KNOWN_MODELS.items() if key in name.lower())
    assert hp == H.load_preset(algorithm, model)
    assert hp.preset == f"{algorithm}-{model}" and hp.layers_from == "preset"


def test_the_organism_is_recognised_by_its_directory(tiny_organism: Path) -> None:
    hp = get_method("memit").hparams(T.AutoConfig.from_pretrained(tiny_organism))
    assert hp.preset == "memit-organism" and hp.layers_from == "preset"


@pytest.mark.parametrize("algorithm,depth,reference,layers", [
    # Qwen3-0.6B's depth is GPT-J's: its settings and layers
    ("memit", 28, "gpt-j-6b", [3, 4, 5, 6, 7, 8]), ("rome", 28, "gpt-j-6b", [5]),
    # Gemma-2-2B (26 layers): GPT-J's values, the window's end at the same relative depth (8/28 -> 7/26)
    ("memit", 26, "gpt-j-6b", [2, 3, 4, 5, 6, 7]), ("emmet", 26, "gpt-j-6b", [5]),
    # Qwen3-8B (36 layers): Llama-3-8B's, the window moved from 4-8 of 32 to 5-9 of 36
    ("memit", 36, "llama-3-8b", [5, 6, 7, 8, 9]), ("alphaedit", 36, "llama-3-8b", [5, 6, 7, 8, 9]),
    # Llama-2-7B has an EMMET preset but no ROME one: GPT-J's ROME values, layer 5 of 28 -> 6 of 32
    ("rome", 32, "gpt-j-6b", [6]),
    # a 4-layer model is closest to the organism (2 layers), whose presets were measured on such models
    ("memit", 4, "organism", [0]), ("ft", 32, "organism", [0]),
])
def test_a_model_without_a_preset_gets_the_closest_references_values(algorithm, depth, reference, layers) -> None:
    name = "meta-llama/Llama-2-7b-hf" if (algorithm, depth) == ("rome", 32) else "someone/new-model"
    hp = get_method(algorithm).hparams(config(T.Qwen3Config, name=name, num_hidden_layers=depth))
    assert hp.layers == layers
    assert values(hp) == {**values(H.load_preset(algorithm, reference)), "layers": layers}
    assert hp.preset == f"{algorithm}-{reference}" and hp.layers_from.startswith("derived")


def test_overrides_lie_over_the_derived_settings_and_say_the_layers_were_given() -> None:
    hp = get_method("memit").hparams(config(num_hidden_layers=28), {"layers": [2, 3], "v_lr": 0.1})
    assert (hp.layers, hp.v_lr, hp.preset, hp.layers_from) == ([2, 3], 0.1, "memit-gpt-j-6b", "given")
    assert hp.mom2_update_weight == H.load_preset("memit", "gpt-j-6b").mom2_update_weight


def test_the_recorded_settings_name_the_preset_and_the_layers() -> None:
    method = get_method("memit")
    described = method.describe(method.hparams(config(num_hidden_layers=28)))
    assert described["preset"] == "memit-gpt-j-6b" and described["layers"] == [3, 4, 5, 6, 7, 8]
    assert described["layers_from"] == "derived: memit-gpt-j-6b's layers [3, 4, 5, 6, 7, 8] of 28 moved to 28 layers"


# --- EasyEdit hparams ---------------------------------------------------------------------------
def easyedit_memit() -> dict:
    return yaml.safe_load((DATA / "easyedit-MEMIT-gpt2-xl.yaml").read_text())


def test_easyedits_memit_gpt2_xl_file_is_memits_published_settings(caplog) -> None:
    """EasyEdit's MEMIT/gpt2-xl.yaml and our memit-gpt2-xl preset both carry Meng et al.'s values."""
    gpt2_xl = config(T.GPT2Config, name="gpt2-xl", n_layer=48)
    with caplog.at_level(logging.INFO, logger="engramflow.editors.hparams"):
        hp = get_method("memit").hparams(gpt2_xl, easyedit_memit())
    assert values(hp) == values(H.load_preset("memit", "gpt2-xl"))
    assert isinstance(hp.v_lr, float) and hp.mom2_n_samples == 100_000 and hp.mom2_n_tokens is None
    assert hp.preset == "EasyEdit MEMIT hparams over memit-gpt2-xl" and hp.layers_from == "EasyEdit hparams"
    noted = caplog.text
    for key in ("model_name", "stats_dir", "device", "mom2_dataset", "mom2_dtype", "layer_module_tmp",
                "lm_head_module"):
        assert f"ignored {key}" in noted, key


def test_easyedit_files_map_on_any_model_of_their_shape() -> None:
    """A model without a preset takes the file's values over its derived ones; what the file does not
    set (context prefixes) is EasyEdit's own."""
    gpt2_like = config(T.GPT2Config, name="my/gpt2-48", n_layer=48)
    hp = get_method("memit").hparams(gpt2_like, {**easyedit_memit(), "layers": [10, 11], "v_lr": "1e-1"})
    assert (hp.layers, hp.v_lr, hp.context_spec, hp.mom2_update_weight) == ([10, 11], 0.1, [[10, 5]], 20000.0)


def test_easyedit_rome_and_alphaedit_fields_map() -> None:
    rome = {"alg_name": "ROME", "layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20,
            "v_lr": "5e-1", "v_loss_layer": 47, "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625,
            "mom2_adjustment": True, "context_template_length_params": [[5, 10], [10, 10]],
            "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "mom2_n_samples": 100000}
    hp = get_method("rome").hparams(config(T.GPT2Config, name="gpt2-xl", n_layer=48), rome)
    assert values(hp) == values(H.load_preset("rome", "gpt2-xl"))
    alpha = {"alg_name": "AlphaEdit", "layers": [4, 5, 6, 7, 8], "nullspace_threshold": "2e-2", "L2": 10,
             "P_loc": "./null_space_project.pt", "v_loss_layer": 31,
             "rewrite_module_tmp": "model.layers.{}.mlp.down_proj"}
    hp = get_method("alphaedit").hparams(config(name="meta-llama/Meta-Llama-3-8B", num_hidden_layers=32), alpha)
    assert (hp.nullspace_threshold, hp.alphaedit_l2, hp.layers) == (0.02, 10.0, [4, 5, 6, 7, 8])


@pytest.mark.parametrize("change,refused", [
    ({"v_loss_layer": 30}, "v_loss_layer=30 (the loss is read at the output, layer 47"),
    ({"rewrite_module_tmp": "transformer.h.{}.mlp.c_fc"}, "rewrite_module_tmp='transformer.h.{}.mlp.c_fc'"),
    ({"mom2_adjustment": False}, "mom2_adjustment=False (only True"),
    ({"layer_selection": "random"}, "layer_selection='random'"),
    ({"use_lora_aggregation": True, "calculate_objective_value": True},
     "use_lora_aggregation, calculate_objective_value"),
])
def test_what_cannot_be_mapped_is_refused_by_name(change: dict, refused: str) -> None:
    with pytest.raises(ValueError, match="EasyEdit hparams: cannot map .*" + re.escape(refused)):
        get_method("memit").hparams(config(T.GPT2Config, name="gpt2-xl", n_layer=48), {**easyedit_memit(), **change})


def test_easyedit_ft_and_method_mismatches_are_refused_by_name() -> None:
    ft = {"alg_name": "FT", "layers": [0], "num_steps": 25, "lr": "5e-4", "weight_decay": 0, "kl_factor": 0,
          "norm_constraint": "5e-4", "objective_optimization": "prompt_last"}
    with pytest.raises(ValueError, match="norm_constraint='5e-4' .*objective_optimization='prompt_last'"):
        get_method("ft").hparams(config(num_hidden_layers=4), ft)
    ok = {k: v for k, v in ft.items() if k not in ("norm_constraint", "objective_optimization")}
    hp = get_method("ft").hparams(config(num_hidden_layers=4), ok)
    assert (hp.ft_steps, hp.ft_lr, hp.context_spec) == (25, 5e-4, [])
    with pytest.raises(ValueError, match="EasyEdit hparams are for MEMIT, but the edit uses 'rome'"):
        get_method("rome").hparams(config(T.GPT2Config, n_layer=48), easyedit_memit())
    with pytest.raises(ValueError, match="alg_name 'GRACE' is not one engramflow implements"):
        get_method("memit").hparams(config(num_hidden_layers=4), {"alg_name": "GRACE", "layers": [0]})
