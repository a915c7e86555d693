"""zsRE (MEND/MEMIT): teacher-forced top-1 accuracy of each token of the new object.

Rows carry protocol `zsre`, one set per edited request: efficacy on the edit prompt, generality on
the paraphrases, locality on the neighbourhood prompts, where locality is the agreement of the
top-1 tokens with the unedited model's on the same (prompt, target) (its `reference`): an
unedited model scores 1 by definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row
from engramflow.editors.evaluation.scoring import TargetScore, mean, score_targets
from engramflow.editors.requests import Request


def _neighbourhood_pairs(request: Request) -> list[tuple[str, str]]:
    return [(n.prompt, n.target) for n in request.neighborhood]


def _agreement(score: TargetScore, reference: Sequence[int]) -> float:
    if len(reference) != len(score.predicted):
        raise ValueError("the reference answers do not match the neighbourhood targets' tokenization")
    return sum(p == r for p, r in zip(score.predicted, reference, strict=True)) / len(reference)


@dataclass(frozen=True, eq=False)
class TokenAccuracy(Evaluator):
    """Efficacy, generality and locality by teacher-forced token accuracy, named by `names`."""

    names: tuple[str, str, str] = ("efficacy", "generality", "locality")
    needs_reference: bool = True

    def reference(self, model: nn.Module, tok: Any, requests: Sequence[Request],
                  batch_size: int = 64) -> dict[str, list[list[int]]]:
        """The unedited model's teacher-forced top-1 tokens on each neighbourhood (prompt, target),
        keyed by request id."""
        pairs = [pair for r in requests for pair in _neighbourhood_pairs(r)]
        scores = iter(score_targets(model, tok, pairs, batch_size))
        return {r.request_id: [list(next(scores).predicted) for _ in r.neighborhood] for r in requests}

    def __call__(self, ctx: EvalContext) -> list[Row]:
        reference = ctx.reference_for(self) if any(r.neighborhood for r in ctx.edited) else {}
        pairs: list[tuple[str, str]] = []
        for r in ctx.edited:
            pairs += [(prompt, r.target_new) for prompt in (r.prompt, *r.paraphrase_prompts)]
            pairs += _neighbourhood_pairs(r)
        scores = iter(score_targets(ctx.model, ctx.tok, pairs, ctx.batch_size))
        rows: list[Row] = []
        for r in ctx.edited:
            efficacy = next(scores).accuracy
            generality = [next(scores).accuracy for _ in r.paraphrase_prompts]
            answers = reference.get(r.request_id, []) if r.neighborhood else []
            if len(answers) != len(r.neighborhood):
                raise ValueError(f"no reference answers for request {r.request_id} in protocol {self.name!r}: "
                                 "compute its reference on the unedited model with these requests")
            locality = [_agreement(next(scores), a) for a in answers]
            rows += self.rows(r.request_id, dict(zip(self.names, (efficacy, mean(generality), mean(locality)),
                                                     strict=True)))
        return rows


register(TokenAccuracy(
    name="zsre", protocol="zsre",
    source="MEND (Mitchell et al. 2022) and MEMIT (Meng et al. 2023), zsRE evaluation",
    metrics={
        "efficacy": "teacher-forced top-1 accuracy of target_new's tokens on the edit prompt",
        "generality": "the same, mean over paraphrase prompts",
        "locality": "share of neighbourhood target tokens whose top-1 prediction is the unedited model's",
    },
))
