"""What an edit produces: an artifact that is applied to a model, reverted, and stored.

Two kinds exist: a `Delta` (low-rank updates of MLP weights; a model version stacks them in order)
and SCEN's `ExpertBank` (experts and indexing neurons; each edit returns the whole new bank, which
replaces the one before). Every artifact is stored as safetensors, tensors plus string metadata whose
`format` names its type; `to_safetensors` / `from_safetensors` below are the one round trip, used
for files and for the content-addressed store alike.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_KEY = "format"


class ArtifactError(ValueError):
    """Stored tensors that are not a known artifact, or that cannot be read as one."""


class Artifact(ABC):
    """An edit's result. Subclasses set `format` (registered by it) and `stacks`."""

    format: ClassVar[str]
    # True: model versions add it on top of earlier artifacts (a Delta). False: it carries its method's
    # whole state, so a version holds at most one and a new one replaces it (a SCEN bank).
    stacks: ClassVar[bool]
    types: ClassVar[dict[str, type[Artifact]]] = {}
    request_ids: list[str]  # the requests this artifact edits in, in edit order
    method_name: str  # the method that produced it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "format" in cls.__dict__:
            Artifact.types[cls.format] = cls

    @abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Edit `model` in place (weights, or an attached routing layer)."""

    @abstractmethod
    def revert(self, model: nn.Module) -> None:
        """Undo `apply` exactly."""

    def merge(self, model: nn.Module) -> None:
        """Apply for good, keeping nothing for a revert (how a model version is materialised)."""
        self.apply(model)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """`with artifact.applied(model):` the edited model inside, the original after."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    def without(self, request_ids: Sequence[str]) -> Artifact | None:
        """This artifact minus some requests, or None when they cannot be taken out alone (a delta is
        one solve over its whole batch, so only the whole of it can go)."""
        return None

    @abstractmethod
    def edit_records(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What the ledger records per request: `layers` it changed and `norm` (Frobenius) of the change
        that carries it; artifacts with one expert per request add `expert` (True), `rank`, `bytes`."""

    def check_finite(self) -> None:
        """Raise ArtifactError naming the tensor when any entry is NaN or infinite."""
        tensors, _ = self.to_tensors()
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{self.format} tensor {name!r} has non-finite entries")

    @abstractmethod
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Named tensors and string metadata (without `format`, which `to_safetensors` adds)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> Artifact:
        """Inverse of `to_tensors`."""

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file."""
        tensors, meta = to_safetensors(self)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read a file written by `save` (of this type, or any type when called on Artifact)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        artifact = from_safetensors(load_file(str(path)), meta, source=str(path))
        if cls is not Artifact and not isinstance(artifact, cls):
            raise ArtifactError(f"{path} holds a {artifact.format} artifact, not a {cls.format}")
        return artifact


def to_safetensors(artifact: Artifact) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an artifact, the metadata naming its format."""
    tensors, meta = artifact.to_tensors()
    return ({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            {**meta, FORMAT_KEY: artifact.format})


def from_safetensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str = "tensors",
                     ) -> Artifact:
    """The artifact stored as (tensors, metadata); ArtifactError naming `source` if it is none."""
    from engramflow.editors import methods

    methods.load_all()  # every method module, so every artifact type is registered
    fmt = (meta or {}).get(FORMAT_KEY)
    if fmt is None and meta and "layers" in meta and "request_ids" in meta:
        fmt = "engramflow.delta/1"  # deltas stored before artifacts named their format
    artifact_type = Artifact.types.get(fmt or "")
    if artifact_type is None:
        raise ArtifactError(f"{source} is not an edit artifact (format {fmt!r}; known: {sorted(Artifact.types)})")
    try:
        return artifact_type.from_tensors(tensors, meta)
    except (KeyError, ValueError, TypeError) as err:
        raise ArtifactError(f"{source}: cannot read it as {fmt} ({err})") from None
