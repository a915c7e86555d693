"""KnowEdit portability: does the edit carry over to questions that follow from it?

Rows carry protocol `knowedit`, one per edited request with portability questions in `extra`: KnowEdit's
`portability` ({kind: [{prompt, ground_truth}]}: reasoning, subject aliasing, logical generalization)
or the EasyEdit zsRE file's ({"New Question", "New Answer"}). Requests without them get no row. The
other KnowEdit numbers (edit success, locality) are the `easyedit` protocol's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row
from engramflow.editors.evaluation.scoring import mean, score_targets
from engramflow.editors.requests import Request


def _first(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def portability_questions(request: Request) -> list[tuple[str, str]]:
    """(question, answer) pairs of the request's portability data, in either format."""
    data = request.extras.get("portability") or {}
    if not isinstance(data, dict):
        return []
    if "New Question" in data:
        pairs = [(data["New Question"], data.get("New Answer"))]
    else:
        pairs = [(item.get("prompt"), _first(item.get("ground_truth")))
                 for items in data.values() if isinstance(items, list) for item in items if isinstance(item, dict)]
    return [(q.strip(), a.strip()) for q, a in pairs
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()]


@dataclass(frozen=True, eq=False)
class Portability(Evaluator):
    def __call__(self, ctx: EvalContext) -> list[Row]:
        questions = [portability_questions(r) for r in ctx.edited]
        scores = iter(score_targets(ctx.model, ctx.tok, [p for qs in questions for p in qs], ctx.batch_size))
        rows: list[Row] = []
        for r, qs in zip(ctx.edited, questions, strict=True):
            rows += self.rows(r.request_id, {"portability": mean([next(scores).accuracy for _ in qs])})
        return rows


register(Portability(
    name="knowedit", protocol="knowedit",
    source="KnowEdit (Zhang et al. 2024, EasyEdit): portability by teacher-forced token accuracy",
    metrics={"portability": "teacher-forced top-1 accuracy of each portability answer's tokens after its "
                            "question, mean over the request's questions"},
))
