"""Perplexity on held-out text: how far the edits moved the model's language modelling.

One model-level row, protocol `model`, metric `perplexity`, over `EvalContext.texts`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row
from engramflow.editors.evaluation.scoring import perplexity


@dataclass(frozen=True, eq=False)
class Perplexity(Evaluator):
    def __call__(self, ctx: EvalContext) -> list[Row]:
        if not ctx.texts:
            raise ValueError("the perplexity protocol needs held-out texts (EvalContext.texts)")
        return self.rows(None, {"perplexity": perplexity(ctx.model, ctx.tok, ctx.texts)})


register(Perplexity(
    name="perplexity", protocol="model",
    source="token-weighted perplexity, as in the sequential-editing studies (Gupta et al. 2024)",
    metrics={"perplexity": "exp of the mean token NLL over the held-out texts (each cut to 256 tokens)"},
))
