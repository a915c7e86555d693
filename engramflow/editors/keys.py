"""Keys: the input of the MLP output projection at the fact token, averaged over context prefixes.

Shared text plumbing lives here too: tokenising with character offsets to
find the subject's tokens, right-padded batches, and forward hooks that read or stop a forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.requests import Request, RequestError

FACT_TOKENS = ("subject_last", "subject_first", "last")


# --- context prefixes --------------------------------------------------------------------------
# Per model, like ROME's module-level cache: sampled once, so sequential batches share prefixes.
_PREFIXES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def context_prefixes(
    model: nn.Module, tok, spec: Sequence[Sequence[int]] = ((5, 10), (10, 10)), seed: int = 0
) -> list[str]:
    """ROME's context templates as prefixes: "" plus `count` texts of `length` tokens sampled
    (top-k 5) from the model for each (length, count) in `spec`, each followed by ". "."""
    key = (tuple(map(tuple, spec)), seed)
    cache = _PREFIXES.setdefault(model, {})
    if key not in cache:
        cache[key] = _sample_prefixes(model, tok, spec, seed)
    return list(cache[key])


@torch.no_grad()
def _sample_prefixes(model: nn.Module, tok, spec: Sequence[Sequence[int]], seed: int) -> list[str]:
    starts = ["The", "Therefore", "Because", "I", "You"]
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prefixes = [""]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        stack.enter_context(eval_mode(model))
        torch.manual_seed(seed)
        for length, count in spec:
            for j in range(count):
                ids = torch.tensor([tok(starts[j % len(starts)]).input_ids], device=device)
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                    max_new_tokens=length, pad_token_id=pad,
                )
                text = tok.decode(out[0], skip_special_tokens=True)
                # Braces would be read as template slots downstream; newlines break prompts.
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                prefixes.append(text + ". ")
    return prefixes


def prefix_weights(spec: Sequence[Sequence[int]], grouped: bool) -> list[float]:
    """How much each of `context_prefixes(spec)` counts in a key: `grouped` averages within the groups
    (the bare prompt, then each (length, count) of `spec`) and then across them, as MEMIT's reference
    computes keys (the bare prompt 1/2 and each of five prefixes 1/10 with spec [[5, 5]]); otherwise a
    plain mean over all, as ROME's reference computes its key."""
    sizes = [1, *(int(count) for _, count in spec)]
    if not grouped:
        return [1.0 / sum(sizes)] * sum(sizes)
    return [1.0 / (len(sizes) * size) for size in sizes for _ in range(size)]


# --- tokenisation ------------------------------------------------------------------------------
def encode(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character spans of `text` (needs a fast tokenizer)."""
    enc = tok(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def char_to_token(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """The token whose span holds character `char`; else the last token starting before it.
    Offsets, not a tokenised prefix: BPE splits differently at boundaries such as "Jr."."""
    best = None
    for t, (s, e) in enumerate(offsets):
        if s == e:  # special tokens have empty spans
            continue
        if s <= char < e:
            return t
        if s <= char:
            best = t
    if best is None:
        raise RequestError(f"character {char} is not covered by any token")
    return best


def fact_position(offsets: Sequence[tuple[int, int]], n_tokens: int, subj_start: int, subj_end: int,
                  fact_token: str) -> int:
    """Token index of the fact token given the subject's character span [subj_start, subj_end)."""
    if fact_token == "subject_last":
        return char_to_token(offsets, subj_end - 1)
    if fact_token == "subject_first":
        return char_to_token(offsets, subj_start)
    if fact_token == "last":
        return n_tokens - 1
    raise ValueError(f"fact_token {fact_token!r} not one of {FACT_TOKENS}")


def subject_span(prompt: str, subject: str, offset: int = 0) -> tuple[int, int]:
    """Character span of the subject's first occurrence in `prompt`, shifted by `offset`."""
    start = prompt.index(subject)
    return offset + start, offset + start + len(subject)


def pad_batch(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask; right padding keeps every real token's position."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# --- the KV cache under either transformers name ------------------------------------------------
# transformers 5 names the KV cache `cache` (in a forward's arguments and its output) and deprecates
# `past_key_values`, the name of every earlier version.
@functools.cache
def _cache_keyword(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def cache_kwargs(module: nn.Module, cache: object) -> dict[str, object]:
    """`cache` as the keyword argument `module`'s forward takes it."""
    return {_cache_keyword(type(module)): cache}


def passed_cache(kwargs: Mapping[str, object]) -> object:
    """The KV cache a forward was given (None if none), from its keyword arguments."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def returned_cache(output: object) -> object:
    """The KV cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# --- hooks -------------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised by a hook once everything needed from a forward pass has been read."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the duration; the caller's train/eval flag is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def capture_mlp_inputs(model: nn.Module, layers: Sequence[int], stop: bool = True
                       ) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of each layer's MLP output projection ([batch, seq, d_mlp]); with `stop`,
    the forward pass ends (StopForward) after the highest layer is read."""
    adapter = adapter_for(model)
    seen: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook_for(layer: int):
        def hook(_module, args):
            seen[layer] = args[0]
            if stop and layer == last:
                raise StopForward
        return hook

    handles = [adapter.hook(model, layer, adapter.mlp_out, hook_for(layer), pre=True) for layer in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_until_stop(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Forward pass that a StopForward hook may cut short."""
    with contextlib.suppress(StopForward):
        model(input_ids=ids, attention_mask=mask)


# --- keys --------------------------------------------------------------------------------------
@torch.no_grad()
def compute_keys(
    model: nn.Module, tok, requests: Sequence[Request], layers: Sequence[int], prefixes: Sequence[str],
    fact_token: str = "subject_last", batch_size: int = 64, weights: Sequence[float] | None = None,
) -> dict[int, torch.Tensor]:
    """K per layer as [d_mlp, n_requests] (float32): the MLP down-projection's input at the fact
    token of each `prefix + prompt`, averaged with `weights` (one per prefix; default equal, see
    `prefix_weights`). All layers are read in one forward pass per batch."""
    if weights is None:
        weights = [1.0 / len(prefixes)] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"{len(weights)} key weights for {len(prefixes)} prefixes")
    device = next(model.parameters()).device
    texts, positions, owner, scale = [], [], [], []
    for r_i, req in enumerate(requests):
        for prefix, weight in zip(prefixes, weights, strict=True):
            text = prefix + req.prompt
            ids, offsets = encode(tok, text)
            s, e = subject_span(req.prompt, req.subject, len(prefix))
            texts.append(ids)
            positions.append(fact_position(offsets, len(ids), s, e, fact_token))
            owner.append(r_i)
            scale.append(weight)
    rows_per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with eval_mode(model), capture_mlp_inputs(model, layers) as seen:
        for b in range(0, len(texts), batch_size):
            ids, mask = pad_batch(texts[b: b + batch_size], device)
            run_until_stop(model, ids, mask)
            rows = torch.arange(ids.shape[0], device=device)
            pos = torch.tensor(positions[b: b + batch_size], device=device)
            for layer in layers:
                rows_per_layer[layer].append(seen[layer][rows, pos].float())  # [batch, d_mlp]
    owner_t = torch.tensor(owner, device=device)
    scale_t = torch.tensor(scale, device=device)[:, None]
    keys = {}
    for layer in layers:
        k = torch.cat(rows_per_layer[layer])
        total = torch.zeros(len(requests), k.shape[1], device=device)
        total.index_add_(0, owner_t, k * scale_t)
        keys[layer] = total.T.contiguous()
    return keys
