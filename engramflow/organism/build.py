"""Building an organism once and finding it in the cache afterwards.

A build lives under `home.models_dir()` in `<name>-<key>`, the key a hash of its configuration and
training data. It is written to a hidden temporary directory and then renamed, so a killed build
never looks cached; every stage then loads it like any Hugging Face causal LM. The build report
(accuracies, epochs, tokens/s, seconds, history) is `organism.json` beside the weights; an organism
of a fact file also keeps `corpus.txt`, the text its statistics and perplexity are computed on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from engramflow import home
from engramflow.data.world import NAMED_WORLDS, named_world
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


CORPUS_FILE = "corpus.txt"  # beside a fact file's organism: its statements, for statistics and perplexity


class OrganismBuildError(RuntimeError):
    """A build that did not reach its accuracy targets; the message says what it reached."""


# Updates a build gets at least (a small fact set gets more epochs): the tiny world's 60 epochs of 32.
MIN_UPDATES = 1800


def _pow2_at_least(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, n))))


def derive_config(data: FactData, base: OrganismConfig) -> OrganismConfig:
    """`base` with what `data` needs, never less than `base` gives: a vocabulary with room for every
    object and every word used three times or more (beyond the 256 bytes), an MLP of half a unit or
    more per fact it holds (the default world's has two), positions for two of the longest statements,
    enough epochs for `MIN_UPDATES` updates, and per-epoch samples of every prompt of a fact file (an
    eighth of a world's, up to 1,000). The embedded worlds' builds are their base configs unchanged."""
    words = Counter(w for s in data.statements for w in s.split())
    vocab = _pow2_at_least(256 + len(data.objects) + sum(1 for c in words.values() if c >= 3))
    facts = len({(s, r) for s, r in zip(data.subjects, data.relations, strict=True) if s}) + sum(
        1 for s in data.subjects if not s)
    steps = math.ceil(math.ceil(len(data.statements) / base.statements_per_sequence) / base.batch_size)
    longest = max(len(s) for s in data.statements)
    # A fact file's build checks its targets on every prompt (up to 2,000 a split); the worlds' builds
    # keep their samples, an eighth of the prompts (their cache keys stay).
    sample = (min(2000, max(len(data.train), len(data.heldout))) if data.prompt_chars is not None
              else min(1000, len(data.train) // 8))
    return replace(
        base,
        vocab_size=max(base.vocab_size, min(16384, vocab)),
        n_inner=max(base.n_inner, _pow2_at_least(facts) // 2),
        n_positions=max(base.n_positions, _pow2_at_least(base.statements_per_sequence * longest / 3)),
        max_epochs=max(base.max_epochs, math.ceil(MIN_UPDATES / steps)),
        eval_sample=max(base.eval_sample, sample),
    )


def _slug(path: str | os.PathLike[str]) -> str:
    stem = Path(str(path)).name.split(".")[0]
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "facts"


def fact_data(tiny: bool = False, facts: str | os.PathLike[str] | None = None, format: str | None = None,
              world: str | None = None) -> tuple[FactData, str]:
    """What a build learns and the name its directory starts with: an embedded world (`world`;
    `tiny` = `world-tiny`) or a fact file of an ingest `format`."""
    if facts is not None:
        from engramflow.data.ingest import load_requests

        if format is None:
            raise ValueError("--facts needs --format (an ingest format name)")
        requests, _rejects = load_requests(str(facts), format)
        return FactData.from_requests(requests, f"{format}:{facts}"), _slug(facts)
    world = world or ("world-tiny" if tiny else "world")
    made = named_world(world)
    if made is None:
        raise ValueError(f"unknown world {world!r}; worlds: {', '.join(NAMED_WORLDS)}")
    return FactData.from_world(made, world), "" if world in ("world", "world-tiny") else world.removeprefix("world-")


def build_organism(tiny: bool = False, facts: str | os.PathLike[str] | None = None, format: str | None = None,
                   progress: bool = True, config: OrganismConfig | None = None, world: str | None = None) -> Path:
    """Build (or find in the cache) an organism and return its directory.

    By default it learns the embedded world (`tiny`: the tiny world and model; `world`: a named world
    such as `world-large`); with `facts` (and its ingest `format`) it learns any fact set the ingest
    stage reads. The config is `config` (default: the default or tiny one) with what the data needs
    (`derive_config`); a `config` given keeps its own epoch cap. A build that misses its accuracy targets raises OrganismBuildError and is kept
    under `failed/`, never cached."""
    data, suffix = fact_data(tiny, facts, format, world)
    base = config or (TINY_CONFIG if tiny or world == "world-tiny" else DEFAULT_CONFIG)
    cfg = derive_config(data, replace(base, name=f"{base.name}-{suffix}") if suffix else base)
    if config is not None:
        cfg = replace(cfg, max_epochs=config.max_epochs)
    if not data.heldout:
        raise OrganismBuildError(
            f"{data.source}: no fact has a wording held out (each is asked in one wording only), so the "
            "build cannot measure whether facts are known beyond their training text; give the requests "
            "paraphrases or a relation shared by several subjects")
    root = home.models_dir()
    target = root / f"{cfg.name}-{_cache_key(cfg, data)}"
    if (target / "organism.json").is_file():
        return target
    model, tok, report = train_organism(data, cfg, progress=progress)
    # A fact file's organism brings its own statistics corpus (`models.default_corpus`); a world's is
    # the world's (`corpus_texts("world-large")`).
    corpus = data.corpus_text() if facts is not None else None
    if not report["targets_reached"]:
        failed = root / "failed" / target.name
        shutil.rmtree(failed, ignore_errors=True)  # an earlier failure of the same build
        _save(model, tok, report, failed, corpus)
        raise OrganismBuildError(
            f"{cfg.name} on {data.source} did not reach its targets (train top-1 {cfg.target_train}, held-out "
            f"{cfg.target_heldout}) in {report['epochs']} epochs: best epoch {report['best_epoch']} read "
            f"{report['best_sample_train_top1']:.3f} / {report['best_sample_heldout_top1']:.3f} on the "
            f"per-epoch samples, {report['train_top1']:.3f} / {report['heldout_top1']:.3f} on every prompt "
            f"({report['n_train_prompts']} / {report['n_heldout_prompts']}), {report['build_seconds']:.0f} s. "
            f"Not cached; the model and its report are in {failed}")
    _save(model, tok, report, target, corpus)
    return target


def _save(model: Any, tok: Any, report: dict[str, Any], target: Path, corpus: str | None = None) -> None:
    """Write a build to `target` through a hidden temporary directory, so a killed build never looks
    complete; a concurrent build that got there first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "organism.json").write_text(json.dumps(report, indent=1))
        if corpus is not None:
            (tmp / CORPUS_FILE).write_text(corpus)
        if target.is_dir() and not (target / "organism.json").is_file():
            shutil.rmtree(target)  # a failed build's leftovers
        os.rename(tmp, target)
    except OSError:
        if not (target / "organism.json").is_file():  # not a concurrent build that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def organism_report(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The build report stored beside an organism's weights."""
    return json.loads((Path(model_dir) / "organism.json").read_text())
