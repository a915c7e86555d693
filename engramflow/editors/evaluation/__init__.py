"""The evaluator registry: named evaluation protocols in the style of lm-evaluation-harness.

Each module of this package defines and registers its evaluators (`register`); a run selects them by
name (an ingest format's defaults, a method's additions, or `--eval`), and every metric the pipeline
records comes from one of them. Adding a protocol is one module here.

    ctx = EvalContext(model, tok, edited=requests, probes=probes, texts=held_out)
    rows = evaluate(ctx, ["counterfact", "fluency", "perplexity"])
    summarize(rows)  # {(protocol, metric): mean}, with CounterFact's S
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row, asked_prompts
from engramflow.editors.evaluation.scoring import harmonic_mean
from engramflow.editors.registry import Registry

_REGISTRY: Registry[Evaluator] = Registry(__name__, "evaluation protocol", skip=("base", "scoring"))
EVALUATORS = _REGISTRY.items  # name -> evaluator (complete once load_all has run)
register = _REGISTRY.register
load_all = _REGISTRY.load_all
get_evaluator = _REGISTRY.get


def evaluate(ctx: EvalContext, names: Sequence[str]) -> list[Row]:
    """The rows of every named protocol on `ctx`, in order."""
    return [row for evaluator in [get_evaluator(n) for n in names] for row in evaluator(ctx)]


def summarize(rows: Iterable[Row]) -> dict[tuple[str, str], float | None]:
    """Mean of each (protocol, metric) over requests, plus CounterFact's S = H(ES, PS, NS)."""
    sums: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        sums.setdefault((row["protocol"], row["metric"]), []).append(row["value"])
    summary: dict[tuple[str, str], float | None] = {key: sum(vals) / len(vals) for key, vals in sums.items()}
    parts = [summary.get(("counterfact", m)) for m in ("es", "ps", "ns")]
    if all(p is not None for p in parts):
        summary[("counterfact", "s")] = harmonic_mean(parts)
    return summary


__all__ = ["EVALUATORS", "EvalContext", "Evaluator", "Row", "asked_prompts", "evaluate", "get_evaluator",
           "load_all", "register", "summarize"]
