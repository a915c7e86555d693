"""The unified framework's central experiment (Gupta et al. 2024): EMMET against MEMIT as the batch
grows, on the same facts. Each fact's target is optimised once (a request cache shared by both methods
and every batch size); for each batch size B the facts are cut into batches of B, every batch edited
into the unedited model on its own, scored (CounterFact ES/PS/NS of its facts, top-1 of 100 unrelated
probes) and reverted.

    python bench/batch_size.py --world world-large                                  # sizes 1..256 and max
    python bench/batch_size.py --facts ../shared/data/counterfact/counterfact-edit.json.gz \\
        --format easyedit-counterfact --records 1300
    python bench/batch_size.py --world world-tiny --n 16 --sizes 1,4,16             # quick
    python bench/batch_size.py --sizes 1 --n 100 --methods rome,memit,emmet,alphaedit,ft,scen   # single edits

EMMET solves the equality-constrained problem (λ only where a batch has more than one key, as the
reference does); where Kᵀ C⁻¹ K + λI is ill-conditioned the solver refuses (SolverError naming the
layer) and the table counts those batches and prints the first refusal. Preservation statistics come
from the organism's corpus, without a batch's subjects where the preset says so (mom2_exclude_edited).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from sequential import console, organism  # bench/ is the script's directory

from engramflow import home


def parse_sizes(text: str, n: int) -> list[int]:
    return [n if s == "max" else int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="world-large")
    parser.add_argument("--facts")
    parser.add_argument("--format", default="easyedit-counterfact")
    parser.add_argument("--records", type=int, default=1300)
    parser.add_argument("--methods", default="emmet,memit")
    parser.add_argument("--sizes", default="1,4,16,64,256,max", help="batch sizes; max = every fact in one batch")
    parser.add_argument("--n", type=int, default=1024, help="facts edited at every batch size (distinct subjects)")
    parser.add_argument("--n-probes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hparams", action="append", default=[], metavar="METHOD=JSON")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    overrides = {m: json.loads(h) for m, h in (x.split("=", 1) for x in args.hparams)}

    import torch

    from engramflow.data.ingest import load_requests
    from engramflow.data.selection import select_requests
    from engramflow.editors.cache import RequestCache
    from engramflow.editors.covariance import NoMentions, layer_stats, partial_stats, without
    from engramflow.editors.evaluation import EvalContext, asked_prompts, evaluate, summarize
    from engramflow.editors.methods import get_method
    from engramflow.editors.requests import as_requests
    from engramflow.editors.solver import SolverError
    from engramflow.models import default_corpus, load_model
    from engramflow.organism import idle_threads
    from engramflow.tasks.stats import corpus_texts

    torch.set_num_threads(min(2, idle_threads()))  # spinning OpenMP threads on a busy CPU cost more than they give
    model_dir, dataset, fmt = organism(args)
    requests, _ = load_requests(dataset, fmt)
    by_id = {r["request_id"]: r for r in requests}
    edit_ids, probe_ids = select_requests(requests, args.n, args.n_probes, args.seed)
    facts, probes = as_requests([by_id[i] for i in edit_ids]), as_requests([by_id[i] for i in probe_ids])
    sizes = parse_sizes(args.sizes, len(facts))
    model, tok = load_model(model_dir)
    texts = corpus_texts(default_corpus(model_dir))
    cache = RequestCache(home.get_home() / "cache" / "bench-batch-size" / Path(model_dir).name)
    stats_dir = home.get_home() / "cache" / "bench-batch-size" / "stats"
    unedited = summarize(evaluate(EvalContext(model, tok, edited=facts, probes=probes), ["counterfact", "probe"]))
    console.print(f"{len(facts)} facts, {len(probes)} probes; unedited ES {unedited[('counterfact', 'es')]:.3f}, "
                  f"PS {unedited[('counterfact', 'ps')]:.3f}, NS {unedited[('counterfact', 'ns')]:.3f}, "
                  f"probe top-1 {unedited[('probe', 'top1')]:.3f}")

    results: list[dict[str, Any]] = []
    for name in args.methods.split(","):
        method = get_method(name)
        hp = method.hparams(model, overrides.get(name))
        spec = method.statistics(hp)  # None: the method preserves nothing through statistics (FT, SCEN)
        full = None if spec is None else layer_stats(
            model, tok, spec.layers, texts, max_tokens=spec.max_tokens, max_samples=spec.max_samples,
            cache_dir=stats_dir)
        # Targets once for every fact (the cache is shared by every batch size and by both methods).
        started = time.perf_counter()
        method.precompute(model, tok, facts, hp, cache)
        console.print(f"{name}: per-request work in {time.perf_counter() - started:.0f} s", highlight=False)

        def stats_for(batch: Sequence[Any], spec: Any = spec, full: Any = full) -> Any:
            if spec is None or not spec.exclude_edited:
                return full
            try:
                minus = partial_stats(model, tok, spec.layers, texts, max_tokens=spec.max_tokens,
                                      max_samples=spec.max_samples, exclude=[r.subject for r in batch],
                                      mentions_only=True)
            except NoMentions:
                return full
            return without(full, minus)

        for size in sizes:
            started = time.perf_counter()
            rows, refused, first_error, probe_top1 = [], 0, None, []
            for i in range(0, len(facts), size):
                batch = facts[i:i + size]
                try:
                    delta = method.edit(model, tok, batch, hp, stats=stats_for(batch), cache=cache)
                except SolverError as err:
                    refused += len(batch)
                    first_error = first_error or str(err)
                    continue
                delta.apply(model)
                try:
                    # As the pipeline scores a method: without the paraphrases it trained on (SCEN).
                    ctx = EvalContext(model, tok, edited=method.scored(batch, hp), probes=probes,
                                      asked=asked_prompts(batch))
                    scored = evaluate(ctx, ["counterfact", "probe"])
                finally:
                    delta.revert(model)
                rows += [r for r in scored if r["protocol"] == "counterfact"]
                probe_top1.append(summarize(r for r in scored if r["protocol"] == "probe")[("probe", "top1")])
            s = summarize(rows)
            result = {"method": name, "batch_size": size, "batches": -(-len(facts) // size), "edited": len(facts) - refused,
                      "refused": refused, "first_refusal": first_error,
                      **{m: s.get(("counterfact", m)) for m in ("es", "ps", "ns", "em", "pm")},
                      "probe_top1": sum(probe_top1) / len(probe_top1) if probe_top1 else None,
                      "seconds": time.perf_counter() - started}
            results.append(result)
            console.print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}),
                          highlight=False, soft_wrap=True)

    table = Table("method", "batch", "batches", "ES", "PS", "NS", "probe top-1", "refused", "s",
                  title=f"EMMET vs MEMIT by batch size ({len(facts)} facts, {Path(model_dir).name}; probe top-1 "
                        f"unedited {unedited[('probe', 'top1')]:.3f})")
    for r in results:
        table.add_row(r["method"], str(r["batch_size"]), str(r["batches"]),
                      *("—" if r[m] is None else f"{r[m]:.3f}" for m in ("es", "ps", "ns", "probe_top1")),
                      str(r["refused"]), f"{r['seconds']:.0f}")
    console.print(table)
    for r in results:
        if r["first_refusal"]:
            console.print(f"{r['method']} batch {r['batch_size']}: {r['refused']} facts refused, first: "
                          f"{r['first_refusal']}", highlight=False, soft_wrap=True)
    out = args.out or home.get_home() / "reports" / f"batch-size-{Path(model_dir).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"unedited": {f"{p}.{m}": v for (p, m), v in unedited.items()}, "results": results},
                              indent=1))
    console.print(f"results: {out}", highlight=False)


if __name__ == "__main__":
    main()
