"""SCEN (Yao et al., 2024): one low-rank expert per fact on an MLP output projection, plus an indexing
neuron per expert that decides, at the last prompt token, whether that expert replaces the layer.

    bank = ExpertBank.for_model(model, layer, ScenConfig())
    add_requests(model, tok, bank, requests)     # stage 1 + stage 2 (continual: call again)
    attach(model, layer, bank)                   # inference, generate() included
    bank.remove(request_id); bank.save(path); ExpertBank.load(path)
"""

from engramflow.editors.scen.config import ScenConfig
from engramflow.editors.scen.layer import NO_EXPERT, ScenLayer
from engramflow.editors.scen.model import (
    AddReport,
    Expert,
    ExpertBank,
    add_requests,
    attach,
    attached,
    detach,
    expert_applied,
    fill_prompt,
    held_out_paraphrases,
    prompt_hidden,
    prompt_target_ids,
    reading_at,
    request_id,
    route,
    target_correct,
    train_expert,
    train_neurons,
)

__all__ = [
    "NO_EXPERT", "AddReport", "Expert", "ExpertBank", "ScenConfig", "ScenLayer", "add_requests", "attach",
    "attached", "detach", "expert_applied", "fill_prompt", "held_out_paraphrases", "prompt_hidden", "prompt_target_ids", "reading_at",
    "request_id", "route", "target_correct", "train_expert", "train_neurons",
]
