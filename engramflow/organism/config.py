"""What determines an organism build besides its data: model size, optimisation, auxiliary losses.

The default is a 2-layer Llama (2.4 M parameters): two layers are what the facts need (layer 0's MLP
looks them up at the subject's last token, layer 1's attention carries them to the last position),
and the build stays a short step of `make demo`. Every field goes into the cache key
(`build._cache_key`); the measurements behind these values are in `docs/notes/2026-12-06-organism.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

EOS = "<|endoftext|>"
BUILD_VERSION = 3  # bump when the training code changes what a config+data hash produces


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines a build besides its data."""

    name: str = "organism"
    vocab_size: int = 2048
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_inner: int = 1024  # 4 x hidden: narrower MLPs could not take a batch of edits without breaking others
    n_positions: int = 128
    statements_per_sequence: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_epochs: int = 45
    # Early stop once the per-epoch samples reach both: the facts known, unseen templates mostly right.
    target_train: float = 0.97
    target_heldout: float = 0.85
    eval_sample: int = 400  # prompts per split evaluated after each epoch (all at the end)
    seed: int = 0
    # Interchange-intervention training (`training._interchange_loss`): the layer whose MLP output at the
    # subject's last token must carry the subject's facts, and the weight of that loss (0 = off).
    store_layer: int = 0
    interchange_weight: float = 0.5
    # Interchange sources: 0 = the subject's own clean run; k > 0 = the subject after 0..k other tokens.
    interchange_context: int = 8
    # Weight (0 = off) of a discarded linear probe naming the statement's subject from the last layer's
    # MLP input at the token before the object, so SCEN's keys there tell subjects apart (`_probe_loss`).
    subject_id_weight: float = 3.0
    # The same for the statement's relation (0 = off): helps SCEN, costs MEMIT, so off by default.
    relation_id_weight: float = 0.0
    architecture: str = "llama"  # "llama" (rotary positions) or "gpt2" (learned absolute positions)
    prefix_space: bool = True  # tokenizer: a text's first word spelled as after a space
    bos: bool = True  # tokenizer: every text starts with BOS


DEFAULT_CONFIG = OrganismConfig()
TINY_CONFIG = OrganismConfig(
    name="organism-tiny", vocab_size=1024, n_embd=128, n_layer=2, n_head=4, n_inner=1024,
    batch_size=8, lr=3e-3, warmup_steps=20, max_epochs=60, target_train=0.97, target_heldout=0.80,
    subject_id_weight=0.0,  # the tests' model predates the subject probe; kept so its hash stays
)
