"""What defines an editing run (`RunConfig`), and the settings of where it runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engramflow.ledger import stable_id

# Settings of where and how fast a run executes, not of what it computes: left out of its id.
EXECUTION_FIELDS = ("device", "edit_cpus", "shards")


@dataclass
class RunConfig:
    """Everything that defines a run: the same config gives the same run id (and so resumes it)."""

    algorithm: str  # a registered method (engramflow.editors.methods)
    model: str  # a model directory or hub id (the CLI turns `organism` into its directory)
    dataset: str = "world"
    format: str = "world"
    n: int = 200
    batch_size: int = 50
    hparams: dict[str, Any] = field(default_factory=dict)  # overrides of the method's preset
    layers: str = "preset"  # "preset", "auto" (causal tracing), or comma-separated layer indices
    window: int = 1  # with layers="auto": how many layers end at the traced peak (MEMIT's spreading)
    corpus: str | None = None  # covariance/perplexity corpus: None = the model's own (models.default_corpus)
    stats_tokens: int | None = None  # keys in the preservation statistics; None = the method's settings
    stats_shards: int = 2
    n_probes: int = 100
    protocols: list[str] | None = None  # evaluation protocols (--eval); None = the format's and the method's
    seed: int = 0
    device: str = "cpu"
    edit_cpus: int = 2  # Ray CPUs (torch threads) for an edit task on the CPU
    # Tasks a batch's per-request work (targets, SCEN's experts) is split into, one core or GPU each;
    # None = the method's default. On this 2-core CPU two 1-thread target shards of 25 requests took as
    # long as one 2-thread task of 50 (both compute-bound); on a cluster they spread.
    shards: int | None = None

    def run_id(self, flow_name: str) -> str:
        return stable_id(flow_name[:3], flow_name,
                         {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS})

    def params(self) -> dict[str, Any]:
        """The config as recorded with the run."""
        return asdict(self)
