"""The scoring machinery every evaluator shares: teacher-forced target scores, generation, perplexity,
n-gram entropy and the harmonic mean. Plain torch, batched.

Every scored (prompt, target) pair is `prompt + " " + target`, tokenized once; the target's tokens
are those that end after the prompt (offset mapping), so the leading space belongs to the target
as in ROME/MEMIT. All pairs of a call are deduplicated, sorted by length and run in chunks of
`batch_size` right-padded sequences: one forward per chunk.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class TargetScore:
    """How a model continues `prompt` with ` target` under teacher forcing."""

    nll: float  # mean token negative log-likelihood of the target
    predicted: tuple[int, ...]  # argmax token at each target position
    target: tuple[int, ...]  # the target's token ids

    @property
    def prob(self) -> float:
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        return sum(p == t for p, t in zip(self.predicted, self.target, strict=True)) / len(self.target)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tok: Any) -> int:
    """Padding id (any id works: padded positions are masked and never scored)."""
    return next(c for c in (tok.pad_token_id, tok.eos_token_id, 0) if c is not None)


def _encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of `prompt + " " + target` and the index of the first target token."""
    texts = [f"{prompt} {target}" for prompt, target in pairs]
    enc = tok(texts, return_offsets_mapping=True, add_special_tokens=True)
    encoded = []
    for (prompt, target), ids, offsets in zip(pairs, enc["input_ids"], enc["offset_mapping"], strict=True):
        cut = len(prompt)
        target_idx = [i for i, (s, e) in enumerate(offsets) if e > cut and e > s]
        if not target_idx or not target.strip():
            raise ValueError(f"empty target for prompt {prompt!r}: {target!r}")
        first, last = target_idx[0], target_idx[-1]
        if first == 0:
            raise ValueError(f"prompt {prompt!r} has no token before its target")
        encoded.append((list(ids[: last + 1]), first))
    return encoded


@contextlib.contextmanager
def _routing_at_prompt_end(model: nn.Module, last_prompt_token: list[int]) -> Iterator[None]:
    """With a SCEN bank attached, route each row by its last prompt token, as generation would (the
    teacher-forced sequence also holds the target, which must not choose the expert)."""
    if getattr(model, "_scen", None) is None:
        yield
        return
    from engramflow.editors.scen import reading_at

    with reading_at(model, last_prompt_token):
        yield


@torch.no_grad()
def score_targets(
    model: nn.Module, tok: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> list[TargetScore]:
    """Teacher-forced NLL and argmax predictions of each (prompt, target) pair, batched."""
    unique = list(dict.fromkeys(pairs))
    if not unique:  # tokenizers reject an empty batch (a run with no probes, say)
        return []
    encoded = _encode_pairs(tok, unique)
    order = sorted(range(len(unique)), key=lambda i: len(encoded[i][0]))
    device, pad = _device(model), _pad_id(tok)
    scores: dict[tuple[str, str], TargetScore] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, gold = [], [], []
        for r, i in enumerate(chunk):
            seq, first = encoded[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            rows += [r] * (len(seq) - first)
            cols += range(first - 1, len(seq) - 1)  # logits at p-1 predict token p
            gold += seq[first:]
        with _routing_at_prompt_end(model, [encoded[i][1] - 1 for i in chunk]):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
        gold_t = torch.tensor(gold, device=device)
        nll = -picked.log_softmax(-1).gather(1, gold_t[:, None])[:, 0]
        argmax = picked.argmax(-1)
        offset = 0
        for i in chunk:
            seq, first = encoded[i]
            n = len(seq) - first
            scores[unique[i]] = TargetScore(
                nll=nll[offset : offset + n].mean().item(),
                predicted=tuple(argmax[offset : offset + n].tolist()),
                target=tuple(seq[first:]),
            )
            offset += n
    return [scores[pair] for pair in pairs]


def mean(values: Sequence[float]) -> float | None:
    """The mean, None for no values (a request without paraphrases has no PS)."""
    return sum(values) / len(values) if values else None


def harmonic_mean(values: Iterable[float | None]) -> float | None:
    """Harmonic mean, e.g. ROME's score S of ES, PS, NS: None when a value is missing (None or NaN)
    or there are none, 0 when one is 0."""
    values = list(values)
    if not values or any(v is None or math.isnan(v) for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy of one text: mean of weighted n-gram entropies (bits)."""
    words = _WORD.findall(text)
    entropies = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        entropies.append(weight * entropy)
    return sum(entropies) / len(entropies)


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    do_sample: bool = False,
    top_k: int = 5,
    batch_size: int = 32,
) -> list[str]:
    """Continuations of `prompts` (greedy, or top-k sampling), left-padded batches."""
    if not prompts:
        return []
    device, pad = _device(model), _pad_id(tok)
    encoded = tok(list(prompts), add_special_tokens=True)["input_ids"]
    texts = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(seq)) + list(seq) for seq in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in chunk], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=do_sample,
            top_k=top_k if do_sample else None,
            pad_token_id=pad,
        )
        texts += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def perplexity(
    model: nn.Module, tok: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 16
) -> float:
    """Token-weighted perplexity over `texts` (each truncated to `max_length` tokens and to the
    model's context)."""
    device, pad = _device(model), _pad_id(tok)
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    encoded = [seq[:max_length] for seq in tok(list(texts), add_special_tokens=True)["input_ids"]] if texts else []
    encoded = sorted((seq for seq in encoded if len(seq) > 1), key=len)
    if not encoded:
        raise ValueError("perplexity needs texts of at least two tokens")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in chunk], device=device)
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        total_nll += nll[keep].sum().item()
        total_tokens += int(keep.sum())
    return math.exp(total_nll / total_tokens)
