"""`engramflow doctor`: find what in a home cannot be trusted, say what depends on it, and (with
`repair`) move it to a quarantine folder so that the next run recomputes what can be recomputed.

Checked: every Parquet part of every table (read in full), every stored tensor (its content against
its key, finiteness), every tensor the tables refer to (present?), and the per-request caches
(optimised targets, SCEN experts, evaluation references). Quarantined files keep their relative path
under `<store>/quarantine/<time>/` (store files) or `<home>/quarantine/<time>/` (caches), beside a
`manifest.json` listing what was moved, why, and what depends on it.

What a repair leads to: statistics whose tensor was quarantined are recomputed by the next run that
needs them, cached targets, experts and references likewise; a model version whose artifact is gone
cannot be materialised any more (its runs are named: rerun them under a new run id); the rows of a
quarantined Parquet part are lost to the catalogue (the manifest keeps the file).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from engramflow import home
from engramflow.editors.files import DamagedFileError, check_file
from engramflow.storage import SCHEMAS, Store, StoreDamageError

# Tables whose rows name tensor keys, and the columns that hold them.
TENSOR_COLUMNS = {"model_versions": ("delta_keys", "state_key"), "edits": ("delta_key",),
                  "stats": ("tensor_key",), "experts": ("expert_key", "neuron_key")}


@dataclass
class Problem:
    """One file that cannot be trusted."""

    kind: str  # part | tensor | missing-tensor | cache
    path: str
    reason: str
    key: str | None = None  # the tensor key (tensor, missing-tensor)
    table: str | None = None  # the table (part)
    versions: list[str] = field(default_factory=list)  # model versions that need it
    runs: list[str] = field(default_factory=list)  # runs those versions belong to
    recomputed: str | None = None  # what the next run recomputes in its place, if anything
    quarantined_to: str | None = None


@dataclass
class Checkup:
    """What `doctor` looked at and what it found."""

    parts: int = 0
    tensors: int = 0
    cache_files: int = 0
    problems: list[Problem] = field(default_factory=list)
    quarantine: str | None = None  # where a repair moved the damaged files

    @property
    def healthy(self) -> bool:
        return not self.problems


def _tensor_references(store: Store, readable: set[str]) -> dict[str, list[dict[str, Any]]]:
    """tensor key -> the rows (table, row) that refer to it, from the tables that can be read."""
    refs: dict[str, list[dict[str, Any]]] = {}
    for table, columns in TENSOR_COLUMNS.items():
        if table not in readable:
            continue
        for row in store.read(table).to_pylist():
            for column in columns:
                value = row.get(column)
                for key in value if isinstance(value, list) else [value]:
                    if key:
                        refs.setdefault(key, []).append({"table": table, **row})
    return refs


def _dependents(problem: Problem, refs: list[dict[str, Any]]) -> None:
    versions = sorted({r["version_id"] for r in refs if r["table"] == "model_versions"})
    problem.versions = versions
    problem.runs = sorted({r["run_id"] for r in refs if r["table"] == "model_versions" and r.get("run_id")})
    stats = [r for r in refs if r["table"] == "stats"]
    if stats and not versions:
        problem.recomputed = "statistics " + ", ".join(
            f"layer {r['layer']} shard {r['shard']}/{r['n_shards']} of {r['corpus']!r}" for r in stats)


def cache_roots() -> dict[str, Path]:
    """The per-request caches of the home: results (targets, experts) and evaluation references."""
    return {"requests": home.cache_dir("requests"), "references": home.cache_dir("references")}


def _check_cache(root: Path) -> tuple[int, list[Problem]]:
    files, problems = 0, []
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        if not path.is_file() or path.name.startswith("."):
            continue
        files += 1
        try:
            if path.suffix == ".safetensors":
                check_file(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (DamagedFileError, ValueError, UnicodeDecodeError) as err:
            problems.append(Problem("cache", str(path), str(err), recomputed="this cached result"))
    return files, problems


def checkup(store: Store) -> Checkup:
    """Check every table part, stored tensor, tensor reference and cache file of the current home."""
    result = Checkup()
    readable = set()
    for table in SCHEMAS:
        parts = store.parts(table)
        result.parts += len(parts)
        damaged = {p: r for p in parts if (r := store.check_part(p)) is not None}
        result.problems += [Problem("part", p, r, table=table) for p, r in damaged.items()]
        if not damaged:
            readable.add(table)
    refs = _tensor_references(store, readable)
    present = store.tensor_keys()
    result.tensors = len(present)
    for key in present:
        reason = store.check_tensor(key)
        if reason is not None:
            problem = Problem("tensor", store.tensor_file(key), reason, key=key)
            _dependents(problem, refs.get(key, []))
            result.problems.append(problem)
    for key in sorted(set(refs) - set(present)):
        problem = Problem("missing-tensor", store.tensor_file(key) if len(key) == 64 else key,
                          "referenced by the ledger but not in the store", key=key)
        _dependents(problem, refs[key])
        if problem.recomputed is None and not problem.versions:
            continue  # only a ledger row (an edit of a reverted version, an expert): nothing needs it
        result.problems.append(problem)
    for root in cache_roots().values():
        files, problems = _check_cache(root)
        result.cache_files += files
        result.problems += problems
    return result


def repair(store: Store, result: Checkup) -> Checkup:
    """Move every damaged file of `result` to a quarantine folder and write its manifest there."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    store_quarantine = f"{store.path}/quarantine/{stamp}"
    home_quarantine = home.get_home() / "quarantine" / stamp
    for problem in result.problems:
        if problem.kind in ("part", "tensor"):
            path = store._tensor_path(problem.key) if problem.kind == "tensor" else problem.path
            target = f"{store_quarantine}/{path[len(store.path) + 1:]}"
            store.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if store.fs.get_file_info(path).type != pafs.FileType.NotFound:
                store.fs.move(path, target)
                problem.quarantined_to = store._url(target)
        elif problem.kind == "cache":
            source = Path(problem.path)
            target_path = home_quarantine / source.relative_to(home.get_home())
            target_path.parent.mkdir(parents=True, exist_ok=True)
            if source.exists():
                source.replace(target_path)
                problem.quarantined_to = str(target_path)
    manifest = json.dumps({"checked_at": stamp, "problems": [asdict(p) for p in result.problems]}, indent=2)
    if any(p.kind in ("part", "tensor", "missing-tensor") for p in result.problems):
        store.fs.create_dir(store_quarantine, recursive=True)
        with store.fs.open_output_stream(f"{store_quarantine}/manifest.json") as out:
            out.write(manifest.encode())
        result.quarantine = store._url(store_quarantine)
    if any(p.kind == "cache" for p in result.problems):
        home_quarantine.mkdir(parents=True, exist_ok=True)
        (home_quarantine / "manifest.json").write_text(manifest)
        result.quarantine = result.quarantine or str(home_quarantine)
    return result


__all__ = ["Checkup", "Problem", "StoreDamageError", "checkup", "repair"]
