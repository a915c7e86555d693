"""SCEN (Yao et al., 2024): one expert per fact on an MLP output projection (low-rank, or dense for
`expert_kind='full'`), plus an indexing neuron per expert that decides, at the last prompt token,
whether that expert replaces the layer.

    bank = ExpertBank.for_model(model, layer, ScenConfig())
    add_requests(model, tok, bank, requests)     # stage 1 + stage 2 (continual: call again)
    with bank.applied(model): ...                # attached for inference, generate() included
    bank.without([request_id]); bank.save(path); ExpertBank.load(path)

Modules: `prompts` (templates, facts, contrast prompts, keys), `experts` (stage 1), `neurons`
(stage 2), `bank` (the bank and the continual step), `layer` and `routing` (inference). As a method
of the registry (`editors.edit(..., method="scen")`): `editors.methods.scen`.
"""

from engramflow.editors.scen.bank import AddReport, ExpertBank, add_requests, held_out_paraphrases
from engramflow.editors.scen.config import ScenConfig, default_layer
from engramflow.editors.scen.experts import (
    Expert,
    cached_experts,
    expert_applied,
    experts_from_tensors,
    experts_to_tensors,
    train_expert,
)
from engramflow.editors.scen.layer import NO_EXPERT, ScenLayer
from engramflow.editors.scen.neurons import train_neurons
from engramflow.editors.scen.prompts import prompt_hidden, prompt_target_ids
from engramflow.editors.scen.routing import (
    attach,
    attached,
    detach,
    detached,
    reading_at,
    route,
    target_correct,
)

__all__ = [
    "NO_EXPERT", "AddReport", "Expert", "ExpertBank", "ScenConfig", "ScenLayer", "add_requests", "attach",
    "attached", "cached_experts", "default_layer", "detach", "detached", "expert_applied",
    "experts_from_tensors", "experts_to_tensors", "held_out_paraphrases", "prompt_hidden", "prompt_target_ids",
    "reading_at", "route", "target_correct", "train_expert", "train_neurons",
]
