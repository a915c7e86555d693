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
    neuron_sharpness: float = 40.0  # matched init: logit drop from a positive to the mean key
    neuron_lr: float = 5e-2
    neuron_steps: int = 60
    neuron_margin: float = 2.0  # margin loss: target logits theta_logit +/- margin
    # Contrast prompts of each kind a new neuron trains on (see model.contrast_prompts), and how many
    # of them, the nearest to firing a neuron, the bank keeps as negatives for later training.
    neuron_candidates: int = 256
    neuron_contrasts: int = 32
    # How many of a request's paraphrase prompts are extra positives. They are then training data: the
    # evaluation scores generality on the others (`held_out_paraphrases`).
    neuron_paraphrases: int = 1
    # Steps on the new keys for old neurons that fire on any of them (0: off). The new batch's contrast
    # prompts put old subjects in new templates, which is where old neurons misfire.
    recalibrate_steps: int = 20
    # Measured together (bench/scen.py --edits 200 [--offset 200], default organism, 200 sequential
    # edits in batches of 10; reliability / generality on held-out paraphrases / locality / routing):
    # first 200 facts 1.000 / 0.825 / 1.000 / 0.963 and next 200 1.000 / 0.870 / 0.983 / 0.967, with
    # 8,826 and 8,902 bank keys. Every candidate kept: 0.840 / 0.997 and 0.880 / 0.983 with 4x the keys;
    # 32 candidates of each kind, all kept: 0.845 / 0.969 and 0.880 / 0.981. No paraphrase positive:
    # generality 0.540 and 0.642; no recalibration: locality 0.952 and 0.981; no contrasts: 0.817 and
    # 0.910. The previous defaults (sharpness 20, 16 candidates all kept, no paraphrase, no
    # recalibration): 0.858 / 0.900 and 0.850 / 0.953. Locality misses left are an edited subject
    # asked another relation in a wording no edit trained on (see the organism's relation probe).
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
