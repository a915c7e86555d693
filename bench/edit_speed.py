"""Editing speed on the embedded model: edits/s per algorithm and batch size, batched against
one-at-a-time target optimisation, and covariance tokens/s against a bare forward pass.

    .venv/bin/python bench/edit_speed.py [--model organism|PATH] [--sizes 1,16,64,256] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from engramflow import editors
from engramflow.data.world import default_world
from engramflow.editors.covariance import iter_texts, partial_stats
from engramflow.editors.hparams import load_preset
from engramflow.editors.keys import context_prefixes, pad_batch
from engramflow.editors.requests import as_requests
from engramflow.editors.targets import compute_targets
from engramflow.models import load_model, resolve_model


def world_requests() -> list[dict]:
    """The embedded world's facts as edit requests (prompt template, subject, counterfactual target)."""
    out = []
    for r in default_world().counterfact_records():
        rr = r["requested_rewrite"]
        out.append({"request_id": str(r["case_id"]), "prompt": rr["prompt"], "subject": rr["subject"],
                    "target_new": rr["target_new"]["str"], "target_true": rr["target_true"]["str"]})
    return out


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_edits(model, tok, requests, algorithms, sizes, stats, device) -> list[tuple]:
    rows = []
    for algorithm in algorithms:
        for size in sizes:
            batch = requests[:size]
            seconds = timed(lambda a=algorithm, b=batch: editors.edit(model, tok, b, method=a, stats=stats), device)
            rows.append((algorithm, size, seconds, size / seconds))
            print(f"  {algorithm:9s} batch {size:4d}: {seconds:8.2f} s  {size / seconds:8.2f} edits/s", flush=True)
    return rows


def bench_targets(model, tok, requests, size, device) -> tuple[float, float]:
    """compute_targets for `size` requests in one batch, and one request at a time."""
    hp = load_preset("memit", "organism")
    reqs = as_requests(requests[:size])
    prefixes = context_prefixes(model, tok, hp.context_spec, hp.seed)
    kw = dict(v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr, v_weight_decay=hp.v_weight_decay,
              kl_factor=hp.kl_factor, clamp_norm_factor=hp.clamp_norm_factor, fact_token=hp.fact_token)
    layer = max(hp.layers)
    batched = timed(lambda: compute_targets(model, tok, reqs, layer, prefixes, **kw), device)
    alone = timed(lambda: [compute_targets(model, tok, [r], layer, prefixes, **kw) for r in reqs], device)
    return batched, alone


@torch.no_grad()
def bench_covariance(model, tok, texts, layers, device) -> tuple[float, float, int]:
    """Tokens/s of partial_stats and of plain forward passes over the same batches."""
    n_tokens = sum(len(tok(t, truncation=True, max_length=128)["input_ids"]) for t in texts)
    stats_s = timed(lambda: partial_stats(model, tok, layers, texts, batch_size=32), device)

    def bare() -> None:
        for b in range(0, len(texts), 32):
            ids, mask = pad_batch([tok(t, truncation=True, max_length=128)["input_ids"] for t in texts[b: b + 32]],
                                  model.device)
            model(input_ids=ids, attention_mask=mask)

    bare_s = timed(bare, device)
    return n_tokens / stats_s, n_tokens / bare_s, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1,16,64,256")
    ap.add_argument("--algorithms", default=",".join(editors.METHODS))
    ap.add_argument("--targets-batch", type=int, default=64, help="batch for batched vs one-at-a-time targets")
    ap.add_argument("--stats-texts", type=int, default=400, help="corpus paragraphs for the covariance timing")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(resolve_model(args.model), device=args.device)
    requests = world_requests()
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > len(requests):
        raise SystemExit(f"the world has {len(requests)} facts; largest batch asked {max(sizes)}")
    texts = list(iter_texts(default_world().corpus_text().splitlines()))
    layers = sorted({layer for a in editors.METHODS for layer in load_preset(a, "organism").layers})
    print(f"model {args.model} on {args.device}: {model.config.num_hidden_layers} layers x {model.config.hidden_size}, "
          f"{torch.get_num_threads()} threads", flush=True)
    stats = editors.reduce_stats([partial_stats(model, tok, layers, texts)])

    print("covariance statistics:", flush=True)
    stats_tps, bare_tps, n_tok = bench_covariance(model, tok, texts[: args.stats_texts], layers, args.device)
    print("batched vs one-at-a-time targets:", flush=True)
    batched, alone = bench_targets(model, tok, requests, args.targets_batch, args.device)
    print("edits:", flush=True)
    rows = bench_edits(model, tok, requests, args.algorithms.split(","), sizes, stats, args.device)

    print(f"\n| algorithm | {' | '.join(f'batch {s}' for s in sizes)} |  (edits/s)")
    print(f"|---|{'---|' * len(sizes)}")
    for algorithm in args.algorithms.split(","):
        cells = [f"{r[3]:.2f}" for r in rows if r[0] == algorithm]
        print(f"| {algorithm} | {' | '.join(cells)} |")
    print(f"\ntargets for {args.targets_batch} requests: batched {batched:.2f} s, one at a time {alone:.2f} s "
          f"-> {alone / batched:.1f}x")
    print(f"covariance over {n_tok} tokens (layers {layers}): {stats_tps:,.0f} tokens/s; bare forward "
          f"{bare_tps:,.0f} tokens/s -> ratio {stats_tps / bare_tps:.2f}")


if __name__ == "__main__":
    main()
