"""Second moment of MLP keys, C = E[k kᵀ], over a text corpus, written as map (per-shard partial sums)
and reduce so the pipeline can spread shards over workers; cached by what determines it.

Accumulated in float64: the keys' second moment is badly conditioned (1e4–1e6 on small models).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engramflow.editors.files import load_checked, save_atomic
from engramflow.editors.keys import capture_mlp_inputs, eval_mode, pad_batch, run_until_stop

Corpus = str | Path | Sequence[str]


@dataclass
class SecondMoment:
    """Σ k kᵀ over `n` key vectors (float64, [d_mlp, d_mlp])."""

    sum_kk: torch.Tensor
    n: int
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived matrices, e.g. projectors

    @property
    def C(self) -> torch.Tensor:
        """E[k kᵀ] = Σ k kᵀ / n."""
        if self.n == 0:
            raise ValueError("second moment over zero samples")
        return self.sum_kk / self.n


def iter_texts(corpus: Corpus) -> Iterator[str]:
    """Non-empty lines of a text file (.gz read as gzip text), or the strings of a list."""
    if isinstance(corpus, str | Path):
        path = Path(corpus)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
    else:
        for text in corpus:
            if text.strip():
                yield text.strip()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def mention_spans(text: str, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` that mention a subject `pattern` matches: what is
    said about the subjects being edited, whose keys an edit must be free to move."""
    mentions = [m.span() for m in pattern.finditer(text)]
    if not mentions:
        return []
    # Sentence ends, except at a period that belongs to a mention (a subject such as "Mark Jr.").
    cuts = [m.end() for m in _SENTENCE_END.finditer(text) if not any(s <= m.start() - 1 < e for s, e in mentions)]
    bounds = zip([0, *cuts], [*cuts, len(text)], strict=True)
    return [(a, b) for a, b in bounds if any(a <= s < b for s, _ in mentions)]


def subject_pattern(subjects: Iterable[str]) -> re.Pattern[str] | None:
    names = sorted({s for s in subjects if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def shard_texts(corpus: Corpus, n_shards: int) -> list[list[str]]:
    """Round-robin split of a corpus into `n_shards` lists of texts (so shards are of similar size)."""
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    for i, text in enumerate(iter_texts(corpus)):
        shards[i % n_shards].append(text)
    return shards


@torch.no_grad()
def partial_stats(
    model: nn.Module, tok, layers: int | Sequence[int], texts: Iterable[str], *,
    max_tokens: int | None = None, max_samples: int | None = None, seq_len: int = 128, batch_size: int = 32,
    exclude: Sequence[str] = (), mentions_only: bool = False,
) -> dict[int, SecondMoment]:
    """Σ k kᵀ and n at each layer over the keys of `texts` (each truncated to `seq_len` tokens): the
    first `max_tokens` tokens of the stream or its first `max_samples` texts (the references' unit).

    `exclude` (subjects) leaves out the keys of the sentences that mention any of them, in their
    context, so the excluded statistics are exactly the full ones minus those keys; `mentions_only`
    sums just those (texts without a mention cost no forward pass), which is how a batch's exclusion
    is subtracted from statistics computed once. All layers in one forward pass, cut after the highest."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    device = next(model.parameters()).device
    pattern = subject_pattern(exclude)
    if mentions_only and pattern is None:
        raise ValueError("mentions_only needs subjects to exclude")
    stats: dict[int, SecondMoment] = {}
    budget = max_tokens
    batch: list[list[int]] = []
    keep: list[list[bool]] = []  # per text in the batch: which of its tokens are counted

    def flush() -> None:
        ids, mask = pad_batch(batch, device)
        run_until_stop(model, ids, mask)
        wanted = torch.zeros_like(mask, dtype=torch.bool)
        for row, flags in enumerate(keep):
            wanted[row, : len(flags)] = torch.tensor(flags, device=device)
        for layer in layers:
            k = seen[layer][wanted].float()  # [tokens, d_mlp]
            if layer not in stats:
                stats[layer] = SecondMoment(torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64,
                                                        device=device), 0)
            # One batch's kᵀk in float32 (at most batch_size x seq_len terms per entry: relative
            # error ~1e-6), the running sum over batches in float64. A float64 product ran the
            # statistics at 0.76x a bare forward on the tiny organism; the running sum is where
            # precision is lost over millions of tokens.
            stats[layer].sum_kk += (k.T @ k).double()
            stats[layer].n += k.shape[0]
        batch.clear()
        keep.clear()

    with eval_mode(model), capture_mlp_inputs(model, layers) as seen:
        for i, text in enumerate(texts):
            if (max_samples is not None and i >= max_samples) or budget == 0:
                break
            enc = tok(text, truncation=True, max_length=seq_len, return_offsets_mapping=pattern is not None)
            ids = enc["input_ids"]
            if budget is not None:  # the budget is a prefix of the token stream, mentions or not
                ids = ids[:budget]
                budget -= len(ids)
            if not ids:
                continue
            flags = [True] * len(ids)
            if pattern is not None:
                spans = mention_spans(text, pattern)
                # Special tokens (BOS: an empty span) belong to no sentence: they stay.
                mentioned = [start != end and any(a <= start < b for a, b in spans)
                             for start, end in enc["offset_mapping"][: len(ids)]]
                flags = mentioned if mentions_only else [not m for m in mentioned]
            if not any(flags):
                continue
            batch.append(ids)
            keep.append(flags)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if not stats:
        if mentions_only:  # nothing in the sample mentions these subjects: nothing to subtract
            raise NoMentions(f"no text of the sample mentions {len(exclude)} subjects")
        raise ValueError(f"no tokens in the corpus for layers {layers}")
    return {layer: SecondMoment(s.sum_kk.cpu(), s.n) for layer, s in stats.items()}


class NoMentions(ValueError):
    """`partial_stats(mentions_only=True)` found no key to sum."""


def without(full: dict[int, SecondMoment], mentions: dict[int, SecondMoment]) -> dict[int, SecondMoment]:
    """Statistics minus the keys `partial_stats(mentions_only=True)` summed over the same sample."""
    return {layer: SecondMoment(m.sum_kk - mentions[layer].sum_kk, m.n - mentions[layer].n) if layer in mentions
            else m for layer, m in full.items()}


def reduce_stats(partials: Iterable[dict[int, SecondMoment]]) -> dict[int, SecondMoment]:
    """Sum per-shard partial statistics layer by layer."""
    out: dict[int, SecondMoment] = {}
    for part in partials:
        for layer, s in part.items():
            if layer in out:
                out[layer] = SecondMoment(out[layer].sum_kk + s.sum_kk, out[layer].n + s.n)
            else:
                out[layer] = SecondMoment(s.sum_kk.clone(), s.n)
    return out


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and a strided sample of every parameter: cheap, and changes when the
    weights do (statistics of an edited model are not those of its base)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=True).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_id(corpus: Corpus) -> str:
    """Identity of a corpus for the cache: a file's resolved path, size and mtime, or a list's hash."""
    if isinstance(corpus, str | Path):
        st = Path(corpus).stat()
        return hashlib.sha256(f"{Path(corpus).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(list(corpus)).encode()).hexdigest()[:16]


def layer_stats(
    model: nn.Module, tok, layers: Sequence[int], corpus: Corpus, *, max_tokens: int | None = None,
    max_samples: int | None = None, exclude: Sequence[str] = (), cache_dir: str | Path | None = None,
    seq_len: int = 128, batch_size: int = 32,
) -> dict[int, SecondMoment]:
    """Second moments at `layers` over `corpus` (without the keys of the sentences that mention any of
    `exclude`), read from / written to `cache_dir` (one safetensors file per layer, keyed by all above)."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    fp, cid = model_fingerprint(model), corpus_id(corpus)
    limit = f"n{max_tokens}" + ("" if max_samples is None else f"-t{max_samples}")
    if exclude:
        limit += "-x" + hashlib.sha256(json.dumps(sorted(set(exclude))).encode()).hexdigest()[:12]

    def path_for(layer: int) -> Path | None:
        if cache_dir is None:
            return None
        return Path(cache_dir) / f"mom2-{fp}-L{layer}-{cid}-{limit}-s{seq_len}-{dtype}.safetensors"

    out: dict[int, SecondMoment] = {}
    for layer in layers:
        path = path_for(layer)
        t = load_checked(path) if path is not None else None  # a damaged file is recomputed, never used
        if t is not None:
            out[layer] = SecondMoment(t["sum_kk"], int(t["n"].item()))
    missing = [layer for layer in layers if layer not in out]
    if missing:
        computed = partial_stats(model, tok, missing, iter_texts(corpus), max_tokens=max_tokens,
                                 max_samples=max_samples, seq_len=seq_len, batch_size=batch_size, exclude=exclude)
        for layer, s in computed.items():
            out[layer] = s
            path = path_for(layer)
            if path is not None:
                save_atomic({"sum_kk": s.sum_kk, "n": torch.tensor([s.n])}, path)
    return out
