"""Reports and audit over the store: what sequential editing did to a model, and what it changed.

`write_report` renders one run (PNG plots and `report.md`), `compare_report` overlays several runs
in one figure per metric, `summary_table` is what the CLI prints after a run; `subject_history` lists
every edit that touched a subject.

Plots put the number of edits applied on the x axis (0 = the unedited model, step -1), so runs
with different batch sizes line up; a run whose steps have no `edits` rows falls back to batches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from engramflow.ledger import get_version
from engramflow.storage import Store
from engramflow.storage import queries as q

Series = dict[int, float]  # step -> value

SCORES = ("es", "ps", "ns")
MAGNITUDES = ("em", "pm", "nm")
LABELS = {
    "es": "efficacy (ES)", "ps": "paraphrase (PS)", "ns": "neighbourhood (NS)",
    "em": "efficacy magnitude (EM)", "pm": "paraphrase magnitude (PM)", "nm": "neighbourhood magnitude (NM)",
    "s": "score S (harmonic mean of ES, PS, NS)", "probe_top1": "unrelated-probe top-1 accuracy",
    "perplexity": "perplexity (held-out text)", "ge": "generation entropy (bits)",
    "rel_norm": "max ‖W − W₀‖_F / ‖W₀‖_F over edited layers",
}
NORM_PREFIX = "rel_norm.L"
NORM_LABEL = r"$\Vert W - W_0\Vert_F\ /\ \Vert W_0\Vert_F$"
# Metrics `compare_report` draws, one figure each: (file stem, title, y label).
COMPARED = (
    ("es", "Efficacy of all edits so far", "ES"),
    ("ps", "Paraphrase success of all edits so far", "PS"),
    ("ns", "Neighbourhood success of all edits so far", "NS"),
    ("retention_es", "Retention of the first batch", "ES of the first batch's edits"),
    ("probe_top1", "Unrelated facts kept", "probe top-1 accuracy"),
    ("perplexity", "Perplexity drift", "perplexity (held-out text)"),
    ("ge", "Fluency", "generation entropy (bits)"),
    ("rel_norm", "Norm growth of the edited matrices", "max over layers of " + NORM_LABEL),
)


@dataclass
class RunData:
    """Everything a report shows about one run, read from the store."""

    run: dict[str, Any]  # the newest `runs` row
    x: dict[int, int]  # step -> x position (edits applied, or batches applied)
    x_label: str
    scores: dict[str, Series]  # CounterFact metrics of all edits so far
    counts: Series  # step -> edits evaluated at that step
    first_batch: int | None
    retention: dict[str, Series]  # CounterFact metrics of the first batch's edits
    drift: dict[str, Series]  # probe_top1, perplexity, ge, rel_norm.L<layer>, rel_norm (max)
    collapse: int | None

    @property
    def run_id(self) -> str:
        return self.run["run_id"]

    @property
    def label(self) -> str:
        """Method, model and batch size: what tells runs apart in a legend."""
        params = json.loads(self.run["params"] or "{}")
        model = Path(str(self.run["model"] or "?")).name
        parts = [str(self.run["algorithm"] or self.run["flow"]), model]
        if params.get("batch_size"):
            parts.append(f"batch {params['batch_size']}")
        return " · ".join(parts)

    @property
    def last_step(self) -> int | None:
        steps = [s for series in (*self.scores.values(), *self.drift.values()) for s in series if s >= 0]
        return max(steps, default=None)

    @property
    def norm_layers(self) -> list[str]:
        return sorted((m for m in self.drift if m.startswith(NORM_PREFIX)), key=lambda m: int(m[len(NORM_PREFIX):]))


def _by_metric(rows: list[dict[str, Any]]) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for r in rows:
        if r["value"] is not None:
            out.setdefault(r["metric"], {})[int(r["step"])] = float(r["value"])
    return out


def load_run(store: Store, run_id: str) -> RunData:
    """Read one run's report data (KeyError naming the run when it is not recorded)."""
    run = q.run_row(store, run_id)
    cf_rows = q.degradation(store, run_id).to_pylist()
    drift_rows = q.drift(store, run_id).to_pylist()
    drift = _by_metric(drift_rows)
    norms = [series for metric, series in drift.items() if metric.startswith(NORM_PREFIX)]
    for series in norms:  # the unedited model's matrices are W₀: their relative change is 0 by definition
        series.setdefault(-1, 0.0)
    if norms:
        drift["rel_norm"] = {s: max(n[s] for n in norms if s in n) for s in set().union(*norms)}
    scores = _by_metric(cf_rows)
    steps = {s for series in (*scores.values(), *drift.values()) for s in series}
    edits = q.edits_so_far(store, run_id)
    if steps <= set(edits):
        x, x_label = edits, "edits applied"
    else:
        x, x_label = {s: s + 1 for s in steps}, "batches applied"
    batches = sorted(s for s in edits if s >= 0)
    first = batches[0] if batches else None
    retention = _by_metric(q.retention(store, run_id, first).to_pylist()) if first is not None else {}
    return RunData(run=run, x=x, x_label=x_label, scores=scores,
                   counts={int(r["step"]): r["n"] for r in cf_rows if r["metric"] == "es"},
                   first_batch=first, retention=retention, drift=drift, collapse=q.collapse_step(drift_rows))


# --- numbers -----------------------------------------------------------------------------------
def harmonic(values: Sequence[float | None]) -> float | None:
    """ROME's score S: harmonic mean of ES, PS, NS (None if one is missing, 0 if one is 0)."""
    if any(v is None or math.isnan(v) for v in values):
        return None
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1 / v for v in values)


def summary(data: RunData) -> dict[str, Any]:
    """The run's final numbers (after its last batch) beside the unedited model's."""
    last = data.last_step

    def at(series: Series | None, step: int | None) -> float | None:
        return None if series is None or step is None else series.get(step)

    out: dict[str, Any] = {"run_id": data.run_id, "algorithm": data.run["algorithm"], "model": data.run["model"],
                           "dataset": data.run["dataset"], "status": data.run["status"], "last_step": last,
                           "edits": data.x.get(last) if data.x_label == "edits applied" else data.counts.get(last),
                           "collapse": data.collapse}
    for metric in (*SCORES, *MAGNITUDES):
        out[metric] = at(data.scores.get(metric), last)
        out[f"{metric}_unedited"] = at(data.scores.get(metric), -1)  # the same requests, before any edit
    out["s"] = harmonic([out[m] for m in SCORES])
    out["s_unedited"] = harmonic([out[f"{m}_unedited"] for m in SCORES])
    if data.first_batch is not None:
        out["retention_es"] = at(data.retention.get("es"), last)
    for metric in ("probe_top1", "perplexity", "ge", "rel_norm"):
        out[metric] = at(data.drift.get(metric), last)
        out[f"{metric}_unedited"] = at(data.drift.get(metric), -1)
    return out


def fmt(value: float | int | None, metric: str = "") -> str:
    """A number as reports print it: 3 decimals, 2 for perplexity/entropy, 4 for norm ratios."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int):
        return str(value)
    if metric in ("perplexity", "ge"):
        return f"{value:.2f}"
    if metric.startswith("rel_norm"):
        return f"{value:.4f}"
    return f"{value:.3f}"


def step_name(step: int | None) -> str:
    return "—" if step is None else "unedited" if step == -1 else f"batch {step}"


# --- plots -------------------------------------------------------------------------------------
def _axes(fig: Figure, n: int = 1) -> list[Axes]:
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return list(axes)


def _x_axis(ax: Axes, x_label: str) -> None:
    """Integer ticks from 0, the 0 tick (step -1, the unedited model) labelled "unedited"."""
    ax.set_xlabel(f"{x_label} (0 = unedited model)")
    ax.set_xlim(left=-0.03 * max(1.0, ax.get_xlim()[1]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: "unedited" if v == 0 else f"{v:g}"))


# Marker and dash per line, so lines that lie on top of each other stay distinguishable.
STYLES = (("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1))))


def _line(ax: Axes, data: RunData, series: Series | None, label: str, **style: Any) -> None:
    """Plot `series` against the run's x positions, each line with its own marker and dash. The unedited
    point is a hollow marker joined to the first batch by a faint dotted segment: nothing was measured
    between them, so no solid line pretends otherwise."""
    if not series:
        return
    marker, dash = STYLES[len(ax.get_lines()) % len(STYLES)] if "marker" not in style else (style["marker"], "-")
    style = {"marker": marker, "linestyle": dash, **style}
    steps = sorted(s for s in series if s in data.x)
    xs, ys = [data.x[s] for s in steps], [series[s] for s in steps]
    edited = [i for i, s in enumerate(steps) if s >= 0]
    (line,) = ax.plot([xs[i] for i in edited], [ys[i] for i in edited], markersize=5, label=label, **style)
    if steps and steps[0] == -1:
        color = line.get_color()
        ax.plot(xs[:1], ys[:1], marker=style["marker"], markersize=8, markerfacecolor="white", color=color,
                linestyle="none")
        if edited:
            ax.plot([xs[0], xs[edited[0]]], [ys[0], ys[edited[0]]], linestyle=":", linewidth=1, alpha=0.5,
                    color=color)


def _collapse(ax: Axes, data: RunData, color: str = "crimson", label: str | None = None) -> None:
    if data.collapse is not None and data.collapse in data.x:
        ax.axvline(data.x[data.collapse], color=color, linestyle=":", linewidth=1.5,
                   label=label or f"collapse starts (after batch {data.collapse})")


def _baseline(ax: Axes, series: Series | None, what: str) -> None:
    if series and -1 in series:
        ax.axhline(series[-1], color="grey", linestyle="--", linewidth=1, label=f"unedited {what}")


def _finish(ax: Axes, data: RunData) -> None:
    """What every panel ends with: the x axis, the collapse marker and the legend."""
    _x_axis(ax, data.x_label)
    _collapse(ax, data)
    ax.legend(loc="best", fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _unit_y(ax: Axes) -> None:
    ax.set_ylim(-0.03, 1.03)


def plot_efficacy(data: RunData, path: Path) -> Path | None:
    """ES/PS/NS (and magnitudes) of all edits so far, after each batch."""
    if not any(m in data.scores for m in SCORES):
        return None
    fig = Figure(figsize=(12, 4.5))
    left, right = _axes(fig, 2)
    for m in SCORES:
        _line(left, data, data.scores.get(m), LABELS[m])
    left.set(title="Scores of all edits so far", ylabel="fraction of edits")
    _unit_y(left)
    for m in MAGNITUDES:
        _line(right, data, data.scores.get(m), LABELS[m])
    right.axhline(0, color="grey", linewidth=0.8)
    right.set(title="Magnitudes: p(new) − p(true) (NM: p(true) − p(new))", ylabel="probability difference")
    for ax in (left, right):
        _finish(ax, data)
    fig.suptitle(f"Edit quality after each batch — {data.label}")
    return _save(fig, path)


def plot_retention(data: RunData, path: Path) -> Path | None:
    """The first batch's ES/PS/NS followed over every later batch."""
    if not data.retention:
        return None
    fig = Figure(figsize=(7.5, 4.5))
    (ax,) = _axes(fig)
    for m in SCORES:
        _line(ax, data, data.retention.get(m), LABELS[m])
    n = data.counts.get(data.first_batch)
    ax.set(title=f"Retention of batch {data.first_batch}{f' ({n} edits)' if n else ''} — {data.label}",
           ylabel="fraction of the batch's edits")
    _unit_y(ax)
    _finish(ax, data)
    return _save(fig, path)


def plot_drift(data: RunData, path: Path) -> Path | None:
    """Locality (NS, unrelated probes) and perplexity / generation entropy drift."""
    panels = [m for m in ("perplexity", "ge") if m in data.drift]
    if "probe_top1" not in data.drift and "ns" not in data.scores and not panels:
        return None
    fig = Figure(figsize=(5.5 * (1 + len(panels)), 4.5))
    axes = _axes(fig, 1 + len(panels))
    _line(axes[0], data, data.scores.get("ns"), LABELS["ns"] + " of edits so far")
    _line(axes[0], data, data.drift.get("probe_top1"), LABELS["probe_top1"])
    _baseline(axes[0], data.drift.get("probe_top1"), "probe accuracy")
    axes[0].set(title="Locality: what must not move", ylabel="fraction")
    _unit_y(axes[0])
    for ax, metric in zip(axes[1:], panels, strict=True):
        _line(ax, data, data.drift[metric], LABELS[metric], color="tab:purple")
        _baseline(ax, data.drift[metric], metric if metric == "perplexity" else "entropy")
        ax.set(title=LABELS[metric][0].upper() + LABELS[metric][1:], ylabel=LABELS[metric])
    for ax in axes:
        _finish(ax, data)
    fig.suptitle(f"Drift of what was not edited — {data.label}")
    return _save(fig, path)


def plot_norms(data: RunData, path: Path) -> Path | None:
    """‖W − W₀‖/‖W₀‖ of each edited matrix after each batch."""
    if not data.norm_layers:
        return None
    fig = Figure(figsize=(7.5, 4.5))
    (ax,) = _axes(fig)
    for metric in data.norm_layers:
        _line(ax, data, data.drift[metric], f"layer {metric[len(NORM_PREFIX):]}")
    ax.set(title=f"Norm growth of the edited MLP output matrices — {data.label}", ylabel=NORM_LABEL)
    _finish(ax, data)
    return _save(fig, path)


# --- markdown ----------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *map(line, rows), ""]


def _collapse_sentence(data: RunData) -> str:
    probe = data.drift.get("probe_top1")
    if not probe or -1 not in probe:
        return "Collapse: not assessed (no unrelated-probe accuracy of the unedited model recorded)."
    if data.collapse is None:
        last = data.last_step
        return (f"No collapse: unrelated-probe top-1 stayed within 10 points of the unedited model "
                f"({fmt(probe[-1])} unedited, {fmt(probe.get(last))} after {step_name(last)}).")
    edits = data.x.get(data.collapse) if data.x_label == "edits applied" else None
    return (f"**Collapse starts after batch {data.collapse}**{f' ({edits} edits)' if edits else ''}: "
            f"unrelated-probe top-1 fell from {fmt(probe[-1])} (unedited) to {fmt(probe[data.collapse])}, "
            f"more than 10 points.")


def _final_table(data: RunData) -> list[str]:
    s = summary(data)
    last = step_name(s["last_step"])
    unedited = {m: data.scores.get(m, {}).get(-1) for m in (*SCORES, *MAGNITUDES)}  # the run's requests, before
    unedited["s"] = harmonic([unedited[m] for m in SCORES])
    rows = [[LABELS[m], fmt(unedited[m]), fmt(s[m])] for m in (*SCORES, *MAGNITUDES, "s")]
    if "retention_es" in s:
        rows.append([f"ES of batch {data.first_batch}'s edits", "—", fmt(s["retention_es"])])
    rows += [[LABELS[m], fmt(s[f"{m}_unedited"], m), fmt(s[m], m)] for m in ("probe_top1", "perplexity", "ge")]
    rows += [[f"‖W − W₀‖_F / ‖W₀‖_F, layer {m[len(NORM_PREFIX):]}", fmt(data.drift[m][-1], m),
              fmt(data.drift[m].get(s["last_step"]), m)]
             for m in data.norm_layers]
    rows = [row for row in rows if row[1:] != ["—", "—"]]  # metrics this run did not record
    return _table(["metric", "unedited", f"after {last}"], rows)


def _per_step_table(data: RunData) -> list[str]:
    steps = sorted({s for series in (*data.scores.values(), *data.drift.values()) for s in series})
    rows = []
    for step in steps:
        rows.append([step_name(step), str(data.x.get(step, "—")),
                     *(fmt(data.scores.get(m, {}).get(step)) for m in SCORES),
                     *(fmt(data.drift.get(m, {}).get(step), m) for m in ("probe_top1", "perplexity", "rel_norm"))])
    return _table(["after", data.x_label, "ES", "PS", "NS", "probe top-1", "perplexity", "max rel. norm"], rows)


def _params_table(run: Mapping[str, Any]) -> list[str]:
    params = json.loads(run["params"] or "{}")
    rows = [[key, json.dumps(value) if isinstance(value, dict | list) else str(value)]
            for key, value in sorted(params.items())]
    return _table(["parameter", "value"], rows) if rows else ["(no parameters recorded)", ""]


def write_report(store: Store, run_id: str, out_dir: str | Path) -> Path:
    """Write one run's plots and `report.md` into `out_dir`; return the markdown's path."""
    data = load_run(store, run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "Edit quality of all edits so far": plot_efficacy(data, out / "efficacy.png"),
        "Retention of the first batch": plot_retention(data, out / "retention.png"),
        "Neighbourhood, unrelated probes and perplexity": plot_drift(data, out / "drift.png"),
        "Norm growth of edited matrices": plot_norms(data, out / "norms.png"),
    }
    run = data.run
    lines = [
        f"# Run `{run_id}`", "",
        f"{run['flow']} flow · algorithm **{run['algorithm'] or '—'}** · model `{run['model'] or '—'}` · dataset "
        f"`{run['dataset'] or '—'}` · status **{run['status']}** · started {run['started_at']:%Y-%m-%d %H:%M:%S} UTC"
        + (f" · finished {run['finished_at']:%Y-%m-%d %H:%M:%S} UTC" if run["finished_at"] else ""), "",
        _collapse_sentence(data), "",
        "## Final numbers", "", *_final_table(data),
        "## After each batch", "", *_per_step_table(data),
        "## Plots", "",
    ]
    for title, path in plots.items():
        lines += [f"### {title}", "", f"![{title}]({path.name})" if path else "(nothing recorded)", ""]
    lines += _trace_section(store, run, out)
    lines += ["## Run parameters", "", *_params_table(run)]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _trace_section(store: Store, run: Mapping[str, Any], out: Path) -> list[str]:
    """The causal-trace heatmaps behind a run whose layers were located (`--layers auto`), copied beside
    the report so its links work wherever the report goes."""
    import shutil

    import pyarrow.compute as pc

    from engramflow.home import get_home

    if json.loads(run["params"] or "{}").get("layers") != "auto":
        return []
    traces = store.read("traces", columns=["trace_id", "base_model"], filter=pc.field("base_model") == run["model"])
    lines = ["## Where the facts live (causal tracing)", ""]
    for trace_id in sorted(set(traces.column("trace_id").to_pylist())):
        source = get_home() / "reports" / "traces" / trace_id
        for image in sorted(source.glob("*.png")):
            target = out / "traces" / trace_id / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
            lines += [f"![{trace_id}: {image.stem}](traces/{trace_id}/{image.name})", ""]
    return lines if len(lines) > 2 else []


def _compare_series(data: RunData, metric: str) -> Series | None:
    if metric == "retention_es":
        return data.retention.get("es")
    return data.scores.get(metric) or data.drift.get(metric)


def compare_report(store: Store, run_ids: Sequence[str], out_dir: str | Path) -> Path:
    """Overlay several runs (e.g. MEMIT vs EMMET vs AlphaEdit on one dataset): one PNG per metric and
    a `report.md` with a summary table; return the markdown's path."""
    if len(set(run_ids)) < 2:
        raise ValueError(f"a comparison needs at least two distinct runs, got {list(run_ids)}")
    runs = [load_run(store, r) for r in dict.fromkeys(run_ids)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_labels = {d.x_label for d in runs}
    x_label = x_labels.pop() if len(x_labels) == 1 else "edits or batches applied"
    plots: list[tuple[str, Path]] = []
    for stem, title, ylabel in COMPARED:
        if not any(_compare_series(d, stem) for d in runs):
            continue
        fig = Figure(figsize=(8, 4.8))
        (ax,) = _axes(fig)
        for i, data in enumerate(runs):
            color = f"C{i}"
            _line(ax, data, _compare_series(data, stem), data.label, color=color)
            _collapse(ax, data, color=color, label=f"{data.label}: collapse after batch {data.collapse}")
        if stem in (*SCORES, "retention_es", "probe_top1"):
            _unit_y(ax)
        ax.set(title=f"{title} — {len(runs)} runs", ylabel=ylabel)
        _x_axis(ax, x_label)
        ax.legend(loc="best", fontsize=8)
        plots.append((title, _save(fig, out / f"{stem}.png")))
    lines = [f"# Comparison of {len(runs)} runs", "",
             "Final numbers after each run's last batch; `a → b` is unedited → final. Collapse = the first "
             "batch after which unrelated-probe top-1 fell more than 10 points below the unedited model.", "",
             *_table(COMPARE_HEADER, [compare_row(summary(d)) for d in runs]), "## Plots", ""]
    for title, path in plots:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    lines += ["## Run parameters", ""]
    params = [json.loads(d.run["params"] or "{}") for d in runs]
    keys = sorted(set().union(*params))
    lines += _table(["parameter", *(d.run_id for d in runs)],
                    [[k, *(json.dumps(p[k]) if k in p else "—" for p in params)] for k in keys])
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


COMPARE_HEADER = ("run", "algorithm", "edits", "ES", "PS", "NS", "S", "first batch ES", "probe top-1",
                  "perplexity", "max rel. norm", "collapse")


def compare_row(s: Mapping[str, Any]) -> list[str]:
    """One run's summary as the cells of `COMPARE_HEADER` (also what the CLI prints)."""
    def before_after(metric: str) -> str:
        return f"{fmt(s[f'{metric}_unedited'], metric)} → {fmt(s[metric], metric)}"

    return [s["run_id"], str(s["algorithm"]), fmt(s["edits"]), *(fmt(s[m]) for m in (*SCORES, "s")),
            fmt(s.get("retention_es")), before_after("probe_top1"), before_after("perplexity"),
            fmt(s["rel_norm"], "rel_norm"),
            "none" if s["collapse"] is None else f"after batch {s['collapse']}"]


# --- audit -------------------------------------------------------------------------------------
def subject_history(store: Store, subject: str, contains: bool = False) -> list[dict[str, Any]]:
    """Every edit that touched `subject`, with its latest ES/PS and `in_latest` (whether its delta is
    still in its run's newest model version, i.e. not reverted)."""
    rows = q.history(store, subject, contains).to_pylist()
    latest: dict[str, tuple[str, ...]] = {}
    for row in rows:
        if row["run_id"] not in latest:
            latest[row["run_id"]] = get_version(store, q.latest_version(store, row["run_id"])["version_id"]).delta_keys
        row["in_latest"] = row["delta_key"] in latest[row["run_id"]]
    return rows


# --- the terminal ------------------------------------------------------------------------------
# Rows of `summary_table`: (summary key, label, has an unedited value).
SUMMARY_ROWS = (
    ("es", "ES", True), ("ps", "PS", True), ("ns", "NS", True), ("s", "S", True),
    ("retention_es", "first batch ES", False), ("probe_top1", "probe top-1", True),
    ("perplexity", "perplexity", True), ("ge", "fluency (ge)", True), ("rel_norm", "max rel. norm", True),
)


def summary_table(summaries: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """One rich table for the CLI (after a run, `demo`, `report`): a metric per row, a run per column,
    and the unedited model in its own column when every run starts from the same one (else each cell
    reads unedited → final). Narrow enough for an 80-column terminal with three runs."""
    from rich.table import Table

    names = [str(s["algorithm"]) for s in summaries]
    if len(set(names)) < len(names):  # the same method twice: tell the runs apart
        names = [f"{n} {s['run_id'][-6:]}" for n, s in zip(names, summaries, strict=True)]
    shared = all(s.get(f"{k}_unedited") == summaries[0].get(f"{k}_unedited")
                 for s in summaries for k, _, before in SUMMARY_ROWS if before)
    table = Table(title=title or None, title_justify="left")
    table.add_column("metric")
    if shared:
        table.add_column("unedited", justify="right")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for key, label, before in SUMMARY_ROWS:
        if all(s.get(key) is None for s in summaries):
            continue
        cells = []
        for s in summaries:
            final = fmt(s.get(key), key)
            cells.append(final if shared or not before else f"{fmt(s.get(f'{key}_unedited'), key)} → {final}")
        table.add_row(label, *([fmt(summaries[0].get(f"{key}_unedited"), key) if before else "—"] if shared else []),
                      *cells)
    table.add_row("edits", *(["0"] if shared else []), *(fmt(s.get("edits")) for s in summaries))
    table.add_row("collapse", *(["—"] if shared else []),
                  *("none" if s.get("collapse") is None else f"batch {s['collapse']}" for s in summaries))
    return table
