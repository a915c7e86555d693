"""Causal tracing (ROME, Meng et al. 2022): where does a model recall the fact about a subject?

Corrupt the subject's token embeddings with Gaussian noise (`noise_factor` x the embedding std),
then restore, one (layer, token) at a time, the clean run's
- `hidden`: the block's output (the residual stream),
- `mlp` / `attn`: the MLP / attention outputs of a window of layers centred on the layer
  (`window_for_depth`: 10 layers at 48 layers deep, scaled to the model),
and measure how much of the answer's probability comes back. Every (kind, layer, token)
configuration x noise sample is one row of a batched forward; all samples of a configuration share
their noise with the corrupted baseline, as in ROME.

The effects form a tidy table (`request_id, kind, layer, position, token, role, prob, effect`;
effect = restored probability - corrupted probability, the indirect effect) for Parquet; one
heatmap per kind; `choose_layers` picks ROME's layer (peak MLP effect at the last subject token)
and MEMIT's window (ending there). Works for every family in `editors.adapters`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engramflow.editors.adapters import Adapter, adapter_for
from engramflow.editors.requests import fill_prompt

KINDS = ("hidden", "mlp", "attn")
ROLES = ("before_subject", "subject_first", "subject_middle", "subject_last", "after_subject", "last")
Row = dict[str, Any]


@dataclass
class Trace:
    """One prompt's trace: its tokens, the answer token, clean/corrupted probabilities and rows."""

    request_id: str
    tokens: list[str]
    subject: tuple[int, int]  # token range [start, end)
    answer_id: int
    p_clean: float
    p_corrupt: float
    rows: list[Row]


def window_for_depth(n_layers: int, reference_window: int = 10, reference_depth: int = 48) -> int:
    """ROME's 10-layer restoration window for GPT-2 XL (48 layers), scaled to `n_layers`."""
    return max(1, round(reference_window * n_layers / reference_depth))


@torch.no_grad()
def embedding_noise_scale(model: nn.Module, factor: float = 3.0, token_ids: Iterable[int] | None = None) -> float:
    """`factor` x the std of the token embeddings (the whole vocabulary, or `token_ids`, e.g. the
    tokens of all subjects of a corpus as ROME does)."""
    weight = adapter_for(model).embed_module(model).weight
    if token_ids is not None:
        weight = weight[torch.tensor(sorted(set(token_ids)), device=weight.device)]
    return factor * weight.float().std().item()


def subject_token_range(offsets: Sequence[tuple[int, int]], prompt: str, subject: str) -> tuple[int, int]:
    """Token range [start, end) covering the first occurrence of `subject` in `prompt`."""
    begin = prompt.find(subject)
    if begin < 0 or not subject:
        raise ValueError(f"subject {subject!r} is not in prompt {prompt!r}")
    finish = begin + len(subject)
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < finish and e > begin]
    return hits[0], hits[-1] + 1


def token_roles(n_tokens: int, start: int, end: int) -> list[str]:
    """Role of each position relative to the subject tokens [start, end) (see `ROLES`)."""
    roles = []
    for i in range(n_tokens):
        if i < start:
            roles.append("before_subject")
        elif i == end - 1:
            roles.append("subject_last")
        elif i == start:
            roles.append("subject_first")
        elif i < end:
            roles.append("subject_middle")
        elif i == n_tokens - 1:
            roles.append("last")
        else:
            roles.append("after_subject")
    return roles


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


class _Patcher:
    """Forward hooks: noise on the subject embeddings, clean outputs restored where masks say."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        n_layers = adapter.n_layers(model)
        self.modules: dict[str, list[nn.Module]] = {
            "hidden": [adapter.block(model, layer) for layer in range(n_layers)],
            "mlp": [adapter.mlp_module(model, layer) for layer in range(n_layers)],
            "attn": [adapter.attn_module(model, layer) for layer in range(n_layers)],
        }
        self.embed = adapter.embed_module(model)
        self.noise: torch.Tensor | None = None  # [B, T, d], zero outside the subject
        self.masks: dict[tuple[str, int], torch.Tensor] = {}  # [B, T, 1] bool
        self.clean: dict[tuple[str, int], torch.Tensor] = {}  # [T, d]
        self.capture = False

    def __enter__(self) -> _Patcher:
        self.handles = [self.embed.register_forward_hook(self._embed_hook)]
        for kind, modules in self.modules.items():
            for layer, module in enumerate(modules):
                self.handles.append(module.register_forward_hook(self._restore_hook(kind, layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _embed_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        return None if self.noise is None else output + self.noise.to(output.dtype)

    def _restore_hook(self, kind: str, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.capture:
                self.clean[kind, layer] = _first(output)[0].detach()
                return None
            mask = self.masks.get((kind, layer))
            if mask is None:
                return None
            hidden = _first(output)
            return _replace_first(output, torch.where(mask, self.clean[kind, layer].to(hidden.dtype), hidden))

        return hook


@torch.no_grad()
def trace(
    model: nn.Module,
    tok: Any,
    prompt: str,
    subject: str,
    noise_scale: float,
    target: str | None = None,
    samples: int = 10,
    window: int | None = None,
    kinds: Sequence[str] = KINDS,
    batch_rows: int = 256,
    seed: int = 0,
    rid: str = "",
) -> Trace:
    """Trace one prompt. The answer is the first token of ` target`, or the model's own top-1
    prediction when `target` is None. `batch_rows` bounds the rows of one forward."""
    adapter = adapter_for(model)
    n_layers = adapter.n_layers(model)
    window = window or window_for_depth(n_layers)
    device = next(model.parameters()).device
    enc = tok(prompt, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], device=device)
    n_tokens = len(ids)
    start, end = subject_token_range(enc["offset_mapping"], prompt, subject)
    roles = token_roles(n_tokens, start, end)

    with _Patcher(model, adapter) as patcher:
        patcher.capture = True
        clean_probs = model(input_ids=ids[None], use_cache=False).logits[0, -1].float().softmax(-1)
        patcher.capture = False
        if target is None:
            answer = int(clean_probs.argmax())
        else:
            full = tok(f"{prompt} {target}", return_offsets_mapping=True)
            answer = next(t for t, (s, e) in zip(full["input_ids"], full["offset_mapping"], strict=True) if e > len(prompt))

        generator = torch.Generator().manual_seed(seed)
        d_model = adapter.d_model(model)
        sample_noise = torch.zeros(samples, n_tokens, d_model)
        sample_noise[:, start:end] = noise_scale * torch.randn(samples, end - start, d_model, generator=generator)
        sample_noise = sample_noise.to(device)

        configs: list[tuple[str, int, int] | None] = [None]  # None: the corrupted baseline
        configs += [(kind, layer, pos) for kind in kinds for layer in range(n_layers) for pos in range(n_tokens)]
        per_chunk = max(1, batch_rows // samples)
        probs: list[float] = []
        for chunk_start in range(0, len(configs), per_chunk):
            chunk = configs[chunk_start : chunk_start + per_chunk]
            rows = len(chunk) * samples
            patcher.noise = sample_noise.repeat(len(chunk), 1, 1)
            patcher.masks = {}
            for c, config in enumerate(chunk):
                if config is None:
                    continue
                kind, layer, pos = config
                if kind == "hidden":
                    restored = [layer]
                else:
                    lo = max(0, layer - window // 2)
                    restored = list(range(lo, min(n_layers, layer - window // 2 + window)))
                for restored_layer in restored:
                    mask = patcher.masks.setdefault(
                        (kind, restored_layer), torch.zeros(rows, n_tokens, 1, dtype=torch.bool, device=device)
                    )
                    mask[c * samples : (c + 1) * samples, pos] = True
            logits = model(input_ids=ids[None].expand(rows, -1), use_cache=False).logits[:, -1].float()
            answer_probs = logits.softmax(-1)[:, answer].view(len(chunk), samples).mean(1)
            probs += answer_probs.tolist()
        patcher.noise = None

    p_corrupt = probs[0]
    tokens = [tok.decode([t]) for t in enc["input_ids"]]
    table = [
        {
            "request_id": rid,
            "kind": kind,
            "layer": layer,
            "position": pos,
            "token": tokens[pos],
            "role": roles[pos],
            "prob": prob,
            "effect": prob - p_corrupt,
        }
        for (kind, layer, pos), prob in zip(configs[1:], probs[1:], strict=True)
    ]
    return Trace(rid, tokens, (start, end), answer, clean_probs[answer].item(), p_corrupt, table)


def trace_requests(
    model: nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]], noise_scale: float, **kwargs: Any
) -> list[Trace]:
    """Trace each request's filled prompt for its subject (`kwargs` as for `trace`)."""
    return [
        trace(model, tok, fill_prompt(r["prompt"], r["subject"]), r["subject"], noise_scale,
              rid=str(r.get("request_id") or i), **kwargs)
        for i, r in enumerate(requests)
    ]


def mean_effects(rows: Iterable[Row], kind: str, role: str) -> dict[int, float]:
    """Mean effect per layer of `kind` at positions with `role`, over every traced prompt."""
    sums: dict[int, list[float]] = {}
    for row in rows:
        if row["kind"] == kind and row["role"] == role:
            sums.setdefault(row["layer"], []).append(row["effect"])
    return {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}


def choose_layers(rows: Iterable[Row], memit_window: int = 5) -> dict[str, Any]:
    """ROME's layer = the peak mean MLP effect at the last subject token; MEMIT's layers = the
    `memit_window` layers ending there."""
    by_layer = mean_effects(rows, "mlp", "subject_last")
    if not by_layer:
        raise ValueError("no MLP effects at the last subject token: trace with kind 'mlp' first")
    peak = max(by_layer, key=by_layer.__getitem__)
    return {"rome_layer": peak, "memit_layers": list(range(max(0, peak - memit_window + 1), peak + 1))}


def plot_heatmaps(rows: Sequence[Row], out_dir: str | Path, prefix: str = "trace") -> list[Path]:
    """One PNG per kind: layers x tokens for a single traced prompt, layers x roles (mean effect)
    for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    single = len({row["request_id"] for row in rows}) == 1
    paths = []
    for kind in dict.fromkeys(row["kind"] for row in rows):
        kind_rows = [row for row in rows if row["kind"] == kind]
        n_layers = max(row["layer"] for row in kind_rows) + 1
        if single:
            field = "position"
            labels = {row["position"]: row["token"] for row in kind_rows}
            keys: list[Any] = sorted(labels)
            ylabels = [repr(labels[k]) for k in keys]
        else:
            field = "role"
            keys = [role for role in ROLES if any(row["role"] == role for row in kind_rows)]
            ylabels = keys
        grid = torch.zeros(len(keys), n_layers)
        counts = torch.zeros(len(keys), n_layers)
        index = {k: i for i, k in enumerate(keys)}
        for row in kind_rows:
            grid[index[row[field]], row["layer"]] += row["effect"]
            counts[index[row[field]], row["layer"]] += 1
        grid = grid / counts.clamp(min=1)
        fig, ax = plt.subplots(figsize=(3.5 + 0.3 * n_layers, 1.5 + 0.3 * len(keys)))
        image = ax.imshow(grid.numpy(), aspect="auto", cmap={"hidden": "Purples", "mlp": "Greens"}.get(kind, "Reds"))
        ax.set_yticks(range(len(keys)), ylabels)
        ax.set_xticks(range(n_layers))  # one tick per layer: layers are integers
        ax.set_xlabel("layer")
        ax.set_title(f"indirect effect: {kind}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out / f"{prefix}_{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
