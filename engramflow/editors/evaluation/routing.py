"""SCEN routing (Yao et al. 2024): does each prompt reach the right expert?

Rows carry protocol `scen`: `routing` per edited request (its edit prompt is routed to its own
expert) and `probe_routing` per probe (an unrelated prompt is routed to no expert). A model with no
bank attached (the unedited model of a SCEN run) routes every prompt to no expert: routing 0, probe
routing 1, the baseline a bank starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row


@dataclass(frozen=True, eq=False)
class Routing(Evaluator):
    def __call__(self, ctx: EvalContext) -> list[Row]:
        from engramflow.editors.scen import attached, route

        prompts = [r.prompt for r in (*ctx.edited, *ctx.probes)]
        try:
            attached(ctx.model)
        except RuntimeError:  # no bank: nothing routes anywhere
            chosen = iter([None] * len(prompts))
        else:
            chosen = iter(route(ctx.model, ctx.tok, prompts))
        rows: list[Row] = []
        for r in ctx.edited:
            rows += self.rows(r.request_id, {"routing": float(next(chosen) == r.request_id)})
        for p in ctx.probes:
            rows += self.rows(p.request_id, {"probe_routing": float(next(chosen) is None)})
        return rows


register(Routing(
    name="routing", protocol="scen",
    source="SCEN (Yao et al. 2024): indexing neurons read at the last prompt token, threshold θ",
    metrics={
        "routing": "1 if the edit prompt is routed to the request's own expert",
        "probe_routing": "1 if an unrelated probe prompt is routed to no expert",
    },
))
