"""SCEN bench: storage and training time per expert (compact vs full, each also served by a bank of
its kind), inference latency against the unedited model with 10, 100 and 1,000 experts per served
kind, and (`--edits N`) the quality of N sequential edits.

    python bench/scen.py --model organism --edits 200
    python bench/scen.py --model organism-tiny --world world-tiny --experts 5 --repeats 3   # quick

Quality is teacher-forced top-1 of every target token (`editors.scen.target_correct`, the zsRE
protocol), routing read at the last prompt token as `generate` would: reliability on the edit
prompts, generality on the paraphrases (all, and apart those the neurons did not train on), locality =
share of neighbourhood / unedited-fact prompts whose next-token argmax is the unedited model's (also
shown apart: CounterFact neighbours, i.e. other subjects with the same relation and answer, and
unedited facts of the world, which often share an edited subject), routing accuracy = right expert (edit prompts and paraphrases) or none
(neighbourhood and unedited facts).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from engramflow import home
from engramflow.editors.adapters import adapter_for
from engramflow.editors.requests import Request, as_requests
from engramflow.editors.scen import (
    ExpertBank,
    ScenConfig,
    add_requests,
    attach,
    detach,
    expert_applied,
    route,
    target_correct,
    train_expert,
)
from engramflow.editors.scen.config import default_layer

console = Console(width=150)
MB = 1024 * 1024
KEEP_ALL = 10**6  # neuron_contrasts that keeps every candidate contrast


def _requests(n: int, world: str) -> list[Request]:
    """The first n requests of the embedded world (`world`), the tiny world (`world-tiny`) or an export."""
    from engramflow.data.ingest import load_requests

    if world == "world-tiny":
        from engramflow.data.world import tiny_world

        world = str(tiny_world().write_counterfact(home.get_home() / "world-tiny.json"))
    requests, _rejects = load_requests(world, "world")
    return as_requests(requests[:n])


@torch.no_grad()
def next_token(model: nn.Module, tok: Any, prompt: str) -> int:
    ids = torch.tensor([tok.encode(prompt)])
    return int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


# --- 1. storage, training time and expert quality -------------------------------------------------
def served(bank: ExpertBank) -> str:
    """How a bank serves its experts (dense matrices or rank-r factors) and the largest numerical rank
    of a served delta, measured (a delta trained on few target tokens has few directions)."""
    rank = max(int(torch.linalg.matrix_rank(bank.delta(i))) for i in range(len(bank)))
    stored = "dense" if bank.full else f"rank-{bank.config.rank} factors"
    return f"{stored} (rank {rank} measured)"


def bench_experts(model: nn.Module, tok: Any, requests: list[Request], layer: int, config: ScenConfig,
                  ) -> dict[str, ExpertBank]:
    """Train each request's expert as LoRA, full matrix and full-then-SVD. Quality with oracle routing
    (the expert applied to its own prompt and paraphrases unconditionally) and as served: routed by a
    bank of that kind, which stores what it serves. Returns the banks by kind."""
    adapter = adapter_for(model)
    d_model, d_mlp = adapter.d_model(model), adapter.d_mlp(model)
    table = Table(title=f"Experts on layer {layer} ({len(requests)} requests; oracle: applied to their own "
                        "prompts; routed: served by a bank of that kind)")
    for col in ("kind", "served as", "bytes / expert", "vs full", "train s / expert", "steps", "oracle rel.",
                "oracle gen.", "routed rel."):
        table.add_column(col, justify="right")
    full_bytes = 4 * d_model * d_mlp
    banks: dict[str, ExpertBank] = {}
    for kind in ("lora", "full", "svd"):
        cfg = replace(config, expert_kind=kind)
        experts = [train_expert(model, tok, r, layer, cfg) for r in requests]
        rel, gen = [], []
        for r, e in zip(requests, experts, strict=True):
            delta = e.delta().float()
            with expert_applied(model, layer, lambda h, d=delta: h.float() @ d.T):
                rel.append(target_correct(model, tok, r.prompt, r.target_new))
                gen += [target_correct(model, tok, p, r.target_new) for p in r.paraphrase_prompts]
        bank = banks[kind] = ExpertBank.for_model(model, layer, cfg)
        add_requests(model, tok, bank, requests, experts)
        with bank.applied(model):
            routed = [target_correct(model, tok, r.prompt, r.target_new) for r in requests]
        nbytes = statistics.mean(e.nbytes() for e in experts)
        label = kind if kind == "full" else f"{kind} r={cfg.rank}"
        table.add_row(label, served(bank), f"{nbytes:,.0f}", f"{nbytes / full_bytes:.4f}",
                      f"{statistics.mean(e.seconds for e in experts):.3f}",
                      f"{statistics.mean(e.steps for e in experts):.1f}", f"{_share(rel):.3f}", f"{_share(gen):.3f}",
                      f"{_share(routed):.3f}")
    console.print(table)
    r = config.rank
    console.print(f"Llama-2-7B down_proj (4096 x 11008, fp16): full {2 * 4096 * 11008 / MB:.1f} MiB, "
                  f"rank {r} {2 * r * (4096 + 11008) / 1024:.1f} KiB + neuron {2 * 11009 / 1024:.1f} KiB per expert")
    return banks


# --- 2. inference latency ---------------------------------------------------------------------------
def _tiled(bank: ExpertBank, n: int) -> ExpertBank:
    """A bank of n experts made by repeating the trained ones (real shapes and routing, for timing)."""
    reps = -(-n // len(bank))
    tiled = ExpertBank(bank.layer, bank.d_model, bank.d_mlp, bank.config)
    tiled.ids = [f"{rid}#{k}" for k in range(reps) for rid in bank.ids][:n]
    for name, t in {**bank.expert_tensors(), "neuron_w": bank.neuron_w, "neuron_b": bank.neuron_b}.items():
        setattr(tiled, name, t.repeat(reps, *([1] * (t.dim() - 1)))[:n])
    return tiled


def _time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def bench_latency(model: nn.Module, tok: Any, banks: dict[str, ExpertBank], edited: str, unrelated: str,
                  repeats: int) -> None:
    """Latency of each bank, tiled to 10, 100 and 1,000 experts, against the unedited model. Every
    setting is timed once per round, round after round, and the best of `repeats` rounds is kept: on a
    shared CPU that spreads other load evenly over the settings."""
    table = Table(title="Inference latency (batch 1, best-of ms; generate = prefill + 8 greedy tokens with KV cache)")
    for col in ("served", "experts", "forward, routed", "forward, unrouted", "generate, routed", "generate, unrouted"):
        table.add_column(col, justify="right")
    settings: dict[tuple[str, str], ExpertBank | None] = {("-", "unedited"): None}
    for bank in banks.values():
        settings.update({(served(bank), str(n)): _tiled(bank, n) for n in (10, 100, 1000)})
    calls: list[Callable[[], object]] = []
    for prompt in (edited, unrelated):
        ids = torch.tensor([tok.encode(prompt)])
        calls.append(lambda ids=ids: model(input_ids=ids, use_cache=False))
        calls.append(lambda ids=ids: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                                    do_sample=False, pad_token_id=tok.pad_token_id))
    best = {name: [float("inf")] * len(calls) for name in settings}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up and counts like the others
            for name, tiled in settings.items():
                if tiled is not None:
                    attach(model, tiled.layer, tiled)
                try:
                    best[name] = [min(b, _time_ms(call)) for b, call in zip(best[name], calls, strict=True)]
                finally:
                    detach(model)
    for (kind, n), (fwd_r, gen_r, fwd_u, gen_u) in best.items():
        table.add_row(kind, n, *(f"{t:.2f}" for t in (fwd_r, fwd_u, gen_r, gen_u)))
    console.print(table)


# --- 3. sequential edits ------------------------------------------------------------------------------
def evaluate(model: nn.Module, tok: Any, bank: ExpertBank, requests: list[Request], unrelated: list[Request],
             base_next: dict[str, int], paraphrase_slice: slice, neighbours: int) -> dict[str, float]:
    """Reliability, generality, locality and routing accuracy of `bank` attached to `model`."""
    # A neighbourhood prompt may be another edited fact's own prompt (CounterFact neighbours are facts of
    # the same relation and object): it is then expected to move, and is left out of locality.
    edited = {r.prompt for r in requests}
    attach(model, bank.layer, bank)
    try:
        rel, gen, loc_neighbour, loc_unrelated, right = [], [], [], [], []
        for r in requests:
            paraphrases = list(r.paraphrase_prompts[paraphrase_slice])
            rel.append(target_correct(model, tok, r.prompt, r.target_new))
            gen += [target_correct(model, tok, p, r.target_new) for p in paraphrases]
            right += [got == r.request_id for got in route(model, tok, [r.prompt, *paraphrases])]
            others = [n.prompt for n in r.neighborhood[:neighbours] if n.prompt not in edited]
            loc_neighbour += [next_token(model, tok, p) == base_next[p] for p in others]
            right += [got is None for got in route(model, tok, others)]
        for r in unrelated:
            loc_unrelated.append(next_token(model, tok, r.prompt) == base_next[r.prompt])
            right += [got is None for got in route(model, tok, [r.prompt])]
    finally:
        detach(model)
    return {"reliability": _share(rel), "generality": _share(gen), "locality": _share(loc_neighbour + loc_unrelated),
            "locality_neighbour": _share(loc_neighbour), "locality_unrelated": _share(loc_unrelated),
            "routing": _share(right)}


def bench_quality(model: nn.Module, tok: Any, requests: list[Request], unrelated: list[Request], layer: int,
                  config: ScenConfig, batch: int, neighbours: int) -> None:
    """Train every expert once, then add them in batches under several neuron settings (neurons only
    differ between rows, so the experts are shared)."""
    start = time.perf_counter()
    experts = [train_expert(model, tok, r, layer, config) for r in requests]
    console.print(f"{len(experts)} experts trained in {time.perf_counter() - start:.1f} s")
    base_next = {}
    for r in requests:
        for n in r.neighborhood[:neighbours]:
            base_next[n.prompt] = next_token(model, tok, n.prompt)
    for r in unrelated:
        base_next[r.prompt] = next_token(model, tok, r.prompt)
    previous = replace(config, neuron_sharpness=20.0, neuron_candidates=16, neuron_contrasts=KEEP_ALL, neuron_paraphrases=0,
                       recalibrate_steps=0)
    variants = {
        "default": config,
        "no paraphrase positive": replace(config, neuron_paraphrases=0),
        "no recalibration": replace(config, recalibrate_steps=0),
        "sharpness 20": replace(config, neuron_sharpness=20.0),
        "every candidate kept": replace(config, neuron_contrasts=KEEP_ALL),
        "32 candidates, all kept": replace(config, neuron_candidates=32, neuron_contrasts=KEEP_ALL),
        "no contrast prompts": replace(config, neuron_candidates=0),
        "margin loss, zero init": replace(config, neuron_init="zero"),
        "reference loss, zero init": replace(config, neuron_loss="reference", neuron_init="zero"),
        "previous default": previous,
    }
    console.print(f"default: {config.neuron_loss} loss, {config.neuron_init} init, sharpness {config.neuron_sharpness:g}, "
                  f"{config.neuron_candidates} candidate contrasts of each kind of which {config.neuron_contrasts} kept, "
                  f"{config.neuron_paraphrases} paraphrase positive, recalibration {config.recalibrate_steps} steps; "
                  "previous default: sharpness 20, 16 candidates all kept, no paraphrase, no recalibration")
    table = Table(title=f"{len(requests)} sequential edits in batches of {batch}, layer {layer}, "
                        f"{config.expert_kind} experts (+{len(unrelated)} unedited facts)")
    table.add_column("neurons", no_wrap=True)
    for col in ("reliability", "generality (all para.)", "gen. held-out para.", "locality", "loc. neighbours",
                "loc. unrelated", "routing acc.",
                "old neurons firing / recal.", "bank keys", "neuron s"):
        table.add_column(col, justify="right")
    for name, cfg in variants.items():
        bank = ExpertBank.for_model(model, layer, cfg)
        fired = recal = 0
        seconds = 0.0
        for i in range(0, len(requests), batch):
            report = add_requests(model, tok, bank, requests[i:i + batch], experts[i:i + batch])
            fired += len(report.old_firing)
            recal += len(report.recalibrated)
            seconds += report.seconds_neurons
        m = evaluate(model, tok, bank, requests, unrelated, base_next, slice(None), neighbours)
        # Paraphrases that trained the neurons are not evidence of generality: the held-out column is the bar.
        held = evaluate(model, tok, bank, requests, [], base_next, slice(cfg.neuron_paraphrases, None), 0)["generality"]
        table.add_row(name, f"{m['reliability']:.3f}", f"{m['generality']:.3f}", f"{held:.3f}",
                      f"{m['locality']:.3f}", f"{m['locality_neighbour']:.3f}", f"{m['locality_unrelated']:.3f}",
                      f"{m['routing']:.3f}", f"{fired} / {recal}", f"{len(bank.keys):,}", f"{seconds:.1f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism", help="organism, organism-tiny or a model directory")
    parser.add_argument("--world", default="world", help="world, world-tiny or a CounterFact export of a world")
    parser.add_argument("--layer", type=int, default=None, help="edited layer (default: SCEN's default_layer)")
    parser.add_argument("--rank", type=int, default=ScenConfig.rank)
    parser.add_argument("--kind", choices=("lora", "full", "svd"), default=ScenConfig.expert_kind,
                        help="expert kind of the quality part")
    parser.add_argument("--experts", type=int, default=20, help="requests for the storage/time/latency part")
    parser.add_argument("--edits", type=int, default=0, help="sequential edits for the quality part (0: skip)")
    parser.add_argument("--offset", type=int, default=0, help="first request of the quality part's edits")
    parser.add_argument("--unrelated", type=int, default=100, help="unedited facts checked for locality")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--neighbours", type=int, default=3, help="neighbourhood prompts checked per edit")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    home.quiet_env()
    from engramflow.models import load_model, resolve_model

    model, tok = load_model(resolve_model(args.model))
    config = ScenConfig(rank=args.rank, expert_kind=args.kind)
    console.print(f"model {args.model}: {adapter_for(model).model_type}, {adapter_for(model).n_layers(model)} layers, "
                  f"d_model {adapter_for(model).d_model(model)}, d_mlp {adapter_for(model).d_mlp(model)}; "
                  f"torch threads {torch.get_num_threads()}")
    if args.layer is None:
        args.layer = default_layer(adapter_for(model).n_layers(model))
    requests = _requests(max(args.experts, args.offset + max(args.edits, 0) + args.unrelated), args.world)
    if len(requests) < args.offset + args.edits:
        parser.error(f"the world has {len(requests)} requests: too few for --offset {args.offset} --edits {args.edits}")
    banks = bench_experts(model, tok, requests[: args.experts], args.layer, config)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, bank in banks.items():
            path = Path(tmp) / f"{kind}.safetensors"
            bank.save(path)
            console.print(f"{kind} bank file, {served(bank)}: {path.stat().st_size / len(bank):,.0f} bytes per expert, "
                          f"of which expert + neuron {bank.expert_nbytes():,} and edit keys "
                          f"{len(bank.keys) / len(bank):.1f} rows of d_mlp (the negatives of later neurons)")
    # svd experts are served as lora's are (rank-r factors): their latency is lora's.
    bench_latency(model, tok, {k: banks[k] for k in ("lora", "full")}, requests[0].prompt, requests[-1].prompt,
                  args.repeats)
    if args.edits:
        edits = requests[args.offset : args.offset + args.edits]
        unrelated = requests[args.offset + args.edits : args.offset + args.edits + args.unrelated]
        bench_quality(model, tok, edits, unrelated, args.layer, config, args.batch, args.neighbours)


if __name__ == "__main__":
    main()
