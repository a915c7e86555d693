"""Fluency (ROME's generation entropy): does the edited model still write varied text?

One model-level row, protocol `model`, metric `ge`: over those of the first `n_requests` edited
requests that have generation prompts, the mean of each one's mean n-gram entropy of prompt + greedy
continuation. No row when none has generation prompts (zsRE, MQuAKE).
"""

from __future__ import annotations

from dataclasses import dataclass

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row
from engramflow.editors.evaluation.scoring import generate, mean, ngram_entropy


@dataclass(frozen=True, eq=False)
class Fluency(Evaluator):
    n_requests: int = 10  # edited requests whose generation prompts are read
    max_new_tokens: int = 20

    def __call__(self, ctx: EvalContext) -> list[Row]:
        chosen = [r for r in ctx.edited[: self.n_requests] if r.generation_prompts]
        prompts = [p for r in chosen for p in r.generation_prompts]
        texts = iter(generate(ctx.model, ctx.tok, prompts, self.max_new_tokens))
        per_request = [sum(ngram_entropy(p + next(texts)) for p in r.generation_prompts) / len(r.generation_prompts)
                       for r in chosen]
        return self.rows(None, {"ge": mean(per_request)})


register(Fluency(
    name="fluency", protocol="model",
    source="ROME (Meng et al. 2022), generation entropy on CounterFact's generation prompts",
    metrics={"ge": "mean over requests of the weighted 2-/3-gram entropy (bits) of prompt + greedy continuation"},
))
