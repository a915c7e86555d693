"""SCEN settings: one dataclass for the edited layer, experts (stage 1), indexing neurons (stage 2)
and routing. How the defaults were measured: docs/notes/2026-12-06-scen.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

# The fields that determine a stage-1 expert (with the weights, the layer and the request).
EXPERT_FIELDS = ("expert_kind", "rank", "expert_lr", "expert_steps", "expert_stop_nll", "seed")


@dataclass(frozen=True)
class ScenConfig:
    """Hyper-parameters of SCEN (Yao et al., 2024). Defaults are tuned for the small embedded model;
    `llama2_reference()` gives the paper's Llama-2-7B stage-1 settings."""

    # The edited layer; None: `default_layer` of the model (the method resolves it).
    layer: int | None = None
    # --- stage 1: one expert per fact, a delta on the MLP output projection ----------------------
    # lora: rank-r factors trained as such; full: a dense delta, stored and served dense;
    # svd: a dense delta trained, then truncated to rank r.
    expert_kind: Literal["lora", "full", "svd"] = "lora"
    rank: int = 4  # rank r of a lora / svd expert B @ A
    expert_lr: float = 1e-2
    expert_steps: int = 25
    expert_stop_nll: float | None = 0.02  # stop once the mean target NLL is this low (None: all steps)
    # --- stage 2: one indexing neuron per expert over the MLP hidden (the down-projection's input) --
    neuron_loss: Literal["reference", "margin"] = "margin"  # see neurons.neuron_loss
    neuron_init: Literal["matched", "zero"] = "matched"  # see neurons.matched_init
    neuron_sharpness: float = 40.0  # matched init: logit drop from a positive to the mean key
    neuron_lr: float = 5e-2
    neuron_steps: int = 60
    neuron_margin: float = 2.0  # margin loss: target logits theta_logit +/- margin
    # Contrast prompts of each kind a new neuron trains on (prompts.contrast_prompts), and how many of
    # them, the nearest to firing a neuron, the bank keeps as negatives for later training.
    neuron_candidates: int = 256
    neuron_contrasts: int = 32
    # Paraphrase prompts per request that are extra positives; evaluation scores generality on the
    # others (`held_out_paraphrases`).
    neuron_paraphrases: int = 1
    # Steps on the new keys for old neurons that fire on any of them (0: off): new contrast prompts put
    # old subjects in new templates, where old neurons misfire.
    recalibrate_steps: int = 20
    # --- inference --------------------------------------------------------------------------------
    theta: float = 0.65  # the score a neuron is trained around (margin loss, matched start) and routes at
    # The score routing asks at inference when it differs from the one the neurons were trained around
    # (None: theta). SCEN's generality-locality trade-off is this threshold's: a lower one routes more
    # paraphrases to their experts and more unrelated prompts too.
    route_theta: float | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, values: Mapping[str, Any]) -> ScenConfig:
        """A copy with some fields changed; unknown keys are a ValueError naming them."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown SCEN settings {unknown}")
        return dataclasses.replace(self, **values)

    @classmethod
    def llama2_reference(cls) -> ScenConfig:
        """Stage-1 settings of the reference implementation on Llama-2-7B (full-matrix experts)."""
        return cls(expert_kind="full", expert_lr=1e-4, expert_steps=10, expert_stop_nll=None,
                   neuron_loss="reference", neuron_steps=20)


def default_layer(n_layers: int) -> int:
    """The layer SCEN edits when none is given: about two thirds of the depth, as the reference's
    layer 20 of Llama-2-7B's 32 (and layer 1 of a 2-layer model, measured best on the tiny organism)."""
    return int(n_layers * 2 / 3)
