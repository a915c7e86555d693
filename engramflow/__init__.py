"""engramflow: rewrite facts inside language models at scale, with an auditable edit history."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_edited(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a directory written by `engramflow export`, with its state artifact (SCEN's
    expert bank) attached when it has one (`engramflow.export.load_edited`)."""
    from engramflow.export import load_edited as load

    return load(path, device)
