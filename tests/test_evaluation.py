"""Metric definitions on a tiny random GPT-2 with a tiny trained BPE."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from engramflow.editors import metrics
from engramflow.editors.adapters import adapter_for

PROMPT = "The capital of France is"


@pytest.fixture()
def model(tiny_tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def _reference_logprob(model, tok, prompt: str, target: str) -> float:
    """Sum of target-token log-probs, one unbatched forward, prompt and ' target' tokenized apart."""
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(" " + target)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    return sum(logp[len(prompt_ids) + i - 1, t].item() for i, t in enumerate(target_ids)) / len(target_ids)


def _request(**fields):
    base = {
        "request_id": "r0",
        "prompt": "The capital of {} is",
        "subject": "France",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrase_prompts": ["Lyon is a city in France. The capital of France is"],
        "neighborhood": [{"prompt": "The capital of Italy is", "target": "Rome"}],
        "generation_prompts": ["Apple was founded by", "Danielle Darrieux speaks"],
    }
    return {**base, **fields}


def test_target_scores_match_an_unbatched_reference(model, tiny_tokenizer) -> None:
    pairs = [(PROMPT, "Paris"), (PROMPT, "Rome, Italy"), ("Steve Jobs founded", "Apple in California")]
    for (prompt, target), score in zip(pairs, metrics.score_targets(model, tiny_tokenizer, pairs, batch_size=2), strict=True):
        assert score.target == tuple(tiny_tokenizer(" " + target)["input_ids"])
        assert -score.nll == pytest.approx(_reference_logprob(model, tiny_tokenizer, prompt, target), abs=1e-5)


def test_es_and_em_follow_the_probability_comparison(model, tiny_tokenizer) -> None:
    low, high = sorted(
        ["Paris", "Rome", "Kentucky lawyer"],
        key=lambda t: _reference_logprob(model, tiny_tokenizer, PROMPT, t),
    )[::2]
    p_high = math.exp(_reference_logprob(model, tiny_tokenizer, PROMPT, high))
    p_low = math.exp(_reference_logprob(model, tiny_tokenizer, PROMPT, low))
    for new, true, es in [(high, low, 1.0), (low, high, 0.0)]:
        rows = metrics.counterfact_metrics(model, tiny_tokenizer, [_request(target_new=new, target_true=true)])
        values = {row["metric"]: row["value"] for row in rows}
        assert values["es"] == es
        expected = p_high - p_low if es else p_low - p_high
        assert values["em"] == pytest.approx(expected, abs=1e-6)
        assert {row["protocol"] for row in rows} == {metrics.COUNTERFACT}
        assert set(values) == {"es", "ps", "ns", "em", "pm", "nm"}


def test_ns_compares_the_neighbours_own_target_with_the_new_one(model, tiny_tokenizer) -> None:
    prompt = "The capital of Italy is"
    lp = {t: _reference_logprob(model, tiny_tokenizer, prompt, t) for t in ("Rome", "Paris")}
    row = metrics.counterfact_metrics(model, tiny_tokenizer, [_request(target_new="Paris")])
    ns = next(r["value"] for r in row if r["metric"] == "ns")
    assert ns == float(lp["Rome"] > lp["Paris"])


def test_batched_equals_unbatched(model, tiny_tokenizer) -> None:
    requests = [
        _request(request_id="a"),
        _request(request_id="b", target_new="Apple", target_true="Rome, Italy"),
        _request(request_id="c", prompt="{} was born in", subject="Abraham Lincoln", target_new="Paris",
                 target_true="Kentucky", neighborhood=[]),
    ]
    pre = metrics.pre_edit_answers(model, tiny_tokenizer, requests)
    for fn, kwargs in [(metrics.counterfact_metrics, {}), (metrics.zsre_metrics, {"pre_answers": pre})]:
        one = fn(model, tiny_tokenizer, requests, batch_size=1, **kwargs)
        many = fn(model, tiny_tokenizer, requests, batch_size=64, **kwargs)
        assert [(r["request_id"], r["metric"]) for r in one] == [(r["request_id"], r["metric"]) for r in many]
        for a, b in zip(one, many, strict=True):
            assert a["value"] == pytest.approx(b["value"], abs=1e-5)
    assert not any(r["metric"] == "ns" and r["request_id"] == "c" for r in one)


def test_zsre_and_easyedit_token_accuracy_and_locality(model, tiny_tokenizer) -> None:
    request = _request(target_new="Rome, Italy")
    pre = metrics.pre_edit_answers(model, tiny_tokenizer, [request])
    same = {r["metric"]: r["value"] for r in metrics.zsre_metrics(model, tiny_tokenizer, [request], pre)}
    assert same["locality"] == 1.0  # the unedited model agrees with itself
    target_ids = tiny_tokenizer(" Rome, Italy")["input_ids"]
    with torch.no_grad():  # every logit 0: the argmax is token 0 everywhere
        model.transformer.wte.weight.zero_()
    flat = {r["metric"]: r["value"] for r in metrics.zsre_metrics(model, tiny_tokenizer, [request], pre)}
    assert flat["efficacy"] == sum(t == 0 for t in target_ids) / len(target_ids)
    pre_tokens = pre["r0"][0]
    assert flat["locality"] == sum(t == 0 for t in pre_tokens) / len(pre_tokens)
    easy = metrics.easyedit_metrics(model, tiny_tokenizer, [request], pre)
    assert {r["metric"] for r in easy} == {"easyedit_rel", "easyedit_gen", "easyedit_loc"}
    assert {r["protocol"] for r in easy} == {metrics.EASYEDIT}
    with pytest.raises(ValueError, match="pre_edit_answers"):
        metrics.zsre_metrics(model, tiny_tokenizer, [request], {})


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(model, tiny_tokenizer) -> None:
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied to lm_head: all logits 0
    texts = ["The capital of France is Paris.", "Toko Yasuda plays the guitar and the piano in Rome."]
    assert metrics.perplexity(model, tiny_tokenizer, texts, batch_size=1) == pytest.approx(len(tiny_tokenizer))


def test_perplexity_batched_equals_unbatched(model, tiny_tokenizer) -> None:
    texts = ["The capital of France is Paris.", "Lyon", "Abraham Lincoln was born in Kentucky and worked."]
    one = metrics.perplexity(model, tiny_tokenizer, texts, batch_size=1)
    assert metrics.perplexity(model, tiny_tokenizer, texts, batch_size=8) == pytest.approx(one, rel=1e-5)


def test_ngram_entropy_definition() -> None:
    assert metrics.ngram_entropy("a a a a a a") == 0.0
    # 5 distinct words: 4 distinct bigrams, 3 distinct trigrams, each uniform
    expected = (2 / 3 * math.log2(4) + 4 / 3 * math.log2(3)) / 2
    assert metrics.ngram_entropy("one two three four five") == pytest.approx(expected)


def test_generation_is_batch_invariant_and_gives_entropy(model, tiny_tokenizer) -> None:
    prompts = ["Apple", "The capital of France is", "Danielle Darrieux speaks French and"]
    one = metrics.generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert metrics.generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3) == one
    rows = metrics.generation_entropy_metrics(model, tiny_tokenizer, [_request()], max_new_tokens=8)
    assert [(r["metric"], r["protocol"]) for r in rows] == [("ge", metrics.COUNTERFACT)]
    texts = metrics.generate(model, tiny_tokenizer, _request()["generation_prompts"], max_new_tokens=8)
    expected = sum(metrics.ngram_entropy(p + t) for p, t in zip(_request()["generation_prompts"], texts, strict=True)) / 2
    assert rows[0]["value"] == pytest.approx(expected)


def test_summary_harmonic_score() -> None:
    rows = [
        {"request_id": str(i), "protocol": metrics.COUNTERFACT, "metric": m, "value": v}
        for i, (es, ps, ns) in enumerate([(1.0, 1.0, 0.5), (1.0, 0.5, 0.5)])
        for m, v in (("es", es), ("ps", ps), ("ns", ns))
    ]
    summary = metrics.summarize(rows)
    assert summary[(metrics.COUNTERFACT, "ps")] == 0.75
    assert summary[(metrics.COUNTERFACT, "s")] == pytest.approx(3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.5))
    assert metrics.harmonic_mean([1.0, 0.0]) == 0.0


def test_weight_norm_growth(model) -> None:
    adapter = adapter_for(model)
    original = adapter.down_weight(model, 1).detach().clone()
    adapter.add_to_down_weight(model, 1, 0.5 * original)
    rows = {r["metric"]: r["value"] for r in metrics.weight_norm_metrics(model, {1: original})}
    assert rows["norm_ratio"] == pytest.approx(1.5)
    assert rows["delta_rel"] == pytest.approx(0.5)


def test_prompt_template_is_filled_and_targets_must_exist(model, tiny_tokenizer) -> None:
    assert metrics.fill_prompt(_request()) == PROMPT
    with pytest.raises(ValueError, match="empty target"):
        metrics.score_targets(model, tiny_tokenizer, [(PROMPT, " ")])


def test_a_neighbour_that_another_edit_asks_is_left_out_of_ns(model, tiny_tokenizer) -> None:
    """In a run that edits both France and Italy, Italy's prompt is meant to move: the evaluation stage
    reads France's NS/NM on its other neighbour only; edited alone, France keeps both."""
    from engramflow.tasks.evaluate import score_version

    france = _request(neighborhood=[{"prompt": "The capital of Italy is", "target": "Rome"},
                                    {"prompt": "The capital of Spain is", "target": "Madrid"}],
                      generation_prompts=[])
    italy = _request(request_id="r1", subject="Italy", target_new="Paris", target_true="Rome",
                     paraphrase_prompts=[], neighborhood=[], generation_prompts=[])
    assert metrics.without_edited_neighbours([france, italy])[0]["neighborhood"] == [france["neighborhood"][1]]
    assert metrics.without_edited_neighbours([france])[0]["neighborhood"] == france["neighborhood"]

    def nm(edited: list[dict]) -> float:
        rows = score_version(model, tiny_tokenizer, {}, edited, [], ["The capital of Spain is Madrid."])
        return next(r["value"] for r in rows if r["request_id"] == "r0" and r["metric"] == "nm")

    def expected(neighbours: list[dict]) -> float:
        rows = metrics.counterfact_metrics(model, tiny_tokenizer, [{**france, "neighborhood": neighbours}])
        return next(r["value"] for r in rows if r["metric"] == "nm")

    assert nm([france, italy]) == pytest.approx(expected(france["neighborhood"][1:]))
    assert nm([france]) == pytest.approx(expected(france["neighborhood"]))
    assert expected(france["neighborhood"][1:]) != pytest.approx(expected(france["neighborhood"]))
