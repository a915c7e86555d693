"""Export a model version for serving, and load an export back.

`export_version` writes a directory in one of the registered formats (`FORMATS`; `hf` by default) and
`edits.json` beside it: the manifest of every edit behind the version (request, method, layers,
artifact hash, its ES/PS measured on the exported model) and the base model it came from. A format
is one function that writes its files and says how to load them; the manifest is shared.

The `hf` format is a Hugging Face directory with every delta merged into the weights, loadable with
plain `AutoModelForCausalLM.from_pretrained`. A state artifact (SCEN's expert bank) cannot be merged
into weights: it is saved beside them and `engramflow.load_edited(DIR)` attaches it; the manifest's
`loader` says which of the two a directory needs.

The `peft` format is a LoRA adapter holding every delta of the version: a delta is U Vᵀ on an MLP down
projection, which is what LoRA's B A is, so `PeftModel.from_pretrained(base, DIR)` serves the edits and
`unload()` takes them out. `import_peft` goes the other way: a LoRA adapter on MLP down projections
becomes a Delta and a recorded model version. Both need the optional `peft` package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engramflow.aliases import edit_manifest, edit_scores, resolve, set_alias
from engramflow.ledger import (
    Version,
    ensure_base_version,
    fetch_requests,
    load_artifact,
    materialize,
    record_run,
    record_version,
    save_artifact,
    stable_id,
)
from engramflow.storage import Store

MANIFEST = "edits.json"
MANIFEST_FORMAT = "engramflow.export/1"
STATE_FILE = "engramflow_state.safetensors"

# format name -> writer(store, version, out_dir) -> what the manifest says about loading it
Exporter = Callable[[Store, Version, Path], dict[str, Any]]
FORMATS: dict[str, Exporter] = {}
# format name -> check(store, version): raises, before any directory or model, when the format cannot hold it
Check = Callable[[Store, Version], None]
CHECKS: dict[str, Check] = {}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def register_format(name: str, check: Check | None = None) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        FORMATS[name] = fn
        if check is not None:
            CHECKS[name] = check
        return fn

    return deco


@register_format("hf")
def export_hf(store: Store, version: Version, out: Path) -> dict[str, Any]:
    """The base model with every delta merged into its weights, saved as safetensors with its
    tokenizer; a state artifact saved beside it for `load_edited`."""
    model, tok = materialize(store, version, with_state=False)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not version.state_key:
        return {"loader": "transformers: AutoModelForCausalLM.from_pretrained(DIR)"}
    state = load_artifact(store, version.state_key)
    state.save(out / STATE_FILE)
    return {"loader": "engramflow.load_edited(DIR)",
            "state": {"file": STATE_FILE, "format": state.format, "method": state.method_name,
                      "note": f"the {state.method_name} edits live in this file, not in the weights: "
                              "AutoModelForCausalLM alone serves the model without them; "
                              "engramflow.load_edited(DIR) attaches it"}}


def require_peft() -> Any:
    """The `peft` module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError("the peft format needs the peft package: pip install 'engramflow[peft]' "
                          "(or pip install peft)") from None
    return peft


def _check_peft(store: Store, version: Version) -> None:
    """Refuse a version LoRA cannot hold: a state artifact, no deltas, or a stacked artifact that is not
    low-rank factors; and refuse when peft is missing. Loads artifacts only, no model."""
    if version.state_key:
        state = load_artifact(store, version.state_key)
        raise ValueError(f"version {version.version_id} carries a {state.method_name} state artifact "
                         f"({state.format}, key {version.state_key[:12]}…): its edits live outside the weights, "
                         "so a LoRA adapter cannot hold them; export it with --format hf")
    if not version.delta_keys:
        raise ValueError(f"version {version.version_id} has no deltas: there is nothing to put in a LoRA adapter")
    for key in version.delta_keys:
        artifact = load_artifact(store, key)
        if not hasattr(artifact, "factors"):
            raise ValueError(f"version {version.version_id}: artifact {key[:12]}… ({artifact.format}, "
                             f"{artifact.method_name}) is not a low-rank weight delta, so a LoRA adapter cannot "
                             "hold it; export it with --format hf")
    require_peft()


def lora_factors(deltas: list[Any]) -> dict[int, tuple[Any, Any]]:
    """layer -> (B [d_out, r], A [r, d_in]) with B A = the sum of the deltas' U Vᵀ at that layer: the
    factors side by side, so ranks add; beyond the full rank min(d_out, d_in) the dense sum is smaller."""
    import torch

    stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for delta in deltas:
        for layer, (U, V) in delta.factors.items():
            U, V = U.detach().float().cpu(), V.detach().float().cpu()
            if layer in stacked:
                U, V = torch.cat([stacked[layer][0], U], 1), torch.cat([stacked[layer][1], V], 1)
            stacked[layer] = (U, V)
    out = {}
    for layer, (U, V) in stacked.items():
        (d_out, rank), d_in = U.shape, V.shape[0]
        if rank > min(d_out, d_in):
            dense = U @ V.T
            U, V = (torch.eye(d_out), dense.T) if d_out <= d_in else (dense, torch.eye(d_in))
        out[layer] = (U.contiguous(), V.T.contiguous())
    return out


def _pattern_key(module: str) -> str:
    """A rank/alpha pattern key that PEFT matches against `module` alone: the name without its first
    component, escaped (PEFT matches pattern keys as regexes at the end of a module's name)."""
    import re

    return re.escape(module.split(".", 1)[1] if "." in module else module)


@register_format("peft", check=_check_peft)
def export_peft(store: Store, version: Version, out: Path) -> dict[str, Any]:
    """Every delta of the version as one LoRA adapter on the edited MLP down projections (rank per
    layer = the sum of the deltas' ranks, lora_alpha = rank so B A is added unscaled), written by PEFT."""
    import torch

    from engramflow.editors.adapters import adapter_for
    from engramflow.models import load_model

    peft = require_peft()
    factors = lora_factors([load_artifact(store, key) for key in version.delta_keys])
    model, _ = load_model(version.base_model)
    adapter = adapter_for(model)
    names = {layer: adapter.mlp_out_name(layer) for layer in sorted(factors)}
    ranks = {layer: int(B.shape[1]) for layer, (B, _A) in factors.items()}
    r = max(ranks.values())
    patterns = {_pattern_key(names[layer]): rank for layer, rank in ranks.items() if rank != r}
    config = peft.LoraConfig(r=r, lora_alpha=r, rank_pattern=patterns, alpha_pattern=dict(patterns),
                             target_modules=list(names.values()), lora_dropout=0.0, bias="none",
                             fan_in_fan_out=adapter.conv1d, init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for layer, (B, A) in factors.items():
            module = peft_model.get_base_model().get_submodule(names[layer])
            if module.scaling["default"] != 1.0:  # alpha = r: B A is added as it is
                raise RuntimeError(f"PEFT scales layer {layer}'s update by {module.scaling['default']}, not 1")
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    peft_model.save_pretrained(out, safe_serialization=True)
    return {"loader": f"peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({version.base_model!r}), "
                      "DIR); unload() gives the base model back",
            "adapter": {"peft_type": "LORA", "peft_version": peft.__version__,
                        "target_modules": list(names.values()),
                        "rank": {str(layer): ranks[layer] for layer in sorted(ranks)}}}


def export_version(store: Store, name: str, out: str | os.PathLike[str], fmt: str = "hf") -> Path:
    """Export the version an alias points at (or a version id) to `out` (new or empty) in format `fmt`;
    returns the directory. Written under a temporary name and renamed, so a failed export leaves none."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(sorted(FORMATS))}")
    version, alias = resolve(store, name)
    if fmt in CHECKS:
        CHECKS[fmt](store, version)
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        loading = FORMATS[fmt](store, version, tmp)
        edits = edit_manifest(store, version)
        _add_metrics(store, tmp, edits)
        manifest = {"format": MANIFEST_FORMAT, "export_format": fmt, "version": version.version_id,
                    "alias": alias, "base_model": version.base_model,
                    "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **loading, "n_edits": len(edits), "edits": edits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _add_metrics(store: Store, out: Path, edits: list[dict[str, Any]]) -> None:
    """ES and PS of every edit, measured on the exported directory as it loads, each scored as its
    method wants (SCEN leaves out the paraphrases its neurons trained on)."""
    from engramflow.editors.methods import get_method

    if not edits:
        return
    model, tok, state = _load(out)
    requests = {r.request_id: r for r in fetch_requests(store, [e["request_id"] for e in edits])}
    scored = []
    for method in dict.fromkeys(e["method"] for e in edits):
        m = get_method(method)
        # A state artifact carries the settings it was built with; deltas are scored as they are.
        settings = getattr(state, "config", None) if state is not None and state.method_name == method else None
        scored += m.scored([requests[e["request_id"]] for e in edits if e["method"] == method],
                           m.hparams(model, settings))
    scores = edit_scores(model, tok, scored)
    for e in edits:
        e["metrics_at_export"] = scores[e["request_id"]]


def _load(path: Path, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model, tokenizer, attached state artifact or None) of an exported directory."""
    from engramflow.editors.artifacts import Artifact
    from engramflow.models import load_model

    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
    if (path / PEFT_CONFIG).is_file():
        peft = require_peft()
        base = json.loads((path / PEFT_CONFIG).read_text())["base_model_name_or_path"]
        model, tok = load_model(base, device=device)
        return peft.PeftModel.from_pretrained(model, str(path)).eval(), tok, None
    model, tok = load_model(str(path), device=device)
    state = None
    if manifest.get("state") or (path / STATE_FILE).is_file():
        state = Artifact.load(path / (manifest.get("state") or {}).get("file", STATE_FILE))
        state.apply(model)
    return model, tok, state


def load_edited(path: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of an exported directory, with its state artifact (SCEN's bank) attached when
    it has one; a `peft` export as a PeftModel on its base model."""
    model, tok, _ = _load(Path(path), device)
    return model, tok


# --- importing a LoRA adapter ------------------------------------------------------------------------
# LoRA settings under which the adapter adds more than B A x to a projection's output (or touches other
# modules): an adapter that uses any of them is not a Delta and is refused, naming the setting.
UNSUPPORTED_LORA = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "alora_invocation_tokens",
                    "target_parameters", "layer_replication", "use_qalora")
_LORA_KEY_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _peft_config(path: Path) -> dict[str, Any]:
    """The adapter's config, refused (ValueError naming the file and field) unless it is a plain LoRA
    stored as safetensors."""
    config_file = path / PEFT_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: it has no {PEFT_CONFIG}")
    if not (path / PEFT_WEIGHTS).is_file():
        raise ValueError(f"{path}: no {PEFT_WEIGHTS} (engramflow reads adapters as safetensors only)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are "
                         "weight deltas")
    for name in UNSUPPORTED_LORA:
        if config.get(name):
            raise ValueError(f"{config_file}: {name} = {config[name]!r}; a delta is B A added to MLP down "
                             "projections alone, so only plain LoRA can be imported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: bias = {config['bias']!r}; only bias = 'none' is a weight delta")
    return config


def _adapter_layers(path: Path, config: dict[str, Any], base_model: str) -> dict[str, int]:
    """module name -> layer of every module the adapter changes, all MLP down projections of
    `base_model` (ValueError naming the first other module, found from the weights' names or from what
    the config's target_modules would wrap in the model's module tree, built without weights)."""
    import re

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from engramflow.editors.adapters import check_supported

    adapter = check_supported(base_model)
    down = re.compile(rf"{re.escape(adapter.blocks)}\.(\d+)\.{re.escape(adapter.mlp_out)}")
    what = f"MLP down projections ({adapter.blocks}.N.{adapter.mlp_out} in {adapter.model_type} models)"
    layers: dict[str, int] = {}
    with safe_open(str(path / PEFT_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        suffix = next((s for s in _LORA_KEY_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{path / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A or B factor; only plain "
                             "LoRA factors can be imported")
        module = key[: -len(suffix)].removeprefix("base_model.model.")
        match = down.fullmatch(module)
        if match is None:
            raise ValueError(f"{path}: the adapter changes module {module!r}, which is not one of the {what}; "
                             "only edits of MLP down projections can be imported")
        layers[module] = int(match.group(1))
    if not layers:
        raise ValueError(f"{path / PEFT_WEIGHTS} holds no LoRA factors")
    with torch.device("meta"):  # the module tree alone: no weights read or allocated
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    targets = config.get("target_modules") or []
    for name, module in skeleton.named_modules():
        if list(module.children()):
            continue
        # PEFT's rule: a string is a regex for the whole name, a list entry matches the name or its end.
        wrapped = (re.fullmatch(targets, name) is not None if isinstance(targets, str)
                   else any(name == t or name.endswith(f".{t}") for t in targets))
        if wrapped and not down.fullmatch(name):
            raise ValueError(f"{path / PEFT_CONFIG}: target_modules {targets!r} wraps module {name!r}, which is "
                             f"not one of the {what}; only edits of MLP down projections can be imported")
    return layers


def _import_parent(store: Store, onto: str | None) -> Version:
    """The version an import goes on top of: an alias, a version id, or a model directory (its base
    version, recorded once)."""
    if not onto:
        raise ValueError("say which model the adapter goes on: an alias, a version id or a model directory "
                         "(the adapter's base_model_name_or_path is empty)")
    try:
        return resolve(store, onto)[0]
    except KeyError:
        pass
    if (Path(onto) / "config.json").is_file():
        return ensure_base_version(store, str(Path(onto).resolve()))
    raise KeyError(f"{onto!r} is neither an alias, a model version in {store.root}, nor a model directory")


def import_peft(store: Store, adapter_dir: str | os.PathLike[str], onto: str | None = None, alias: str | None = None,
                set_by: str = "engramflow import-peft") -> Version:
    """Record a model version = `onto` (an alias, a version id or a model directory; by default the
    adapter's own base model) + the LoRA adapter in `adapter_dir` as one Delta, with a `runs` row of
    flow `import-peft`; with `alias`, point it there (`engramflow rollback ALIAS` undoes that). The
    adapter must change MLP down projections only."""
    import torch

    from engramflow.aliases import check_alias_name
    from engramflow.editors.delta import Delta
    from engramflow.models import load_model

    path = Path(adapter_dir).resolve()
    config = _peft_config(path)
    parent = _import_parent(store, onto or config.get("base_model_name_or_path"))
    layers = _adapter_layers(path, config, parent.base_model)
    if alias is not None:
        check_alias_name(alias)
    peft = require_peft()

    model, _ = load_model(parent.base_model)
    # PEFT reads the adapter, so the scaling (alpha / r, rank and alpha patterns, rsLoRA) is PEFT's own.
    lora_model = peft.PeftModel.from_pretrained(model, str(path)).get_base_model()
    factors = {}
    with torch.no_grad():
        for name, layer in sorted(layers.items(), key=lambda item: item[1]):
            module = lora_model.get_submodule(name)
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # [r, d_in], [d_out, r]
            factors[layer] = ((B.float() * module.scaling["default"]).contiguous(), A.float().T.contiguous())
    delta = Delta(factors, algorithm="peft-lora",
                  meta={"source": "peft", "adapter_dir": str(path), "peft_version": peft.__version__,
                        "base_model_name_or_path": config.get("base_model_name_or_path"),
                        "r": config.get("r"), "lora_alpha": config.get("lora_alpha")})
    key = save_artifact(store, delta)
    version_id = stable_id("peft", parent.version_id, key)
    record_run(store, version_id, "import-peft", delta.algorithm, parent.base_model, None,
               {"adapter_dir": str(path), "onto": parent.version_id, "layers": sorted(factors)}, "completed")
    version = record_version(store, version_id, parent, delta, key, version_id, note=f"PEFT adapter {path}")
    if alias is not None:
        set_alias(store, alias, version.version_id, "set", set_by, note=f"imported PEFT adapter {path}")
    return version
