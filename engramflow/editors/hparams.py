"""Editing hyper-parameters and the YAML presets in `editors/presets/` (`<algorithm>-<model>.yaml`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from engramflow.editors.keys import FACT_TOKENS

PRESETS = Path(__file__).parent / "presets"
# Substrings of a model's name_or_path (lower case) -> the preset model name.
KNOWN_MODELS = {"gpt2-xl": "gpt2-xl", "gpt-j-6b": "gpt-j-6b", "llama-2-7b": "llama-2-7b",
                "llama-3-8b": "llama-3-8b"}


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

    def __post_init__(self) -> None:
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be non-empty, ascending and distinct, got {self.layers}")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token {self.fact_token!r} not one of {FACT_TOKENS}")

    def replace(self, **changes: Any) -> Hparams:
        return dataclasses.replace(self, **changes)


def preset_model(model: nn.Module | Any) -> str:
    """The preset model name for a model (or its config): a published one when its name says so,
    else `organism`."""
    config = getattr(model, "config", model)
    name = str(getattr(config, "name_or_path", "")).lower()
    return next((preset for key, preset in KNOWN_MODELS.items() if key in name), "organism")


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
    return from_mapping(yaml.safe_load(path.read_text()), source=str(path))


def from_mapping(values: Mapping[str, Any], source: str = "hparams", base: Hparams | None = None) -> Hparams:
    """Hparams from a mapping, over `base` if given; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(Hparams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown hyper-parameters {unknown}")
    return dataclasses.replace(base, **values) if base is not None else Hparams(**values)


def resolve(algorithm: str, model: nn.Module, hparams: Hparams | Mapping[str, Any] | str | None) -> Hparams:
    """None: the preset for this model; a str: that preset's model name; a mapping: overrides of
    the preset; Hparams: as given."""
    if isinstance(hparams, Hparams):
        return hparams
    if isinstance(hparams, str):
        return load_preset(algorithm, hparams)
    base = load_preset(algorithm, preset_model(model))
    return from_mapping(hparams, base=base) if hparams else base
