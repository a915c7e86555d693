"""Target values: the change δ to a layer's output at the fact token that makes the model say
`target_new`, optimised for a whole batch of requests at once (one δ row per request).

Per request r, as in ROME/MEMIT: loss_r = NLL(target_new | each context prefix + prompt)
+ kl_factor · KL(p ‖ p₀) of the next-token distribution read at the fact token of "{subject} is a" (as the
references read it: the subject's last token, and this direction of the divergence)
+ v_weight_decay · ‖δ_r‖ / ‖h_r‖², with ‖δ_r‖ clamped to clamp_norm_factor · ‖h_r‖. The batch loss is Σ_r loss_r: each δ_r only reaches its own prompts
and Adam is element-wise, so every row follows the same path as it would alone.

Tokens before a prompt's fact token never see δ (attention is causal), so their keys and values are
computed once and cached; every step runs only the tokens from the fact token on. Blocks up to the
edited layer never see δ either (it is added at that block's output), so their output at those
tokens is recorded once and replayed: a step runs only the blocks after the edited layer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.cache import RequestCache
from engramflow.editors.covariance import model_fingerprint
from engramflow.editors.keys import (
    Request,
    RequestError,
    StopForward,
    cache_kwargs,
    encode,
    eval_mode,
    fact_position,
    pad_batch,
    returned_cache,
    subject_span,
)

EARLY_STOP_LOSS = 5e-2  # ROME stops a request's optimisation once its loss falls below this


@dataclass
class Targets:
    delta: torch.Tensor  # [d_model, n] optimised change of the layer output at the fact token
    h: torch.Tensor  # [d_model, n] unedited layer output at the fact token of the bare prompt
    loss: torch.Tensor  # [n] each request's final loss
    steps: int  # optimisation steps taken


def block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def add_at_positions(model: nn.Module, layer: int, rows: torch.Tensor, pos: torch.Tensor,
                     values: torch.Tensor) -> Iterator[None]:
    """During forward passes, add values[i] to block `layer`'s output at (rows[i], pos[i])."""

    def hook(_module, _args, output):
        hidden = block_output(output)
        hidden = hidden.index_put((rows, pos), values.to(hidden.dtype), accumulate=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = adapter_for(model).block(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def current_outputs(model: nn.Module, tok, requests: Sequence[Request], layer: int,
                    fact_token: str = "subject_last") -> torch.Tensor:
    """Block `layer`'s output at the fact token of each bare prompt, [d_model, n] float32."""
    device = next(model.parameters()).device
    seqs, positions = [], []
    for req in requests:
        ids, offsets = encode(tok, req.prompt)
        s, e = subject_span(req.prompt, req.subject)
        seqs.append(ids)
        positions.append(fact_position(offsets, len(ids), s, e, fact_token))
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = block_output(output)

    ids, mask = pad_batch(seqs, device)
    handle = adapter_for(model).block(model, layer).register_forward_hook(hook)
    try:
        with eval_mode(model):
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return captured["h"][torch.arange(len(seqs), device=device), torch.tensor(positions, device=device)].float().T


@dataclass
class Prompts:
    """All rewrite and KL sequences of a batch, flattened, with where to add δ and what to score."""

    seqs: list[list[int]]
    owner: list[int]  # request index of each sequence
    fact_pos: list[int]  # where δ is added
    score_pos: list[list[int]]  # rewrite prompts: positions predicting target tokens; KL: [fact token]
    score_ids: list[list[int]]  # rewrite prompts: the target tokens; KL prompts: []
    is_kl: list[bool]


def build_prompts(tok, requests: Sequence[Request], prefixes: Sequence[str], fact_token: str) -> Prompts:
    p = Prompts([], [], [], [], [], [])
    for r_i, req in enumerate(requests):
        for prefix in prefixes:
            text = prefix + req.prompt
            ids, offsets = encode(tok, text + " " + req.target_new)
            # Target tokens are those starting at or after the separating space (offsets, not a
            # separately tokenised target, so the split matches how the model reads the sentence).
            tgt = [t for t, (s, e) in enumerate(offsets) if s >= len(text) and e > s]
            if not tgt:
                raise RequestError(f"request {req.request_id}: target {req.target_new!r} has no tokens")
            s, e = subject_span(req.prompt, req.subject, len(prefix))
            p.seqs.append(ids[: tgt[-1]])
            p.owner.append(r_i)
            p.fact_pos.append(fact_position(offsets, tgt[0], s, e, fact_token))
            p.score_pos.append([t - 1 for t in tgt])
            p.score_ids.append([ids[t] for t in tgt])
            p.is_kl.append(False)
    for r_i, req in enumerate(requests):
        text = f"{req.subject} is a"
        ids, offsets = encode(tok, text)
        fact = fact_position(offsets, len(ids), 0, len(req.subject), fact_token)
        p.seqs.append(ids[: fact + 1])  # causal: the tokens after the one read change nothing
        p.owner.append(r_i)
        p.fact_pos.append(fact)
        p.score_pos.append([fact])
        p.score_ids.append([])
        p.is_kl.append(True)
    return p


def length_groups(idx: Sequence[int], lengths: Sequence[int], max_rows: int, max_padding: float = 0.25,
                  ) -> list[list[int]]:
    """Split sequences idx (with these run lengths) into chunks of at most max_rows, by ascending
    length, starting a new chunk where padding would exceed max_padding of the chunk's real tokens.
    A batch mixes templates whose runs differ several-fold (subject first or last); padded together,
    most of a step's work was padding, and batching 64 requests was slower than one at a time."""
    groups: list[list[int]] = []
    tokens = 0
    for length, i in sorted(zip(lengths, idx, strict=True)):
        g = groups[-1] if groups else None
        # Sorted ascending, so `length` is the padded width if i joins the last chunk.
        if g is None or len(g) >= max_rows or (len(g) + 1) * length > (1 + max_padding) * (tokens + length):
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += length
    return groups


def compute_targets(
    model: nn.Module, tok, requests: Sequence[Request], layer: int, prefixes: Sequence[str], *,
    v_num_grad_steps: int, v_lr: float, v_weight_decay: float, kl_factor: float,
    clamp_norm_factor: float, fact_token: str = "subject_last", chunk_size: int = 512,
) -> Targets:
    """Optimise δ [n, d_model] at block `layer`'s output for all `requests` together. Each step is
    one forward/backward over every prompt, split into chunks of `chunk_size` sequences whose
    gradients add up (the loss is a sum over sequences)."""
    device = next(model.parameters()).device
    n = len(requests)
    adapter = adapter_for(model)

    def unembed(hidden: torch.Tensor) -> torch.Tensor:
        return adapter.logits(model, hidden)

    h = current_outputs(model, tok, requests, layer, fact_token)  # [d_model, n]
    p = build_prompts(tok, requests, prefixes, fact_token)
    n_rewrite = torch.zeros(n, device=device).index_add_(
        0, torch.tensor(p.owner, device=device),
        torch.tensor([0.0 if k else 1.0 for k in p.is_kl], device=device))

    def chunks_for(active: torch.Tensor) -> list[PromptChunk]:
        # Only the prompts of requests still optimising: a finished request's δ is frozen, so
        # running its prompts again would cost a forward/backward and change nothing.
        idx = [i for i in range(len(p.seqs)) if bool(active[p.owner[i]])]
        # A sequence whose fact token is its first token has nothing to cache; it goes in chunks of its own.
        cached = [i for i in idx if p.fact_pos[i] > 0]
        whole = [i for i in idx if p.fact_pos[i] == 0]
        return ([PromptChunk.build(p, g, device, split_at_fact=True)
                 for g in length_groups(cached, [len(p.seqs[i]) - p.fact_pos[i] for i in cached], chunk_size)]
                + [PromptChunk.build(p, g, device)
                   for g in length_groups(whole, [len(p.seqs[i]) for i in whole], chunk_size)])

    kl_init: dict[int, torch.Tensor] = {}  # sequence index -> the unedited KL distribution (δ = 0)

    h_norm = h.norm(dim=0)  # [n]
    max_norm = clamp_norm_factor * h_norm
    delta = torch.zeros(n, h.shape[0], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=v_lr)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    loss = torch.zeros(n, device=device)
    chunks, built_for = [], None
    steps = 0
    with eval_mode(model):
        for it in range(v_num_grad_steps):
            last = it == v_num_grad_steps - 1
            # Rebuilding drops finished requests' prompts but costs a prefix forward, so it waits until a
            # quarter of the built-for requests have finished; until then finished rows still run, their δ
            # frozen and their loss kept, which changes no other row (each δ reaches only its own prompts).
            if built_for is None or int((~done).sum()) <= 0.75 * int((~built_for).sum()):
                chunks, built_for = chunks_for(~done), done.clone()
                for c in chunks:
                    c.cache_prefix(model)
                    c.record_blocks(model, layer)
            nll = torch.zeros(n, device=device)
            kl = torch.zeros(n, device=device)
            grad = torch.zeros_like(delta)
            for c in chunks:
                with c.replaying(model), add_at_positions(model, layer, c.rows, c.fact_pos, delta[c.owner]):
                    hidden = c.final_hidden(model)
                # NLL per rewrite sequence (mean over its target tokens), averaged per request.
                logp = unembed(hidden[c.t_seq, c.t_pos]).float().log_softmax(-1)
                seq_nll = torch.zeros(len(c.owner), device=device).index_add_(
                    0, c.t_seq, -logp.gather(1, c.t_id[:, None])[:, 0]) / c.t_len
                c_nll = torch.zeros(n, device=device).index_add_(0, c.owner, seq_nll) / n_rewrite
                kl_logp = unembed(hidden[c.kl_rows, c.kl_last]).float().log_softmax(-1)
                if c.kl_init is None:
                    kl_init.update({s: row for s, row in zip(c.kl_seqs, kl_logp.detach(), strict=True)
                                    if s not in kl_init})
                    c.kl_init = torch.stack([kl_init[s] for s in c.kl_seqs]) if c.kl_seqs else kl_logp.detach()
                c_kl = torch.zeros(n, device=device).index_add_(
                    0, c.owner[c.kl_rows],
                    kl_factor * F.kl_div(c.kl_init, kl_logp, log_target=True, reduction="none").sum(-1))
                if not last:
                    grad += torch.autograd.grad((c_nll + c_kl).sum(), [delta])[0]
                nll += c_nll.detach()
                kl += c_kl.detach()
            wd = v_weight_decay * delta.norm(dim=1) / h_norm**2
            loss = torch.where(done, loss, nll + kl + wd.detach())  # [n]; finished requests keep theirs
            done |= loss < EARLY_STOP_LOSS
            if bool(done.all()) or last:
                break
            frozen = delta.detach().clone()
            opt.zero_grad()
            delta.grad = grad + torch.autograd.grad(wd.sum(), [delta])[0]
            opt.step()
            steps += 1
            with torch.no_grad():
                delta[done] = frozen[done]  # finished requests keep their δ, as if stopped alone
                norms = delta.norm(dim=1)
                delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))[:, None])
    return Targets(delta=delta.detach().T.contiguous(), h=h, loss=loss, steps=steps)


def cached_targets(model: nn.Module, tok, requests: Sequence[Request], layer: int, prefixes: Sequence[str],
                   cache: RequestCache | None, *, chunk_size: int = 512, **settings: Any) -> Targets:
    """`compute_targets` for the requests `cache` does not hold yet; the rest are read from it.
    `settings` are compute_targets' optimisation settings (they are part of the key); `steps` counts
    the optimisation steps this call took (0 when every target was cached)."""
    if cache is None:
        return compute_targets(model, tok, requests, layer, prefixes, chunk_size=chunk_size, **settings)
    fingerprint = model_fingerprint(model)
    keys = [cache.key(fingerprint, layer, list(prefixes), sorted(settings.items()), r.prompt, r.subject, r.target_new)
            for r in requests]
    found = {i: hit for i, k in enumerate(keys) if (hit := cache.get(k)) is not None}
    missing = [i for i in range(len(requests)) if i not in found]
    steps = 0
    if missing:
        fresh = compute_targets(model, tok, [requests[i] for i in missing], layer, prefixes,
                                chunk_size=chunk_size, **settings)
        steps = fresh.steps
        diverged = [requests[i].request_id for j, i in enumerate(missing)
                    if not bool(torch.isfinite(fresh.delta[:, j]).all())]
        if diverged:  # never cached, never solved for
            raise ValueError(f"layer {layer}: target optimisation diverged (NaN or infinite target) for request(s) "
                             f"{', '.join(diverged)}")
        for j, i in enumerate(missing):
            found[i] = {"delta": fresh.delta[:, j], "h": fresh.h[:, j], "loss": fresh.loss[j:j + 1]}
            cache.put(keys[i], found[i])
    device = next(model.parameters()).device
    column = [found[i] for i in range(len(requests))]
    return Targets(delta=torch.stack([c["delta"] for c in column], 1).to(device),
                   h=torch.stack([c["h"] for c in column], 1).to(device),
                   loss=torch.cat([c["loss"] for c in column]).to(device), steps=steps)


@dataclass
class PromptChunk:
    """One slice of the flattened prompts as tensors: where δ goes, which tokens are scored."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    owner: torch.Tensor
    fact_pos: torch.Tensor
    t_seq: torch.Tensor  # (t_seq, t_pos, t_id): every scored target token of the chunk
    t_pos: torch.Tensor
    t_id: torch.Tensor
    t_len: torch.Tensor  # target length per sequence (1 for KL rows, which have none)
    kl_rows: torch.Tensor
    kl_last: torch.Tensor
    kl_seqs: list[int]  # global sequence index of each KL row
    kl_init: torch.Tensor | None = None  # the unedited KL distributions, set on the first pass
    # A chunk split at the fact token: `ids` are the tokens from the fact token on, at `position_ids`,
    # after a prefix (`prefix_ids`) whose keys and values are computed once; `mask` covers both.
    position_ids: torch.Tensor | None = None
    prefix_ids: torch.Tensor | None = None
    prefix_mask: torch.Tensor | None = None
    prefix_cache: Any = None
    # Blocks 0..replay_layer's output at the chunk's tokens (see `record_blocks`), replayed in `replaying`.
    replay_layer: int | None = None
    replay_output: Any = None

    @classmethod
    def build(cls, p: Prompts, idx: Sequence[int], device: torch.device, split_at_fact: bool = False) -> PromptChunk:
        """Tensors for sequences idx. With split_at_fact (every fact position > 0), positions (fact,
        scored) count from each sequence's fact token."""
        idx = list(idx)
        start = [p.fact_pos[i] if split_at_fact else 0 for i in idx]
        if split_at_fact and min(start) < 1:
            raise ValueError("split_at_fact needs every sequence to have tokens before its fact token")
        ids, mask = pad_batch([p.seqs[i][s:] for i, s in zip(idx, start, strict=True)], device)
        extra = {}
        if split_at_fact:
            prefix_ids, prefix_mask = pad_batch([p.seqs[i][:s] for i, s in zip(idx, start, strict=True)], device)
            offset = torch.tensor(start, device=device)
            extra = {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
                     "position_ids": offset[:, None] + torch.arange(ids.shape[1], device=device)}
            mask = torch.cat([prefix_mask, mask], 1)
        tri = [(j, pos - s, tid) for j, (i, s) in enumerate(zip(idx, start, strict=True)) if not p.is_kl[i]
               for pos, tid in zip(p.score_pos[i], p.score_ids[i], strict=True)]
        t_seq, t_pos, t_id = (torch.tensor(col, dtype=torch.long, device=device)
                              for col in (zip(*tri, strict=True) if tri else ([], [], [])))
        kl = [j for j, i in enumerate(idx) if p.is_kl[i]]
        return cls(
            ids=ids, mask=mask, rows=torch.arange(len(idx), device=device),
            owner=torch.tensor([p.owner[i] for i in idx], device=device),
            fact_pos=torch.tensor([p.fact_pos[i] - s for i, s in zip(idx, start, strict=True)], device=device),
            t_seq=t_seq, t_pos=t_pos, t_id=t_id,
            t_len=torch.tensor([max(len(p.score_ids[i]), 1) for i in idx], device=device),
            kl_rows=torch.tensor(kl, dtype=torch.long, device=device),
            kl_last=torch.tensor([p.score_pos[idx[j]][0] - start[j] for j in kl], dtype=torch.long, device=device),
            kl_seqs=[idx[j] for j in kl],
            **extra,
        )

    @torch.no_grad()
    def cache_prefix(self, model: nn.Module) -> None:
        """Keys and values of the tokens before each fact token, from the model as it is now (with any
        earlier updates overlaid) but without δ: call it outside the hook that adds δ, whose positions
        count from the fact token."""
        if self.prefix_ids is not None:
            out = model.base_model(input_ids=self.prefix_ids, attention_mask=self.prefix_mask, use_cache=True)
            self.prefix_cache = returned_cache(out)

    @torch.no_grad()
    def record_blocks(self, model: nn.Module, layer: int) -> None:
        """Record block `layer`'s output at the chunk's tokens, from the model as it is now and without δ
        (call it outside the hook that adds δ, after `cache_prefix`). Nothing up to that output depends
        on δ, so `replaying` can stand in for blocks 0..layer on every later step."""
        captured = {}

        def capture(_module, _args, output):
            captured["output"] = output
            raise StopForward  # the blocks after `layer` are what each step runs

        handle = adapter_for(model).block(model, layer).register_forward_hook(capture)
        try:
            with contextlib.suppress(StopForward):
                self.final_hidden(model)
        finally:
            handle.remove()
        self.replay_layer, self.replay_output = layer, captured["output"]

    @contextlib.contextmanager
    def replaying(self, model: nn.Module) -> Iterator[None]:
        """Within: blocks 0..replay_layer of `model` return the recorded output instead of computing
        it (a no-op before `record_blocks`). Hooks registered inside on block `replay_layer` (such as
        the one adding δ) act on the replayed output."""
        if self.replay_layer is None:
            yield
            return
        blocks = model.get_submodule(adapter_for(model).blocks)
        originals = [blocks[i] for i in range(self.replay_layer + 1)]
        try:
            for i, block in enumerate(originals):
                blocks[i] = _Replay(block, self.replay_output)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def final_hidden(self, model: nn.Module) -> torch.Tensor:
        """The base model's last hidden state (final norm applied) at the chunk's tokens: logits are
        then taken only where they are scored, instead of [sequences, length, vocab] for the batch."""
        if self.prefix_ids is None:
            return model.base_model(input_ids=self.ids, attention_mask=self.mask).last_hidden_state
        if self.prefix_cache is None:
            raise RuntimeError("a chunk split at the fact token needs cache_prefix(model) before its forwards")
        # A copy: the forward appends the chunk's own keys and values to the cache it is given.
        cache = cache_kwargs(model.base_model, copy.deepcopy(self.prefix_cache))
        return model.base_model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position_ids,
                                use_cache=True, **cache).last_hidden_state


class _Replay(nn.Module):
    """Stands in for a transformer block: returns a recorded block output, whatever its input. Other
    attributes (a block's `attention_type`, read by some model loops) come from the block it replaces,
    which stays unregistered here so the model's parameters do not change."""

    def __init__(self, block: nn.Module, output: Any) -> None:
        super().__init__()
        self.__dict__["_replaced"] = block
        self.__dict__["_output"] = output

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self._output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_replaced"], name)
