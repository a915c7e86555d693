"""Evaluation of a (possibly edited) model on requests: CounterFact, zsRE and EasyEdit protocols,
generation entropy, perplexity and weight-norm growth. Plain torch, batched.

Every scored (prompt, target) pair is `prompt + " " + target`, tokenized once; the target's tokens
are those that end after the prompt (offset mapping), so the leading space belongs to the target
as in ROME/MEMIT. All pairs of a call are deduplicated, sorted by length and run in chunks of
`batch_size` right-padded sequences: one forward per chunk.

Request rows are `{request_id, protocol, metric, value}` for the long `metrics` table.
Protocols never share metric names:
- `counterfact` (ROME/MEMIT): `es`, `ps`, `ns` (probability comparisons; a multi-token target's
  probability is exp(-mean token NLL)), magnitudes `em`, `pm`, `nm`, generation entropy `ge`;
  `summarize` adds the harmonic score `s` of the means of ES, PS and NS.
- `zsre` (MEND/MEMIT): teacher-forced top-1 accuracy of each target token: `efficacy` (edit
  prompt), `generality` (paraphrases), `locality` (neighbourhood prompts, agreement with the
  unedited model's teacher-forced predictions, see `pre_edit_answers`).
- `easyedit`: EasyEdit's token accuracy for any dataset: `easyedit_rel`, `easyedit_gen`,
  `easyedit_loc`. On zsRE the definitions coincide with the zsRE protocol's; on CounterFact they
  are token accuracies where the `counterfact` protocol compares probabilities.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for

COUNTERFACT = "counterfact"
ZSRE = "zsre"
EASYEDIT = "easyedit"

Request = Mapping[str, Any]
Row = dict[str, Any]
PreAnswers = Mapping[str, list[list[int]]]

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


def fill_prompt(request: Request) -> str:
    """The request's prompt with `{}` replaced by the subject (ROME-style templates)."""
    prompt = request["prompt"]
    return prompt.format(request["subject"]) if "{}" in prompt else prompt


def request_id(request: Request, index: int) -> str:
    return str(request.get("request_id") or index)


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


def _rows(rid: str, protocol: str, values: Mapping[str, float | None]) -> list[Row]:
    return [
        {"request_id": rid, "protocol": protocol, "metric": metric, "value": float(value)}
        for metric, value in values.items()
        if value is not None
    ]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def counterfact_metrics(
    model: nn.Module, tok: Any, requests: Sequence[Request], batch_size: int = 64
) -> list[Row]:
    """ES/PS/NS and EM/PM/NM per request (ROME/MEMIT definitions).

    Neighbourhood prompts compare their own `target` (the fact that must not move) against the
    request's `target_new`."""
    pairs: list[tuple[str, str]] = []
    for request in requests:
        new, true = request["target_new"], request["target_true"]
        if not true:
            raise ValueError(f"counterfact metrics need target_true: {request.get('request_id')}")
        for prompt in [fill_prompt(request), *request.get("paraphrase_prompts", ())]:
            pairs += [(prompt, new), (prompt, true)]
        for item in request.get("neighborhood", ()):
            pairs += [(item["prompt"], new), (item["prompt"], item["target"])]
    scores = iter(score_targets(model, tok, pairs, batch_size))
    rows: list[Row] = []
    for index, request in enumerate(requests):
        edit_new, edit_true = next(scores), next(scores)
        para = [(next(scores), next(scores)) for _ in request.get("paraphrase_prompts", ())]
        neigh = [(next(scores), next(scores)) for _ in request.get("neighborhood", ())]
        rows += _rows(
            request_id(request, index),
            COUNTERFACT,
            {
                "es": float(edit_new.nll < edit_true.nll),
                "ps": _mean([float(n.nll < t.nll) for n, t in para]),
                "ns": _mean([float(t.nll < n.nll) for n, t in neigh]),
                "em": edit_new.prob - edit_true.prob,
                "pm": _mean([n.prob - t.prob for n, t in para]),
                "nm": _mean([t.prob - n.prob for n, t in neigh]),
            },
        )
    return rows


def _neighbourhood_pairs(request: Request) -> list[tuple[str, str]]:
    return [(item["prompt"], item["target"]) for item in request.get("neighborhood", ())]


def without_edited_neighbours(requests: Sequence[Request]) -> list[Request]:
    """The requests with every neighbourhood prompt dropped that is one of the requests' own prompts or
    paraphrases: it asks an edited question, so it is meant to move and is no evidence of locality
    (CounterFact neighbours share the relation and the true object, so in a run of many edits some are
    other edits: 340 of the 818 neighbours of the embedded world's first 200 facts)."""
    asked = {fill_prompt(r) for r in requests}
    asked |= {p.format(r["subject"]) if "{}" in p else p for r in requests for p in r.get("paraphrase_prompts", ())}
    return [{**r, "neighborhood": [n for n in r.get("neighborhood", ()) if n["prompt"] not in asked]}
            for r in requests]


def pre_edit_answers(
    model: nn.Module, tok: Any, requests: Sequence[Request], batch_size: int = 64
) -> dict[str, list[list[int]]]:
    """The unedited model's teacher-forced top-1 tokens on each neighbourhood (prompt, target),
    keyed by request id: the reference for zsRE / EasyEdit locality after editing."""
    pairs = [pair for request in requests for pair in _neighbourhood_pairs(request)]
    scores = iter(score_targets(model, tok, pairs, batch_size))
    return {
        request_id(request, i): [list(next(scores).predicted) for _ in _neighbourhood_pairs(request)]
        for i, request in enumerate(requests)
    }


def _agreement(score: TargetScore, reference: Sequence[int]) -> float:
    if len(reference) != len(score.predicted):
        raise ValueError("pre-edit answers do not match the neighbourhood targets' tokenization")
    return sum(p == r for p, r in zip(score.predicted, reference, strict=True)) / len(reference)


def _token_accuracy_rows(
    model: nn.Module,
    tok: Any,
    requests: Sequence[Request],
    pre_answers: PreAnswers,
    protocol: str,
    names: tuple[str, str, str],
    batch_size: int,
) -> list[Row]:
    pairs: list[tuple[str, str]] = []
    for request in requests:
        prompts = [fill_prompt(request), *request.get("paraphrase_prompts", ())]
        pairs += [(prompt, request["target_new"]) for prompt in prompts]
        pairs += _neighbourhood_pairs(request)
    scores = iter(score_targets(model, tok, pairs, batch_size))
    rows: list[Row] = []
    for index, request in enumerate(requests):
        rid = request_id(request, index)
        efficacy = next(scores).accuracy
        generality = [next(scores).accuracy for _ in request.get("paraphrase_prompts", ())]
        neighbourhood = _neighbourhood_pairs(request)
        reference = pre_answers.get(rid, []) if neighbourhood else []
        if len(reference) != len(neighbourhood):
            raise ValueError(f"no pre-edit answers for request {rid}: call pre_edit_answers first")
        locality = [_agreement(next(scores), ref) for ref in reference]
        values = dict(zip(names, (efficacy, _mean(generality), _mean(locality)), strict=True))
        rows += _rows(rid, protocol, values)
    return rows


def zsre_metrics(
    model: nn.Module,
    tok: Any,
    requests: Sequence[Request],
    pre_answers: PreAnswers,
    batch_size: int = 64,
) -> list[Row]:
    """zsRE protocol: per-request mean teacher-forced top-1 token accuracy of `target_new` on the
    edit prompt (efficacy) and paraphrases (generality); locality = agreement of the top-1 tokens
    on neighbourhood prompts with `pre_answers` (from `pre_edit_answers` on the unedited model)."""
    names = ("efficacy", "generality", "locality")
    return _token_accuracy_rows(model, tok, requests, pre_answers, ZSRE, names, batch_size)


def easyedit_metrics(
    model: nn.Module,
    tok: Any,
    requests: Sequence[Request],
    pre_answers: PreAnswers,
    batch_size: int = 64,
) -> list[Row]:
    """EasyEdit's token-accuracy reliability / generalization / locality, on any dataset."""
    names = ("easyedit_rel", "easyedit_gen", "easyedit_loc")
    return _token_accuracy_rows(model, tok, requests, pre_answers, EASYEDIT, names, batch_size)


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


def generation_entropy_metrics(
    model: nn.Module,
    tok: Any,
    requests: Sequence[Request],
    max_new_tokens: int = 40,
    do_sample: bool = False,
    batch_size: int = 32,
) -> list[Row]:
    """`ge`: mean n-gram entropy of `prompt + continuation` over a request's generation prompts."""
    prompts = [p for request in requests for p in request.get("generation_prompts", ())]
    texts = iter(generate(model, tok, prompts, max_new_tokens, do_sample, batch_size=batch_size))
    rows: list[Row] = []
    for index, request in enumerate(requests):
        gens = [p + next(texts) for p in request.get("generation_prompts", ())]
        rows += _rows(request_id(request, index), COUNTERFACT, {"ge": _mean([ngram_entropy(g) for g in gens])})
    return rows


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (ROME's score S of ES, PS, NS)."""
    values = list(values)
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def summarize(rows: Iterable[Row]) -> dict[tuple[str, str], float]:
    """Mean of each (protocol, metric) over requests, plus CounterFact's S = H(ES, PS, NS)."""
    sums: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        sums.setdefault((row["protocol"], row["metric"]), []).append(row["value"])
    summary = {key: sum(vals) / len(vals) for key, vals in sums.items()}
    parts = [summary.get((COUNTERFACT, m)) for m in ("es", "ps", "ns")]
    if all(p is not None for p in parts):
        summary[(COUNTERFACT, "s")] = harmonic_mean(parts)
    return summary


@torch.no_grad()
def perplexity(
    model: nn.Module, tok: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 16
) -> float:
    """Token-weighted perplexity over `texts` (each truncated to `max_length` tokens and to the
    model's context)."""
    device, pad = _device(model), _pad_id(tok)
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    encoded = [seq[:max_length] for seq in tok(list(texts), add_special_tokens=True)["input_ids"]]
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


@torch.no_grad()
def weight_norm_metrics(model: nn.Module, originals: Mapping[int, torch.Tensor]) -> list[Row]:
    """Per edited layer: ‖W‖_F / ‖W₀‖_F (`norm_ratio`) and ‖W − W₀‖_F / ‖W₀‖_F (`delta_rel`)
    of the MLP output projection, `originals` holding W₀ as [d_model, d_mlp] per layer."""
    adapter = adapter_for(model)
    rows = []
    for layer, original in sorted(originals.items()):
        w0 = original.double()
        w = adapter.down_weight(model, layer).detach().to(w0.device).double()
        base = torch.linalg.matrix_norm(w0).item()
        rows += [
            {"layer": layer, "metric": "norm_ratio", "value": torch.linalg.matrix_norm(w).item() / base},
            {"layer": layer, "metric": "delta_rel", "value": torch.linalg.matrix_norm(w - w0).item() / base},
        ]
    return rows
