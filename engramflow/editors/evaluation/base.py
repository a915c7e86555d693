"""What an evaluator is and what it is given.

An `Evaluator` is one named protocol described as data (lm-evaluation-harness style): the paper or
implementation whose definitions it follows, its metrics with a one-line definition each, and a call
that turns an `EvalContext` into rows of the long `metrics` table. Its `name` is what a run selects
(`--eval`, a loader's defaults); `protocol` is the value its rows carry, which the stored queries and
reports read (several evaluators write model-level rows under `model`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engramflow.editors.requests import Request, as_requests

# One row of the `metrics` table as an evaluator writes it: request_id (None: a model-level value),
# protocol, metric, value.
Row = dict[str, Any]


def asked_prompts(requests: Iterable[Request]) -> frozenset[str]:
    """Every prompt the edits ask: edit prompts and paraphrases (filled)."""
    return frozenset(p for r in requests for p in (r.prompt, *r.paraphrase_prompts))


@dataclass(frozen=True)
class EvalContext:
    """A model to score and what to score it on."""

    model: nn.Module
    tok: Any
    # The run's edits so far, as the method wants them scored (`Method.scored`).
    edited: Sequence[Request] = ()
    # Unrelated facts that no edit should move.
    probes: Sequence[Request] = ()
    # Held-out text for perplexity.
    texts: Sequence[str] = ()
    # W0 of every edited layer's MLP output projection ([d_model, d_mlp]), for weight-norm growth.
    originals: Mapping[int, torch.Tensor] = field(default_factory=dict)
    # Evaluator name -> what `Evaluator.reference` computed on the unedited model, for the
    # protocols that compare against it (`needs_reference`); None when none does.
    reference: Mapping[str, Mapping[str, Any]] | None = None
    # Every prompt the run's edits ask, when `edited` lacks some (a method's `scored` drops the
    # paraphrases it trained on, which were edited all the same); None: those of `edited`.
    asked: frozenset[str] | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        # Store rows, notebook dicts and Requests alike (Request.from_mapping).
        object.__setattr__(self, "edited", as_requests(self.edited))
        object.__setattr__(self, "probes", as_requests(self.probes))

    def asked_prompts(self) -> frozenset[str]:
        return self.asked if self.asked is not None else asked_prompts(self.edited)

    def reference_for(self, evaluator: Evaluator) -> Mapping[str, Any]:
        """The unedited model's reference for `evaluator` (ValueError saying how to compute it)."""
        if self.reference is None or evaluator.name not in self.reference:
            raise ValueError(f"protocol {evaluator.name!r} compares against the unedited model: pass "
                             f"EvalContext(reference={{{evaluator.name!r}: evaluator.reference(unedited, tok, "
                             "requests)}})")
        return self.reference[evaluator.name]


@dataclass(frozen=True, eq=False)
class Evaluator(ABC):
    """One evaluation protocol (see the module docstring)."""

    name: str
    protocol: str
    source: str  # the paper or implementation whose definitions it follows, one line
    metrics: Mapping[str, str]  # metric name -> one-line definition
    # Compares against the unedited model: `reference()` computes what on it, and the context
    # carries the result.
    needs_reference: bool = False

    @abstractmethod
    def __call__(self, ctx: EvalContext) -> list[Row]:
        """The metric rows of `ctx.model`."""

    def reference(self, model: nn.Module, tok: Any, requests: Sequence[Request]) -> dict[str, Any]:
        """What this protocol compares against, computed on the unedited model: JSON-able values
        keyed by request id (so they can be cached and extended request by request)."""
        raise NotImplementedError(f"protocol {self.name!r} compares against nothing")

    def rows(self, request_id: str | None, values: Mapping[str, float | None]) -> list[Row]:
        """Rows of this protocol; a value of None (e.g. PS of a request without paraphrases) is left out."""
        return [{"request_id": request_id, "protocol": self.protocol, "metric": metric, "value": float(value)}
                for metric, value in values.items() if value is not None]
