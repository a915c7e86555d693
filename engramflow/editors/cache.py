"""Per-request results kept in a directory of safetensors files, keyed by everything that determines
them: optimised target values (MEMIT, EMMET, AlphaEdit) and SCEN's stage-1 experts.

Valid across batches and runs because each request's result depends on that request and the weights
alone (each target is optimised on its own prompts; each expert is trained on its own fact), so the
first batch of every method in a comparison, every point of a solver sweep and a rerun all compute it
once, and shards of a batch computed by separate workers hand theirs to the edit through it. MEMIT's
reference code keeps its targets per case for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from engramflow.editors.files import load_checked, save_atomic


class RequestCache:
    """key -> tensors, one file each under `root`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @staticmethod
    def key(*parts: Any) -> str:
        """The key of a result determined by `parts` (JSON-serialisable)."""
        return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The result under `key`, or None when there is none or its file is damaged (modified, truncated,
        non-finite: it is then removed with a warning and computed again)."""
        return load_checked(self._path(key))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a result (`DamagedFileError` if it has NaN or infinite entries: such a result is never kept)."""
        save_atomic(tensors, self._path(key))

    def files(self) -> list[Path]:
        """Every result file in the cache."""
        return sorted(self.root.glob("*/*.safetensors")) if self.root.is_dir() else []
