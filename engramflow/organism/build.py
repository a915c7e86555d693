"""Building an organism once and finding it in the cache afterwards.

A build lives under `home.models_dir()` in `<name>-<key>`, the key a hash of its configuration and
training data. It is written to a hidden temporary directory and then renamed, so a killed build
never looks cached; every stage then loads it like any Hugging Face causal LM. The build report
(accuracies, epochs, tokens/s, seconds, history) is `organism.json` beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engramflow import home
from engramflow.data.world import default_world, tiny_world
from engramflow.organism.config import BUILD_VERSION, DEFAULT_CONFIG, TINY_CONFIG, OrganismConfig
from engramflow.organism.data import FactData
from engramflow.organism.training import train_organism

# Config fields added after builds were cached, with their "off" values: a field at that value is left
# out of the cache key, so the builds made before it existed keep their hash.
_LATER_FIELDS = {"subject_id_weight": 0.0, "relation_id_weight": 0.0}


def _cache_key(cfg: OrganismConfig, data: FactData) -> str:
    """16 hex digits naming a build: a hash of its config (less the later fields left "off"),
    BUILD_VERSION and its data."""
    config = {k: v for k, v in asdict(cfg).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    h = hashlib.sha256(json.dumps({"config": config, "version": BUILD_VERSION}, sort_keys=True).encode())
    h.update(data.fingerprint().encode())
    if cfg.relation_id_weight > 0:  # the relation labels are data only the relation probe reads
        h.update(json.dumps(data.relations).encode())
    return h.hexdigest()[:16]


def build_organism(tiny: bool = False, facts: str | os.PathLike[str] | None = None, format: str | None = None,
                   progress: bool = True, config: OrganismConfig | None = None) -> Path:
    """Build (or find in the cache) an organism and return its directory.

    By default it learns the embedded world (`tiny` picks the tiny world and model); with `facts`
    (and its ingest `format`) it learns any fact set the ingest stage reads."""
    cfg = config or (TINY_CONFIG if tiny else DEFAULT_CONFIG)
    if facts is not None:
        from engramflow.data.ingest import load_requests

        if format is None:
            raise ValueError("--facts needs --format (an ingest format name)")
        requests, _rejects = load_requests(str(facts), format)
        data = FactData.from_requests(requests, f"{format}:{facts}")
    else:
        data = FactData.from_world(tiny_world() if tiny else default_world(), "world-tiny" if tiny else "world")
    root = home.models_dir()
    target = root / f"{cfg.name}-{_cache_key(cfg, data)}"
    if (target / "organism.json").is_file():
        return target
    model, tok, report = train_organism(data, cfg, progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "organism.json").write_text(json.dumps(report, indent=1))
        os.rename(tmp, target)
    except OSError:
        if not (target / "organism.json").is_file():  # not a concurrent build that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def organism_report(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The build report stored beside an organism's weights."""
    return json.loads((Path(model_dir) / "organism.json").read_text())
