"""The interface every editing method implements.

A method says what it needs (covariance statistics at its layers, per-request work that can be
computed ahead in shards), what it produces (an `Artifact`: a stacking `Delta`, or a state such as
SCEN's expert bank that replaces its predecessor), how its settings resolve for a model, which
evaluation protocols it adds, and which of a request's prompts it trained on (so evaluation scores
generality on the others). The pipeline, the CLI and the notebook API ask the method; none of them
branches on a method's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from engramflow.editors.artifacts import Artifact
from engramflow.editors.cache import RequestCache
from engramflow.editors.covariance import Corpus, SecondMoment
from engramflow.editors.hparams import Hparams, resolve
from engramflow.editors.requests import Request

# Covariance statistics as a method takes them: per layer (SecondMoment or a C matrix), or a corpus.
Stats = Mapping[int, SecondMoment | torch.Tensor] | Corpus | None


@dataclass(frozen=True)
class StatisticsSpec:
    """What preservation statistics a method's settings ask for."""

    layers: list[int]
    max_tokens: int | None  # keys counted in tokens (this project's unit) ...
    max_samples: int | None  # ... or in texts (the references' `mom2_n_samples`); None: no limit
    exclude_edited: bool  # leave out the texts that mention a subject being edited


@dataclass(frozen=True)
class Method(ABC):
    name: str
    # The solver preserves keys: it needs their second moment at every edited layer (`stats`).
    needs_stats: bool = False
    # Per-request work (targets, experts) depends on one request and the weights alone, so shards of a
    # batch can compute it ahead into a RequestCache (`precompute`) on separate workers.
    shardable: bool = False
    # Shards the pipeline uses when the run does not say.
    default_shards: int = 1
    # Evaluation protocols this method adds to the dataset's (SCEN: routing).
    protocols: tuple[str, ...] = ()

    artifact: ClassVar[type[Artifact]]

    @abstractmethod
    def hparams(self, model: nn.Module | Any, overrides: Any = None) -> Any:
        """The method's settings for `model` (a model or its config): its preset, with `overrides`
        (a mapping, or settings already resolved) on top."""

    @abstractmethod
    def layers(self, hp: Any) -> list[int]:
        """The layers these settings edit (statistics are needed at these)."""

    @abstractmethod
    def with_layers(self, hp: Any, layers: Sequence[int]) -> Any:
        """These settings with the edited layers replaced (located by causal tracing, or given)."""

    @abstractmethod
    def edit(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: Any, *, stats: Stats = None,
             cache: RequestCache | None = None, state: Artifact | None = None,
             history: Sequence[Artifact] = (), stats_cache_dir: str | Path | None = None) -> Artifact:
        """Edit `requests` into a new artifact, leaving `model` as it was. `state`: the artifact this
        method's previous edit produced when artifacts do not stack (SCEN's bank), else None.
        `history`: the stacked artifacts already in `model`, oldest first (AlphaEdit preserves the keys
        its earlier edits wrote)."""

    def statistics(self, hp: Any) -> StatisticsSpec | None:
        """The preservation statistics these settings need (None: none)."""
        return None

    def precompute(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: Any,
                   cache: RequestCache) -> int:
        """Compute ahead into `cache` the per-request work `edit` will read (shardable methods);
        returns the work done (optimisation steps), 0 when everything was cached."""
        return 0

    def scored(self, requests: Sequence[Request], hp: Any) -> list[Request]:
        """The requests as evaluation should score them: without prompts the edit trained on beyond
        the edit prompt itself (those are not evidence of generality)."""
        return list(requests)

    def describe(self, hp: Any) -> dict[str, Any]:
        """The settings as a JSON-able mapping (what a run records)."""
        return dict(vars(hp))


@dataclass(frozen=True)
class PresetMethod(Method):
    """A method whose settings are `Hparams` from the presets (`editors/presets/<name>-<model>.yaml`)."""

    def hparams(self, model: nn.Module | Any, overrides: Any = None) -> Hparams:
        return resolve(self.name, model, overrides)

    def layers(self, hp: Hparams) -> list[int]:
        return list(hp.layers)

    def with_layers(self, hp: Hparams, layers: Sequence[int]) -> Hparams:
        return hp.replace(layers=list(layers))
