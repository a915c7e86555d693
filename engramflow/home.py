"""Where engramflow keeps its state: one home directory holding the store, models and service state.

The home comes from `--home`, else `ENGRAMFLOW_HOME`, else `./.engramflow`. The CLI writes the chosen
home back into `ENGRAMFLOW_HOME` so that Ray workers and subprocesses inherit it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_HOME = ".engramflow"

# Telemetry off and no hub access, everywhere (../shared/PLATFORM.md).
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
    # Third-party progress bars (transformers' "Loading weights" in every task) off; ours are the stages'.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Prefect's "Task run ... Finished in state Completed()" for every task: the flows report progress.
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
}


def quiet_env() -> None:
    """Set the telemetry-off / offline variables unless the user set them already; without a terminal
    (output redirected to a log) also the switches that keep ANSI colours out of Ray's and Prefect's lines."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.stdout.isatty():
        for key, value in PLAIN_OUTPUT_ENV.items():
            os.environ.setdefault(key, value)


# Colour off when output is not a terminal: Ray's worker-line prefixes, Prefect's log levels, rich.
PLAIN_OUTPUT_ENV = {"RAY_COLOR_PREFIX": "0", "PREFECT_LOGGING_COLORS": "false", "NO_COLOR": "1"}


def set_home(path: str | os.PathLike[str]) -> Path:
    """Make `path` the home for this process and its children."""
    home = Path(path).expanduser().resolve()
    os.environ["ENGRAMFLOW_HOME"] = str(home)
    return home


def get_home() -> Path:
    """The home directory (created on first use)."""
    home = Path(os.environ.get("ENGRAMFLOW_HOME", DEFAULT_HOME)).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def store_root() -> str:
    """Root of the artifact store: `ENGRAMFLOW_STORE` (any fsspec URL, e.g. s3://bucket/x) or <home>/store."""
    return os.environ.get("ENGRAMFLOW_STORE") or str(get_home() / "store")


def models_dir() -> Path:
    """Cache of built models: `ENGRAMFLOW_MODEL_CACHE` or <home>/models."""
    path = Path(os.environ.get("ENGRAMFLOW_MODEL_CACHE") or get_home() / "models").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(name: str) -> Path:
    """A cache under the home (`requests`: per-request results, `references`: evaluation references)."""
    return get_home() / "cache" / name


def state_dir(name: str) -> Path:
    """A directory for service state (prefect, ray, ...) under the home, readable by its owner only."""
    path = get_home() / "state" / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.chmod(0o700)
    return path
