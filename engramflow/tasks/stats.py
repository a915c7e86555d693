"""Covariance statistics stage: one task per corpus shard returns partial sums Σ k kᵀ for every
edited layer (one forward pass serves all layers), a reduction sums them.

Each (model, layer, corpus, shard) partial is stored once and recorded in the `stats` table, so a
killed run recomputes only the shards it had not finished, and later runs reuse finished statistics.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow.ledger import Version, default_store, materialize, stable_id
from engramflow.runtime import retry_on_worker_loss
from engramflow.storage import Store


def corpus_texts(corpus: str) -> list[str]:
    """The texts of a corpus: an embedded world's (`world`, `world-tiny`) or a text file (.gz ok)."""
    from engramflow.data.world import named_world
    from engramflow.editors.covariance import iter_texts

    world = named_world(corpus)
    return world.corpus_text().splitlines() if world is not None else list(iter_texts(corpus))


def excluded_id(subjects: list[str]) -> str | None:
    """A short id of the subjects whose sentences a statistic sums alone (None: the whole sample)."""
    return stable_id("x", sorted(set(subjects))) if subjects else None


def stats_id(base_model: str, layer: int, corpus: str, shard: int, n_shards: int, max_tokens: int | None,
             max_samples: int | None = None, excluded: str | None = None) -> str:
    extra = () if max_samples is None and excluded is None else (max_samples, excluded)
    return stable_id("stats", base_model, layer, corpus, shard, n_shards, max_tokens, *extra)


def recorded_stats(store: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
    """stats id -> its newest row whose tensor is in the store (a quarantined tensor is recomputed)."""
    table = store.read("stats", filter=pc.field("stats_id").isin(ids))
    rows = sorted(table.to_pylist(), key=lambda row: row["created_at"])
    return {row["stats_id"]: row for row in rows if store.has_tensors(row["tensor_key"])}


@task(name="covariance-shard", cache_policy=NO_CACHE)
def stats_shard(base: Version, layers: list[int], corpus: str, shard: int, n_shards: int,
                max_tokens: int | None, max_samples: int | None = None, mentions_of: list[str] | None = None,
                ) -> dict[int, str]:
    """Partial second moments of shard `shard` of `n_shards` (at most `max_tokens` keys or `max_samples`
    texts in all shards together): layer -> stats id (computed only if not recorded already). With
    `mentions_of` (subjects), only the keys of the sentences that mention them, from the same sample:
    what a batch's exclusion subtracts. A shard whose sample mentions none of them records n = 0."""
    import torch

    from engramflow.editors.covariance import NoMentions, partial_stats, shard_texts

    store = default_store()
    excluded = excluded_id(mentions_of or [])
    ids = {layer: stats_id(base.base_model, layer, corpus, shard, n_shards, max_tokens, max_samples, excluded)
           for layer in layers}
    done = recorded_stats(store, list(ids.values()))
    todo = [layer for layer in layers if ids[layer] not in done]
    if todo:
        model, tok = materialize(store, base)
        texts = shard_texts(corpus_texts(corpus), n_shards)[shard]
        per_shard = None if max_tokens is None else max(1, max_tokens // n_shards)
        samples = None if max_samples is None else max(1, max_samples // n_shards)
        try:
            partial = partial_stats(model, tok, todo, texts, max_tokens=per_shard, max_samples=samples,
                                    exclude=mentions_of or (), mentions_only=bool(mentions_of))
        except NoMentions:
            from engramflow.editors.adapters import adapter_for
            from engramflow.editors.covariance import SecondMoment

            d_mlp = adapter_for(model).d_mlp(model)
            partial = {layer: SecondMoment(torch.zeros(d_mlp, d_mlp, dtype=torch.float64), 0) for layer in todo}
        rows = []
        for layer, moment in partial.items():
            key = _put_moment(store, moment, f"layer {layer}, shard {shard}/{n_shards} of corpus {corpus!r}")
            rows.append({"stats_id": ids[layer], "base_model": base.base_model, "layer": layer, "corpus": corpus,
                         "shard": shard, "n_shards": n_shards, "max_tokens": max_tokens, "max_samples": max_samples,
                         "excluded": excluded, "n": moment.n, "tensor_key": key})
        # Two runs may compute the same shard at once: its row is written once.
        store.append_once("stats", rows, "stats_id", valid=lambda row: store.has_tensors(row["tensor_key"]))
    return ids


def _put_moment(store: Store, moment: Any, what: str) -> str:
    """Store a second moment; ValueError naming `what` if it has non-finite entries (never stored)."""
    from engramflow.storage import NonFiniteTensorError

    try:
        return store.put_tensors({"sum_kk": moment.sum_kk.contiguous()}, {"n": str(moment.n)})
    except NonFiniteTensorError:
        raise ValueError(f"covariance statistics of {what} have NaN or infinite entries; not stored") from None


@task(name="covariance-reduce", cache_policy=NO_CACHE)
def stats_reduce(shard_ids: list[dict[int, str]]) -> dict[int, str]:
    """Sum the shards' partials per layer; layer -> tensor key of the reduced Σ k kᵀ (metadata n)."""
    from engramflow.editors.covariance import SecondMoment, reduce_stats

    store = default_store()
    rows = recorded_stats(store, [i for ids in shard_ids for i in ids.values()])
    partials = []
    for ids in shard_ids:
        part = {}
        for layer, sid in ids.items():
            row = rows[sid]
            part[int(layer)] = SecondMoment(store.get_tensors(row["tensor_key"])["sum_kk"], int(row["n"]))
        partials.append(part)
    return {layer: _put_moment(store, m, f"layer {layer} (all shards)") for layer, m in reduce_stats(partials).items()}


def load_moments(store: Store, keys: dict[int, str], minus: dict[int, str] | None = None) -> dict[int, Any]:
    """layer -> SecondMoment from the reduced statistics' tensor keys, less the keys of `minus` (a batch's
    mentions of its subjects, summed over the same sample)."""
    from engramflow.editors.covariance import SecondMoment, without

    def read(keys: dict[int, str]) -> dict[int, Any]:
        moments = {}
        for layer, key in keys.items():
            tensors, metadata = store.load_tensors(key)
            moments[int(layer)] = SecondMoment(tensors["sum_kk"], int(metadata["n"]))
        return moments

    return without(read(keys), read(minus)) if minus else read(keys)


# A shard's row is written once (`append_once`) and a reduction is content-addressed: both are safe to rerun.
retry_on_worker_loss(stats_shard)
retry_on_worker_loss(stats_reduce)
