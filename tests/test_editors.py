"""Keys, targets, covariance, deltas and whole edits on a tiny random GPT-2 with a trained BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engramflow import editors
from engramflow.editors.adapters import adapter_for
from engramflow.editors.covariance import partial_stats, reduce_stats, shard_texts
from engramflow.editors.delta import Delta, DeltaError
from engramflow.editors.keys import compute_keys, encode, fact_position, subject_span
from engramflow.editors.requests import RequestError, as_requests
from engramflow.editors.targets import (
    PromptChunk,
    add_at_positions,
    build_prompts,
    compute_targets,
    length_groups,
)

CORPUS = [
    "Anna Berg was born in Paris.", "Tom Vale works for Acme Labs.", "The city of Rome is in Italy.",
    "Jr. Smith plays the violin.", "Berlin is the capital of Germany.", "Lena Kors speaks Dutch.",
    "Mark Jr. was born in Oslo.", "Vira Holt plays the piano in Rome.", "Acme Labs is based in Berlin.",
]
REQUESTS = [
    {"request_id": "a", "prompt": "{} was born in", "subject": "Anna Berg", "target_new": "Rome"},
    {"request_id": "b", "prompt": "Tom Vale works for", "subject": "Tom Vale", "target_new": "Italy"},
    {"request_id": "c", "prompt": "{} plays the", "subject": "Mark Jr.", "target_new": "piano"},
]
# fact_token "last": on a random model attention barely carries a subject-token change to the
# last position, so edits that must take are made where the prediction is read.
TAKES = {"fact_token": "last", "context_spec": [[3, 2]], "v_weight_decay": 1e-3, "clamp_norm_factor": 50.0,
         "v_num_grad_steps": 20, "mom2_update_weight": 1.0, "ft_lr": 1e-2, "ft_norm_bound": 1.0}


@pytest.fixture(scope="module")
def tok() -> T.PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    return T.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tok: T.PreTrainedTokenizerFast) -> T.GPT2LMHeadModel:
    torch.manual_seed(0)
    # initializer_range 0.2: at GPT-2's 0.02 a random model's outputs barely depend on its input.
    cfg = T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128,
                       bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return T.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def stats(model, tok) -> dict[int, editors.SecondMoment]:
    wikitext = Path(__file__).resolve().parents[2] / "shared/data/wikitext/wikitext-2-raw-v1.wiki.test.raw.gz"
    return editors.layer_stats(model, tok, [0, 1, 2], wikitext, max_tokens=3000)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def log_prob(model, tok, prompt: str, target: str) -> torch.Tensor:
    """Log-probabilities of the next token after `prompt`, and the id of target's first token."""
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        return model(ids).logits[0, -1].log_softmax(-1), tok(" " + target).input_ids[0]


# --- requests and keys -------------------------------------------------------------------------
def test_requests_fill_templates_and_name_bad_records() -> None:
    reqs = as_requests(REQUESTS)
    assert reqs[0].prompt == "Anna Berg was born in" and reqs[0].request_id == "a"
    with pytest.raises(RequestError, match="request x .*'target_new'"):
        as_requests([{"request_id": "x", "prompt": "{} is", "subject": "A", "target_new": ""}])
    with pytest.raises(RequestError, match="request 0 .*not in prompt"):
        as_requests([{"prompt": "B is", "subject": "A", "target_new": "C"}])


def test_subject_tokens_come_from_character_offsets(tok) -> None:
    prompt = "Hi Mark Jr. was born in"
    ids, offsets = encode(tok, prompt)
    s, e = subject_span(prompt, "Mark Jr.")
    last = fact_position(offsets, len(ids), s, e, "subject_last")
    first = fact_position(offsets, len(ids), s, e, "subject_first")
    assert offsets[last][0] <= e - 1 < offsets[last][1]  # the token holding the subject's last "."
    assert "M" in prompt[offsets[first][0]: offsets[first][1]]
    assert fact_position(offsets, len(ids), s, e, "last") == len(ids) - 1


def test_keys_are_batched_over_requests_and_averaged_over_prefixes(model, tok) -> None:
    reqs = as_requests(REQUESTS)
    prefixes = ["", "The cat sat. ", "Because it rained. "]
    batched = compute_keys(model, tok, reqs, [0, 2], prefixes, batch_size=4)
    assert batched[0].shape == (128, 3) and batched[2].shape == (128, 3)
    for i, req in enumerate(reqs):
        per_prefix = [compute_keys(model, tok, [req], [2], [p])[2] for p in prefixes]
        torch.testing.assert_close(batched[2][:, i: i + 1], torch.stack(per_prefix).mean(0), rtol=1e-4, atol=1e-5)


# --- targets -----------------------------------------------------------------------------------
def test_batched_targets_match_one_at_a_time(model, tok) -> None:
    reqs = as_requests(REQUESTS)
    kw = dict(v_num_grad_steps=8, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0)
    prefixes = ["", "The cat sat. "]
    batched = compute_targets(model, tok, reqs, 1, prefixes, chunk_size=3, **kw)
    for i, req in enumerate(reqs):
        alone = compute_targets(model, tok, [req], 1, prefixes, **kw)
        torch.testing.assert_close(batched.delta[:, i], alone.delta[:, 0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(batched.loss[i], alone.loss[0], rtol=1e-3, atol=1e-4)
    assert batched.delta.norm() > 0


def test_targets_read_the_tokens_before_the_fact_token_from_a_cache(model, tok) -> None:
    """Tokens before the fact token never see δ, so their keys and values are cached and only the rest
    is run: the scored hidden states must equal a whole-sequence forward, and a prompt that starts
    with a one-token subject (nothing to cache) must still get its own target."""
    first = {"request_id": "d", "prompt": "{} is in", "subject": "X", "target_new": "Germany"}
    reqs = as_requests([*REQUESTS, first])
    p = build_prompts(tok, reqs, ["", "The cat sat. "], "subject_last")
    assert 0 in p.fact_pos  # "X is in" without a BOS token: the fact token is the first
    idx = [i for i in range(len(p.seqs)) if p.fact_pos[i] > 0]
    whole = PromptChunk.build(p, idx, torch.device("cpu"))
    split = PromptChunk.build(p, idx, torch.device("cpu"), split_at_fact=True)
    assert split.ids.shape[1] < whole.ids.shape[1]
    delta = torch.randn(len(reqs), model.config.n_embd, generator=torch.Generator().manual_seed(0))
    read = []
    split.cache_prefix(model)
    replayed = PromptChunk.build(p, idx, torch.device("cpu"), split_at_fact=True)
    replayed.cache_prefix(model)
    replayed.record_blocks(model, 1)  # blocks 0 and 1 replayed: only block 2 runs
    calls = []
    blocks = [adapter_for(model).block(model, i) for i in range(3)]
    handle = blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        for c in (whole, split, replayed):
            with c.replaying(model), add_at_positions(model, 1, c.rows, c.fact_pos, delta[c.owner]), torch.no_grad():
                hidden = c.final_hidden(model)
            read.append(torch.cat([hidden[c.t_seq, c.t_pos], hidden[c.kl_rows, c.kl_last]]))
    finally:
        handle.remove()
    assert len(calls) == 2  # block 0 computed for `whole` and `split`, replayed for `replayed`
    assert [adapter_for(model).block(model, i) for i in range(3)] == blocks  # the blocks are back
    torch.testing.assert_close(read[1], read[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(read[2], read[0], rtol=1e-4, atol=1e-5)
    kw = dict(v_num_grad_steps=8, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0)
    batched = compute_targets(model, tok, reqs, 1, ["", "The cat sat. "], **kw)
    alone = compute_targets(model, tok, reqs[-1:], 1, ["", "The cat sat. "], **kw)
    torch.testing.assert_close(batched.delta[:, -1], alone.delta[:, 0], rtol=1e-3, atol=1e-4)
    assert alone.delta.norm() > 0



def test_cached_targets_are_optimised_once_per_request_and_weights(model, tok, tmp_path) -> None:
    """A target is cached per request, so a later batch that shares requests with an earlier one (the
    first batch of another algorithm, a solver sweep) optimises only the new ones, and gets the same
    targets it would get without the cache; other weights recompute."""
    from engramflow.editors.cache import RequestCache
    from engramflow.editors.targets import cached_targets

    reqs = as_requests(REQUESTS)
    kw = dict(v_num_grad_steps=8, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0)
    prefixes = ["", "The cat sat. "]
    cache = RequestCache(tmp_path)
    first = cached_targets(model, tok, reqs[:2], 1, prefixes, cache, **kw)
    assert first.steps > 0 and len(list(tmp_path.rglob("*.safetensors"))) == 2
    again = cached_targets(model, tok, reqs[1::-1], 1, prefixes, cache, **kw)  # same requests, other order
    assert again.steps == 0
    torch.testing.assert_close(again.delta, first.delta.flip(1))
    mixed = cached_targets(model, tok, reqs, 1, prefixes, cache, **kw)  # two cached, one new
    fresh = compute_targets(model, tok, reqs, 1, prefixes, **kw)
    assert mixed.steps > 0
    for got, want in ((mixed.delta, fresh.delta), (mixed.h, fresh.h), (mixed.loss, fresh.loss)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert cached_targets(model, tok, reqs[:1], 1, prefixes, cache, **{**kw, "v_lr": 0.25}).steps > 0
    with random_delta(model, layers=(1,)).applied(model):  # other weights
        assert cached_targets(model, tok, reqs[:1], 1, prefixes, cache, **kw).steps > 0


def test_a_solver_sweep_reads_its_targets_from_the_cache(model, tok, stats, tmp_path) -> None:
    """editors.edit with a target cache: a second MEMIT weight reuses the first run's targets and
    gives the update a cold run with that weight gives."""
    hp = {**TAKES, "layers": [1]}
    cache = editors.RequestCache(tmp_path)
    editors.edit(model, tok, REQUESTS[:2], method="memit", hparams=hp, stats=stats, cache=cache)
    written = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")}
    assert len(written) == 2
    sweep = {**hp, "mom2_update_weight": 10.0}
    warm = editors.edit(model, tok, REQUESTS[:2], method="memit", hparams=sweep, stats=stats, cache=cache)
    cold = editors.edit(model, tok, REQUESTS[:2], method="memit", hparams=sweep, stats=stats)
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")} == written
    torch.testing.assert_close(warm.matrix(1), cold.matrix(1), rtol=1e-3, atol=1e-5)

def test_targets_precomputed_in_shards_are_the_ones_the_edit_reads(model, tok, stats, tmp_path) -> None:
    """A batch's targets optimised in two disjoint shards (as the pipeline's parallel target tasks do)
    fill the cache the edit then reads, without optimising again, and give the update a cold edit gives."""
    hp = {**TAKES, "layers": [1]}
    cache = editors.RequestCache(tmp_path)
    steps = [editors.precompute(model, tok, shard, cache, method="emmet", hparams=hp)
             for shard in (REQUESTS[::2], REQUESTS[1::2])]
    assert all(s > 0 for s in steps)
    written = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")}
    assert len(written) == len(REQUESTS)
    assert editors.precompute(model, tok, REQUESTS, cache, method="emmet", hparams=hp) == 0
    warm = editors.edit(model, tok, REQUESTS, method="emmet", hparams=hp, stats=stats, cache=cache)
    cold = editors.edit(model, tok, REQUESTS, method="emmet", hparams=hp, stats=stats)
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")} == written
    torch.testing.assert_close(warm.matrix(1), cold.matrix(1), rtol=1e-3, atol=1e-5)
    # ROME optimises each request against the earlier ones' updates: nothing can be precomputed.
    assert editors.precompute(model, tok, REQUESTS, editors.RequestCache(tmp_path / "rome"),
                              method="rome", hparams=hp) == 0


def test_length_groups_bound_padding_and_rows() -> None:
    lengths = [2, 9, 3, 2, 8, 9, 2, 3, 4, 9, 2, 2]
    groups = length_groups(list(range(len(lengths))), lengths, max_rows=4)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width, real = max(lengths[i] for i in g), sum(lengths[i] for i in g)
        assert len(g) <= 4 and len(g) * width <= 1.25 * real
    assert len(length_groups([0, 1], [5, 5], max_rows=512)) == 1  # one request's prompts: one chunk


def test_target_norm_is_clamped(model, tok) -> None:
    reqs = as_requests(REQUESTS)
    t = compute_targets(model, tok, reqs, 1, [""], v_num_grad_steps=10, v_lr=5.0, v_weight_decay=0.0,
                        kl_factor=0.0, clamp_norm_factor=0.1)
    assert (t.delta.norm(dim=0) <= 0.1 * t.h.norm(dim=0) * (1 + 1e-5)).all()


# --- covariance --------------------------------------------------------------------------------
def test_sharded_statistics_reduce_to_the_whole(model, tok) -> None:
    whole = partial_stats(model, tok, [0, 2], CORPUS, batch_size=4)
    parts = reduce_stats(partial_stats(model, tok, [0, 2], shard, batch_size=2) for shard in shard_texts(CORPUS, 3))
    n_tokens = sum(len(tok(t).input_ids) for t in CORPUS)
    for layer in (0, 2):
        assert whole[layer].n == parts[layer].n == n_tokens
        assert whole[layer].sum_kk.dtype == torch.float64
        # float32 forward passes over differently padded batches: equal up to rounding
        torch.testing.assert_close(whole[layer].sum_kk, parts[layer].sum_kk, rtol=1e-4, atol=1e-5)
    one_layer = partial_stats(model, tok, 2, CORPUS)  # batches of 32: other float32 per-batch products
    torch.testing.assert_close(one_layer[2].C, whole[2].C, rtol=1e-5, atol=1e-7)


def test_statistics_stop_at_max_tokens_and_are_cached(model, tok, tmp_path) -> None:
    first = editors.layer_stats(model, tok, [1], CORPUS, max_tokens=20, cache_dir=tmp_path)
    assert first[1].n == 20
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = editors.layer_stats(model, tok, [1], CORPUS, max_tokens=20, cache_dir=tmp_path)
    assert torch.equal(first[1].sum_kk, again[1].sum_kk) and again[1].n == 20
    other = editors.layer_stats(model, tok, [1], CORPUS, max_tokens=30, cache_dir=tmp_path)
    assert other[1].n == 30 and len(list(tmp_path.glob("*.safetensors"))) == 2


# --- deltas ------------------------------------------------------------------------------------
def random_delta(model, layers=(0, 2), rank=3) -> Delta:
    a = adapter_for(model)
    g = torch.Generator().manual_seed(3)
    return Delta({layer: (torch.randn(a.d_model(model), rank, generator=g),
                          torch.randn(a.d_mlp(model), rank, generator=g) * 0.1) for layer in layers})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_revert_restores_weights_bit_for_bit(model, dtype) -> None:
    m = T.GPT2LMHeadModel(model.config).to(dtype).eval()
    before = weights(m)
    d = random_delta(m)
    d.apply(m)
    assert not torch.equal(m.transformer.h[0].mlp.c_proj.weight, before["transformer.h.0.mlp.c_proj.weight"])
    d.revert(m)
    after = weights(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_adds_u_v_transpose_and_reverts_are_last_in_first_out(model) -> None:
    m = T.GPT2LMHeadModel(model.config).eval()
    a = adapter_for(m)
    W = a.down_weight(m, 0).clone()
    first, second = random_delta(m), random_delta(m, layers=(0,), rank=1)
    first.apply(m)
    torch.testing.assert_close(a.down_weight(m, 0), W + first.matrix(0))
    with pytest.raises(DeltaError, match="layer 0: delta already applied"):
        first.apply(m)
    second.apply(m)
    with pytest.raises(DeltaError, match="layer 0: weight changed"):
        first.revert(m)
    second.revert(m)
    first.revert(m)
    assert torch.equal(a.down_weight(m, 0), W)


def test_delta_save_load_round_trip(model, tmp_path) -> None:
    d = random_delta(model)
    d.algorithm, d.request_ids, d.meta = "memit", ["a", "b"], {"layers": [0, 2]}
    d.save(tmp_path / "d.safetensors")
    back = Delta.load(tmp_path / "d.safetensors")
    assert back.algorithm == "memit" and back.request_ids == ["a", "b"] and back.layers == [0, 2]
    for layer in d.layers:
        assert torch.equal(back.factors[layer][0], d.factors[layer][0])
        assert torch.equal(back.factors[layer][1], d.factors[layer][1])
    assert back.frobenius_norms() == pytest.approx({k: float(d.matrix(k).norm()) for k in d.layers}, rel=1e-5)


def test_overlay_computes_what_applying_computes(model, tok) -> None:
    d = random_delta(model)
    ids = torch.tensor([tok("Anna Berg was born in").input_ids])
    with torch.no_grad(), d.overlaid(model):
        hooked = model(ids).logits
    with torch.no_grad(), d.applied(model):
        applied = model(ids).logits
    torch.testing.assert_close(hooked, applied, rtol=1e-4, atol=1e-4)


# --- whole edits -------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,layers", [
    ("rome", [1]), ("emmet", [1]), ("memit", [0, 1]), ("alphaedit", [0, 1]), ("ft", [1])])
def test_edit_takes_and_leaves_the_model_alone(model, tok, stats, algorithm: str, layers: list[int]) -> None:
    before = weights(model)
    hp = {**TAKES, "layers": layers}
    if algorithm == "alphaedit":  # a random model's keys span every direction: take the lower half
        hp["nullspace_threshold"] = float(torch.linalg.eigvalsh(stats[0].C).median())
    delta = editors.edit(model, tok, REQUESTS[:2], method=algorithm, hparams=hp, stats=stats)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert delta.algorithm == algorithm and delta.layers == layers and delta.request_ids == ["a", "b"]
    with delta.applied(model):
        for req in REQUESTS[:2]:
            prompt = req["prompt"].replace("{}", req["subject"])
            logp, target = log_prob(model, tok, prompt, req["target_new"])
            assert int(logp.argmax()) == target, (algorithm, req["request_id"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rome_update_puts_the_key_on_its_target_value(model, tok, stats) -> None:
    """ROME's equality constraint on a real model: W_new k = W k + (z − h) at the edited layer, exactly
    at the bare prompt's key (the reference's denominator; the direction comes from the averaged key)."""
    req = as_requests(REQUESTS[:1])
    hp = editors.hparams.from_mapping({**TAKES, "layers": [1]})
    delta = editors.edit(model, tok, REQUESTS[:1], method="rome", hparams=hp, stats=stats)
    prefixes = editors.keys.context_prefixes(model, tok, hp.context_spec, hp.seed)
    k = compute_keys(model, tok, req, [1], [""], "last")[1][:, 0]
    W = adapter_for(model).down_weight(model, 1).detach()
    U, V = delta.factors[1]
    moved = (W + U @ V.T) @ k - W @ k
    t = compute_targets(model, tok, req, 1, prefixes, v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr,
                        v_weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
                        clamp_norm_factor=hp.clamp_norm_factor, fact_token="last")
    assert (moved - t.delta[:, 0]).norm() / t.delta[:, 0].norm() < 1e-5
    k_avg = compute_keys(model, tok, req, [1], prefixes, "last")[1][:, 0]  # the averaged key: only a share
    assert ((W + U @ V.T) @ k_avg - W @ k_avg - t.delta[:, 0]).norm() / t.delta[:, 0].norm() > 1e-3


def test_unknown_algorithm_and_missing_stats_are_clear_errors(model, tok) -> None:
    with pytest.raises(ValueError, match="unknown method 'rom'"):
        editors.edit(model, tok, REQUESTS, method="rom", hparams={"layers": [1]})
    with pytest.raises(ValueError, match="needs covariance statistics"):
        editors.edit(model, tok, REQUESTS, method="memit", hparams={"layers": [1]})
    with pytest.raises(ValueError, match="unknown hyper-parameters.*'v_steps'"):
        editors.edit(model, tok, REQUESTS, method="memit", hparams={"layers": [1], "v_steps": 3})


def test_every_preset_loads() -> None:
    for path in sorted(editors.hparams.PRESETS.glob("*.yaml")):
        algorithm, model_name = path.stem.split("-", 1)
        assert algorithm in editors.METHODS, path.name
        assert editors.load_preset(algorithm, model_name).layers, path.name


def test_statistics_exclusion_removes_exactly_the_listed_texts(model, tok) -> None:
    """Σ k kᵀ over the corpus minus Σ k kᵀ with the sentences naming the edited subjects left out equals
    Σ k kᵀ over exactly those sentences' keys (the sum check): nothing else moves, nothing of them stays."""
    from engramflow.editors.covariance import without

    subjects = [r["subject"] for r in REQUESTS]  # Anna Berg, Tom Vale, Mark Jr.
    corpus = [*CORPUS, "Anna Berg was born in Paris. Lena Kors speaks Dutch. Tom Vale works for Acme Labs."]
    full = partial_stats(model, tok, [1], corpus)
    kept = partial_stats(model, tok, [1], corpus, exclude=subjects)
    only = partial_stats(model, tok, [1], corpus, exclude=subjects, mentions_only=True)
    n_mentioned = sum(len(tok(t)["input_ids"]) for t in CORPUS if any(s in t for s in subjects)) + len(
        tok("Anna Berg was born in Paris.")["input_ids"]) + len(tok(" Tom Vale works for Acme Labs.")["input_ids"])
    assert only[1].n == n_mentioned and full[1].n == kept[1].n + only[1].n
    torch.testing.assert_close(full[1].sum_kk - kept[1].sum_kk, only[1].sum_kk, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(without(full, only)[1].sum_kk, kept[1].sum_kk, rtol=1e-5, atol=1e-4)
    # within a budget of tokens, the sum check holds over the same prefix of the stream
    cut = partial_stats(model, tok, [1], corpus, max_tokens=40)
    cut_only = partial_stats(model, tok, [1], corpus, max_tokens=40, exclude=subjects, mentions_only=True)
    cut_kept = partial_stats(model, tok, [1], corpus, max_tokens=40, exclude=subjects)
    assert cut[1].n == 40 == cut_kept[1].n + cut_only[1].n
    torch.testing.assert_close(cut[1].sum_kk - cut_only[1].sum_kk, cut_kept[1].sum_kk, rtol=1e-5, atol=1e-4)


def test_statistics_count_samples_like_the_references(model, tok) -> None:
    """mom2_n_samples counts texts (the references' unit), mom2_n_tokens counts keys."""
    by_texts = partial_stats(model, tok, [1], CORPUS, max_samples=4)[1]
    first_four = partial_stats(model, tok, [1], CORPUS[:4])[1]
    assert by_texts.n == first_four.n
    torch.testing.assert_close(by_texts.sum_kk, first_four.sum_kk)
    assert partial_stats(model, tok, [1], CORPUS, max_tokens=10)[1].n == 10


def test_alphaedit_keeps_the_keys_of_its_earlier_edits(model, tok, stats) -> None:
    """Sequential AlphaEdit carries K_p: the second batch, given the first's delta as history, moves the
    first batch's keys far less than the same batch edited without it, and still edits."""
    hp = {**TAKES, "layers": [1], "nullspace_threshold": 0.5, "alphaedit_l2": 1.0}
    first = editors.edit(model, tok, REQUESTS[:2], method="alphaedit", hparams=hp, stats=stats)
    assert first.keys[1].shape[1] == 2
    with first.applied(model):
        second = editors.edit(model, tok, REQUESTS[2:], method="alphaedit", hparams=hp, stats=stats,
                              history=[first])
        alone = editors.edit(model, tok, REQUESTS[2:], method="alphaedit", hparams=hp, stats=stats)
    K_p = first.keys[1]
    kept, moved = (second.matrix(1) @ K_p).norm(), (alone.matrix(1) @ K_p).norm()
    assert kept < 0.5 * moved and second.matrix(1).norm() > 0
    # stored and read back with its keys
    back = editors.from_safetensors(*editors.to_safetensors(first))
    torch.testing.assert_close(back.keys[1], first.keys[1])
