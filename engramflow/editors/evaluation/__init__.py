"""The evaluator registry: named evaluation protocols in the style of lm-evaluation-harness.

Each module of this package defines and registers its evaluators (`register`); a run selects them by
name (an ingest format's defaults, a method's additions, or `--eval`), and every metric the pipeline
records comes from one of them. Adding a protocol is one module here.

    ctx = EvalContext(model, tok, edited=requests, probes=probes, texts=held_out)
    rows = evaluate(ctx, ["counterfact", "fluency", "perplexity"])
    summarize(rows)  # {(protocol, metric): mean}, with CounterFact's S
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence

from engramflow.editors.evaluation.base import EvalContext, Evaluator, Row, asked_prompts
from engramflow.editors.evaluation.scoring import harmonic_mean

EVALUATORS: dict[str, Evaluator] = {}
_LOADED = False


def register(evaluator: Evaluator) -> Evaluator:
    """Add an evaluator to the registry under its name (a module calls this at import)."""
    if evaluator.name in EVALUATORS and EVALUATORS[evaluator.name] is not evaluator:
        raise ValueError(f"an evaluator named {evaluator.name!r} is already registered")
    EVALUATORS[evaluator.name] = evaluator
    return evaluator


def load_all() -> dict[str, Evaluator]:
    """Import every module of this package once; the registry, name -> evaluator."""
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True
    return EVALUATORS


def get_evaluator(name: str) -> Evaluator:
    """The registered evaluator `name` (ValueError naming the known ones otherwise)."""
    evaluators = load_all()
    try:
        return evaluators[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown evaluation protocol {name!r}; known: {', '.join(sorted(evaluators))}") from None


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
