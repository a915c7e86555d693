"""The report of a sweep: one table of every cell's final metrics, ranked, beside the unedited model;
each metric against each swept axis (a line per value of the other axes); the degradation curves of
the cells overlaid.

The numbers come from one SQL query (`storage.queries.SWEEP_RESULTS`, documented in the README), so a
notebook gets the same table with `engramflow sql` or DuckDB.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from engramflow.report import LABELS, _axes, _save, _table, _x_axis, fmt, harmonic, load_run
from engramflow.storage import Store
from engramflow.storage import queries as q

# (column, protocol, metric) pivoted out of the long results; any other protocol's metrics become
# "<protocol>.<metric>" columns.
NAMED = (
    ("es", "counterfact", "es"), ("ps", "counterfact", "ps"), ("ns", "counterfact", "ns"),
    ("em", "counterfact", "em"), ("pm", "counterfact", "pm"), ("nm", "counterfact", "nm"),
    ("probe_top1", "probe", "top1"), ("perplexity", "model", "perplexity"), ("ge", "model", "ge"),
)
# What the table shows and the axis plots draw: (column, header).
SHOWN = (("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("s", "S"), ("probe_top1", "probe top-1"),
         ("perplexity", "perplexity"), ("rel_norm", "max rel. norm"))
# The terminal's table: what fits 80 columns beside the axes (the report's markdown has every column).
TERMINAL = (("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("probe_top1", "probe"), ("perplexity", "ppl"))
PLOTTED_LABELS = {**LABELS, "rel_norm": "max ‖W − W₀‖_F / ‖W₀‖_F"}
MARKERS = ("o", "s", "^", "D", "v", "P")
STYLES = ("-", "--", ":", "-.")


def cell_label(axes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in axes.items())


def sweep_rows(store: Store, sweep_id: str) -> list[dict[str, Any]]:
    """One dict per cell: its `sweeps` row, its final metrics and (`<metric>_unedited`) the unedited
    model's on the same requests, ES/PS/NS's harmonic mean S, the collapse step; ranked by S, then ES
    (cells without metrics last). KeyError naming the sweep when nothing is recorded."""
    long = q.sweep_results(store, sweep_id).to_pylist()
    if not long:
        raise KeyError(f"sweep {sweep_id!r} is not recorded in {store.root}")
    named = {(protocol, metric): column for column, protocol, metric in NAMED}
    cells: dict[int, dict[str, Any]] = {}
    for r in long:
        row = cells.setdefault(r["cell"], {
            k: r[k] for k in ("sweep_id", "cell", "run_id", "status", "reused", "error", "node_id", "hostname",
                              "started_at", "finished_at", "algorithm", "model", "dataset", "last_step")})
        row["axes"] = json.loads(r["axes"])
        if r["metric"] is None:
            continue
        column = named.get((r["protocol"], r["metric"]), f"{r['protocol']}.{r['metric']}")
        row[column], row[f"{column}_unedited"] = r["value"], r["unedited"]
        if column == "counterfact.es" or column == "es":
            row["edits"] = r["n"]
        if r["protocol"] == "model" and r["metric"].startswith("rel_norm.L") and r["value"] is not None:
            row["rel_norm"] = max(row.get("rel_norm") or 0.0, r["value"])
            row["rel_norm_unedited"] = 0.0
    rows = list(cells.values())
    for row in rows:
        row["s"] = harmonic([row.get(m) for m in ("es", "ps", "ns")])
        row["s_unedited"] = harmonic([row.get(f"{m}_unedited") for m in ("es", "ps", "ns")])
        row["collapse"] = None
        if row["last_step"] is not None and row["last_step"] >= 0:
            row["collapse"] = load_run(store, row["run_id"]).collapse
    rows.sort(key=lambda r: (r["s"] is None, -(r["s"] or 0.0), -(r.get("es") or 0.0), r["cell"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row["s"] is not None or row.get("es") is not None else None
    return rows


def baselines(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The unedited model's numbers per (model, dataset): from the cell of that pair with the most edits
    (its step -1 scores every request it edits)."""
    best: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        key = (row["model"], row["dataset"])
        if row.get("es_unedited") is None and row.get("probe_top1_unedited") is None:
            continue
        if key not in best or (row.get("edits") or 0) > (best[key].get("edits") or 0):
            best[key] = row
    return [{"model": m, "dataset": d, "edits": r.get("edits"), "cell": r["cell"],
             **{c: r.get(f"{c}_unedited") for c, _ in SHOWN}} for (m, d), r in best.items()]


# --- tables ----------------------------------------------------------------------------------------
def _where(row: Mapping[str, Any]) -> str:
    return f"{row.get('hostname') or '—'} ({str(row.get('node_id') or '—')[:8]})"


def _status(row: Mapping[str, Any]) -> str:
    return f"{row['status']} (before)" if row.get("reused") else row["status"]


def _collapse(row: Mapping[str, Any]) -> str:
    return "—" if row.get("last_step") is None else "none" if row["collapse"] is None else f"batch {row['collapse']}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["rank", "cell", "axes", "status", "edits", *(h for _, h in SHOWN), "collapse", "host (node)"]
    body = [["unedited", "—", f"{b['model'].rsplit('/', 1)[-1]}, {b['dataset']} (cell {b['cell']}'s requests)", "—",
             "0", *(fmt(b[c], c) for c, _ in SHOWN), "—", "—"] for b in baselines(rows)]
    body += [[str(r["rank"] or "—"), str(r["cell"]), cell_label(r["axes"]), _status(r), fmt(r.get("edits")),
              *(fmt(r.get(c), c) for c, _ in SHOWN), _collapse(r), _where(r)] for r in rows]
    return _table(header, body)


def results_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """The ranked table for the terminal (rich), narrow enough for 80 columns: rank, the cell's axes
    (with its status when it did not complete) and five metrics; the markdown report has them all."""
    from rich.markup import escape
    from rich.table import Table

    table = Table("#", "axes", *(h for _, h in TERMINAL), title=title or None, title_justify="left")
    for b in baselines(rows):
        table.add_row("—", escape(f"unedited (cell {b['cell']}'s requests)"), *(fmt(b[c], c) for c, _ in TERMINAL),
                      style="dim")
    for r in rows:
        label = cell_label(r["axes"]) + ("" if r["status"] == "completed" else f" [{_status(r)}]")
        table.add_row(str(r["rank"] or "—"), escape(label), *(fmt(r.get(c), c) for c, _ in TERMINAL))
    return table


# --- plots -----------------------------------------------------------------------------------------
def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_axis(rows: Sequence[Mapping[str, Any]], axis: str, path: Path) -> Path | None:
    """Each metric against the values of `axis`, one line per combination of the other axes (per method
    when the method is swept)."""
    done = [r for r in rows if r["status"] == "completed" and axis in r["axes"]]
    metrics = [(c, h) for c, h in SHOWN if any(r.get(c) is not None for r in done)]
    if not done or not metrics:
        return None
    values = list(dict.fromkeys(json.dumps(r["axes"][axis], sort_keys=True) for r in done))
    decoded = [json.loads(v) for v in values]
    numeric = _numeric(decoded)
    position = {v: (d if numeric else i) for i, (v, d) in enumerate(zip(values, decoded, strict=True))}
    series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for r in done:
        others = {k: v for k, v in r["axes"].items() if k != axis}
        series.setdefault(cell_label(others) or "all cells", []).append(
            (position[json.dumps(r["axes"][axis], sort_keys=True)], r))
    cols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * nrows + 0.6))
    axes = [ax for row in fig.subplots(nrows, cols, squeeze=False) for ax in row]
    base = baselines(done)
    for ax, (column, header) in zip(axes, metrics, strict=False):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        for i, (label, points) in enumerate(series.items()):
            points = sorted((x, r.get(column)) for x, r in points if r.get(column) is not None)
            if points:  # markers and dashes differ too: equal results (MEMIT and EMMET here) stay visible
                ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{i % 10}", label=label,
                        marker=MARKERS[i % len(MARKERS)], markersize=7 - 4 * (i % 2), markerfacecolor="none",
                        linestyle=STYLES[i % len(STYLES)])
        if len(base) == 1 and base[0].get(column) is not None:
            ax.axhline(base[0][column], color="grey", linestyle="--", linewidth=1, label="unedited")
        if column in ("es", "ps", "ns", "s", "probe_top1"):
            ax.set_ylim(-0.03, 1.03)
        if numeric and min(decoded) > 0 and max(decoded) / min(decoded) >= 20:
            ax.set_xscale("log")
        if numeric:
            ax.set_xticks(sorted(set(decoded)), [f"{v:g}" for v in sorted(set(decoded))])
        else:
            ax.set_xticks(range(len(values)), [str(d) for d in decoded], rotation=20)
        ax.set(title=PLOTTED_LABELS.get(column, header), xlabel=axis)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"Final metrics against {axis} — sweep {done[0]['sweep_id']}")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    return path


def plot_degradation(store: Store, rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """ES of all edits so far and unrelated-probe top-1 against edits applied, every cell evaluated after
    more than one batch overlaid."""
    runs = [(r, load_run(store, r["run_id"])) for r in rows if (r.get("last_step") or 0) >= 1]
    if not runs:
        return None
    fig = Figure(figsize=(13, 4.8))
    left, right = _axes(fig, 2)
    for i, (row, data) in enumerate(sorted(runs, key=lambda p: p[0]["cell"])):
        for ax, series in ((left, data.scores.get("es")), (right, data.drift.get("probe_top1"))):
            if series:
                steps = sorted(s for s in series if s in data.x)
                ax.plot([data.x[s] for s in steps], [series[s] for s in steps], marker=MARKERS[i % len(MARKERS)],
                        markersize=5 - 2 * (i % 2), markerfacecolor="none", color=f"C{i % 10}",
                        linestyle=STYLES[i % len(STYLES)], label=cell_label(row["axes"]))
    left.set(title="Efficacy of all edits so far", ylabel="ES")
    right.set(title="Unrelated facts kept", ylabel="probe top-1 accuracy")
    for ax in (left, right):
        ax.set_ylim(-0.03, 1.03)
        _x_axis(ax, runs[0][1].x_label)
    right.legend(loc="best", fontsize=7)
    fig.suptitle(f"Sequential degradation — sweep {rows[0]['sweep_id']}")
    return _save(fig, path)


def write_sweep_report(store: Store, sweep_id: str, out_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write the sweep's `report.md` and plots into `out_dir`; return its path and the ranked rows."""
    rows = sweep_rows(store, sweep_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = list(dict.fromkeys(k for r in rows for k in r["axes"]))
    plotted = [a for a in axes if a != "algorithm"] or axes
    plots = [(f"Final metrics against {a}", plot_axis(rows, a, out / f"axis-{_slug(a)}.png")) for a in plotted]
    plots.append(("Sequential degradation", plot_degradation(store, rows, out / "degradation.png")))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "failed", "running")}
    lines = [f"# Sweep `{sweep_id}`", "",
             f"{len(rows)} cells over {', '.join(axes)}: {counts['completed']} completed, {counts['failed']} "
             f"failed, {counts['running']} running or interrupted. Final numbers after each cell's last batch, "
             "ranked by S (harmonic mean of ES, PS, NS); the unedited rows are the model before any edit on "
             "the requests of the named cell. Collapse: the first batch after which unrelated-probe top-1 "
             "fell more than 10 points below the unedited model.", "",
             *markdown_table(rows)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed cells", "", *_table(["cell", "axes", "error"],
                                                 [[str(r["cell"]), cell_label(r["axes"]), r["error"] or "—"]
                                                  for r in failed])]
    lines += ["## Plots", ""]
    for title, path in plots:
        if path:
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    lines += ["## Runs", "", *_table(["cell", "run", "algorithm", "host (node)", "started", "finished"],
                                     [[str(r["cell"]), r["run_id"], str(r["algorithm"] or "—"), _where(r),
                                       f"{r['started_at']:%Y-%m-%d %H:%M:%S}" if r["started_at"] else "—",
                                       f"{r['finished_at']:%Y-%m-%d %H:%M:%S}" if r["finished_at"] else "—"]
                                      for r in sorted(rows, key=lambda r: r["cell"])]),
              "The same numbers in SQL (`engramflow sql`, DuckDB over the store), one row per cell, protocol "
              "and metric:", "", "```sql", q.SWEEP_RESULTS.strip().replace("$sweep", f"'{sweep_id}'"), "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report, rows


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
