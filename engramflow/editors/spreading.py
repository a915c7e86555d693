"""Spreading one batch's change over several layers (MEMIT), independent of the constraint.

Targets z are fixed at the last edited layer. Layer i of L (ascending) is solved for
R_i = (z − z_i) / (L − i), where z_i is the last layer's output at the fact token with the updates
of layers before i already in place; so each layer takes an equal share of what is still missing.
With one layer this is ROME's single update: R = z − h = δ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from engramflow.editors.delta import Delta
from engramflow.editors.keys import Request, compute_keys
from engramflow.editors.targets import current_outputs

# (layer, K [d_in, n], R [d_out, n], K at the bare prompts [d_in, n] or None) -> (U [d_out, r], V [d_in, r])
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def spread(
    model: nn.Module, tok, requests: Sequence[Request], layers: Sequence[int], z: torch.Tensor,
    prefixes: Sequence[str], solve_layer: LayerSolver, *, fact_token: str = "subject_last",
    batch_size: int = 512, key_weights: Sequence[float] | None = None, bare_keys: bool = False,
    keep_keys: bool = False,
) -> Delta:
    """Solve each layer in turn for its share of the residual z − z_i; the caller's weights are
    never touched (earlier layers' updates are seen through forward hooks). Keys are averaged over
    the prefixes with `key_weights`; with `bare_keys` the solver also gets each bare prompt's key
    (ROME's denominator); with `keep_keys` the delta keeps each layer's keys (AlphaEdit's K_p)."""
    delta = Delta({})
    top = max(layers)
    for i, layer in enumerate(layers):
        with delta.overlaid(model):
            K = compute_keys(model, tok, requests, [layer], prefixes, fact_token, batch_size, key_weights)[layer]
            K_bare = compute_keys(model, tok, requests, [layer], [""], fact_token, batch_size)[layer] if bare_keys \
                else None
            z_i = current_outputs(model, tok, requests, top, fact_token)
        R = (z - z_i) / (len(layers) - i)
        U, V = solve_layer(layer, K, R, K_bare)
        delta.add_factors(layer, U, V)
        if keep_keys:
            delta.keys[layer] = K
    return delta
