"""Stage 2: indexing neurons, sigmoid(w . h + b) over the MLP hidden h (the edited projection's input)
at the last prompt token, trained to fire on their fact's keys and not on every other edit's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engramflow.editors.scen.config import ScenConfig


def neuron_loss(z: torch.Tensor, own: torch.Tensor, config: ScenConfig) -> torch.Tensor:
    """Loss of k neurons with logits z [k, m] over m keys; own [k, m] marks each neuron's positives,
    every other key is a negative. Means over positives and negatives, summed over neurons.

    'reference' is SCEN's exp(-s_pos) + mean_neg[(exp(s_neg) + 0.7) + (exp(s_neg) - s_pos + 0.3)] on
    s = sigmoid(z). Its constants carry no gradient (they are not hinge margins), nothing in it refers
    to theta, and its gradient through the sigmoid vanishes once a score saturates on the wrong side.
    'margin' fixes that: softplus on logits, pushing positives above logit(theta) + margin and
    negatives below logit(theta) - margin, with gradients that do not vanish when wrong."""
    own_f = own.float()
    neg_f = 1.0 - own_f
    n_pos = own_f.sum(1).clamp(min=1)
    n_neg = neg_f.sum(1)
    has_neg = (n_neg > 0).float()
    n_neg = n_neg.clamp(min=1)
    if config.neuron_loss == "reference":
        s = torch.sigmoid(z)
        s_pos = (s * own_f).sum(1) / n_pos  # [k]
        pos_term = (torch.exp(-s) * own_f).sum(1) / n_pos
        neg_terms = (torch.exp(s) + 0.7) + (torch.exp(s) - s_pos[:, None] + 0.3)
        neg_term = (neg_terms * neg_f).sum(1) / n_neg * has_neg
        return (pos_term + neg_term).sum()
    centre = math.log(config.theta / (1 - config.theta))
    pos_term = (F.softplus(centre + config.neuron_margin - z) * own_f).sum(1) / n_pos
    neg_term = (F.softplus(z - centre + config.neuron_margin) * neg_f).sum(1) / n_neg
    return (pos_term + neg_term).sum()


def matched_init(x: torch.Tensor, own: torch.Tensor, theta: float, sharpness: float, tau: float = 0.8,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tight starting point for k neurons over keys x [m, d]: fire when a key, centred on the mean key,
    projects onto the mean centred positive u at least tau times as far as the positives do, so that a
    key unlike all of the positives starts far below theta (a zero start fires on half of all keys).
    z(x) = sharpness / p * ((x - mu) . u - tau * p) + logit(theta), p the positives' least projection."""
    mu = x.mean(0)
    own_f = own.float()
    pos_mean = (own_f @ x) / own_f.sum(1, keepdim=True).clamp(min=1) - mu  # [k, d]
    u = pos_mean / pos_mean.norm(dim=1, keepdim=True).clamp(min=1e-6)
    proj = (x - mu) @ u.T  # [m, k]
    p = torch.where(own.T, proj, torch.inf).min(0).values.clamp(min=1e-6)  # [k]
    w = (sharpness / p)[:, None] * u
    b = -(w @ mu) - sharpness * tau + math.log(theta / (1 - theta))
    return w, b


def train_neurons(
    keys: torch.Tensor, own: torch.Tensor, config: ScenConfig, init: tuple[torch.Tensor, torch.Tensor] | None = None,
    steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: train k neurons at once over keys [m, d_mlp] with own [k, m] (see `neuron_loss`);
    returns (w [k, d_mlp], b [k]) in the raw key space, so inference is sigmoid(h @ w.T + b)."""
    keys = keys.float()
    # Train on keys scaled to unit mean norm so that one learning rate fits every model width.
    scale = keys.norm(dim=1).mean().clamp(min=1e-6)
    x = keys / scale
    if init is not None:
        w, b = init[0].float() * scale, init[1].float().clone()
    elif config.neuron_init == "matched":
        w, b = matched_init(x, own, config.theta, config.neuron_sharpness)
    else:
        w, b = torch.zeros(own.shape[0], keys.shape[1]), torch.zeros(own.shape[0])
    w.requires_grad_()
    b.requires_grad_()
    opt = torch.optim.Adam([w, b], lr=config.neuron_lr)
    with torch.enable_grad():
        for _ in range(config.neuron_steps if steps is None else steps):
            opt.zero_grad()
            neuron_loss(w @ x.T + b[:, None], own, config).backward()  # logits [k, m]
            opt.step()
    return (w.detach() / scale), b.detach()
