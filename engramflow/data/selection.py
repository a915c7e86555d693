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
