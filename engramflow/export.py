"""Export a model version for serving, and load an export back.

`export_version` writes a directory in one of the registered formats (`FORMATS`; `hf` by default) and
`edits.json` beside it: the manifest of every edit behind the version (request, method, layers,
artifact hash, its ES/PS measured on the exported model) and the base model it came from. A format
is one function that writes its files and says how to load them; the manifest is shared.

The `hf` format is a Hugging Face directory with every delta merged into the weights, loadable with
plain `AutoModelForCausalLM.from_pretrained`. A state artifact (SCEN's expert bank) cannot be merged
into weights: it is saved beside them and `engramflow.load_edited(DIR)` attaches it; the manifest's
`loader` says which of the two a directory needs.
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

from engramflow.aliases import edit_manifest, edit_scores, resolve
from engramflow.ledger import Version, fetch_requests, load_artifact, materialize
from engramflow.storage import Store

MANIFEST = "edits.json"
MANIFEST_FORMAT = "engramflow.export/1"
STATE_FILE = "engramflow_state.safetensors"

# format name -> writer(store, version, out_dir) -> what the manifest says about loading it
Exporter = Callable[[Store, Version, Path], dict[str, Any]]
FORMATS: dict[str, Exporter] = {}


def register_format(name: str) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        FORMATS[name] = fn
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


def export_version(store: Store, name: str, out: str | os.PathLike[str], fmt: str = "hf") -> Path:
    """Export the version an alias points at (or a version id) to `out` (new or empty) in format `fmt`;
    returns the directory. Written under a temporary name and renamed, so a failed export leaves none."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(sorted(FORMATS))}")
    version, alias = resolve(store, name)
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
    model, tok = load_model(str(path), device=device)
    state = None
    if manifest.get("state") or (path / STATE_FILE).is_file():
        state = Artifact.load(path / (manifest.get("state") or {}).get("file", STATE_FILE))
        state.apply(model)
    return model, tok, state


def load_edited(path: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of an exported directory, with its state artifact (SCEN's bank) attached when
    it has one."""
    model, tok, _ = _load(Path(path), device)
    return model, tok
