"""Editing hyper-parameters and the YAML presets in `editors/presets/` (`<algorithm>-<model>.yaml`).

A model with a preset of its own (its name says gpt2-xl, gpt-j-6b, llama-2-7b or llama-3-8b, or it is the
embedded organism) gets that preset. Any other model gets settings derived from the references:

- the values of the method's preset whose model is closest in depth (number of layers, compared on a
  log scale; the organism, 2 layers, is the reference for small models);
- the layers of that preset moved to the model's depth: the last edited layer (where targets are
  computed) at the same relative depth, round(last · depth / reference depth), and the window as wide as
  the reference's (as far as the layers below allow). On the references themselves this gives back their
  own layers: ROME/EMMET gpt2-xl 48 -> 17, gpt-j 28 -> 5; MEMIT gpt2-xl 13-17, gpt-j 3-8, llama-3 4-8.
  `--layers auto` (causal tracing) replaces them.

`from_easyedit` maps an EasyEdit hparams file (ROME, MEMIT, EMMET, AlphaEdit, FT) onto these settings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from engramflow.editors.keys import FACT_TOKENS

log = logging.getLogger(__name__)

PRESETS = Path(__file__).parent / "presets"
# Substrings of a model's name_or_path (lower case) -> the preset model name.
KNOWN_MODELS = {"gpt2-xl": "gpt2-xl", "gpt-j-6b": "gpt-j-6b", "llama-2-7b": "llama-2-7b",
                "llama-3-8b": "llama-3-8b"}
# The depth (transformer blocks) of every preset's model: what a model without a preset is compared with.
REFERENCE_DEPTHS = {"gpt2-xl": 48, "gpt-j-6b": 28, "llama-2-7b": 32, "llama-3-8b": 32, "organism": 2}
# The embedded organism's directory holds its build report under this name (engramflow.organism).
ORGANISM_REPORT = "organism.json"


@dataclass
class Hparams:
    layers: list[int]  # edited layers, ascending; targets are computed at the last one
    fact_token: str = "subject_last"
    context_spec: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])  # (length, count)
    # target values (ROME/MEMIT compute_v)
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    # preservation (solver)
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1
    nullspace_threshold: float = 2e-2
    alphaedit_l2: float = 10.0  # AlphaEdit's ridge on the projected update
    # Preservation statistics: how many keys, counted in tokens (this project's unit) or in texts (the
    # references' mom2_n_samples; a preset sets one of the two), and whether texts that mention a subject
    # being edited are left out (so the preserved subspace does not hold the keys the edit must move).
    mom2_n_tokens: int | None = 100_000
    mom2_n_samples: int | None = None
    mom2_exclude_edited: bool = False
    # fine-tuning (ft)
    ft_lr: float = 5e-4
    ft_steps: int = 25
    ft_norm_bound: float = 0.05  # max ‖ΔW‖_F as a fraction of ‖W₀‖_F
    # execution
    chunk_size: int = 512  # sequences per forward pass
    seed: int = 0
    # Where these settings came from, recorded with a run and never read by the maths: the preset
    # whose values they are (and what was laid over it), and how the layers were chosen.
    preset: str = ""
    layers_from: str = ""

    def __post_init__(self) -> None:
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be non-empty, ascending and distinct, got {self.layers}")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token {self.fact_token!r} not one of {FACT_TOKENS}")

    def replace(self, **changes: Any) -> Hparams:
        return dataclasses.replace(self, **changes)


def model_depth(model: nn.Module | Any) -> int:
    """The number of transformer blocks of a model (or its transformers config)."""
    config = getattr(model, "config", model)
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise ValueError(f"cannot tell the depth of {type(config).__name__}: it has no num_hidden_layers")
    return depth


def preset_model(model: nn.Module | Any) -> str | None:
    """The preset model name of a model (or its config): a published one when its name says so,
    `organism` for the embedded model's directory, else None (settings are then derived)."""
    config = getattr(model, "config", model)
    name = str(getattr(config, "name_or_path", "") or "")
    if name and (Path(name) / ORGANISM_REPORT).is_file():
        return "organism"
    return next((preset for key, preset in KNOWN_MODELS.items() if key in name.lower()), None)


def derived_layers(reference: list[int], reference_depth: int, depth: int) -> list[int]:
    """A reference preset's edited layers moved to a model `depth` layers deep: the last at the same
    relative depth (rounded half up), the window as wide as the reference's where the layers allow."""
    last = min(depth - 1, math.floor(max(reference) * depth / reference_depth + 0.5))
    width = min(len(reference), last + 1)
    return list(range(last - width + 1, last + 1))


def closest_reference(algorithm: str, depth: int) -> str:
    """The preset model of `algorithm` closest in depth to a model `depth` layers deep (log scale)."""
    have = [name for name in REFERENCE_DEPTHS if (PRESETS / f"{algorithm}-{name}.yaml").exists()]
    if not have:
        raise FileNotFoundError(f"no preset for algorithm {algorithm!r} in {PRESETS}")
    return min(have, key=lambda name: abs(math.log(depth / REFERENCE_DEPTHS[name])))


def model_preset(algorithm: str, model: nn.Module | Any) -> Hparams:
    """The settings `algorithm` starts from on `model` (a model or its config): its own preset, or
    one derived from the references (module docstring); `preset` and `layers_from` say which."""
    name = preset_model(model)
    if name is not None and (PRESETS / f"{algorithm}-{name}.yaml").exists():
        return load_preset(algorithm, name).replace(layers_from="preset")
    depth = model_depth(model)
    reference = closest_reference(algorithm, depth)
    base = load_preset(algorithm, reference)
    layers = derived_layers(base.layers, REFERENCE_DEPTHS[reference], depth)
    hp = base.replace(layers=layers, layers_from=(
        f"derived: {algorithm}-{reference}'s layers {base.layers} of {REFERENCE_DEPTHS[reference]} moved to "
        f"{depth} layers"))
    log.info("%s has no %s preset: values of %s (the closest reference in depth), layers %s",
             getattr(getattr(model, "config", model), "name_or_path", "") or "the model", algorithm,
             hp.preset, layers)
    return hp


# What a preset's algorithm and model names may be: a name is never a path (`-a ../x` reads nothing).
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_preset(algorithm: str, model_name: str) -> Hparams:
    for kind, name in (("algorithm", algorithm), ("model", model_name)):
        if not isinstance(name, str) or not _PRESET_NAME.match(name) or ".." in name:
            raise ValueError(f"{name!r} is not a preset {kind} name (letters, digits, '.', '_', '-')")
    path = PRESETS / f"{algorithm}-{model_name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in PRESETS.glob(f"{algorithm}-*.yaml"))
        raise FileNotFoundError(f"no preset {path.name} for algorithm {algorithm!r} and model {model_name!r}; "
                                f"available: {have}")
    return from_mapping(yaml.safe_load(path.read_text()), source=str(path)).replace(
        preset=path.stem, layers_from="preset")


def from_mapping(values: Mapping[str, Any], source: str = "hparams", base: Hparams | None = None) -> Hparams:
    """Hparams from a mapping, over `base` if given; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(Hparams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown hyper-parameters {unknown}")
    hp = dataclasses.replace(base, **values) if base is not None else Hparams(**values)
    return hp.replace(layers_from="given") if "layers" in values and "layers_from" not in values else hp


def resolve(algorithm: str, model: nn.Module | Any, hparams: Hparams | Mapping[str, Any] | str | None) -> Hparams:
    """None: the model's preset (`model_preset`); a str: that preset's model name; a mapping: overrides
    of the model's preset, or an EasyEdit hparams file's fields (it has `alg_name`); Hparams: as given."""
    if isinstance(hparams, Hparams):
        return hparams
    if isinstance(hparams, str):
        return load_preset(algorithm, hparams)
    base = model_preset(algorithm, model)
    if hparams and "alg_name" in hparams:
        overrides, notes = from_easyedit(hparams, algorithm, model)
        for note in notes:
            log.info("EasyEdit hparams: %s", note)
        hp = from_mapping(overrides, source="EasyEdit hparams", base=base)
        return hp.replace(preset=f"EasyEdit {hparams['alg_name']} hparams over {base.preset}",
                          layers_from="EasyEdit hparams" if "layers" in overrides else hp.layers_from)
    return from_mapping(hparams, base=base) if hparams else base


# --- EasyEdit's hparams files -------------------------------------------------------------------------
# alg_name -> our method, for the methods both implement.
EASYEDIT_ALGORITHMS = {"ROME": "rome", "MEMIT": "memit", "EMMET": "emmet", "AlphaEdit": "alphaedit", "FT": "ft"}
# EasyEdit field -> (ours, type).
EASYEDIT_FIELDS: dict[str, tuple[str, type]] = {
    "layers": ("layers", list), "fact_token": ("fact_token", str), "v_num_grad_steps": ("v_num_grad_steps", int),
    "v_lr": ("v_lr", float), "v_weight_decay": ("v_weight_decay", float),
    "clamp_norm_factor": ("clamp_norm_factor", float), "kl_factor": ("kl_factor", float),
    "mom2_update_weight": ("mom2_update_weight", float), "mom2_n_samples": ("mom2_n_samples", int),
    "nullspace_threshold": ("nullspace_threshold", float), "L2": ("alphaedit_l2", float),
    "emmet_lambda": ("emmet_lambda", float), "context_template_length_params": ("context_spec", list),
    "num_steps": ("ft_steps", int), "lr": ("ft_lr", float),
}
# Fields that say where or how EasyEdit runs, not what an edit computes: ignored, with why.
EASYEDIT_IGNORED = {
    "alg_name": "checked against the method",
    "model_name": "the model is the one being edited",
    "device": "the device is the run's (--device)",
    "model_parallel": "the device is the run's (--device)",
    "stats_dir": "statistics are cached in the store",
    "mom2_dataset": "the statistics corpus is the run's (--corpus, or stats=)",
    "mom2_dtype": "statistics are summed in float64",
    "P_loc": "AlphaEdit's projection is computed from the statistics",
    "max_length": "prompts are not truncated",
    "batch_size": "batches are the run's (--batch-size)",
    **{name: "modules are found by the model family's adapter (editors.adapters)"
       for name in ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module")},
}
# Fields that only one value of can be honoured (what our methods do): any other value is refused.
EASYEDIT_FIXED = {"mom2_adjustment": True, "layer_selection": "all", "update_norm_lambda": 0}
EASYEDIT_FIXED_FT = {"kl_factor": 0, "weight_decay": 0, "objective_optimization": "target_new"}


def from_easyedit(values: Mapping[str, Any], algorithm: str | None = None, model: nn.Module | Any = None,
                  ) -> tuple[dict[str, Any], list[str]]:
    """An EasyEdit hparams file's fields (ROME, MEMIT, EMMET, AlphaEdit, FT) as overrides of our settings,
    and notes on what was ignored. ValueError naming every field it cannot map; with `model` (a model
    or its config), `v_loss_layer` and `rewrite_module_tmp` are checked against it."""
    alg_name = values.get("alg_name")
    method = EASYEDIT_ALGORITHMS.get(alg_name)
    if method is None:
        raise ValueError(f"EasyEdit hparams: alg_name {alg_name!r} is not one engramflow implements "
                         f"({', '.join(EASYEDIT_ALGORITHMS)})")
    if algorithm is not None and algorithm != method:
        raise ValueError(f"EasyEdit hparams are for {alg_name}, but the edit uses {algorithm!r}")
    fixed = {**EASYEDIT_FIXED, **(EASYEDIT_FIXED_FT if method == "ft" else {})}
    overrides: dict[str, Any] = {}
    refused, ignored = [], []
    for key, value in values.items():
        if key in fixed:
            if _value(value, type(fixed[key])) != fixed[key]:
                refused.append(f"{key}={value!r} (only {fixed[key]!r} is implemented)")
        elif key in EASYEDIT_FIELDS:
            ours, kind = EASYEDIT_FIELDS[key]
            overrides[ours] = _value(value, kind)
        elif key in EASYEDIT_IGNORED:
            if key != "alg_name":
                ignored.append(key)
        elif key == "norm_constraint" and method == "ft":
            refused.append(f"norm_constraint={value!r} (an element-wise bound; ours bounds the Frobenius norm "
                           "of the update, ft_norm_bound)")
        elif key in ("v_loss_layer", "rewrite_module_tmp"):
            problem = _model_field(key, value, model)
            if problem:
                refused.append(problem)
        else:
            refused.append(key)
    if refused:
        raise ValueError(f"EasyEdit hparams: cannot map {', '.join(refused)}")
    if "mom2_n_samples" in overrides:
        overrides["mom2_n_tokens"] = None  # counted in texts, as EasyEdit counts them
    if "context_spec" not in overrides:
        # EasyEdit's MEMIT family samples 5 prefixes of 10 tokens (fixed in its code); FT trains on the
        # bare prompt.
        overrides["context_spec"] = [] if method == "ft" else [[10, 5]]
    notes = [f"ignored {key}: {EASYEDIT_IGNORED[key]}" for key in ignored]
    return overrides, notes


def _value(value: Any, kind: type) -> Any:
    """A YAML value as `kind`: PyYAML reads 5e-1 as a string (YAML 1.1 floats need a dot), as EasyEdit
    knows (construct_float_from_scientific_notation)."""
    if kind in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _model_field(key: str, value: Any, model: nn.Module | Any) -> str | None:
    """Why `key` does not hold for `model` (None when it does, or when there is no model to check)."""
    if model is None:
        return None
    if key == "v_loss_layer":
        depth = model_depth(model)
        # Ours reads the loss at the model's output: what EasyEdit's files set (the last layer).
        return None if _value(value, int) == depth - 1 else (
            f"v_loss_layer={value!r} (the loss is read at the output, layer {depth - 1} of this model)")
    from engramflow.editors.adapters import UnknownModelType, adapter_for

    try:
        adapter = adapter_for(model)
    except UnknownModelType:
        return None  # the edit itself says the family has no adapter
    if str(value).format(0) != adapter.mlp_out_name(0):
        return (f"rewrite_module_tmp={value!r} (this model's edited projection is "
                f"{adapter.blocks}.{{}}.{adapter.mlp_out})")
    return None
