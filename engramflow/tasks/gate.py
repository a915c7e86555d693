"""Quality-gate stage of continual editing: measure a model version on what it must keep, and decide
whether a candidate may replace the alias's current version.

A measurement (`measure_version`, a task) holds per-request ES/PS of the drop's edits and of every
earlier edit behind the alias, per-probe top-1 of an unrelated probe set, and perplexity on a fixed
text. `decide` compares a candidate's measurement with the current version's against the thresholds
(`gate_defaults.yaml` beside this module, overridden per deployment with `--gate FILE`);
`record_gate` writes the decision as a `gates` row and a Prefect markdown artifact.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow.aliases import edit_scores
from engramflow.ledger import Version, default_store, fetch_requests, materialize
from engramflow.runtime import retry_on_worker_loss, use_assigned_cpus
from engramflow.storage import Store
from engramflow.tasks.stats import corpus_texts

DEFAULTS_FILE = Path(__file__).with_name("gate_defaults.yaml")


@dataclass(frozen=True)
class GateSettings:
    """Thresholds and what the gate measures on (keys of `gate_defaults.yaml`)."""

    min_es: float
    min_ps: float
    max_retention_drop: float
    max_probe_drop: float
    max_perplexity_rise: float
    probe_dataset: str | None = None
    probe_format: str = "world"
    n_probes: int = 100
    probe_seed: int = 0
    perplexity_text: str | None = None
    perplexity_lines: int = 200

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


THRESHOLDS = ("min_es", "min_ps", "max_retention_drop", "max_probe_drop", "max_perplexity_rise")


def load_gate(overrides: str | Path | Mapping[str, Any] | None = None) -> GateSettings:
    """The defaults with `overrides` (a YAML file or a mapping) on top; an unknown key or a value of the
    wrong kind is a ValueError naming it and where it came from."""
    values = yaml.safe_load(DEFAULTS_FILE.read_text())
    source = "gate overrides"
    if isinstance(overrides, (str, Path)):
        source = str(overrides)
        try:
            overrides = yaml.safe_load(Path(overrides).read_text()) or {}
        except OSError as err:
            raise ValueError(f"gate file {source}: cannot read it ({err})") from None
        if not isinstance(overrides, Mapping):
            raise ValueError(f"gate file {source}: expected a mapping of thresholds, got {type(overrides).__name__}")
    known = {f.name: f for f in fields(GateSettings)}
    unknown = sorted(set(overrides or {}) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown gate key(s) {unknown}; keys: {sorted(known)}")
    values.update(overrides or {})
    for name in THRESHOLDS:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{source}: {name} must be a number >= 0, got {value!r}")
        values[name] = float(value)
    for name in ("n_probes", "probe_seed", "perplexity_lines"):
        if isinstance(values[name], bool) or not isinstance(values[name], int) or values[name] < 0:
            raise ValueError(f"{source}: {name} must be a whole number >= 0, got {values[name]!r}")
    return GateSettings(**values)


# --- what the gate measures on --------------------------------------------------------------------
def world_of(corpus: str) -> str | None:
    """The embedded world a corpus name is (`world`, `world-tiny`), else None."""
    from engramflow.data.world import NAMED_WORLDS

    return corpus if corpus in NAMED_WORLDS else None


@task(name="select-probes", cache_policy=NO_CACHE)
def select_probes(settings: GateSettings, corpus: str, exclude_subjects: list[str]) -> list[str]:
    """Request ids of the probe set: `n_probes` facts of the probe dataset (default: the corpus's world)
    whose subjects are not in `exclude_subjects`, in a seeded order, so the same edits get the same
    probes. Empty when no probe dataset is configured or known."""
    from engramflow.data.ingest import ingest_file

    dataset = settings.probe_dataset or world_of(corpus)
    if dataset is None or settings.n_probes == 0:
        return []
    fmt = settings.probe_format if settings.probe_dataset else "world"
    ids = ingest_file(dataset, fmt).request_ids
    excluded = set(exclude_subjects)
    candidates = [r for r in fetch_requests(default_store(), ids) if r.target_true and r.subject not in excluded]
    random.Random(settings.probe_seed).shuffle(candidates)
    return [r.request_id for r in candidates[: settings.n_probes]]


def perplexity_texts(settings: GateSettings, corpus: str, exclude_subjects: Sequence[str]) -> list[str]:
    """The fixed text perplexity is measured on: the last `perplexity_lines` sentences of the perplexity
    text (default: the corpus) that mention no subject in `exclude_subjects`. What is said about an
    edited subject is meant to change (the embedded world's corpus states the very facts a drop edits:
    with them in, 50 good MEMIT edits raised it 11%)."""
    from engramflow.editors.covariance import subject_pattern

    if not settings.perplexity_lines:
        return []
    sentences = [s for line in corpus_texts(settings.perplexity_text or corpus)
                 for s in re.split(r"(?<=[.!?])\s+", line.strip()) if s]
    pattern = subject_pattern(exclude_subjects)
    return [s for s in sentences if pattern is None or not pattern.search(s)][-settings.perplexity_lines:]


@task(name="measure", cache_policy=NO_CACHE)
def measure_version(version: Version, request_ids: list[str], probe_ids: list[str], texts: list[str], method: str,
                    hparams: dict[str, Any] | None, device: str = "cpu") -> dict[str, Any]:
    """ES/PS of `request_ids` (scored as `method` wants), top-1 of `probe_ids` and perplexity on `texts`,
    on `version`: {"scores", "probe_top1", "perplexity", "seconds"}."""
    from engramflow.editors.evaluation import EvalContext, evaluate
    from engramflow.editors.methods import get_method
    use_assigned_cpus()
    start = time.perf_counter()
    store = default_store()
    model, tok = materialize(store, version, device=device)
    m = get_method(method)
    requests = m.scored(fetch_requests(store, request_ids), m.hparams(model, hparams))
    ctx = EvalContext(model, tok, probes=fetch_requests(store, probe_ids), texts=texts)
    rows = evaluate(ctx, ["probe", *(["perplexity"] if texts else [])])
    return {
        "scores": edit_scores(model, tok, requests),
        "probe_top1": {r["request_id"]: r["value"] for r in rows if r["metric"] == "top1"},
        "perplexity": next((r["value"] for r in rows if r["metric"] == "perplexity"), None),
        "seconds": time.perf_counter() - start,
    }


# It only reads: rerunning one whose worker died changes nothing.
retry_on_worker_loss(measure_version)


# --- the decision ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    values: dict[str, Any]  # the measured columns of a `gates` row, thresholds included


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def decide(current: Mapping[str, Any], candidate: Mapping[str, Any], own: Sequence[str], earlier: Sequence[str],
           settings: GateSettings) -> GateDecision:
    """Does `candidate` (a measurement) hold against `current` for the drop's edits `own` and the earlier
    edits `earlier`? A criterion with nothing to measure (no earlier edits, no probes) holds."""
    cand, cur = candidate["scores"], current["scores"]
    es = _mean([cand[r]["es"] for r in own])
    ps = _mean([cand[r]["ps"] for r in own])
    retention = _mean([cand[r]["es"] for r in earlier])
    retention_current = _mean([cur[r]["es"] for r in earlier])
    probes = sorted(set(candidate["probe_top1"]) & set(current["probe_top1"]))
    probe = _mean([candidate["probe_top1"][p] for p in probes])
    probe_current = _mean([current["probe_top1"][p] for p in probes])
    ppl, ppl_current = candidate["perplexity"], current["perplexity"]
    values = {
        "es": es, "ps": ps, "retention": retention, "retention_current": retention_current,
        "retention_drop": None if retention is None else retention_current - retention,
        "probe_top1": probe, "probe_top1_current": probe_current,
        "probe_drop": None if probe is None else probe_current - probe,
        "perplexity": ppl, "perplexity_current": ppl_current,
        "perplexity_rise": None if ppl is None or ppl_current is None else ppl / ppl_current - 1,
        "n_earlier": len(earlier), "n_probes": len(probes),
        **{name: getattr(settings, name) for name in THRESHOLDS},
    }
    failed = []
    if es is not None and es < settings.min_es:
        failed.append(f"ES {es:.3f} < min_es {settings.min_es:g}")
    if ps is not None and ps < settings.min_ps:
        failed.append(f"PS {ps:.3f} < min_ps {settings.min_ps:g}")
    if values["retention_drop"] is not None and values["retention_drop"] > settings.max_retention_drop:
        failed.append(f"retention of {len(earlier)} earlier edits fell {values['retention_drop']:.3f} "
                      f"({retention_current:.3f} -> {retention:.3f}) > max_retention_drop "
                      f"{settings.max_retention_drop:g}")
    if values["probe_drop"] is not None and values["probe_drop"] > settings.max_probe_drop:
        failed.append(f"probe top-1 fell {values['probe_drop']:.3f} ({probe_current:.3f} -> {probe:.3f}, "
                      f"{len(probes)} probes) > max_probe_drop {settings.max_probe_drop:g}")
    if values["perplexity_rise"] is not None and values["perplexity_rise"] > settings.max_perplexity_rise:
        failed.append(f"perplexity rose {values['perplexity_rise']:.1%} ({ppl_current:.3f} -> {ppl:.3f}) > "
                      f"max_perplexity_rise {settings.max_perplexity_rise:.0%}")
    return GateDecision(not failed, "; ".join(failed) or "passed", values)


# --- the record -----------------------------------------------------------------------------------
def record_gate(store: Store, row: dict[str, Any], publish: bool = True) -> None:
    """Append a `gates` row and, inside a Prefect run, publish it as a markdown artifact (one key per
    alias, so the Prefect UI shows an alias's decisions as one versioned history)."""
    store.append("gates", [row])
    if not publish:
        return
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import get_run_context

    try:
        get_run_context()
    except Exception:  # MissingContextError: not inside a flow or task run
        return
    key = "gate-" + re.sub(r"[^a-z0-9-]+", "-", row["alias"].lower()).strip("-")
    create_markdown_artifact(markdown=gate_markdown(row), key=key,
                             description=f"gate {row['evaluation']} of {row['alias']}: "
                                         f"{'passed' if row['passed'] else 'failed'}")


def gate_markdown(row: Mapping[str, Any]) -> str:
    """A gate row as a markdown table: each criterion, the current and candidate values, the threshold."""
    def f(value: Any, pct: bool = False) -> str:
        return "–" if value is None else (f"{value:.1%}" if pct else f"{value:.3f}")

    lines = [
        f"### {row['alias']}: gate {row['evaluation']} ({row['stage']}) {'passed' if row['passed'] else 'FAILED'}",
        "", f"candidate `{row['candidate_version']}` against current `{row['current_version']}`, "
            f"{len(row['request_ids'])} request(s) of the drop", "",
        "| criterion | current | candidate | change | threshold |", "|---|---|---|---|---|",
        f"| drop's ES | | {f(row['es'])} | | ≥ {row['min_es']:g} |",
        f"| drop's PS | | {f(row['ps'])} | | ≥ {row['min_ps']:g} |",
        f"| retention ({row['n_earlier']} earlier edits) | {f(row['retention_current'])} | {f(row['retention'])} | "
        f"{f(row['retention_drop'])} drop | ≤ {row['max_retention_drop']:g} |",
        f"| probe top-1 ({row['n_probes']}) | {f(row['probe_top1_current'])} | {f(row['probe_top1'])} | "
        f"{f(row['probe_drop'])} drop | ≤ {row['max_probe_drop']:g} |",
        f"| perplexity | {f(row['perplexity_current'])} | {f(row['perplexity'])} | "
        f"{f(row['perplexity_rise'], True)} rise | ≤ {row['max_perplexity_rise']:.0%} |",
        "", f"**{row['reason']}**",
    ]
    return "\n".join(lines)
