"""Inference: attach a bank to a model as a SCEN routing layer, read which expert a prompt is routed to,
and score a target with the routing read where generation would read it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.keys import eval_mode, passed_cache
from engramflow.editors.scen.layer import NO_EXPERT, ScenLayer
from engramflow.editors.scen.prompts import model_device, prompt_target_ids

if TYPE_CHECKING:
    from engramflow.editors.scen.bank import ExpertBank


def _begin_prompt_hook(layer: ScenLayer) -> Any:
    """A forward pre-hook on the model that tells the layer when a new prompt starts (routing is then
    decided again, read at each row's last attended token) and when a forward continues one."""

    def hook(_model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = passed_cache(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        previous, layer.last_input_ids = layer.last_input_ids, ids
        if cache is not None and cache.get_seq_length() > 0:
            return  # a continuation: keep the routing of this prompt
        if (cache is None and ids is not None and previous is not None and ids.shape[0] == previous.shape[0]
                and ids.shape[1] == previous.shape[1] + 1 and torch.equal(ids[:, :-1], previous)):
            return  # generate(use_cache=False) re-reads the sequence plus one token: still this prompt
        mask = kwargs.get("attention_mask")
        read_at = None
        if layer.read_override is not None:
            read_at = layer.read_override
        elif mask is not None and mask.dim() == 2:
            # The last attended token of each row, for left or right padding alike.
            positions = torch.arange(mask.shape[1], device=mask.device)
            read_at = torch.where(mask.bool(), positions, -1).max(dim=1).values
        layer.begin_prompt(read_at)

    return hook


def attach(model: nn.Module, layer: int, bank: ExpertBank) -> ScenLayer:
    """Replace the layer's MLP output projection with a SCEN routing layer over `bank`."""
    adapter = adapter_for(model)
    if layer != bank.layer:
        raise ValueError(f"the bank was trained on layer {bank.layer}, not layer {layer}")
    if (adapter.d_model(model), adapter.d_mlp(model)) != (bank.d_model, bank.d_mlp):
        raise ValueError(
            f"bank shapes d_model={bank.d_model}, d_mlp={bank.d_mlp} do not match the model's "
            f"{adapter.d_model(model)}, {adapter.d_mlp(model)}"
        )
    detach(model)
    parent_name, _, child = adapter.mlp_out_name(layer).rpartition(".")
    parent = model.get_submodule(parent_name)
    scen = ScenLayer(getattr(parent, child), bank, layer)
    _install(model, parent, child, scen)
    return scen


def _install(model: nn.Module, parent: nn.Module, child: str, scen: ScenLayer) -> None:
    setattr(parent, child, scen)
    model._scen = (parent, child, scen, model.register_forward_pre_hook(_begin_prompt_hook(scen), with_kwargs=True))


def detach(model: nn.Module) -> None:
    """Put the original projection back (no-op when nothing is attached)."""
    state = getattr(model, "_scen", None)
    if state is None:
        return
    parent, child, scen, handle = state
    handle.remove()
    setattr(parent, child, scen.base)
    del model._scen


@contextmanager
def detached(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the layer's original projection is back (the weights experts and keys are
    computed on); after it the same routing layer is attached again. A no-op when none is attached."""
    state = getattr(model, "_scen", None)
    if state is None:
        yield model
        return
    parent, child, scen, _ = state
    detach(model)
    try:
        yield model
    finally:
        _install(model, parent, child, scen)


def attached(model: nn.Module) -> ScenLayer:
    """The routing layer attached to `model` (RuntimeError when there is none)."""
    state = getattr(model, "_scen", None)
    if state is None:
        raise RuntimeError("no SCEN bank is attached to this model; call editors.scen.attach first")
    return state[2]


@contextmanager
def reading_at(model: nn.Module, positions: torch.Tensor | Sequence[int]) -> Iterator[None]:
    """Within the block, new prompts are routed by the neurons at these token positions (one per row)
    instead of the last token: for teacher-forced scoring of prompt + target in one forward."""
    layer = attached(model)
    layer.read_override = torch.as_tensor(positions, dtype=torch.long)
    try:
        yield
    finally:
        layer.read_override = None


@torch.no_grad()
def route(model: nn.Module, tok: Any, prompts: Sequence[str]) -> list[str | None]:
    """The expert each prompt is routed to (its request id), or None for the original weights."""
    layer = attached(model)
    device = model_device(model)
    out: list[str | None] = []
    with eval_mode(model):
        for prompt in prompts:
            model(input_ids=torch.tensor([tok.encode(prompt)], device=device), use_cache=False)
            assert layer.routes is not None
            i = int(layer.routes[0])
            out.append(None if i == NO_EXPERT else layer.bank.ids[i])
    return out


@torch.no_grad()
def target_correct(model: nn.Module, tok: Any, prompt: str, target: str) -> bool:
    """Teacher-forced top-1 of every target token (scored as ' ' + target), with SCEN routing read at
    the last prompt token, as generation would."""
    ids, n_prompt = prompt_target_ids(tok, prompt, target)
    ids = ids.to(model_device(model))
    with eval_mode(model):
        if getattr(model, "_scen", None) is not None:
            with reading_at(model, [n_prompt - 1]):
                logits = model(input_ids=ids, use_cache=False).logits
        else:
            logits = model(input_ids=ids, use_cache=False).logits
    return bool((logits[0, n_prompt - 1 : -1].argmax(-1) == ids[0, n_prompt:]).all())
