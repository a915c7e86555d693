"""What SCEN reads from a request: the templates of the prompts that train a neuron, the facts and
contrast prompts built from the edit history, and the tokens and MLP hidden states of prompts."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.keys import eval_mode
from engramflow.editors.requests import Request
from engramflow.editors.scen.layer import ScenLayer


def template_of(prompt: str, subject: str) -> str:
    """A filled prompt as a template with `{}` where its (last) subject is."""
    head, sep, tail = prompt.rpartition(subject)
    if not sep:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    return head + "{}" + tail


def fact_of(request: Request, paraphrases: int = 0) -> dict[str, Any]:
    """What a neuron is about: subject, relation (None when the dataset has none) and the templates of
    the prompts that train it (the edit prompt first, then its first `paraphrases` paraphrases that
    hold the subject). These templates are the wordings later contrasts reuse with other subjects."""
    templates = [template_of(request.prompt, request.subject)]
    for p in request.paraphrase_prompts[:paraphrases]:
        if request.subject not in p:
            continue  # no subject, no template
        template = template_of(p, request.subject)
        # Kept only when it formats: its `{}` and no other brace (CounterFact paraphrases carry free text).
        if template.count("{") == template.count("}") == 1:
            templates.append(template)
    return {"subject": request.subject, "template": templates[0], "templates": templates,
            "relation": request.relation}


def templates_of(fact: Mapping[str, Any]) -> list[str]:
    """A fact's templates (banks saved before facts had "templates" hold the edit prompt's alone)."""
    return list(fact.get("templates") or [fact["template"]])


def question_of(fact: Mapping[str, Any]) -> str:
    """Facts ask the same question when subject and relation match (or the template, with no relation)."""
    return json.dumps([fact["subject"], fact["relation"] or fact["template"]])


def contrast_prompts(fact: Mapping[str, Any], others: Sequence[Mapping[str, Any]], n: int, seed: int,
                     ) -> list[tuple[str, str]]:
    """Negatives for a fact's neuron built from the edit history alone: its templates with up to n other
    edited subjects (same question, another subject) and, when relations are known, its subject in up
    to n of the other relations' templates that earlier edits trained on (same subject, another
    question). Pairs (prompt, question) so that a later edit of exactly that question can drop them."""
    asked = {question_of(f) for f in [fact, *others]}
    rng = random.Random(seed)
    swaps = sorted({f["subject"] for f in others if f["subject"] != fact["subject"]})
    # A contrast that asks an edited question is that fact's paraphrase, not a negative: skipped.
    swaps = [s for s in swaps if question_of({**fact, "subject": s}) not in asked]
    out = [(template.format(s), question_of({**fact, "subject": s}))
           for s in rng.sample(swaps, min(n, len(swaps))) for template in templates_of(fact)]
    if fact["relation"] is not None:
        templates = sorted({(t, f["relation"]) for f in others if f["relation"] is not None
                            and question_of({**fact, "relation": f["relation"]}) not in asked
                            for t in templates_of(f)})
        for template, relation in rng.sample(templates, min(n, len(templates))):
            out.append((template.format(fact["subject"]), question_of({**fact, "relation": relation})))
    return out


def prompt_target_ids(tok: Any, prompt: str, target: str) -> tuple[torch.Tensor, int]:
    """Token ids of prompt + ' ' + target and the prompt's length; the pieces are encoded apart so
    that the target's tokens are the same whatever the prompt. The prompt gets the tokenizer's
    special tokens (BOS on Llama-likes), as the model saw them in training; the target none."""
    p = tok.encode(prompt)
    t = tok.encode(" " + target, add_special_tokens=False)
    if not t:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return torch.tensor([p + t]), len(p)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prompt_hidden(model: nn.Module, tok: Any, prompts: Sequence[str], layer: int, batch_size: int = 64,
                  ) -> list[torch.Tensor]:
    """The MLP hidden (down-projection input) of `layer` at every token of each prompt, [len_i, d_mlp]
    float32 each. Reads the base layer even when a SCEN layer is attached (experts do not change it).
    Right-padded batches: with a causal mask the real tokens never see the padding."""
    adapter = adapter_for(model)
    name = adapter.mlp_out
    if isinstance(adapter.mlp_out_module(model, layer), ScenLayer):
        name += ".base"
    captured: list[torch.Tensor] = []
    handle = adapter.hook(model, layer, name, lambda _m, args, _out: captured.append(args[0]))
    device = model_device(model)
    rows: list[torch.Tensor] = []
    try:
        with eval_mode(model):
            for start in range(0, len(prompts), batch_size):
                encoded = [tok.encode(p) for p in prompts[start : start + batch_size]]
                width = max(map(len, encoded))
                ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded], device=device)
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
                captured.clear()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                rows += [captured[0][i, : len(e)].float().cpu() for i, e in enumerate(encoded)]
    finally:
        handle.remove()
    return rows
