"""Training the organism: packed fact statements, next-token loss, and two auxiliary losses that put
the facts where editors look for them.

- Sequences: each epoch shuffles the statements and packs two per sequence, joined by a space, a
  newline or EOS, so facts are seen at position 0, after other text and after end-of-text.
- Interchange intervention (`_interchange_loss`): the first MLP's output at the subject's last token
  must carry the fact, as causal tracing finds in real models and as ROME/MEMIT keys assume.
- Subject (and optional relation) probe (`_probe_loss`): the last prompt token's state names its
  subject, so SCEN's indexing neurons, which read it, tell subjects apart.
- AdamW, linear warm-up then cosine decay to 5%; the best epoch is kept and training stops at the
  config's accuracy targets. Threads: the idle cores only (`idle_threads`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import psutil
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from engramflow.data.world import World
from engramflow.editors.adapters import adapter_for
from engramflow.editors.keys import (
    StopForward,
    char_to_token,
    encode,
    pad_batch,
    run_until_stop,
    subject_span,
)
from engramflow.organism.config import EOS, OrganismConfig
from engramflow.organism.data import FactData, Pair, train_tokenizer

log = logging.getLogger(__name__)


@torch.no_grad()
def first_token_accuracy(model: torch.nn.Module, tok: Any, pairs: Sequence[Pair], batch_size: int = 256) -> float:
    """Share of (prompt, object) pairs whose object's first token is the model's top-1 next token."""
    return _top1(model, tok, pairs, batch_size, whole_object=False)


@torch.no_grad()
def object_accuracy(model: torch.nn.Module, tok: Any, pairs: Sequence[Pair], batch_size: int = 256) -> float:
    """Share of (prompt, object) pairs whose every object token is top-1 given the prompt and the
    object's tokens before it (teacher forced); for one-token objects, `first_token_accuracy`."""
    return _top1(model, tok, pairs, batch_size, whole_object=True)


def _top1(model: torch.nn.Module, tok: Any, pairs: Sequence[Pair], batch_size: int, whole_object: bool) -> float:
    if not pairs:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [tok.encode(p) for p, _ in chunk]
        objects = [tok.encode(" " + o, add_special_tokens=False) for _, o in chunk]
        objects = [o if whole_object else o[:1] for o in objects]
        seqs = [p + o[:-1] for p, o in zip(prompts, objects, strict=True)]
        ids, mask = pad_batch(seqs, device)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for j, (p, o) in enumerate(zip(prompts, objects, strict=True)):
            hits += int(predicted[j, len(p) - 1: len(p) - 1 + len(o)].tolist() == o)
    model.train(was_training)
    return hits / len(pairs)


def evaluate_organism(model: torch.nn.Module, tok: Any, world: World | FactData) -> dict[str, float]:
    """Top-1 accuracy of the whole object (every token, teacher forced) on the trained prompts and on
    the held-out ones; with a file's paraphrases, on those too."""
    data = world if isinstance(world, FactData) else FactData.from_world(world, "world")
    out = {"train_top1": object_accuracy(model, tok, data.train),
           "heldout_top1": object_accuracy(model, tok, data.heldout)}
    if data.paraphrases:
        out["paraphrase_top1"] = object_accuracy(model, tok, data.paraphrases)
    return out


class Answer(NamedTuple):
    """Where a statement's object is predicted, and what the probes should name there."""

    position: int  # the token before the object
    subject: str
    relation: str  # "" if none


@dataclass
class Packed:
    """One packed training sequence and where its subjects are."""

    ids: list[int]
    subjects: list[tuple[int, int, bool]]  # (first token, last token, written after a space)
    answers: list[Answer] = field(default_factory=list)


def _batches(data: FactData, tok: Any, cfg: OrganismConfig, rng: random.Random) -> list[Packed]:
    """One epoch of token sequences: shuffled statements packed a few per sequence, with the token
    span of each statement's subject (found through character offsets)."""
    order = list(range(len(data.statements)))
    rng.shuffle(order)
    seqs: list[Packed] = []
    for i in range(0, len(order), cfg.statements_per_sequence):
        text, spans, ends = "", [], []
        for j, k in enumerate(order[i:i + cfg.statements_per_sequence]):
            if j:
                text += rng.choice((" ", "\n", EOS))
            subject = data.subjects[k] if data.subjects else ""
            if subject and subject in data.statements[k]:
                spans.append(subject_span(data.statements[k], subject, offset=len(text)))
                # The statement is "<prompt> <object>.": its prompt's last character.
                prompt_end = len(text) + data.prompt_length(k) - 1
                if prompt_end >= len(text):
                    ends.append((prompt_end, subject, data.relations[k] if data.relations else ""))
            text += data.statements[k]
        ids, offsets = encode(tok, text)
        ids, offsets = ids[: cfg.n_positions], offsets[: cfg.n_positions]
        # Kept when the object's token is in the sequence (the prompt ends before the last token starts).
        answers = [Answer(char_to_token(offsets, end), subject, relation) for end, subject, relation in ends
                   if end < offsets[-1][0]]
        subjects = []
        for begin, end in spans:
            if end > offsets[-1][1]:  # cut off by n_positions
                continue
            first, last = char_to_token(offsets, begin), char_to_token(offsets, end - 1)
            if offsets[first][0] >= begin - 1:  # not merged into a token before it
                subjects.append((first, last, begin > 0 and text[begin - 1] == " "))
        seqs.append(Packed(ids, subjects, answers))
    return seqs


def _subject_spellings(tok: Any, subjects: Iterable[str]) -> dict[tuple[bool, int], list[list[int]]]:
    """Every subject's token ids, bare and after a space, grouped by (after a space, length): the
    pool a subject is swapped from in `_interchange_loss`."""
    pool: dict[tuple[bool, int], list[list[int]]] = {}
    for subject in sorted(set(subjects) - {""}):
        for spaced in (False, True):
            ids = tok.encode((" " if spaced else "") + subject, add_special_tokens=False)
            pool.setdefault((spaced, len(ids)), []).append(ids)
    return pool


def _interchange_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                      seqs: list[Packed], clean_mlp: torch.Tensor, mlp: torch.nn.Module,
                      pool: dict[tuple[bool, int], list[list[int]]], rng: random.Random,
                      context_max: int = 0, bos_id: int | None = None) -> torch.Tensor | None:
    """Interchange-intervention training (Geiger et al., 2022): put another subject's tokens where
    the subject was, restore the clean run's MLP output at the subject's last token, and ask for the
    original continuation. The answer then has to come through that one activation, so the fact is
    looked up by the MLP at the subject's last token and read from there by later positions, as
    causal tracing finds in real language models (Meng et al., 2022) and as ROME/MEMIT keys assume;
    on next-token loss alone these small models look facts up at the prompt's last position instead.

    With `context_max`, the restored activation comes from the same subject after a different context
    (see `_subject_in_new_context`), so the lookup has to work from the subject alone."""
    swapped = ids.clone()
    labels_after = torch.full_like(labels, -100)
    rows, lasts, subjects = [], [], []
    for r, seq in enumerate(seqs):
        for first, last, spaced in seq.subjects:
            candidates = pool.get((spaced, last - first + 1))
            if not candidates:
                continue
            swapped[r, first:last + 1] = torch.tensor(rng.choice(candidates))
            labels_after[r, last + 1:] = labels[r, last + 1:]
            rows.append(r)
            lasts.append(last)
            subjects.append(seq.ids[first:last + 1])
    if not rows:
        return None
    rows_t, lasts_t = torch.tensor(rows), torch.tensor(lasts)
    source = (_subject_in_new_context(model, subjects, seqs, mlp, context_max, bos_id, rng) if context_max
              else clean_mlp[rows_t, lasts_t])

    def restore(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[rows_t, lasts_t] = source
        return output

    handle = mlp.register_forward_hook(restore)
    try:
        return model(input_ids=swapped, attention_mask=mask, labels=labels_after).loss
    finally:
        handle.remove()


def _subject_in_new_context(model: torch.nn.Module, subjects: list[list[int]], seqs: list[Packed],
                            mlp: torch.nn.Module, context_max: int, bos_id: int | None,
                            rng: random.Random) -> torch.Tensor:
    """The store-layer MLP output at the last token of each subject (token ids) when it follows a
    different context: 0 to `context_max` tokens cut from a random sequence of the batch, after BOS
    when the tokenizer adds one. Real models' subject representations barely depend on the words
    before the subject, which is why ROME's key (averaged over a few prefixes) reaches paraphrases;
    without this, layer 0's attention mixes the preceding words into the key and an edit written for
    one context misses others."""
    sources = []
    for subject in subjects:
        donor = seqs[rng.randrange(len(seqs))].ids
        donor = donor[1:] if bos_id is not None and donor[:1] == [bos_id] else donor
        n = rng.randint(0, min(context_max, len(donor)))
        start = rng.randint(0, len(donor) - n)
        sources.append(([bos_id] if bos_id is not None else []) + donor[start:start + n] + subject)
    src_ids, src_mask = pad_batch(sources, next(model.parameters()).device)
    seen: dict[str, torch.Tensor] = {}

    def capture(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
        seen["mlp"] = output
        raise StopForward  # nothing after the store layer is needed; the graph up to here is kept

    handle = mlp.register_forward_hook(capture)
    try:
        run_until_stop(model, src_ids, src_mask)
    finally:
        handle.remove()
    return seen["mlp"][torch.arange(len(sources)), torch.tensor([len(q) - 1 for q in sources])]


def _probe_targets(seqs: list[Packed], name: str, label_ids: dict[str, int]) -> tuple[torch.Tensor, ...] | None:
    """(rows, positions, labels) of every statement's last prompt token in a batch for the probe that
    names its `name` ("subject" or "relation"), or None."""
    found = [(r, answer.position, label_ids[getattr(answer, name)]) for r, seq in enumerate(seqs)
             for answer in seq.answers if getattr(answer, name) in label_ids]
    return tuple(torch.tensor(column) for column in zip(*found, strict=True)) if found else None


def _probe_loss(mlp_input: torch.Tensor, targets: tuple[torch.Tensor, ...], probe: torch.nn.Linear,
                     ) -> torch.Tensor:
    """Cross-entropy of a linear probe that names the subject from the last layer's MLP input at each
    statement's last prompt token (the token that predicts the object).

    In real language models the last prompt token's state reflects its subject: attention heads there
    read the subject's enriched representation (Geva et al., 2023). This organism, trained on next-token
    loss alone, kept little of it (that state told templates apart, not subjects, and SCEN's neurons read
    it); the probe makes it name its subject without telling the model what to predict. `targets` is
    `_probe_targets` of the batch."""
    rows, positions, labels = targets
    return torch.nn.functional.cross_entropy(probe(mlp_input[rows, positions]), labels)


def _collate(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of a batch, right-padded; padding is masked from the loss."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
        labels[j, : len(s)] = ids[j, : len(s)]
    return ids, (labels != -100).long(), labels


def _progress(enabled: bool) -> Progress | None:
    """A progress bar over training steps showing the epoch's loss and accuracies, or None."""
    if not enabled:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn())


def idle_threads(sample_seconds: float = 0.5) -> int:
    """Threads worth using now: the idle cores, at least one, since OpenMP threads on an oversubscribed
    CPU spin against each other. Idle cores are sampled over `sample_seconds` (psutil), not read from
    the load average, which still counts work that has just finished. `ENGRAMFLOW_TRAIN_THREADS`
    overrides."""
    if os.environ.get("ENGRAMFLOW_TRAIN_THREADS"):
        return max(1, int(os.environ["ENGRAMFLOW_TRAIN_THREADS"]))
    cores = os.cpu_count() or 1
    busy_cores = psutil.cpu_percent(interval=sample_seconds) / 100 * cores
    return max(1, min(torch.get_num_threads(), cores - round(busy_cores)))


def train_organism(data: FactData, cfg: OrganismConfig, progress: bool = True) -> tuple[
        PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train tokenizer and model on `data`; returns them and the build report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(idle_threads())
    try:
        return _train(data, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _new_model(cfg: OrganismConfig, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A freshly initialised model of `cfg.architecture`, sized by `cfg`, with no dropout."""
    special = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    if cfg.architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special))
    if cfg.architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), max_position_embeddings=cfg.n_positions, hidden_size=cfg.n_embd,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
            intermediate_size=cfg.n_inner, tie_word_embeddings=True, attention_dropout=0.0, **special))
    raise ValueError(f"organism architecture {cfg.architecture!r} is not one of 'gpt2', 'llama'")


def _train(data: FactData, cfg: OrganismConfig, progress: bool) -> tuple[
        PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """`train_organism` under the thread count it has set."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    started = time.perf_counter()
    tok = train_tokenizer(data, cfg.vocab_size, cfg.prefix_space, cfg.bos)
    pool = _subject_spellings(tok, data.subjects)
    model = _new_model(cfg, tok)
    model.train()
    store_mlp = adapter_for(model).mlp_module(model, cfg.store_layer)
    clean: dict[str, torch.Tensor] = {}  # the store layer's MLP output in the plain forward
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    # The subject probe is trained with the model and discarded: it is not part of the saved model.
    label_ids = {name: {v: i for i, v in enumerate(sorted(set(values) - {""}))}
                 for name, values in (("subject", data.subjects), ("relation", data.relations))}
    weights = {"subject": cfg.subject_id_weight, "relation": cfg.relation_id_weight}
    probe_hooks = []
    probes: dict[str, torch.nn.Linear] = {}
    if weights["subject"] > 0:
        probes["subject"] = torch.nn.Linear(cfg.n_embd, max(1, len(label_ids["subject"])))
    if weights["relation"] > 0 and label_ids["relation"]:
        probes["relation"] = torch.nn.Linear(cfg.n_embd, len(label_ids["relation"]))
    for probe in probes.values():
        decay += [probe.weight]
        no_decay += [probe.bias]
    if probes:
        # The last layer's MLP input of the latest forward, read by the probes after each training run.
        probe_hooks.append(adapter_for(model).mlp_module(model, cfg.n_layer - 1).register_forward_pre_hook(
            lambda _m, args: clean.__setitem__("last_mlp_input", args[0])))

    def probe_loss(targets: dict[str, tuple[torch.Tensor, ...] | None]) -> torch.Tensor | float:
        """The probes' weighted loss on the latest forward (0 when they are off)."""
        loss: torch.Tensor | float = 0.0
        for name, probe in probes.items():
            if targets[name] is not None:
                loss = loss + weights[name] * _probe_loss(clean["last_mlp_input"], targets[name], probe)
        return loss
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(math.ceil(len(data.statements) / cfg.statements_per_sequence) / cfg.batch_size)
    total = steps_per_epoch * cfg.max_epochs

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    eval_rng = random.Random(cfg.seed + 1)
    train_probe = eval_rng.sample(data.train, min(cfg.eval_sample, len(data.train)))
    heldout_probe = eval_rng.sample(data.heldout, min(cfg.eval_sample, len(data.heldout)))
    paraphrase_probe = eval_rng.sample(data.paraphrases, min(cfg.eval_sample, len(data.paraphrases)))
    best: dict[str, Any] = {"score": -1.0}
    history: list[dict[str, float]] = []
    tokens = 0
    train_seconds = 0.0
    bar = _progress(progress)
    if bar is not None:
        bar.start()
        task = bar.add_task(cfg.name, total=total, info="")
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            seqs = _batches(data, tok, cfg, rng)
            loss_sum = 0.0
            for i in range(0, len(seqs), cfg.batch_size):
                chunk = seqs[i:i + cfg.batch_size]
                ids, mask, labels = _collate([s.ids for s in chunk], tok.pad_token_id)
                handle = store_mlp.register_forward_hook(lambda _m, _a, out: clean.__setitem__("mlp", out))
                try:
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                finally:
                    handle.remove()
                # Where the probe reads and what it should name: the same for the plain and the interchanged run.
                targets = {name: _probe_targets(chunk, name, label_ids[name]) for name in probes}
                loss = loss + probe_loss(targets)
                if cfg.interchange_weight > 0:
                    swap = _interchange_loss(model, ids, mask, labels, chunk, clean["mlp"], store_mlp, pool, rng,
                                             cfg.interchange_context, tok.bos_token_id if cfg.bos else None)
                    if swap is not None:
                        # The probe reads the interchanged run too, where the subject's tokens are another's and
                        # only the restored activation knows who it is: the name reaches the last token the way
                        # the facts do, through the store layer's MLP at the subject's last token.
                        loss = loss + cfg.interchange_weight * swap + probe_loss(targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                tokens += int((labels != -100).sum())
                loss_sum += loss.item()
                if bar is not None:
                    bar.update(task, advance=1, info=f"epoch {epoch} loss {loss.item():.3f}")
            train_seconds += time.perf_counter() - t0
            acc_train = object_accuracy(model, tok, train_probe)
            acc_held = object_accuracy(model, tok, heldout_probe) if heldout_probe else 1.0
            row = {"epoch": epoch, "loss": loss_sum / steps_per_epoch, "train_top1": acc_train,
                   "heldout_top1": acc_held, "seconds": time.perf_counter() - started}
            if paraphrase_probe:  # a file's own paraphrases: followed, not a target
                row["paraphrase_top1"] = object_accuracy(model, tok, paraphrase_probe)
            history.append(row)
            log.info("%s epoch %d: %s", cfg.name, epoch, {k: round(v, 4) for k, v in row.items()})
            if bar is not None:
                bar.update(task, info=f"epoch {epoch} train {acc_train:.3f} held-out {acc_held:.3f}")
                if not bar.console.is_terminal:  # a log file or CI: the live bar never renders there
                    bar.console.print(f"{cfg.name} epoch {epoch}/{cfg.max_epochs}: train top-1 {acc_train:.3f}, "
                                      f"held-out {acc_held:.3f}, {row['seconds']:.0f} s")
            score = min(acc_train / cfg.target_train, acc_held / cfg.target_heldout)
            if score > best["score"]:
                best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict()), "row": row}
            if score >= 1.0:
                break
    finally:
        for handle in probe_hooks:
            handle.remove()
        if bar is not None:
            bar.stop()
    model.load_state_dict(best["state"])
    model.eval()
    final = evaluate_organism(model, tok, data)
    report = {
        **final,
        # Reached = some epoch's samples met both targets (the early stop); else the build failed.
        "targets_reached": best["score"] >= 1.0, "best_sample_train_top1": best["row"]["train_top1"],
        "best_sample_heldout_top1": best["row"]["heldout_top1"],
        "epochs": len(history), "best_epoch": best["epoch"], "tokens": tokens,
        "tokens_per_second": tokens / train_seconds, "build_seconds": time.perf_counter() - started,
        "n_params": sum(p.numel() for p in model.parameters()), "n_train_prompts": len(data.train),
        "n_heldout_prompts": len(data.heldout), "n_paraphrase_prompts": len(data.paraphrases),
        "n_statements": len(data.statements), "data": data.notes, "source": data.source, "config": asdict(cfg),
        "torch_threads": torch.get_num_threads(), "history": history,
    }
    return model, tok, report

