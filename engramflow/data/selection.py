"""Which requests a run edits and which it probes, chosen reproducibly from a dataset."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any


def select_requests(requests: Sequence[Mapping[str, Any]], n: int, n_probes: int, seed: int,
                    ) -> tuple[list[str], list[str]]:
    """`n` requests to edit, one per subject (two edits of one subject in a batch would ask one key
    for two values), and `n_probes` unrelated requests whose subjects are never edited."""
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    chosen, subjects = [], set()
    for i in order:
        if len(chosen) == n:
            break
        if requests[i]["subject"] not in subjects:
            chosen.append(i)
            subjects.add(requests[i]["subject"])
    if len(chosen) < n:
        raise ValueError(f"dataset has only {len(chosen)} requests with distinct subjects; asked for n={n}")
    probes = [i for i in order if requests[i]["subject"] not in subjects][:n_probes]
    return [requests[i]["request_id"] for i in chosen], [requests[i]["request_id"] for i in probes]


def with_known_targets(requests: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The first `n` requests (in order, distinct subjects, with a true object) whose `target_new` is
    the true object of another chosen request: an organism learns every target as some fact's object,
    so no edit asks for an answer it has never produced (never-seen targets keep untrained output
    embeddings; ORGANISM.md measured ES 0.06 against 0.79). ValueError if the requests hold fewer."""
    pool, subjects = [], set()
    for r in requests:
        if r.get("target_true") and r["subject"] not in subjects:
            subjects.add(r["subject"])
            pool.append(r)
    trues = {r["target_true"] for r in pool}
    candidates = [r for r in pool if r["target_new"] in trues]
    chosen, nxt = candidates[:n], n
    while True:
        known = {r["target_true"] for r in chosen}
        kept = [r for r in chosen if r["target_new"] in known]
        if len(kept) == len(chosen) == n:
            return chosen
        if nxt >= len(candidates) and len(kept) == len(chosen):
            break
        chosen = kept + candidates[nxt: nxt + n - len(kept)]
        nxt += n - len(kept)
    raise ValueError(f"only {len(chosen)} requests have targets that other requests hold as true objects; asked for {n}")
