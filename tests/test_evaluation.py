"""The evaluators' metric definitions and the shared scoring machinery, on a tiny random GPT-2 with a
tiny trained BPE."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from engramflow.editors.adapters import adapter_for
from engramflow.editors.evaluation import EVALUATORS, EvalContext, get_evaluator, load_all, scoring, summarize
from engramflow.editors.evaluation.counterfact import without_edited_neighbours
from engramflow.editors.requests import Request, as_requests

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


def _score(name: str, model, tok, requests, reference=None, **context) -> list[dict]:
    """The rows of evaluator `name` on `requests` (the reference computed on `reference`, a model)."""
    evaluator = get_evaluator(name)
    ref = None
    if reference is not None and evaluator.needs_reference:
        ref = {name: evaluator.reference(reference, tok, as_requests(requests))}
    return evaluator(EvalContext(model, tok, edited=requests, reference=ref, **context))


def _values(rows: list[dict], request_id: str | None = None) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows if request_id is None or r["request_id"] == request_id}


def test_target_scores_match_an_unbatched_reference(model, tiny_tokenizer) -> None:
    pairs = [(PROMPT, "Paris"), (PROMPT, "Rome, Italy"), ("Steve Jobs founded", "Apple in California")]
    for (prompt, target), score in zip(pairs, scoring.score_targets(model, tiny_tokenizer, pairs, batch_size=2), strict=True):
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
        rows = _score("counterfact", model, tiny_tokenizer, [_request(target_new=new, target_true=true)])
        values = _values(rows)
        assert values["es"] == es
        expected = p_high - p_low if es else p_low - p_high
        assert values["em"] == pytest.approx(expected, abs=1e-6)
        assert {row["protocol"] for row in rows} == {"counterfact"}
        assert set(values) == {"es", "ps", "ns", "em", "pm", "nm"}


def test_ns_compares_the_neighbours_own_target_with_the_new_one(model, tiny_tokenizer) -> None:
    prompt = "The capital of Italy is"
    lp = {t: _reference_logprob(model, tiny_tokenizer, prompt, t) for t in ("Rome", "Paris")}
    row = _score("counterfact", model, tiny_tokenizer, [_request(target_new="Paris")])
    ns = next(r["value"] for r in row if r["metric"] == "ns")
    assert ns == float(lp["Rome"] > lp["Paris"])


def test_batched_equals_unbatched(model, tiny_tokenizer) -> None:
    requests = [
        _request(request_id="a"),
        _request(request_id="b", target_new="Apple", target_true="Rome, Italy"),
        _request(request_id="c", prompt="{} was born in", subject="Abraham Lincoln", target_new="Paris",
                 target_true="Kentucky", neighborhood=[]),
    ]
    for name in ("counterfact", "zsre"):
        one = _score(name, model, tiny_tokenizer, requests, reference=model, batch_size=1)
        many = _score(name, model, tiny_tokenizer, requests, reference=model, batch_size=64)
        assert [(r["request_id"], r["metric"]) for r in one] == [(r["request_id"], r["metric"]) for r in many]
        for a, b in zip(one, many, strict=True):
            assert a["value"] == pytest.approx(b["value"], abs=1e-5)
    assert not any(r["metric"] == "ns" and r["request_id"] == "c" for r in one)


def test_zsre_and_easyedit_token_accuracy_and_locality(model, tiny_tokenizer) -> None:
    request = _request(target_new="Rome, Italy")
    zsre = get_evaluator("zsre")
    pre = zsre.reference(model, tiny_tokenizer, as_requests([request]))
    same = _values(_score("zsre", model, tiny_tokenizer, [request], reference=model))
    assert same["locality"] == 1.0  # the unedited model agrees with itself
    target_ids = tiny_tokenizer(" Rome, Italy")["input_ids"]
    with torch.no_grad():  # every logit 0: the argmax is token 0 everywhere
        model.transformer.wte.weight.zero_()
    flat = _values(zsre(EvalContext(model, tiny_tokenizer, edited=[request], reference={"zsre": pre})))
    assert flat["efficacy"] == sum(t == 0 for t in target_ids) / len(target_ids)
    pre_tokens = pre["r0"][0]
    assert flat["locality"] == sum(t == 0 for t in pre_tokens) / len(pre_tokens)
    easy = get_evaluator("easyedit")(EvalContext(model, tiny_tokenizer, edited=[request], reference={"easyedit": pre}))
    assert {r["metric"] for r in easy} == {"easyedit_rel", "easyedit_gen", "easyedit_loc"}
    assert {r["protocol"] for r in easy} == {"easyedit"}
    with pytest.raises(ValueError, match="reference"):
        zsre(EvalContext(model, tiny_tokenizer, edited=[request]))
    with pytest.raises(ValueError, match="reference"):
        zsre(EvalContext(model, tiny_tokenizer, edited=[request], reference={"zsre": {}}))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(model, tiny_tokenizer) -> None:
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied to lm_head: all logits 0
    texts = ["The capital of France is Paris.", "Toko Yasuda plays the guitar and the piano in Rome."]
    assert scoring.perplexity(model, tiny_tokenizer, texts, batch_size=1) == pytest.approx(len(tiny_tokenizer))
    rows = get_evaluator("perplexity")(EvalContext(model, tiny_tokenizer, texts=texts))
    assert [(r["request_id"], r["protocol"], r["metric"]) for r in rows] == [(None, "model", "perplexity")]
    assert rows[0]["value"] == pytest.approx(len(tiny_tokenizer))
    with pytest.raises(ValueError, match="held-out texts"):
        get_evaluator("perplexity")(EvalContext(model, tiny_tokenizer))


def test_perplexity_batched_equals_unbatched(model, tiny_tokenizer) -> None:
    texts = ["The capital of France is Paris.", "Lyon", "Abraham Lincoln was born in Kentucky and worked."]
    one = scoring.perplexity(model, tiny_tokenizer, texts, batch_size=1)
    assert scoring.perplexity(model, tiny_tokenizer, texts, batch_size=8) == pytest.approx(one, rel=1e-5)


def test_ngram_entropy_definition() -> None:
    assert scoring.ngram_entropy("a a a a a a") == 0.0
    # 5 distinct words: 4 distinct bigrams, 3 distinct trigrams, each uniform
    expected = (2 / 3 * math.log2(4) + 4 / 3 * math.log2(3)) / 2
    assert scoring.ngram_entropy("one two three four five") == pytest.approx(expected)


def test_generation_is_batch_invariant_and_gives_entropy(model, tiny_tokenizer) -> None:
    prompts = ["Apple", "The capital of France is", "Danielle Darrieux speaks French and"]
    one = scoring.generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert scoring.generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3) == one
    fluency = dataclasses.replace(get_evaluator("fluency"), max_new_tokens=8)
    rows = fluency(EvalContext(model, tiny_tokenizer, edited=[_request()]))
    assert [(r["metric"], r["protocol"], r["request_id"]) for r in rows] == [("ge", "model", None)]
    texts = scoring.generate(model, tiny_tokenizer, _request()["generation_prompts"], max_new_tokens=8)
    expected = sum(scoring.ngram_entropy(p + t) for p, t in zip(_request()["generation_prompts"], texts, strict=True)) / 2
    assert rows[0]["value"] == pytest.approx(expected)
    assert fluency(EvalContext(model, tiny_tokenizer, edited=[_request(generation_prompts=[])])) == []


def test_summary_harmonic_score() -> None:
    rows = [
        {"request_id": str(i), "protocol": "counterfact", "metric": m, "value": v}
        for i, (es, ps, ns) in enumerate([(1.0, 1.0, 0.5), (1.0, 0.5, 0.5)])
        for m, v in (("es", es), ("ps", ps), ("ns", ns))
    ]
    summary = summarize(rows)
    assert summary[("counterfact", "ps")] == 0.75
    assert summary[("counterfact", "s")] == pytest.approx(3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.5))
    assert scoring.harmonic_mean([1.0, 0.0]) == 0.0
    # The same contract as report.harmonic, so the report can use this one.
    assert scoring.harmonic_mean([1.0, None]) is None and scoring.harmonic_mean([1.0, math.nan]) is None


def test_weight_norm_growth(model, tiny_tokenizer) -> None:
    adapter = adapter_for(model)
    original = adapter.down_weight(model, 1).detach().clone()
    adapter.add_to_down_weight(model, 1, 0.5 * original)
    rows = get_evaluator("norms")(EvalContext(model, tiny_tokenizer, originals={1: original}))
    assert {(r["request_id"], r["protocol"]) for r in rows} == {(None, "model")}
    values = _values(rows)
    assert values["norm_ratio.L1"] == pytest.approx(1.5)
    assert values["rel_norm.L1"] == pytest.approx(0.5)
    assert get_evaluator("norms")(EvalContext(model, tiny_tokenizer)) == []  # an unedited model


def test_prompt_template_is_filled_and_targets_must_exist(model, tiny_tokenizer) -> None:
    assert Request.from_mapping(_request()).prompt == PROMPT
    with pytest.raises(ValueError, match="empty target"):
        scoring.score_targets(model, tiny_tokenizer, [(PROMPT, " ")])


def test_a_neighbour_that_another_edit_asks_is_left_out_of_ns(model, tiny_tokenizer) -> None:
    """In a run that edits both France and Italy, Italy's prompt is meant to move: the counterfact
    protocol reads France's NS/NM on its other neighbour only; edited alone, France keeps both."""
    france = _request(neighborhood=[{"prompt": "The capital of Italy is", "target": "Rome"},
                                    {"prompt": "The capital of Spain is", "target": "Madrid"}],
                      generation_prompts=[])
    italy = _request(request_id="r1", subject="Italy", target_new="Paris", target_true="Rome",
                     paraphrase_prompts=[], neighborhood=[], generation_prompts=[])
    neighbours = as_requests([france])[0].neighborhood
    assert without_edited_neighbours(as_requests([france, italy]))[0].neighborhood == neighbours[1:]
    assert without_edited_neighbours(as_requests([france]))[0].neighborhood == neighbours

    def nm(edited: list[dict], **context) -> float:
        return _values(_score("counterfact", model, tiny_tokenizer, edited, **context), "r0")["nm"]

    def expected(kept: list[dict]) -> float:
        return nm([{**france, "neighborhood": kept}], asked=frozenset())

    assert nm([france, italy]) == pytest.approx(expected(france["neighborhood"][1:]))
    assert nm([france]) == pytest.approx(expected(france["neighborhood"]))
    assert expected(france["neighborhood"][1:]) != pytest.approx(expected(france["neighborhood"]))
    # Italy edited but not scored (a method's `scored` left it out): its prompt is still asked.
    asked = frozenset({"The capital of Italy is"})
    assert nm([france], asked=asked) == pytest.approx(expected(france["neighborhood"][1:]))


def test_every_evaluator_says_what_it_measures_and_where_from() -> None:
    load_all()
    assert {"counterfact", "zsre", "easyedit", "knowedit", "mquake", "fluency", "perplexity", "probe",
            "routing", "norms"} <= set(EVALUATORS)
    for name, evaluator in EVALUATORS.items():
        assert evaluator.name == name and evaluator.protocol
        assert len(evaluator.source.strip()) > 10 and "\n" not in evaluator.source, name
        assert evaluator.metrics and all(m and d.strip() for m, d in evaluator.metrics.items()), name
    # The names the stored queries and reports read.
    assert {n: EVALUATORS[n].protocol for n in ("counterfact", "probe", "fluency", "perplexity", "norms",
                                               "routing")} == {
        "counterfact": "counterfact", "probe": "probe", "fluency": "model", "perplexity": "model",
        "norms": "model", "routing": "scen"}
    with pytest.raises(ValueError, match="known: .*counterfact"):
        get_evaluator("nope")


def test_probe_top1_reads_the_first_token_of_the_true_object(model, tiny_tokenizer) -> None:
    probes = [_request(request_id="p0", target_true="Paris"), _request(request_id="p1", target_true="Rome, Italy")]
    rows = get_evaluator("probe")(EvalContext(model, tiny_tokenizer, probes=probes))
    scores = scoring.score_targets(model, tiny_tokenizer, [(PROMPT, "Paris"), (PROMPT, "Rome, Italy")])
    assert [(r["request_id"], r["protocol"], r["metric"]) for r in rows] == [("p0", "probe", "top1"),
                                                                            ("p1", "probe", "top1")]
    assert [r["value"] for r in rows] == [float(s.predicted[0] == s.target[0]) for s in scores]


def test_routing_without_a_bank_routes_nothing(model, tiny_tokenizer) -> None:
    """The unedited model of a SCEN run has no bank: no edit prompt reaches an expert, every probe
    reaches none (the baseline the bank starts from)."""
    rows = get_evaluator("routing")(EvalContext(model, tiny_tokenizer, edited=[_request()],
                                                probes=[_request()]))
    assert [(r["metric"], r["value"]) for r in rows] == [("routing", 0.0), ("probe_routing", 1.0)]


def test_knowedit_portability_reads_either_format(model, tiny_tokenizer) -> None:
    knowedit = {"portability": {"Reasoning": [{"prompt": "The capital of Italy is", "ground_truth": ["Rome"]}],
                                "Subject_Aliasing": [{"prompt": PROMPT, "ground_truth": "Paris"}]}}
    zsre = {"portability": {"New Question": PROMPT, "New Answer": "Paris", "Recalled Relation": "(x, y, z)"}}
    requests = [_request(request_id="k", extra=knowedit), _request(request_id="z", extra=zsre),
                _request(request_id="none")]
    rows = get_evaluator("knowedit")(EvalContext(model, tiny_tokenizer, edited=requests))
    rome, paris = scoring.score_targets(model, tiny_tokenizer, [("The capital of Italy is", "Rome"), (PROMPT, "Paris")])
    assert [(r["request_id"], r["protocol"], r["metric"]) for r in rows] == [("k", "knowedit", "portability"),
                                                                            ("z", "knowedit", "portability")]
    assert rows[0]["value"] == pytest.approx((rome.accuracy + paris.accuracy) / 2)
    assert rows[1]["value"] == paris.accuracy


def test_mquake_scores_a_case_once_all_its_rewrites_are_edited(model, tiny_tokenizer) -> None:
    case = {"questions": [PROMPT, "The capital of Italy is"], "answer": "Paris", "new_answer": "Rome",
            "new_answer_alias": ["Rome, Italy"], "n_rewrites": 2}
    first = _request(request_id="m0", extra={**case, "rewrite_index": 0})
    second = _request(request_id="m1", subject="Italy", extra={**case, "rewrite_index": 1})
    mquake = get_evaluator("mquake")
    assert mquake(EvalContext(model, tiny_tokenizer, edited=[first])) == []  # one rewrite still unedited
    rows = mquake(EvalContext(model, tiny_tokenizer, edited=[second, first]))
    assert {(r["request_id"], r["protocol"]) for r in rows} == {("m0", "mquake")}
    pairs = [(q, a) for q in case["questions"] for a in ("Rome", "Rome, Italy", "Paris")]
    s = dict(zip(pairs, scoring.score_targets(model, tiny_tokenizer, pairs), strict=True))
    values = _values(rows)
    assert values["multihop"] == float(any(s[q, a].accuracy == 1.0 for q in case["questions"]
                                           for a in ("Rome", "Rome, Italy")))
    assert values["multihop_pref"] == sum(s[q, "Rome"].nll < s[q, "Paris"].nll for q in case["questions"]) / 2


def test_routing_and_teacher_forced_scores_read_an_attached_bank(model, tiny_tokenizer) -> None:
    """With a SCEN bank attached, `routing` records where each prompt is routed, and teacher-forced
    scores route by the last prompt token, as generation does (`target_correct`)."""
    from engramflow.editors.scen import (
        ExpertBank,
        ScenConfig,
        add_requests,
        attach,
        detach,
        route,
        target_correct,
    )

    requests = as_requests([
        _request(request_id="fr", paraphrase_prompts=[], neighborhood=[]),
        _request(request_id="it", subject="Italy", target_new="Paris", target_true="Rome", paraphrase_prompts=[],
                 neighborhood=[]),
    ])
    probes = as_requests([_request(request_id="p", prompt="Steve Jobs founded", subject="Steve Jobs",
                                   target_true="Apple")])
    bank = ExpertBank.for_model(model, 1, ScenConfig(rank=2, expert_lr=5e-2, expert_steps=20, neuron_steps=40))
    add_requests(model, tiny_tokenizer, bank, requests)
    attach(model, 1, bank)
    try:
        rows = get_evaluator("routing")(EvalContext(model, tiny_tokenizer, edited=requests, probes=probes))
        routes = route(model, tiny_tokenizer, [r.prompt for r in (*requests, *probes)])
        assert routes[0] == "fr"  # an expert fires, so the scores below go through the routing hook
        assert [(r["request_id"], r["protocol"], r["metric"], r["value"]) for r in rows] == [
            ("fr", "scen", "routing", float(routes[0] == "fr")), ("it", "scen", "routing", float(routes[1] == "it")),
            ("p", "scen", "probe_routing", float(routes[2] is None))]
        scores = scoring.score_targets(model, tiny_tokenizer, [(r.prompt, r.target_new) for r in requests])
        for r, s in zip(requests, scores, strict=True):
            assert (s.accuracy == 1.0) == target_correct(model, tiny_tokenizer, r.prompt, r.target_new)
    finally:
        detach(model)
