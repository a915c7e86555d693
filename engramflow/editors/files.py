"""Writing cache files that concurrent readers and writers (Ray workers sharing a home) can trust,
and reading them back only when they are intact."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

log = logging.getLogger(__name__)

DIGEST_KEY = "sha256"  # metadata entry: the digest of the tensors, checked on every read


class DamagedFileError(ValueError):
    """A cache file that is unreadable, does not match its digest, or holds NaN/infinite values."""


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' safetensors form without metadata (names, dtypes, shapes and bytes)."""
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})).hexdigest()


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors with NaN or infinite entries."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Save `tensors` to `path` as safetensors with their digest: written to a uniquely named file beside
    it, then renamed, so a reader never sees half a file and two writers of one path never share a temp
    file. Tensors with NaN or infinite entries raise `DamagedFileError` and are never written."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    bad = non_finite(tensors)
    if bad:
        raise DamagedFileError(f"{path.name}: tensor(s) {', '.join(bad)} have NaN or infinite entries; not cached")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={DIGEST_KEY: tensors_digest(tensors)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a file written by `save_atomic`, verified; `DamagedFileError` naming the file if it
    cannot be read, does not match its digest or holds non-finite values. (Files from before digests
    were kept are checked for finiteness only.)"""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise DamagedFileError(f"{path}: not a readable safetensors file ({err})") from None
    digest = meta.get(DIGEST_KEY)
    if digest is not None and digest != tensors_digest(tensors):
        raise DamagedFileError(f"{path}: its tensors do not match the digest written with them (modified or corrupt)")
    bad = non_finite(tensors)
    if bad:
        raise DamagedFileError(f"{path}: tensor(s) {', '.join(bad)} have NaN or infinite entries")
    return tensors


def load_checked(path: str | os.PathLike[str]) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file if it exists and is intact; a damaged one is reported, removed, and
    treated as absent, so its value is computed again instead of being used."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return check_file(path)
    except DamagedFileError as err:
        log.warning("ignoring and removing a damaged cache file (it will be recomputed): %s", err)
        path.unlink(missing_ok=True)
        return None
