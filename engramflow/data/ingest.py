"""Ingest: registered loaders turn benchmark and user files into normalised edit requests.

Every format has a reader (file -> ``(position, raw record)``) and a converter (raw record -> partial
requests). One validator then normalises each request to the `requests` schema
(docs/architecture.md): ``{}`` in a prompt is filled with the subject, the subject must occur in the
prompt, texts must be non-empty, decodable and of sane length. A record that fails any check becomes
a `rejects` row naming its file, position, field and reason, and ingest goes on. The request id is a
content hash, so ingesting the same file twice adds nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engramflow.editors.requests import fill_prompt, request_id

if TYPE_CHECKING:
    from engramflow.storage.store import Store
# Sanity limits: far above anything in the public benchmarks (longest text there: 319 characters).
MAX_PROMPT_CHARS = 2000
MAX_SHORT_CHARS = 500  # subject, targets, relation, case id
MAX_LIST_ITEMS = 200
MAX_EXTRA_CHARS = 200_000
MAX_RAW_CHARS = 2000  # how much of a rejected record is kept in `rejects.raw`
MAX_NESTING = 32  # levels of lists/objects in one record (the benchmarks use 4)
_BOM = b"\xef\xbb\xbf"

_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
_NQ_PREFIX = re.compile(r"^\s*nq question:\s*", re.IGNORECASE)

Raw = Any
Reader = Callable[[str], Iterator[tuple[int, Raw]]]
Converter = Callable[[Raw], list[dict[str, Any]]]


class IngestError(ValueError):
    """A whole file cannot be read (missing, not the expected container format)."""


class RecordError(ValueError):
    """One record is invalid; `field` names the offending field (None for the record as a whole)."""

    def __init__(self, field: str | None, reason: str, raw: Raw = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True)
class Loader:
    """A registered format: how to read the file and how to map one raw record."""

    name: str
    read: Reader
    convert: Converter
    description: str
    # The format's default edit-quality protocols (evaluator names, engramflow.editors.evaluation).
    protocols: tuple[str, ...] = ()
    # The top-level fields its records have: a file none of whose records has any of them is not in this
    # format (a JSONL file read as CSV), an error rather than a file of rejects. Empty: not checked.
    fields: frozenset[str] = frozenset()


@dataclass
class IngestResult:
    """Outcome of `ingest_file`: `accepted` = requests newly added to the store, `duplicates` =
    valid records already stored or repeated in the file, `request_ids` = every valid request of the
    file (new or not), `rejects` = the reject rows of this file (also those recorded before)."""

    accepted: int
    rejected: int
    duplicates: int
    request_ids: list[str]
    rejects: list[dict[str, Any]] = field(default_factory=list)


LOADERS: dict[str, Loader] = {}
# Default protocols of the formats that carry CounterFact-style requests (target_true, paraphrases,
# neighbours, generation prompts).
COUNTERFACT = ("counterfact", "fluency")


def register(name: str, read: Reader, description: str, protocols: tuple[str, ...] = (),
             fields: Iterable[str] = ()) -> Callable[[Converter], Converter]:
    """Register `convert` (the decorated function) under the format `name`, scored by default with
    `protocols`; `fields`: the top-level fields of its records."""

    def deco(convert: Converter) -> Converter:
        LOADERS[name] = Loader(name, read, convert, description, protocols, frozenset(fields))
        return convert

    return deco


def get_loader(fmt: str) -> Loader:
    try:
        return LOADERS[fmt]
    except KeyError:
        raise IngestError(f"unknown format {fmt!r}; formats: {', '.join(LOADERS)}") from None


# ---- readers ------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    """The file's bytes (local path or fsspec URL); `.gz`/`.bz2`/... decompressed by suffix."""
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            return f.read()
    except FileNotFoundError as e:
        cause = e.__cause__ or e.__context__
        if "://" in path and cause is not None:  # fsspec reports every failed HTTP request as not found
            raise IngestError(f"{path}: network error, cannot fetch it ({type(cause).__name__}: {cause})") from None
        raise IngestError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise IngestError(f"{path}: cannot read ({e})") from e
    except Exception as e:  # aiohttp, botocore...: errors of the network, not of the file
        if "://" in path:
            raise IngestError(f"{path}: network error, cannot fetch it ({type(e).__name__}: {e})") from None
        raise


def _decode(data: bytes) -> str:
    """UTF-8 text without a byte-order mark; undecodable bytes become lone surrogates, which validation
    rejects per record."""
    return data.removeprefix(_BOM).decode("utf-8", errors="surrogateescape")


def _too_deep(raw: str) -> RecordError:
    return RecordError(None, f"nested deeper than {MAX_NESTING} levels", raw=raw[:MAX_RAW_CHARS])


def _json_elements(text: str) -> Iterator[str]:
    """The source text of each element of a top-level JSON array, found without parsing them (so one
    element nested too deep for the parser does not hide the others)."""
    start = text.index("[") + 1
    depth, in_string, escaped, begin = 0, False, False, None
    for j in range(start, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
            continue
        if c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                if begin is not None:
                    yield text[begin:j]
                return
            depth -= 1
        elif c == "," and depth == 0:
            yield text[begin:j] if begin is not None else ""
            begin = None
            continue
        if begin is None and not c.isspace():
            begin = j


def read_json_list(path: str) -> Iterator[tuple[int, Raw]]:
    """A JSON file holding a list of records (CounterFact, zsRE, KnowEdit, MQuAKE...)."""
    text = _decode(_read_bytes(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:  # some record is nested too deep to parse: parse the records one by one
        if not text.lstrip().startswith("["):
            raise IngestError(f"{path}: nested deeper than the JSON parser allows") from None
        for i, element in enumerate(_json_elements(text)):
            try:
                yield i, json.loads(element)
            except RecursionError:
                yield i, _too_deep(element)
            except json.JSONDecodeError as e:
                yield i, RecordError(None, f"invalid JSON ({e})", raw=element[:MAX_RAW_CHARS])
        return
    if not isinstance(data, list):
        raise IngestError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    yield from enumerate(data)


def read_world(path: str) -> Iterator[tuple[int, Raw]]:
    """`world` / `world-tiny` = an embedded world; any other path is a CounterFact-format export of one."""
    from engramflow.data.world import named_world

    world = named_world(path)
    if world is not None:
        yield from enumerate(world.counterfact_records())
    else:
        yield from read_json_list(path)


def read_jsonl(path: str) -> Iterator[tuple[int, Raw]]:
    """One JSON record per line; position = 0-based line number; blank lines are skipped.

    Lines are split on b"\\n" only: `str.splitlines` would also split inside strings holding
    U+2028 and friends, which JSON writers leave unescaped.
    """
    for i, raw_line in enumerate(_read_bytes(path).split(b"\n")):
        line = _decode(raw_line).rstrip("\r")
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, RecordError(None, f"invalid JSON on line {i + 1}: {e}", raw=line)
        except RecursionError:
            yield i, _too_deep(line)


# The fields of user files (jsonl, csv, parquet).
_USER_FIELDS = {"subject", "prompt", "target_new", "target_true", "paraphrase_prompts", "neighborhood",
                "neighborhood_prompts", "generation_prompts", "relation", "case_id"}

# CSV cells of these columns may hold a JSON list (a plain string is a one-element list).
_CSV_LIST_FIELDS = {"paraphrase_prompts", "neighborhood", "neighborhood_prompts", "generation_prompts"}


def read_csv(path: str) -> Iterator[tuple[int, Raw]]:
    """A CSV file with a header row; position = 0-based data row; empty cells are absent fields."""
    reader = csv.DictReader(io.StringIO(_decode(_read_bytes(path)), newline=""))
    if not reader.fieldnames:
        raise IngestError(f"{path}: empty CSV (no header row)")
    if not _USER_FIELDS & {name.strip() for name in reader.fieldnames if name}:
        raise IngestError(f"{path}: the CSV header has none of the fields {', '.join(sorted(_REQUIRED_USER_FIELDS))}"
                          f" (header: {', '.join(map(repr, reader.fieldnames[:5]))}): is it a CSV file? (--format)")
    try:
        for i, row in enumerate(reader):
            if None in row:
                yield i, RecordError(None, "row has more cells than the header", raw=row)
                continue
            record: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
            try:
                for name in _CSV_LIST_FIELDS & record.keys():
                    if record[name].lstrip().startswith("["):
                        record[name] = json.loads(record[name])
            except json.JSONDecodeError as e:
                yield i, RecordError(name, f"not a valid JSON list ({e})", raw=row)
                continue
            except RecursionError:
                yield i, RecordError(name, f"nested deeper than {MAX_NESTING} levels", raw=row)
                continue
            yield i, record
    except csv.Error as e:
        raise IngestError(f"{path}: malformed CSV ({e})") from e


def read_parquet(path: str) -> Iterator[tuple[int, Raw]]:
    """A Parquet file, one record per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(_read_bytes(path)))
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{path}: not a readable Parquet file ({e})") from e
    for i, row in enumerate(table.to_pylist()):
        yield i, {k: v for k, v in row.items() if v is not None}


# ---- field access -------------------------------------------------------------------------------
def _get(record: Raw, *path: str, required: bool = True) -> Any:
    """`record[path[0]][path[1]]...`; RecordError naming the dotted path if a level is missing."""
    value = record
    for depth, key in enumerate(path):
        if not isinstance(value, dict):
            where = ".".join(path[:depth]) or "record"
            raise RecordError(where, f"expected an object, got {type(value).__name__}")
        if key not in value or value[key] is None:
            if required:
                raise RecordError(".".join(path[: depth + 1]), "missing")
            return None
        value = value[key]
    return value


def _first(value: Any, name: str) -> Any:
    """The first element of (possibly nested) lists, e.g. zsRE `answers` or KnowEdit `ground_truth`."""
    while isinstance(value, list):
        if not value:
            raise RecordError(name, "empty list")
        value = value[0]
    return value


def _as_list(value: Any, name: str) -> list[Any]:
    """A list field; a single string means a one-element list (EasyEdit's `rephrase_prompt`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RecordError(name, f"expected a list, got {type(value).__name__}")
    return value


def _rest(record: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The record's fields no column holds, kept in `extra`."""
    return {k: v for k, v in record.items() if k not in used}


def _record(raw: Raw) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RecordError(None, f"record is a {type(raw).__name__}, not an object")
    return raw


# ---- converters ---------------------------------------------------------------------------------
def _counterfact(raw: Raw) -> list[dict[str, Any]]:
    rec = _record(raw)
    rw = _get(rec, "requested_rewrite")
    target_true = _get(rec, "requested_rewrite", "target_true", "str", required=False)
    extra = _rest(rec, {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                        "generation_prompts"})
    extra["requested_rewrite"] = _rest(rw, {"prompt", "subject", "relation_id", "target_new", "target_true"})
    extra["target_ids"] = {k: _get(rw, k, "id", required=False) for k in ("target_new", "target_true")}
    return [{
        "case_id": rec.get("case_id"),
        "relation": rw.get("relation_id"),
        "subject": _get(rec, "requested_rewrite", "subject"),
        "prompt": _get(rec, "requested_rewrite", "prompt"),
        "target_new": _get(rec, "requested_rewrite", "target_new", "str"),
        "target_true": target_true,
        "paraphrase_prompts": _as_list(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        # In CounterFact the neighbourhood prompts' true answer is the edited fact's true object.
        "neighborhood": _neighbors_from_prompts(rec.get("neighborhood_prompts"), target_true, "neighborhood_prompts"),
        "generation_prompts": _as_list(rec.get("generation_prompts"), "generation_prompts"),
        "extra": extra,
    }]


def _neighbors_from_prompts(prompts: Any, target: Any, name: str) -> list[dict[str, Any]]:
    items = _as_list(prompts, name)
    if items and target is None:
        raise RecordError(name, "neighbourhood prompts need target_true (their answer)")
    return [{"prompt": p, "target": target} for p in items]


_COUNTERFACT_FIELDS = ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                       "generation_prompts")
register("counterfact", read_json_list, "ROME CounterFact JSON list ({} in the prompt)", COUNTERFACT,
         _COUNTERFACT_FIELDS)(_counterfact)
register("world", read_world, "the embedded world (path `world`) or its CounterFact export",
         COUNTERFACT, _COUNTERFACT_FIELDS)(_counterfact)


@register("easyedit-counterfact", read_json_list, "EasyEdit/MEND CounterFact split (filled prompts)", COUNTERFACT,
          ("case_id", "subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
           "locality_ground_truth"))
def _easyedit_counterfact(raw: Raw) -> list[dict[str, Any]]:
    rec = _record(raw)
    loc = rec.get("locality_prompt")
    return [{
        "case_id": rec.get("case_id"),
        "subject": _get(rec, "subject"),
        "prompt": _get(rec, "prompt"),
        "target_new": _get(rec, "target_new"),
        "target_true": rec.get("ground_truth"),
        "paraphrase_prompts": _as_list(rec.get("rephrase_prompt"), "rephrase_prompt"),
        "neighborhood": [] if loc is None else [{"prompt": loc, "target": _get(rec, "locality_ground_truth")}],
        "extra": _rest(rec, {"case_id", "subject", "prompt", "target_new", "ground_truth", "rephrase_prompt",
                             "locality_prompt", "locality_ground_truth"}),
    }]


def _nq_question(text: Any) -> Any:
    """zsRE locality prompts are Natural Questions as "nq question: who ..."; make them plain questions."""
    if not isinstance(text, str) or not _NQ_PREFIX.match(text):
        return text
    question = _NQ_PREFIX.sub("", text).strip()
    if question:
        question = question[0].upper() + question[1:]
        if question[-1] not in "?.!":
            question += "?"
    return question


@register("zsre", read_json_list, "MEND zsRE (src, alt, answers, rephrase, loc, loc_ans)", ("zsre",),
          ("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans"))
def _zsre(raw: Raw) -> list[dict[str, Any]]:
    rec = _record(raw)
    loc = rec.get("loc")
    extra = _rest(rec, {"subject", "src", "alt", "rephrase", "loc", "loc_ans"})
    if loc is not None:
        extra["loc"] = loc
    return [{
        "case_id": rec.get("case_id"),
        "subject": _get(rec, "subject"),
        "prompt": _get(rec, "src"),
        "target_new": _get(rec, "alt"),
        "target_true": _first(_get(rec, "answers"), "answers"),
        "paraphrase_prompts": _as_list(rec.get("rephrase"), "rephrase"),
        "neighborhood": [] if loc is None else [{"prompt": _nq_question(loc), "target": _first(_get(rec, "loc_ans"), "loc_ans")}],
        "extra": extra,
    }]


@register("knowedit", read_json_list, "KnowEdit zsRE (ZsRE-test-all: locality / portability dicts)",
          ("easyedit", "knowedit"), ("subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality",
                                     "portability"))
def _knowedit(raw: Raw) -> list[dict[str, Any]]:
    rec = _record(raw)
    locality = _get(rec, "locality", required=False) or {}
    if not isinstance(locality, dict):
        raise RecordError("locality", f"expected an object, got {type(locality).__name__}")
    neighborhood = []
    for kind, items in locality.items():
        for j, item in enumerate(_as_list(items, f"locality.{kind}")):
            if not isinstance(item, dict):
                raise RecordError(f"locality.{kind}[{j}]", f"expected an object, got {type(item).__name__}")
            neighborhood.append({
                "prompt": _get(item, "prompt"),
                "target": _first(_get(item, "ground_truth"), f"locality.{kind}[{j}].ground_truth"),
            })
    ground_truth = rec.get("ground_truth")
    return [{
        "case_id": rec.get("case_id"),
        "subject": _get(rec, "subject"),
        "prompt": _get(rec, "prompt"),
        "target_new": _get(rec, "target_new"),
        "target_true": None if ground_truth is None else _first(ground_truth, "ground_truth"),
        "paraphrase_prompts": _as_list(rec.get("rephrase_prompt"), "rephrase_prompt"),
        "neighborhood": neighborhood,
        "extra": _rest(rec, {"case_id", "subject", "prompt", "target_new", "rephrase_prompt", "locality"}),
    }]


# Each rewrite is a single-hop CounterFact-style fact (ES/EM: no paraphrases or neighbours); the
# multi-hop questions are scored once all of a case's rewrites are edited.
@register("mquake", read_json_list, "MQuAKE (each requested_rewrite is one request; questions in extra)",
          ("counterfact", "mquake"), ("case_id", "requested_rewrite", "questions", "answer"))
def _mquake(raw: Raw) -> list[dict[str, Any]]:
    rec = _record(raw)
    rewrites = _as_list(_get(rec, "requested_rewrite"), "requested_rewrite")
    if not rewrites:
        raise RecordError("requested_rewrite", "empty list")
    case = _rest(rec, {"case_id", "requested_rewrite"})
    out = []
    for i, rw in enumerate(rewrites):
        name = f"requested_rewrite[{i}]"
        if not isinstance(rw, dict):
            raise RecordError(name, f"expected an object, got {type(rw).__name__}")
        out.append({
            "case_id": rec.get("case_id"),
            "relation": rw.get("relation_id"),
            "subject": _get(rw, "subject"),
            "prompt": _get(rw, "prompt"),
            "target_new": _get(rw, "target_new", "str"),
            "target_true": _get(rw, "target_true", "str", required=False),
            "extra": {**case, "rewrite_index": i, "n_rewrites": len(rewrites),
                      "rewrite": _rest(rw, {"subject", "prompt", "relation_id"})},
        })
    return out


# Known facts are for causal tracing: target_new = target_true, so no edit-quality protocol applies.
@register("known", read_json_list, "ROME known facts (known_1000.json): target_new = target_true = attribute",
          (), ("known_id", "subject", "prompt", "attribute", "relation_id"))
def _known(raw: Raw) -> list[dict[str, Any]]:
    """Known facts are for causal tracing, not editing: the request keeps the fact as it is."""
    rec = _record(raw)
    attribute = _get(rec, "attribute")
    return [{
        "case_id": rec.get("known_id"),
        "relation": rec.get("relation_id"),
        "subject": _get(rec, "subject"),
        "prompt": _get(rec, "prompt"),
        "target_new": attribute,
        "target_true": attribute,
        "extra": {**_rest(rec, {"known_id", "relation_id", "subject", "prompt", "attribute"}), "known_fact": True},
    }]


_REQUIRED_USER_FIELDS = ("subject", "prompt", "target_new")


def _user(raw: Raw) -> list[dict[str, Any]]:
    """User files: {subject, prompt, target_new} + optional target_true, paraphrase_prompts,
    neighborhood [{prompt, target}] or neighborhood_prompts (answered by target_true), relation,
    case_id, generation_prompts; any other field goes to `extra`."""
    rec = _record(raw)
    neighborhood = _as_list(rec.get("neighborhood"), "neighborhood")
    neighborhood += _neighbors_from_prompts(rec.get("neighborhood_prompts"), rec.get("target_true"),
                                            "neighborhood_prompts")
    return [{
        "case_id": rec.get("case_id"),
        "relation": rec.get("relation"),
        "subject": _get(rec, "subject"),
        "prompt": _get(rec, "prompt"),
        "target_new": _get(rec, "target_new"),
        "target_true": rec.get("target_true"),
        "paraphrase_prompts": _as_list(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        "neighborhood": neighborhood,
        "generation_prompts": _as_list(rec.get("generation_prompts"), "generation_prompts"),
        "extra": _rest(rec, _USER_FIELDS),
    }]


register("jsonl", read_jsonl, "user JSON lines", COUNTERFACT, _USER_FIELDS)(_user)
register("csv", read_csv, "user CSV with a header (list cells as JSON)", COUNTERFACT, _USER_FIELDS)(_user)
register("parquet", read_parquet, "user Parquet", COUNTERFACT, _USER_FIELDS)(_user)


# ---- validation ---------------------------------------------------------------------------------
def _text(value: Any, name: str, limit: int, optional: bool = False) -> str | None:
    """A stripped, non-empty, decodable string of at most `limit` characters."""
    if value is None:
        if optional:
            return None
        raise RecordError(name, "missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("case_id", "relation"):
        value = str(value)
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(name, "undecodable text (not valid UTF-8)") from None
    text = value.strip()
    if not text:
        if optional:
            return None
        raise RecordError(name, "empty")
    if len(text) > limit:
        raise RecordError(name, f"too long ({len(text)} characters, limit {limit})")
    if _BAD_CHARS.search(text):
        raise RecordError(name, "contains control or replacement characters (undecodable text)")
    return text


def _texts(values: list[Any], name: str, subject: str) -> list[str]:
    if len(values) > MAX_LIST_ITEMS:
        raise RecordError(name, f"too many items ({len(values)}, limit {MAX_LIST_ITEMS})")
    out = []
    for i, v in enumerate(values):
        text = _text(v, f"{name}[{i}]", MAX_PROMPT_CHARS)
        out.append(fill_prompt(text, subject))
    return out


def _neighborhood(values: list[Any]) -> list[dict[str, str]]:
    if len(values) > MAX_LIST_ITEMS:
        raise RecordError("neighborhood", f"too many items ({len(values)}, limit {MAX_LIST_ITEMS})")
    out = []
    for i, item in enumerate(values):
        name = f"neighborhood[{i}]"
        if not isinstance(item, dict):
            raise RecordError(name, f"expected an object {{prompt, target}}, got {type(item).__name__}")
        out.append({"prompt": _text(item.get("prompt"), f"{name}.prompt", MAX_PROMPT_CHARS),
                    "target": _text(item.get("target"), f"{name}.target", MAX_SHORT_CHARS)})
    return out


def normalise(partial: dict[str, Any], dataset: str, source: str, position: int) -> dict[str, Any]:
    """Validate a converter's output and turn it into a `requests` row (without `ingested_at`)."""
    subject = _text(partial.get("subject"), "subject", MAX_SHORT_CHARS)
    prompt = fill_prompt(_text(partial.get("prompt"), "prompt", MAX_PROMPT_CHARS), subject)
    if subject not in prompt:
        raise RecordError("subject", f"subject {subject!r} does not occur in the prompt {prompt!r}")
    try:
        extra = json.dumps(partial.get("extra") or {}, ensure_ascii=False, sort_keys=True)
        extra.encode("utf-8")
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise RecordError("extra", f"cannot be stored as JSON ({e})") from None
    if len(extra) > MAX_EXTRA_CHARS:
        raise RecordError("extra", f"too long ({len(extra)} characters of JSON, limit {MAX_EXTRA_CHARS})")
    request = {
        "dataset": dataset,
        "source": source,
        "position": position,
        "case_id": _text(partial.get("case_id"), "case_id", MAX_SHORT_CHARS, optional=True),
        "relation": _text(partial.get("relation"), "relation", MAX_SHORT_CHARS, optional=True),
        "subject": subject,
        "prompt": prompt,
        "target_new": _text(partial.get("target_new"), "target_new", MAX_SHORT_CHARS),
        "target_true": _text(partial.get("target_true"), "target_true", MAX_SHORT_CHARS, optional=True),
        "paraphrase_prompts": _texts(partial.get("paraphrase_prompts") or [], "paraphrase_prompts", subject),
        "neighborhood": _neighborhood(partial.get("neighborhood") or []),
        "generation_prompts": _texts(partial.get("generation_prompts") or [], "generation_prompts", subject),
        "extra": extra,
    }
    rid = request_id(subject, prompt, request["target_new"], request["target_true"], request["paraphrase_prompts"],
                     [(n["prompt"], n["target"]) for n in request["neighborhood"]])
    return {"request_id": rid, **request}


# ---- entry points -------------------------------------------------------------------------------
def _source(path: str, fmt: str) -> str:
    from engramflow.data.world import NAMED_WORLDS

    if fmt == "world" and path in NAMED_WORLDS:
        return path
    return str(path) if "://" in str(path) else os.path.abspath(path)


def _raw_text(raw: Raw) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=True, default=repr)
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")[:MAX_RAW_CHARS]


def _load(path: str | os.PathLike[str], fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(unique valid requests, reject rows, number of in-file duplicates)."""
    loader = get_loader(fmt)
    path = str(path)
    source = _source(path, fmt)
    requests: dict[str, dict[str, Any]] = {}
    rejects: list[dict[str, Any]] = []
    duplicates = 0

    def reject(position: int, raw: Raw, err: RecordError) -> None:
        rejects.append({"source": source, "dataset": fmt, "position": position, "field": err.field,
                        "reason": err.reason, "raw": _raw_text(raw)})

    objects = matching = 0  # records that are objects, and those with a field of the format
    for position, raw in loader.read(path):
        if isinstance(raw, RecordError):
            reject(position, raw.raw, raw)
            continue
        if _depth(raw) > MAX_NESTING:
            reject(position, "<a record nested deeper than the limit>", _too_deep(""))
            continue
        if isinstance(raw, dict):
            objects += 1
            matching += bool(loader.fields & raw.keys())
        try:
            partials = loader.convert(raw)
        except RecordError as e:
            reject(position, raw, e)
            continue
        for partial in partials:
            try:
                request = normalise(partial, fmt, source, position)
            except RecordError as e:
                reject(position, raw, e)
                continue
            if request["request_id"] in requests:
                duplicates += 1
            else:
                requests[request["request_id"]] = request
    if loader.fields and objects and not matching:
        raise IngestError(f"{path}: none of its {objects} records has any field of format {fmt!r} "
                          f"({', '.join(sorted(loader.fields)[:6])}...): is --format right?")
    return list(requests.values()), rejects, duplicates


def _depth(value: Raw) -> int:
    """Levels of lists and objects in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_NESTING:
            return level
        stack.extend((child, level + 1) for child in children)
    return deepest


def first_valid(path: str | os.PathLike[str], fmt: str) -> dict[str, Any]:
    """The first valid request of the file (how a run checks its dataset before it starts); IngestError
    when the file cannot be read, is not in format `fmt`, or holds no valid request."""
    requests, rejects, _ = _load(path, fmt)
    if not requests:
        first = rejects[0] if rejects else None
        detail = (f"; first reject at position {first['position']}: {first['field'] or 'record'}: {first['reason']}"
                  if first else "")
        raise IngestError(f"{path}: no valid {fmt} record{detail}")
    return requests[0]


def load_requests(path: str | os.PathLike[str], fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read and validate a file without writing: (unique valid requests, reject rows)."""
    requests, rejects, _ = _load(path, fmt)
    return requests, rejects


def ingest_file(path: str | os.PathLike[str], fmt: str, store: Store | None = None) -> IngestResult:
    """Load `path` as format `fmt` and append its new requests and rejects to the store.

    Requests already stored (same content hash) and rejects already recorded for the same file are
    not written again, so re-ingesting a file adds nothing.
    """
    from engramflow import home
    from engramflow.storage.store import Store

    store = store or Store(home.store_root())
    requests, rejects, duplicates = _load(path, fmt)
    # Written once per id even when two runs ingest the same file at once (checked under the table's lock).
    store.append_once("rejects", rejects, ("source", "dataset", "position", "field", "reason", "raw"))
    new = store.append_once("requests", requests, "request_id")
    duplicates += len(requests) - len(new)
    return IngestResult(accepted=len(new), rejected=len(rejects), duplicates=duplicates,
                        request_ids=[r["request_id"] for r in requests], rejects=rejects)
