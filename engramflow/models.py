"""Loading a model by path for the pipeline's stages: any Hugging Face causal LM directory or hub id.

The embedded organism is built by `engramflow.organism`; callers above the flows (the CLI, tests,
benchmarks) turn the names `organism` / `organism-tiny` into its directory first (`resolve_model`),
so stages below never train anything.
"""

from __future__ import annotations

import threading
from typing import Any

# transformers builds a model on the meta device under context managers that patch torch globally, so
# two threads loading at once break each other ("Cannot copy out of meta tensor"): stages that run as
# threads of one process (a sweep's cell, Prefect's thread pool) load one model at a time.
_LOADING = threading.Lock()

# What the CLI, the tests and the benchmarks accept for the embedded default, -> `build_organism` kwargs.
ORGANISM_NAMES = {"organism": {}, "organism-tiny": {"tiny": True}, "organism-large": {"world": "world-large"}}


def resolve_model(spec: str) -> str:
    """`organism` / `organism-tiny` / `organism-large` -> the built model's directory (built on first
    use); any other path or hub id unchanged."""
    if spec in ORGANISM_NAMES:
        from engramflow.organism import build_organism

        return str(build_organism(**ORGANISM_NAMES[spec]))
    return spec


def load_model(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory or hub id, in eval mode, with a padding token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path in ORGANISM_NAMES:
        raise ValueError(f"{path!r} is a name, not a model directory: resolve it first "
                         "(engramflow.models.resolve_model)")
    with _LOADING:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device)
    model.eval()
    return model, tok


def default_corpus(model: str) -> str:
    """The statistics/perplexity corpus a run on `model` uses when it names none: an organism's own
    (its world's name, or the `corpus.txt` a fact file's organism keeps), else the embedded world."""
    import json
    from pathlib import Path

    from engramflow.data.world import NAMED_WORLDS

    path = Path(model)
    report = path / "organism.json"
    if report.is_file():
        source = json.loads(report.read_text()).get("source")
        if source in NAMED_WORLDS:
            return source
        if (path / "corpus.txt").is_file():
            return str(path / "corpus.txt")
    return "world"
