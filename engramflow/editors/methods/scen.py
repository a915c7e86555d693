"""SCEN as a method: an edit trains one expert per request (stage 1: one request and the weights
alone, so it is cached per request and can be computed ahead in shards) and adds them, with their
indexing neurons, to a copy of the previous bank (stage 2). The bank is the method's whole state:
each edit returns the new one, which replaces the one before."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from engramflow.editors.adapters import adapter_for
from engramflow.editors.artifacts import Artifact
from engramflow.editors.cache import RequestCache
from engramflow.editors.methods import register
from engramflow.editors.methods.base import Method, Stats
from engramflow.editors.requests import Request
from engramflow.editors.scen.bank import ExpertBank, add_requests, held_out_paraphrases
from engramflow.editors.scen.config import ScenConfig, default_layer
from engramflow.editors.scen.experts import cached_experts
from engramflow.editors.scen.routing import detached


@dataclass(frozen=True)
class ScenMethod(Method):
    artifact: ClassVar[type[ExpertBank]] = ExpertBank

    def hparams(self, model: nn.Module | Any, overrides: Any = None) -> ScenConfig:
        """ScenConfig's defaults, or `overrides` on top of them (a mapping of its fields, where a
        `layers` list names the layer by its last entry, or a ScenConfig); the layer resolved for
        `model` (a model or its transformers config): `default_layer` of its depth when not given."""
        n_layers = adapter_for(model).n_layers(model) if isinstance(model, nn.Module) else model.num_hidden_layers
        if overrides is None:
            hp = ScenConfig()
        elif isinstance(overrides, ScenConfig):
            hp = overrides
        elif isinstance(overrides, Mapping):
            values = dict(overrides)
            if "layers" in values:
                layers = list(values.pop("layers"))
                if not layers or values.get("layer", layers[-1]) != layers[-1]:
                    raise ValueError(f"SCEN settings: layers {layers} and layer {values.get('layer')} disagree "
                                     "(SCEN edits one layer, the last of `layers`)")
                values["layer"] = layers[-1]
            hp = ScenConfig().with_overrides(values)
        else:
            raise TypeError(f"SCEN settings are a mapping of ScenConfig fields or a ScenConfig, not {overrides!r}")
        if hp.layer is None:
            hp = replace(hp, layer=default_layer(n_layers))
        if not 0 <= hp.layer < n_layers:
            raise ValueError(f"SCEN layer {hp.layer} out of range: the model has {n_layers} layers")
        return hp

    def layers(self, hp: ScenConfig) -> list[int]:
        if hp.layer is None:
            raise ValueError("SCEN settings without a layer: resolve them with hparams(model, ...) first")
        return [hp.layer]

    def with_layers(self, hp: ScenConfig, layers: Sequence[int]) -> ScenConfig:
        if not layers:
            raise ValueError("SCEN edits one layer: got no layers")
        return replace(hp, layer=list(layers)[-1])

    def edit(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: ScenConfig, *,
             stats: Stats = None, cache: RequestCache | None = None, state: Artifact | None = None,
             history: Sequence[Artifact] = (), stats_cache_dir: str | Path | None = None) -> ExpertBank:
        """A new bank: `state` (never changed) or an empty bank, plus an expert and a neuron per request.
        Experts and keys are computed on the weights without any attached bank."""
        (layer,) = self.layers(hp)
        bank = self._continued(model, hp, state)
        with detached(model):
            experts, _ = cached_experts(model, tok, requests, layer, hp, cache)
            add_requests(model, tok, bank, requests, experts)
        return bank

    def precompute(self, model: nn.Module, tok: Any, requests: Sequence[Request], hp: ScenConfig,
                   cache: RequestCache) -> int:
        """Train into `cache` the experts `edit` will read; returns how many were trained."""
        (layer,) = self.layers(hp)
        with detached(model):
            return cached_experts(model, tok, requests, layer, hp, cache)[1]

    def scored(self, requests: Sequence[Request], hp: ScenConfig) -> list[Request]:
        return held_out_paraphrases(requests, hp)

    def describe(self, hp: ScenConfig) -> dict[str, Any]:
        return hp.to_dict()

    def _continued(self, model: nn.Module, hp: ScenConfig, state: Artifact | None) -> ExpertBank:
        """A copy of the previous bank, or a new one; a bank built with other settings is refused."""
        if state is None:
            return ExpertBank.for_model(model, self.layers(hp)[0], hp)
        if not isinstance(state, ExpertBank):
            raise TypeError(f"SCEN continues an ExpertBank, not a {type(state).__name__}")
        built = replace(state.config, layer=state.layer).to_dict()
        differ = sorted(name for name, value in hp.to_dict().items() if built[name] != value)
        if differ:
            raise ValueError(f"the bank was built with other SCEN settings ({', '.join(differ)}): continue it "
                             f"with the settings it was built with (bank.config, at layer {state.layer})")
        return state.copy()


register(ScenMethod("scen", shardable=True, default_shards=2, protocols=("routing",)))
