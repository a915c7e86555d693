"""SCEN settings: one dataclass for experts (stage 1), indexing neurons (stage 2) and routing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class ScenConfig:
    """Hyper-parameters of SCEN (Yao et al., 2024). Defaults are tuned for the small embedded model;
    `llama2_reference()` gives the paper's Llama-2-7B stage-1 settings."""

    # --- stage 1: one expert per fact, a delta on the MLP output projection ----------------------
    expert_kind: Literal["lora", "full", "svd"] = "lora"  # full: dense delta; svd: dense, then rank-r
    rank: int = 4  # rank r of the stored delta B @ A
    expert_lr: float = 1e-2
    expert_steps: int = 25
    expert_stop_nll: float | None = 0.02  # stop once the mean target NLL is this low (None: all steps)
    # --- stage 2: one indexing neuron per expert over the MLP hidden (the down-projection's input) --
    neuron_loss: Literal["reference", "margin"] = "margin"
    neuron_init: Literal["matched", "zero"] = "matched"  # see model.matched_init
    neuron_sharpness: float = 20.0  # matched init: logit drop from a positive to the mean key
    neuron_lr: float = 5e-2
    neuron_steps: int = 60
    neuron_margin: float = 2.0  # margin loss: target logits theta_logit +/- margin
    neuron_contrasts: int = 16  # contrast prompts of each kind per neuron (see model.contrast_prompts)
    neuron_paraphrases: int = 0  # how many of a request's paraphrase prompts are extra positives
    recalibrate_steps: int = 0  # steps on new negatives for old neurons that fire on new prompts (0: off;
    # measured: the new neuron outscores the old one on its own prompt, so routing did not improve)
    # --- inference --------------------------------------------------------------------------------
    theta: float = 0.65
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def llama2_reference(cls) -> ScenConfig:
        """Stage-1 settings of the reference implementation on Llama-2-7B (full-matrix experts)."""
        return cls(expert_kind="full", expert_lr=1e-4, expert_steps=10, expert_stop_nll=None,
                   neuron_loss="reference", neuron_steps=20)


def default_layer(n_layers: int) -> int:
    """The layer SCEN edits when none is given: about two thirds of the depth, as the reference's
    layer 20 of Llama-2-7B's 32 (and layer 1 of a 2-layer model, measured best on the tiny organism)."""
    return int(n_layers * 2 / 3)
