"""The edit request, normalised: one type for every editor, evaluator and method.

A `Request` is a frozen record of the `requests` table's fields (docs/architecture.md): the prompt
with its subject filled in, the new (and current) object, paraphrases, neighbourhood prompts whose
answers must not move, generation prompts. It is also a read-only mapping, so a row read from the
store and a request built in a notebook are handled alike; `as_requests` turns either into Requests,
naming the record and field of anything missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple


class RequestError(ValueError):
    """A request that cannot be edited or scored; the message names the request and the field."""


class Neighbour(NamedTuple):
    """A prompt about another subject whose answer `target` must not move."""

    prompt: str
    target: str


def fill_prompt(template: str, subject: str) -> str:
    """A ROME-style template with `{}` where the subject goes, filled; a prompt without `{}` as it is."""
    return template.replace("{}", subject)


def request_id(subject: str, prompt: str, target_new: str, target_true: str | None = None,
               paraphrase_prompts: Sequence[str] = (), neighborhood: Iterable[Sequence[str]] = ()) -> str:
    """The content hash (sha256, 16 hex) of what defines a request: the same request from any file,
    run or worker gets the same id."""
    key = [subject, prompt, target_new, target_true, list(paraphrase_prompts),
           [[n[0], n[1]] for n in neighborhood]]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Request(Mapping[str, Any]):
    """One edit request; `prompt` has the subject filled in and contains it, and `target_new`
    continues it after one space."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[Neighbour, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation: str | None = None
    request_id: str = field(default="")
    extra: str = "{}"  # JSON of dataset-specific fields (MQuAKE questions, portability, ...)

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", request_id(
                self.subject, self.prompt, self.target_new, self.target_true, self.paraphrase_prompts,
                self.neighborhood))

    # --- read-only mapping over the fields --------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)

    def replace(self, **changes: Any) -> Request:
        """A copy with some fields changed (the id stays: the request is still the same edit)."""
        return replace(self, **changes)

    @property
    def extras(self) -> dict[str, Any]:
        """`extra` parsed."""
        return json.loads(self.extra or "{}")

    @classmethod
    def from_mapping(cls, record: Mapping[str, Any], position: int = 0) -> Request:
        """A Request from any mapping with at least prompt, subject and target_new (a `requests` row, a
        notebook dict); `{}` in the prompt is filled with the subject. RequestError names the request
        (its id, or its position when it has none) and the field."""
        if isinstance(record, Request):
            return record
        name = f"request {record.get('request_id') or position} (position {position})"
        for key in ("prompt", "subject", "target_new"):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise RequestError(f"{name}: field {key!r} missing or empty")
        subject = record["subject"]
        prompt = fill_prompt(record["prompt"], subject)
        if subject not in prompt:
            raise RequestError(f"{name}: subject {subject!r} not in prompt {prompt!r}")
        try:
            neighbours = tuple(Neighbour(n["prompt"], n["target"]) if isinstance(n, Mapping) else Neighbour(*n)
                               for n in record.get("neighborhood") or ())
        except (KeyError, TypeError, ValueError):
            raise RequestError(f"{name}: field 'neighborhood' must hold (prompt, target) pairs") from None
        extra = record.get("extra") or "{}"
        return cls(
            prompt=prompt, subject=subject, target_new=record["target_new"],
            target_true=record.get("target_true") or None,
            paraphrase_prompts=tuple(fill_prompt(p, subject) for p in record.get("paraphrase_prompts") or ()),
            neighborhood=neighbours,
            generation_prompts=tuple(fill_prompt(p, subject) for p in record.get("generation_prompts") or ()),
            relation=record.get("relation") or None,
            request_id=str(record.get("request_id") or ""),
            extra=extra if isinstance(extra, str) else json.dumps(extra, ensure_ascii=False, sort_keys=True),
        )


_FIELDS = tuple(f.name for f in fields(Request))


def as_requests(records: Iterable[Mapping[str, Any]]) -> list[Request]:
    """Requests from mappings or Requests (see `Request.from_mapping`)."""
    return [Request.from_mapping(r, i) for i, r in enumerate(records)]
