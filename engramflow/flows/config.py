"""What defines an editing run (`RunConfig`), and the settings of where it runs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


# --- validation: every option checked before any service starts or any row is written -------------
class ConfigError(ValueError):
    """A run option that cannot work; `option` names it as the command line spells it."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason

    def __reduce__(self) -> tuple:  # picklable: it may cross a process boundary (Ray, Prefect)
        return (type(self), (self.option, self.reason), self.__dict__)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.sep + "." in spec or spec in (".", "..")


def check_model(spec: str) -> None:
    """`spec` (before `resolve_model`) is an organism name, a Hugging Face model directory, or a hub id in
    the local cache (no hub is reachable here); ConfigError naming --model otherwise."""
    from engramflow.models import ORGANISM_NAMES

    if spec in ORGANISM_NAMES:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError("--model", f"{spec} is a directory without config.json, not a model directory")
        return
    if path.exists():
        raise ConfigError("--model", f"{spec} is a file, not a model directory")
    names = ", ".join(ORGANISM_NAMES)
    if _looks_like_path(spec):
        raise ConfigError("--model", f"no such model directory: {spec} (or one of: {names})")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(spec)
    except Exception:  # transformers raises OSError, HFValidationError, ValueError... for an unknown id
        raise ConfigError("--model", f"{spec!r} is no model directory, no hub model in the local cache (the hub "
                                     f"is not reachable) and not one of: {names}") from None


def _check_file_or_world(option: str, value: str, fmt: str | None = None) -> None:
    from engramflow.data.world import named_world

    if named_world(value) is not None or "://" in value:  # a URL is checked when it is read
        return
    if not Path(value).expanduser().is_file():
        worlds = "world, world-tiny" if fmt in (None, "world") else "an existing file"
        raise ConfigError(option, f"no such file: {value} (expected a file or {worlds})")


def parsed_layers(value: str) -> list[int] | None:
    """Explicit layers of `--layers` (None for preset / auto); ConfigError if not integers."""
    if value in ("preset", "auto"):
        return None
    try:
        layers = [int(x) for x in value.split(",")]
    except ValueError:
        raise ConfigError("--layers", f"{value!r} is not 'preset', 'auto' or comma-separated layer indices") from None
    return layers


def check_options(cfg: RunConfig) -> None:
    """The options that need no model config, cheapest first (`cfg.model` may still be an organism name):
    ConfigError naming the first bad one."""
    for option, value, least in (("--n", cfg.n, 1), ("--batch-size", cfg.batch_size, 1),
                                 ("--n-probes", cfg.n_probes, 0), ("--window", cfg.window, 1),
                                 ("--stats-shards", cfg.stats_shards, 1), ("--shards", cfg.shards, 1),
                                 ("--edit-cpus", cfg.edit_cpus, 1), ("--stats-tokens", cfg.stats_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(option, f"must be an integer ≥ {least}, got {value!r}")
    parsed_layers(cfg.layers)
    from engramflow.data.ingest import IngestError, get_loader

    try:
        get_loader(cfg.format)
    except IngestError as err:
        raise ConfigError("--format", str(err)) from None
    _check_file_or_world("--dataset", cfg.dataset, cfg.format)
    if cfg.corpus is not None:
        _check_file_or_world("--corpus", cfg.corpus)
    check_model(cfg.model)
    from engramflow.editors.methods import get_method

    try:
        get_method(cfg.algorithm)
    except ValueError as err:
        raise ConfigError("--algorithm", str(err)) from None
    import torch

    try:
        torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", f"{cfg.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    from engramflow.tasks.evaluate import protocols_for

    try:
        protocols_for(cfg.format, cfg.algorithm, cfg.protocols)
    except ValueError as err:
        raise ConfigError("--eval", str(err)) from None


def check_against_model(cfg: RunConfig) -> None:
    """The options that need the model's config (`cfg.model` a directory or hub id): layers within its
    depth, settings valid for it, and a dataset with valid records."""
    from transformers import AutoConfig

    from engramflow.data.ingest import IngestError, first_valid
    from engramflow.editors.methods import get_method

    method = get_method(cfg.algorithm)
    config = AutoConfig.from_pretrained(cfg.model)
    depth = getattr(config, "num_hidden_layers", None)
    try:
        hp = method.hparams(config, cfg.hparams)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError("--hparams", str(err)) from None
    layers = parsed_layers(cfg.layers)
    if layers is not None:
        try:
            hp = method.with_layers(hp, layers)
        except (ValueError, TypeError) as err:
            raise ConfigError("--layers", str(err)) from None
    if depth is not None:
        bad = [layer for layer in method.layers(hp) if not 0 <= layer < depth]
        if bad:
            where = "--layers" if layers is not None else "--hparams"
            raise ConfigError(where, f"layer(s) {bad} out of range: {cfg.model} has {depth} layers (0-{depth - 1})")
        if cfg.layers == "auto" and cfg.window > depth:
            raise ConfigError("--window", f"{cfg.window} layers asked, {cfg.model} has {depth}")
    if "://" not in cfg.dataset:
        try:
            first_valid(cfg.dataset, cfg.format)
        except IngestError as err:
            raise ConfigError("--dataset", str(err)) from None


def validate(cfg: RunConfig) -> None:
    """Check every option of `cfg` (its model a directory or hub id) before any service starts and before
    anything is recorded: ConfigError naming the option otherwise."""
    check_options(cfg)
    check_against_model(cfg)
