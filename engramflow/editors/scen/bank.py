"""The expert bank: every expert and indexing neuron of one layer in edit order, plus the keys of
every edited prompt (the negatives of later neurons). `add_requests` is SCEN's continual step.

Layers before the edited one are never changed, so the MLP hidden there is the base model's: keys
computed once are valid for every later neuron and recalibration.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.artifacts import FORMAT_KEY, Artifact
from engramflow.editors.requests import Request, as_requests
from engramflow.editors.scen.config import ScenConfig
from engramflow.editors.scen.experts import Expert, train_expert
from engramflow.editors.scen.neurons import train_neurons
from engramflow.editors.scen.prompts import contrast_prompts, fact_of, prompt_hidden, question_of
from engramflow.editors.scen.routing import attach, attached, detach


def _owned_by(owner: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """[len(rows), m]: which of m keys (owner [m], see ExpertBank.key_owner) are each neuron's positives."""
    return owner[None, :] == torch.tensor(list(rows), dtype=torch.long)[:, None]


@dataclass
class AddReport:
    """What adding a batch did: experts trained, old neurons that fired on new prompts, recalibration."""

    experts: list[Expert] = field(default_factory=list)
    old_firing: list[str] = field(default_factory=list)  # old experts whose neuron fired (> theta) on a new key
    recalibrated: list[str] = field(default_factory=list)
    seconds_experts: float = 0.0
    seconds_neurons: float = 0.0


class ExpertBank(Artifact):
    """Experts and their indexing neurons for one layer, in edit order, plus the keys of every edited
    prompt (the negatives of later neurons). A bank is SCEN's whole state: each edit returns the new
    bank, which replaces the one before (`stacks = False`); applying it attaches it as a routing layer.

    Experts are stored as the config says: a `full` bank holds each delta dense (`dense`
    [n, d_model, d_mlp]), a `lora` or `svd` bank its rank-r factors (`a` [n, r, d_mlp], `b`
    [n, d_model, r]); the other tensors are None."""

    format: ClassVar[str] = "engramflow.scen/1"
    stacks: ClassVar[bool] = False
    method_name: ClassVar[str] = "scen"

    def __init__(self, layer: int, d_model: int, d_mlp: int, config: ScenConfig) -> None:
        self.layer = layer
        self.d_model, self.d_mlp = d_model, d_mlp
        self.config = config
        self.theta = config.theta
        self.route_theta = config.theta if config.route_theta is None else config.route_theta
        self.ids: list[str] = []
        self.facts: list[dict[str, Any]] = []  # fact_of(request) per expert, for contrast prompts
        r = config.rank
        self.a: torch.Tensor | None = None if self.full else torch.zeros(0, r, d_mlp)  # [n, r, d_mlp]
        self.b: torch.Tensor | None = None if self.full else torch.zeros(0, d_model, r)  # [n, d_model, r]
        self.dense: torch.Tensor | None = torch.zeros(0, d_model, d_mlp) if self.full else None
        self.neuron_w = torch.zeros(0, d_mlp)  # [n, d_mlp]
        self.neuron_b = torch.zeros(0)  # [n]
        # Keys of every edit's prompts: owner i >= 0 marks the last prompt token of expert i's prompts
        # (its positives, everyone else's negatives); owner -2 - i marks expert i's other prompt tokens
        # and contrast prompts, negatives for every neuron (in-distribution "not this prompt" examples).
        self.keys = torch.zeros(0, d_mlp)  # [m, d_mlp]
        self.key_owner = torch.zeros(0, dtype=torch.long)  # [m]
        self.key_question: list[str | None] = []  # [m] the question a contrast key asks (None: others)
        self.version = 0  # bumped on every change; attached layers refresh their copies

    @classmethod
    def for_model(cls, model: nn.Module, layer: int, config: ScenConfig) -> ExpertBank:
        """An empty bank for `layer` of `model` (ValueError when the model has no such layer)."""
        adapter = adapter_for(model)
        n_layers = adapter.n_layers(model)
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers")
        return cls(layer, adapter.d_model(model), adapter.d_mlp(model), config)

    @property
    def full(self) -> bool:
        """Whether experts are stored and served as dense matrices."""
        return self.config.expert_kind == "full"

    @property
    def request_ids(self) -> list[str]:
        return list(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, rid: str) -> int:
        try:
            return self.ids.index(rid)
        except ValueError:
            raise KeyError(f"no expert for request {rid!r} in the bank (layer {self.layer})") from None

    def delta(self, i: int) -> torch.Tensor:
        """Expert i's delta on W as a dense [d_model, d_mlp] matrix, as the bank serves it."""
        if self.dense is not None:
            return self.dense[i]
        assert self.a is not None and self.b is not None
        return self.b[i] @ self.a[i]

    def expert_nbytes(self) -> int:
        """Storage of one expert (dense, or its factors) plus its neuron, in bytes (float32)."""
        r = self.config.rank
        expert = self.d_model * self.d_mlp if self.full else r * (self.d_model + self.d_mlp)
        return 4 * (expert + self.d_mlp + 1)

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """The stored experts by name: {"dense"} or {"a", "b"}."""
        parts = {"a": self.a, "b": self.b, "dense": self.dense}
        return {name: t for name, t in parts.items() if t is not None}

    def _stacked(self, experts: Sequence[Expert]) -> dict[str, torch.Tensor]:
        """New experts in the bank's form: dense for a full bank, else rank-r factors (a dense expert is
        refused there rather than silently truncated)."""
        if self.full:
            return {"dense": torch.stack([e.delta().float() for e in experts])}
        r, kind = self.config.rank, self.config.expert_kind
        for e in experts:
            if e.a is None or e.b is None or e.a.shape[0] != r:
                have = "a dense expert" if e.a is None else f"a rank-{e.a.shape[0]} expert"
                raise ValueError(f"request {e.request_id}: {have} in a rank-{r} {kind} bank (train it with this "
                                 "bank's config, or build the bank with expert_kind 'full')")
        return {"a": torch.stack([e.a.float() for e in experts]), "b": torch.stack([e.b.float() for e in experts])}

    def _own(self, rows: Sequence[int]) -> torch.Tensor:
        """[len(rows), m]: which of the bank's keys are each of these neurons' positives."""
        return _owned_by(self.key_owner, rows)

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        """Neuron activations on keys [m, d_mlp]: [m, n]."""
        return torch.sigmoid(keys.float() @ self.neuron_w.T + self.neuron_b)

    def add(self, experts: Sequence[Expert], keys: Sequence[torch.Tensor],
            negatives: Sequence[tuple[torch.Tensor, Sequence[str | None]]] | None = None,
            facts: Sequence[Mapping[str, Any]] | None = None) -> AddReport:
        """Append experts with their positive keys ([p_i, d_mlp] each: last prompt tokens) and negative
        keys ([c_i, d_mlp]: other prompt tokens and contrast prompts, each with the question it asks or
        None), train the new neurons against every other key, keep of each expert's contrast keys the
        hardest `neuron_contrasts`, and recalibrate old neurons that fire on any new key, positive or
        negative. Old experts are never touched."""
        report = AddReport(experts=list(experts))
        if not experts:
            return report
        duplicate = sorted({e.request_id for e in experts} & set(self.ids))
        if duplicate or len({e.request_id for e in experts}) != len(experts):
            raise ValueError(f"requests already in the bank or repeated in the batch: {duplicate}")
        start = time.perf_counter()
        facts = list(facts) if facts is not None else [{"subject": e.request_id, "template": "", "relation": None}
                                                        for e in experts]
        negatives = negatives if negatives is not None else [(torch.zeros(0, self.d_mlp), []) for _ in keys]
        # Contrast keys that ask one of the new questions are now that fact's positives' neighbours.
        asked = {question_of(f) for f in facts}
        keep = torch.tensor([q not in asked for q in self.key_question], dtype=torch.bool)
        self.keys, self.key_owner = self.keys[keep], self.key_owner[keep]
        self.key_question = [q for q in self.key_question if q not in asked]
        n_old = len(self.ids)
        new_keys = torch.cat([k.float() for k in keys])
        added = torch.cat([new_keys, *[c.float() for c, _ in negatives]])  # positives, then negatives
        # Old neurons are checked on every new key: the new contrast prompts ask old subjects new questions,
        # the prompts an old neuron misfired on most (docs/notes/2026-12-06-scen.md).
        old_scores = self.scores(added)  # [m_added, n_old]
        owners = [torch.full((len(k),), n_old + i, dtype=torch.long) for i, k in enumerate(keys)]
        owners += [torch.full((len(c),), -2 - (n_old + i), dtype=torch.long) for i, (c, _) in enumerate(negatives)]
        for name, stacked in self._stacked(experts).items():
            setattr(self, name, torch.cat([getattr(self, name), stacked]))
        self.ids += [e.request_id for e in experts]
        self.facts += [dict(f) for f in facts]
        added_owner = torch.cat(owners)
        added_question = [None] * len(new_keys) + [q for _, qs in negatives for q in qs]
        # The new neurons train on every candidate contrast; the bank keeps only the hardest of them (and
        # every key an old neuron fired on, which its recalibration below needs).
        w, b = train_neurons(torch.cat([self.keys, added]),
                             _owned_by(torch.cat([self.key_owner, added_owner]), range(n_old, len(self.ids))),
                             self.config)
        self.neuron_w = torch.cat([self.neuron_w, w])
        self.neuron_b = torch.cat([self.neuron_b, b])
        firing = old_scores > self.theta  # [m_added, n_old]
        keep = self._hardest(added, added_owner, added_question, firing.any(1))
        self.keys = torch.cat([self.keys, added[keep]])
        self.key_owner = torch.cat([self.key_owner, added_owner[keep]])
        self.key_question += [q for q, k in zip(added_question, keep.tolist(), strict=True) if k]
        fired = firing.any(0).nonzero().squeeze(1).tolist()
        report.old_firing = [self.ids[i] for i in fired]
        if fired and self.config.recalibrate_steps > 0:
            w, b = train_neurons(self.keys, self._own(fired), self.config,
                                 init=(self.neuron_w[fired], self.neuron_b[fired]),
                                 steps=self.config.recalibrate_steps)
            self.neuron_w[fired], self.neuron_b[fired] = w, b
            report.recalibrated = list(report.old_firing)
        report.seconds_neurons = time.perf_counter() - start
        self.version += 1
        return report

    def _hardest(self, keys: torch.Tensor, owner: torch.Tensor, question: Sequence[str | None],
                 fired: torch.Tensor) -> torch.Tensor:
        """[m] which of a batch's keys the bank keeps: positives and other prompt tokens, keys in `fired`,
        and of each expert's contrast keys the `neuron_contrasts` that come nearest to firing a neuron."""
        contrast = torch.tensor([q is not None for q in question], dtype=torch.bool)
        keep = ~contrast | fired
        logits = keys.float() @ self.neuron_w.T + self.neuron_b  # [m, n]
        hardness = logits.max(1).values if logits.shape[1] else torch.zeros(len(keys))
        for expert in owner[contrast].unique().tolist():
            rows = ((owner == expert) & contrast).nonzero().squeeze(1)
            keep[rows[hardness[rows].topk(min(len(rows), self.config.neuron_contrasts)).indices]] = True
        return keep

    def copy(self) -> ExpertBank:
        """An independent copy (tensors cloned), e.g. to try a batch without changing this bank."""
        bank = ExpertBank(self.layer, self.d_model, self.d_mlp, self.config)
        bank.ids, bank.facts, bank.key_question = list(self.ids), [dict(f) for f in self.facts], list(self.key_question)
        for name, t in {**self.expert_tensors(), "neuron_w": self.neuron_w, "neuron_b": self.neuron_b,
                        "keys": self.keys, "key_owner": self.key_owner}.items():
            setattr(bank, name, t.clone())
        return bank

    def remove(self, rid: str) -> None:
        """Revert one fact: drop its expert, its neuron and its keys."""
        i = self.index(rid)
        keep = [j for j in range(len(self.ids)) if j != i]
        for name, t in self.expert_tensors().items():
            setattr(self, name, t[keep])
        self.neuron_w, self.neuron_b = self.neuron_w[keep], self.neuron_b[keep]
        mask = (self.key_owner != i) & (self.key_owner != -2 - i)
        self.keys = self.keys[mask]
        self.key_question = [q for q, m in zip(self.key_question, mask.tolist(), strict=True) if m]
        owner = self.key_owner[mask]
        # Renumber the experts after i, in both encodings.
        self.key_owner = owner - (owner > i).long() + (owner < -2 - i).long()
        del self.ids[i]
        del self.facts[i]
        self.version += 1

    # --- the artifact -----------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        """Attach this bank to `model` at its layer (RuntimeError when a bank is attached already)."""
        if getattr(model, "_scen", None) is not None:
            raise RuntimeError("a SCEN bank is already attached to this model; revert it first")
        attach(model, self.layer, self)

    def revert(self, model: nn.Module) -> None:
        """Detach this bank: the layer's original projection is back (RuntimeError when another bank is
        attached)."""
        if attached(model).bank is not self:
            raise RuntimeError(f"another SCEN bank is attached to layer {self.layer}, not this one")
        detach(model)

    def edit_records(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per request: its expert's layer, the Frobenius norm of its delta, rank and bytes as served."""
        rank = min(self.d_model, self.d_mlp) if self.full else self.config.rank
        return {rid: {"layers": [self.layer], "norm": float(self.delta(self.index(rid)).double().norm()),
                      "expert": True, "rank": rank, "bytes": self.expert_nbytes()} for rid in request_ids}

    def without(self, request_ids: Sequence[str]) -> ExpertBank:
        """A copy without these requests' experts, neurons and keys: an exact revert of those facts
        (KeyError naming a request the bank does not hold)."""
        bank = self.copy()
        for rid in request_ids:
            bank.remove(rid)
        return bank

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Experts, neurons and edit keys as named tensors; ids and settings as string metadata."""
        tensors = {**self.expert_tensors(), "neuron_w": self.neuron_w, "neuron_b": self.neuron_b,
                   "keys": self.keys, "key_owner": self.key_owner}
        meta = {
            "layer": str(self.layer), "d_model": str(self.d_model), "d_mlp": str(self.d_mlp),
            "ids": json.dumps(self.ids), "facts": json.dumps(self.facts),
            "key_question": json.dumps(self.key_question), "config": json.dumps(self.config.to_dict()),
        }
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], *, source: str = "tensors",
                     ) -> ExpertBank:
        """Inverse of `to_tensors`; metadata that names another format is a ValueError naming `source`."""
        fmt = (meta or {}).get(FORMAT_KEY, cls.format)
        if fmt != cls.format:
            raise ValueError(f"{source} is not a SCEN bank (metadata format {fmt!r})")
        bank = cls(int(meta["layer"]), int(meta["d_model"]), int(meta["d_mlp"]),
                   ScenConfig(**json.loads(meta["config"])))
        bank.ids = json.loads(meta["ids"])
        bank.facts = json.loads(meta["facts"])
        bank.key_question = json.loads(meta["key_question"])
        bank.neuron_w, bank.neuron_b = tensors["neuron_w"], tensors["neuron_b"]
        bank.keys, bank.key_owner = tensors["keys"], tensors["key_owner"]
        if not bank.full:
            bank.a, bank.b = tensors["a"], tensors["b"]
        elif "dense" in tensors:
            bank.dense = tensors["dense"]
        else:  # a full bank stored before full experts were served: its experts were cut to rank r
            bank.dense = tensors["b"] @ tensors["a"]
        return bank


def held_out_paraphrases(requests: Sequence[Mapping[str, Any]], config: ScenConfig) -> list[Mapping[str, Any]]:
    """The requests without the paraphrase prompts that trained their neurons (`neuron_paraphrases`),
    so that generality is scored on paraphrases the bank never saw. Requests stay Requests and
    other mappings (the pipeline's rows) stay dicts."""
    n = config.neuron_paraphrases
    return [r.replace(paraphrase_prompts=r.paraphrase_prompts[n:]) if isinstance(r, Request)
            else {**r, "paraphrase_prompts": list(r.get("paraphrase_prompts") or [])[n:]} for r in requests]


def add_requests(model: nn.Module, tok: Any, bank: ExpertBank, requests: Sequence[Mapping[str, Any]],
                 experts: Sequence[Expert] | None = None) -> AddReport:
    """Continual step: train an expert per new request (unless given, e.g. from parallel workers), read
    its prompt keys (plus `neuron_paraphrases` paraphrases), and add both to the bank."""
    if not requests:
        return AddReport()
    requests = as_requests(requests)
    start = time.perf_counter()
    if experts is None:
        experts = [train_expert(model, tok, r, bank.layer, bank.config) for r in requests]
    mismatched = [(r.request_id, e.request_id) for r, e in zip(requests, experts, strict=True)
                  if r.request_id != e.request_id]
    if mismatched:
        raise ValueError(f"experts do not match their requests (request id, expert id): {mismatched}")
    seconds_experts = time.perf_counter() - start
    n_para = bank.config.neuron_paraphrases
    facts = [fact_of(r, n_para) for r in requests]
    own = [[r.prompt, *r.paraphrase_prompts[:n_para]] for r in requests]
    contrasts = [
        contrast_prompts(facts[i], bank.facts + facts[:i] + facts[i + 1 :], bank.config.neuron_candidates,
                         seed=bank.config.seed + zlib.crc32(e.request_id.encode()))
        for i, e in enumerate(experts)
    ]
    flat = [p for ps in own for p in ps] + [p for cs in contrasts for p, _ in cs]
    hidden = iter(prompt_hidden(model, tok, flat, bank.layer))
    own_hidden = [[next(hidden) for _ in ps] for ps in own]
    keys, negatives = [], []
    for hs, cs in zip(own_hidden, contrasts, strict=True):
        contrast_keys = [next(hidden)[-1:] for _ in cs]
        keys.append(torch.stack([h[-1] for h in hs]))
        # The other tokens of the edit prompts are negatives too: free, in-distribution "not this prompt".
        negatives.append((torch.cat([h[:-1] for h in hs] + contrast_keys),
                          [None] * sum(len(h) - 1 for h in hs) + [q for _, q in cs]))
    report = bank.add(experts, keys, negatives, facts)
    report.seconds_experts = seconds_experts
    return report

