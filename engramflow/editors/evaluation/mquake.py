"""MQuAKE multi-hop (Zhong et al. 2023): once every rewrite of a case is edited, do questions that
chain them reach the new answer?

Rows carry protocol `mquake`, one set per complete case: a case is the requests the `mquake` loader
made of one record's rewrites (its `extra` holds the case's `questions`, `answer`, `new_answer`,
`new_answer_alias`, `rewrite_index` and `n_rewrites`); it is scored only when all its rewrites are
among the edited requests, and its rows are keyed by the request of its first rewrite. "Answered" is
teacher-forced exact match after the bare question (greedy decoding would begin with the answer),
not the paper's generated answers under a few-shot chain-of-thought prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engramflow.editors.evaluation import register
from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row
from engramflow.editors.evaluation.scoring import mean, score_targets
from engramflow.editors.requests import Request


@dataclass(frozen=True)
class Case:
    """One MQuAKE record whose rewrites are all edited."""

    request_id: str  # the request of its first rewrite
    questions: tuple[str, ...]
    answer: str  # the multi-hop answer before the edits
    new_answers: tuple[str, ...]  # after them: new_answer and its aliases


def complete_cases(requests: list[Request]) -> list[Case]:
    """The cases all of whose rewrites are among `requests`, in the order of their first rewrite."""
    parts: dict[str, dict[int, Request]] = {}
    info: dict[str, dict[str, Any]] = {}
    for r in requests:
        extra = r.extras
        if not extra.get("questions") or not extra.get("new_answer") or "rewrite_index" not in extra:
            continue
        key = json.dumps([extra["questions"], extra["new_answer"]])
        parts.setdefault(key, {})[int(extra["rewrite_index"])] = r
        info[key] = extra
    cases = []
    for key, rewrites in parts.items():
        extra = info[key]
        if set(rewrites) != set(range(int(extra.get("n_rewrites", 0)))):
            continue
        aliases = [a for a in extra.get("new_answer_alias") or () if isinstance(a, str) and a.strip()]
        cases.append(Case(rewrites[0].request_id, tuple(extra["questions"]), extra.get("answer") or "",
                          tuple(dict.fromkeys([extra["new_answer"], *aliases]))))
    return cases


@dataclass(frozen=True, eq=False)
class MultiHop(Evaluator):
    def __call__(self, ctx: EvalContext) -> list[Row]:
        cases = complete_cases(list(ctx.edited))
        pairs = [(q, a) for c in cases for q in c.questions for a in c.new_answers]
        pairs += [(q, c.answer) for c in cases if c.answer for q in c.questions]
        scores = dict(zip(pairs, score_targets(ctx.model, ctx.tok, pairs, ctx.batch_size), strict=True))
        rows: list[Row] = []
        for c in cases:
            answered = any(scores[q, a].accuracy == 1.0 for q in c.questions for a in c.new_answers)
            preferred = [float(scores[q, c.new_answers[0]].nll < scores[q, c.answer].nll)
                         for q in c.questions] if c.answer else []
            rows += self.rows(c.request_id, {"multihop": float(answered), "multihop_pref": mean(preferred)})
        return rows


register(MultiHop(
    name="mquake", protocol="mquake",
    source="MQuAKE (Zhong et al. 2023), multi-hop accuracy; teacher-forced instead of generated answers",
    metrics={
        "multihop": "1 if any of the case's multi-hop questions is answered with new_answer or an alias "
                    "(every answer token top-1 under teacher forcing)",
        "multihop_pref": "share of the case's questions with P(new_answer) > P(answer before the edits)",
    },
))
