"""Unrelated probes: facts no edit asks about, which the model should keep knowing.

Rows carry protocol `probe`, metric `top1`, one per probe request (`EvalContext.probes`): a fall of
their mean marks collapse (`storage.queries.collapse_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row
from engramflow.editors.evaluation.scoring import score_targets


@dataclass(frozen=True, eq=False)
class Probe(Evaluator):
    def __call__(self, ctx: EvalContext) -> list[Row]:
        for p in ctx.probes:
            if not p.target_true:
                raise ValueError(f"probe request {p.request_id} has no target_true to check")
        pairs = [(p.prompt, p.target_true) for p in ctx.probes]
        rows: list[Row] = []
        for p, s in zip(ctx.probes, score_targets(ctx.model, ctx.tok, pairs, ctx.batch_size), strict=True):
            rows += self.rows(p.request_id, {"top1": float(s.predicted[0] == s.target[0])})
        return rows


register(Probe(
    name="probe", protocol="probe",
    source="engramflow: collapse detection in the manner of Gupta et al. 2024 (unrelated-fact accuracy)",
    metrics={"top1": "1 if the first token of the probe's true object is the top-1 prediction after its prompt"},
))
