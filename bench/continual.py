"""Continual editing on the embedded model: one tick's time for a drop of N world facts, and what the
gate's bisection costs when a drop carries a few harmful requests.

    .venv/bin/python bench/continual.py [--model organism|PATH] [--sizes 50,200] [--harm 5] [-a memit]
                                        [--edit-cpus 2]

Each size runs in a fresh home, so its tick is cold: the covariance statistics and every target are
computed. Reported from inside the flow (the Prefect API and Ray start are reported apart): the tick's
seconds, its batches, gate evaluations and their seconds, and the promoted version's ES/PS. Then a
second drop lands on the first size's alias: as many new facts again, `--harm` of them replaced by
harmful requests (each restores, through another prompt of its relation, the true object of a fact the
first drop edited, which breaks that earlier edit), and the bisection that finds them is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from engramflow import home


def facts(world: str) -> list[dict]:
    """The world's facts as user records, one per subject, in world order."""
    from engramflow.data.world import named_world

    out, seen = [], set()
    for record in named_world(world).user_records():
        if record["subject"] not in seen:
            seen.add(record["subject"])
            out.append(record)
    return out


def harmful(world: str, edited: list[dict], k: int) -> list[dict]:
    """`k` requests that each undo an earlier edit through another prompt of its relation."""
    from engramflow.data.world import named_world

    relations = named_world(world).relations
    out = []
    for record in edited[:k]:
        template = next(t for t in relations[record["relation"]].templates
                        if t.format(record["subject"]) not in (record["prompt"], *record["paraphrase_prompts"]))
        out.append({"subject": record["subject"], "prompt": template.format(record["subject"]),
                    "target_new": record["target_true"], "target_true": record["target_new"]})
    return out


def write_drop(inbox: Path, name: str, records: list[dict]) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, inbox / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="organism")
    parser.add_argument("--sizes", default="50,200")
    parser.add_argument("--harm", type=int, default=5)
    parser.add_argument("-a", "--algorithm", default="memit")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--edit-cpus", type=int, default=2, help="cores (torch threads) of an edit or a measurement")
    args = parser.parse_args()

    home.quiet_env()
    from engramflow.flows.continual import ContinualConfig, continual_flow
    from engramflow.ledger import default_store
    from engramflow.models import default_corpus, resolve_model
    from engramflow.runtime import pipeline_runtime, task_runner

    model = resolve_model(args.model)
    world = default_corpus(model)
    sizes = [int(s) for s in args.sizes.split(",")]
    every = facts(world)
    lines = []
    for size in sizes:
        home.set_home(tempfile.mkdtemp(prefix=f"bench-continual-{size}-"))
        inbox = home.get_home() / "inbox"
        started = time.perf_counter()
        with pipeline_runtime():
            runtime_s = time.perf_counter() - started
            cfg = ContinualConfig(inbox=str(inbox), model=model, alias="bench", algorithm=args.algorithm,
                                  batch_size=args.batch_size, edit_cpus=args.edit_cpus)
            write_drop(inbox, "day1.jsonl", every[:size])
            first = continual_flow.with_options(task_runner=task_runner())(cfg)
            lines.append(_line(f"drop of {size}", first, default_store()))
            if size == sizes[0]:
                second = every[size: 2 * size - args.harm] + harmful(world, every[:size], args.harm)
                write_drop(inbox, "day2.jsonl", second)
                bisect = continual_flow.with_options(task_runner=task_runner())(cfg)
                lines.append(_line(f"second drop of {size}, {args.harm} of them harmful", bisect, default_store()))
        lines.append(f"    (Prefect API and Ray started in {runtime_s:.1f} s, not counted)")
    print("\n".join(lines))


def _line(label: str, result, store) -> str:
    """The tick's numbers, and the values its last passing gate measured."""
    line = (f"{label}: tick {result.seconds:.1f} s (candidates edited {result.edit_seconds:.1f} s, "
            f"{result.gate_evaluations} gate evaluations {result.gate_seconds:.1f} s), promoted {result.promoted}, "
            f"quarantined {result.quarantined}; finding offenders: {result.bisect_evaluations} evaluations, "
            f"{result.bisect_seconds:.1f} s")
    passed = store.sql(f"select * from gates where tick_id = '{result.tick_id}' and passed "
                       "order by recorded_at desc limit 1").to_pylist()
    if passed:
        g = passed[0]
        line += "\n    promoted: " + ", ".join(
            f"{name} {g[name]:.3f}" for name in ("es", "ps", "retention_drop", "probe_drop", "perplexity_rise")
            if g[name] is not None) + f" ({g['n_earlier']} earlier edits, {g['n_probes']} probes)"
    return line


if __name__ == "__main__":
    main()
