"""Writing cache files that concurrent readers and writers (Ray workers sharing a home) can trust."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Save `tensors` to `path` as safetensors: written to a uniquely named file beside it, then
    renamed, so a reader never sees half a file and two writers of one path never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
