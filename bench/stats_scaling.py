"""Covariance-statistics throughput through the pipeline with 1 and 2 Ray workers, against a bare
forward pass of the same model over the same tokens, in one run.

    python bench/stats_scaling.py [--model organism] [--tokens 200000] [--layers 0]

The statistics go to a throw-away store (the model cache is the usual one), so nothing is reused
from earlier runs and the 1- and 2-worker runs each compute every shard.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def bare_forward_tokens_per_second(model, tok, texts: list[str], max_tokens: int, threads: int) -> float:
    """Forward passes only (no hooks, no accumulation), batched as the statistics stage batches."""
    import torch

    from engramflow.editors.keys import pad_batch

    torch.set_num_threads(threads)
    n, batch = 0, []
    start = time.perf_counter()
    with torch.no_grad():
        for text in texts:
            batch.append(tok(text, truncation=True, max_length=128)["input_ids"])
            if len(batch) == 32:
                ids, mask = pad_batch(batch, torch.device("cpu"))
                model(input_ids=ids, attention_mask=mask)
                n += int(mask.sum())
                batch.clear()
                if n >= max_tokens:
                    break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism")
    parser.add_argument("--corpus", default="world", help="'world' or a text file (.gz ok)")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--layers", default="0")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    from rich.console import Console
    from rich.table import Table

    from engramflow import home
    from engramflow.models import load_model, resolve_model

    home.quiet_env()
    model_dir = resolve_model(args.model)  # build before timing anything
    os.environ["ENGRAMFLOW_STORE"] = tempfile.mkdtemp(prefix="stats-bench-")

    from engramflow.flows.stats import stats_flow
    from engramflow.ledger import default_store
    from engramflow.runtime import pipeline_runtime, task_runner
    from engramflow.tasks.stats import corpus_texts

    texts = corpus_texts(args.corpus)
    model, tok = load_model(model_dir)
    rows = []
    for threads in (1, 2):
        rate = bare_forward_tokens_per_second(model, tok, texts, args.tokens, threads)
        rows.append((f"bare forward, 1 process, {threads} thread(s)", rate, None))
    baseline = rows[0][1]
    with pipeline_runtime(num_cpus=2):
        for workers in (1, 2):
            start = time.perf_counter()
            keys = stats_flow.with_options(task_runner=task_runner())(
                model_dir, layers, args.corpus, n_shards=workers, max_tokens=args.tokens)
            seconds = time.perf_counter() - start
            n = int(default_store().tensor_metadata(keys[layers[0]])["n"])
            rows.append((f"pipeline statistics, {workers} Ray worker(s), {len(layers)} layer(s)", n / seconds, seconds))

    table = Table(title=f"covariance statistics, {args.model}, {args.tokens:,} tokens")
    for column in ("what", "tokens/s", "vs bare forward (1 thread)", "wall s"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for what, rate, seconds in rows:
        table.add_row(what, f"{rate:,.0f}", f"{rate / baseline:.2f}x", "" if seconds is None else f"{seconds:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
