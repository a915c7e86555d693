"""SCEN: routing, continual addition, save/load, removal and generation, on tiny random models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engramflow import editors
from engramflow.editors.adapters import adapter_for
from engramflow.editors.artifacts import Artifact, from_safetensors, to_safetensors
from engramflow.editors.cache import RequestCache
from engramflow.editors.methods import get_method
from engramflow.editors.requests import Request, as_requests
from engramflow.editors.scen import (
    Expert,
    ExpertBank,
    ScenConfig,
    ScenLayer,
    add_requests,
    attach,
    attached,
    default_layer,
    detach,
    expert_applied,
    prompt_hidden,
    route,
    target_correct,
    train_expert,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUBJECTS = ["Alva Brennick", "Doran Kest", "Mirela Vost", "Tobin Harrow", "Selka Drun", "Orrin Pell"]
CITIES = ["Zarnow", "Kelmet", "Vossa", "Ildar", "Brenhollow", "Quessel"]
# The subject ends every prompt: in a random (untrained) model only the last token's own embedding
# tells prompts apart at the last position, and these tests check mechanics, not what a trained
# model's attention carries there.
TEMPLATES = ["The hometown of {}", "The birthplace of {}", "The city that raised {}"]
UNRELATED = ["The river flows past the old mill", "Seven bells rang over Vossa at noon"]


def _requests() -> list[Request]:
    return as_requests([
        {"prompt": TEMPLATES[0], "subject": s, "target_new": CITIES[(i + 1) % len(CITIES)],
         "target_true": CITIES[i], "paraphrase_prompts": [t.format(s) for t in TEMPLATES[1:]]}
        for i, s in enumerate(SUBJECTS)
    ])


def _tokenizer() -> PreTrainedTokenizerFast:
    words = {w for t in TEMPLATES + UNRELATED + SUBJECTS + CITIES for w in t.replace("{}", "").split()}
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=128,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2(tok: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    return _gpt2(len(tok))


CONFIG = ScenConfig(rank=2, expert_lr=5e-2, expert_steps=40, neuron_steps=100, recalibrate_steps=5)


@pytest.fixture(scope="module")
def bank(gpt2: GPT2LMHeadModel, tok: PreTrainedTokenizerFast) -> ExpertBank:
    bank = ExpertBank.for_model(gpt2, 1, CONFIG)
    add_requests(gpt2, tok, bank, _requests()[:4])
    return bank


def test_expert_training_leaves_the_model_untouched(gpt2, tok):
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    expert = train_expert(gpt2, tok, _requests()[0], 1, CONFIG)
    assert expert.a is not None and expert.a.shape == (2, 128) and expert.b.shape == (32, 2)
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())
    assert all(p.grad is None for p in gpt2.parameters())
    # The expert alone flips the fact (tested without routing: applied to every prompt).
    r = _requests()[0]
    assert not target_correct(gpt2, tok, r.prompt, r.target_new)
    with expert_applied(gpt2, 1, lambda h: (h.float() @ expert.a.T) @ expert.b.T):
        assert target_correct(gpt2, tok, r.prompt, r.target_new)


def test_own_prompt_routes_to_own_expert_and_unrelated_to_none(gpt2, tok, bank):
    attach(gpt2, 1, bank)
    try:
        reqs = _requests()[:4]
        assert route(gpt2, tok, [r.prompt for r in reqs]) == [r.request_id for r in reqs]
        assert route(gpt2, tok, UNRELATED) == [None, None]
        for r in reqs:
            assert target_correct(gpt2, tok, r.prompt, r.target_new)
    finally:
        detach(gpt2)
    assert not isinstance(adapter_for(gpt2).mlp_out_module(gpt2, 1), ScenLayer)


def test_routing_asks_route_theta_not_the_training_threshold(gpt2, tok, bank):
    """SCEN's generality-locality trade-off is the inference threshold's: at 0 every prompt goes to its
    strongest expert, unrelated ones too; at 1 none does; the neurons are the same throughout."""
    assert ExpertBank(1, 32, 128, replace(CONFIG, route_theta=0.3)).route_theta == 0.3
    assert ExpertBank(1, 32, 128, CONFIG).route_theta == CONFIG.theta
    reqs = _requests()[:4]
    attach(gpt2, 1, bank)
    try:
        bank.route_theta = 0.0
        assert None not in route(gpt2, tok, UNRELATED)
        bank.route_theta = 1.0
        assert route(gpt2, tok, [r.prompt for r in reqs]) == [None] * 4
    finally:
        bank.route_theta = CONFIG.theta
        detach(gpt2)
    attach(gpt2, 1, bank)
    try:
        assert route(gpt2, tok, [r.prompt for r in reqs]) == [r.request_id for r in reqs]
    finally:
        detach(gpt2)


def test_routing_is_kept_through_generate_with_kv_cache_and_per_row(gpt2, tok, bank):
    reqs = _requests()[:2]
    prompts = [reqs[0].prompt, UNRELATED[0], reqs[1].prompt]
    enc = [tok.encode(p) for p in prompts]
    width = max(map(len, enc))
    # Left padding, as decoder-only generation expects; the mask tells the layer where each row ends.
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    layer = attach(gpt2, 1, bank)
    try:
        out = gpt2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert [bank.ids[i] if i >= 0 else None for i in layer.routes.tolist()] == [
            reqs[0].request_id, None, reqs[1].request_id]
        # Without a KV cache generate re-reads the whole sequence each step; the routing must hold too.
        uncached = gpt2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 pad_token_id=0, use_cache=False)
        assert torch.equal(uncached, out)
        first = out[:, width]
        assert tok.decode([int(first[0])]) == reqs[0].target_new
        assert tok.decode([int(first[2])]) == reqs[1].target_new
    finally:
        detach(gpt2)
    base = gpt2.generate(input_ids=ids[1:2, width - len(enc[1]):], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, width:], base[0, len(enc[1]):])  # the unrouted row is the base model's


def test_continual_addition_leaves_old_experts_bit_identical(gpt2, tok, bank):
    a, b, ids = bank.a.clone(), bank.b.clone(), list(bank.ids)
    grown = bank.copy()
    report = add_requests(gpt2, tok, grown, _requests()[4:])
    assert grown.ids[:4] == ids and len(grown) == 6
    assert torch.equal(grown.a[:4], a) and torch.equal(grown.b[:4], b)
    assert set(report.recalibrated) <= set(ids)
    attach(gpt2, 1, grown)
    try:
        reqs = _requests()
        assert route(gpt2, tok, [r.prompt for r in reqs]) == [r.request_id for r in reqs]
        assert route(gpt2, tok, UNRELATED) == [None, None]
    finally:
        detach(gpt2)


def test_save_load_round_trip_gives_identical_routing_and_outputs(gpt2, tok, bank, tmp_path: Path):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = ExpertBank.load(path)
    assert loaded.ids == bank.ids and loaded.config == bank.config and loaded.facts == bank.facts
    assert loaded.key_question == bank.key_question and torch.equal(loaded.keys, bank.keys)
    prompts = [r.prompt for r in _requests()] + UNRELATED
    outputs = []
    for b in (bank, loaded):
        attach(gpt2, 1, b)
        try:
            routes = route(gpt2, tok, prompts)
            logits = [gpt2(input_ids=torch.tensor([tok.encode(p)])).logits for p in prompts]
        finally:
            detach(gpt2)
        outputs.append((routes, logits))
    assert outputs[0][0] == outputs[1][0]
    assert all(torch.equal(x, y) for x, y in zip(outputs[0][1], outputs[1][1], strict=True))
    # ...and into a second, separately built model of the same architecture and weights.
    other = _gpt2(len(tok))
    other.load_state_dict(gpt2.state_dict())
    attach(other, 1, loaded)
    try:
        assert route(other, tok, prompts) == outputs[0][0]
    finally:
        detach(other)


def test_removal_restores_base_behaviour_for_that_fact(gpt2, tok, bank):
    r = _requests()[1]
    prompt = r.prompt
    ids = torch.tensor([tok.encode(prompt)])
    base = gpt2(input_ids=ids).logits
    smaller = bank.copy()
    smaller.remove(r.request_id)
    assert r.request_id not in smaller.ids and len(smaller) == 3
    attach(gpt2, 1, smaller)
    try:
        assert route(gpt2, tok, [prompt]) == [None]
        assert torch.equal(gpt2(input_ids=ids).logits, base)
        others = [x for i, x in enumerate(_requests()[:4]) if i != 1]
        assert route(gpt2, tok, [x.prompt for x in others]) == [x.request_id for x in others]
    finally:
        detach(gpt2)
    with pytest.raises(KeyError, match=r.request_id):
        smaller.remove(r.request_id)


def test_works_on_a_tiny_llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    bank = ExpertBank.for_model(model, 0, CONFIG)
    add_requests(model, tok, bank, _requests()[:3])
    assert bank.a.shape == (3, 2, 96) and bank.b.shape == (3, 32, 2) and bank.neuron_w.shape == (3, 96)
    attach(model, 0, bank)
    try:
        reqs = _requests()[:3]
        assert route(model, tok, [r.prompt for r in reqs]) == [r.request_id for r in reqs]
        out = model.generate(input_ids=torch.tensor([tok.encode(reqs[0].prompt)]), max_new_tokens=2,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (1, len(tok.encode(reqs[0].prompt)) + 2)
    finally:
        detach(model)


def test_attach_rejects_a_bank_of_another_layer_or_shape(gpt2, tok, bank):
    with pytest.raises(ValueError, match="layer 1"):
        attach(gpt2, 0, bank)
    torch.manual_seed(0)
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64))
    with pytest.raises(ValueError, match="d_mlp"):
        attach(wider, 1, bank)


def test_contrast_prompts_never_ask_an_edited_question():
    from engramflow.editors.scen.prompts import contrast_prompts

    facts = [{"subject": "A", "template": "{} was born in", "relation": "P19"},
             {"subject": "B", "template": "The hometown of {} is", "relation": "P19"},
             {"subject": "C", "template": "{} speaks", "relation": "P37"},
             {"subject": "A", "template": "{} is fluent in", "relation": "P37"}]
    prompts = [p for p, _ in contrast_prompts(facts[0], facts[1:], 8, seed=0)]
    # B and C in A's birthplace template: B's birthplace is itself an edit, so only C is a contrast;
    # A's P37 question is edited too, so no other-relation template is left for A.
    assert prompts == ["C was born in"]


def test_an_old_neuron_firing_on_a_new_contrast_key_is_recalibrated_and_keeps_its_own_fact():
    """A new batch's contrast prompts ask old subjects new questions; an old neuron that fires on one of
    them is retrained (its expert untouched) until it stays silent there and still fires on its own key."""
    torch.manual_seed(0)
    d_model, d_mlp = 4, 8
    old_key, new_key = torch.randn(1, d_mlp), torch.randn(1, d_mlp)
    negatives = torch.randn(20, d_mlp)
    near = old_key + 0.5 * torch.randn(1, d_mlp)  # the old subject in the new fact's template

    def expert(rid: str) -> Expert:
        return Expert(rid, 0, torch.randn(1, d_mlp), torch.randn(d_model, 1))

    for steps in (0, 40):
        bank = ExpertBank(0, d_model, d_mlp, ScenConfig(rank=1, recalibrate_steps=steps))
        bank.add([expert("old")], [old_key], [(negatives, [None] * len(negatives))])
        assert bank.scores(near)[0, 0] > bank.theta  # the misfire this is about
        w_old, a_old = bank.neuron_w[0].clone(), bank.a[0].clone()
        report = bank.add([expert("new")], [new_key], [(near, ['["old subject", "new relation"]'])])
        assert report.old_firing == ["old"]
        assert torch.equal(bank.a[0], a_old)
        if steps == 0:
            assert report.recalibrated == [] and torch.equal(bank.neuron_w[0], w_old)
        else:
            assert report.recalibrated == ["old"]
            assert bank.scores(near)[0, 0] < bank.theta < bank.scores(old_key)[0, 0]
            assert bank.scores(new_key)[0, 1] > bank.theta


def test_contrasts_reuse_the_wordings_other_edits_trained_on():
    """An edit's training paraphrases join the template vocabulary: other subjects are contrasted in
    them, while the paraphrases held out for evaluation are never used."""
    from engramflow.editors.scen.prompts import contrast_prompts, fact_of

    a = {"subject": "A", "prompt": "{} was born in", "relation": "P19", "target_new": "X",
         "paraphrase_prompts": ["The hometown of A is", "A grew up in"]}
    c = {"subject": "C", "prompt": "{} speaks", "relation": "P37", "target_new": "Y"}
    fact_a, fact_c = fact_of(Request.from_mapping(a), paraphrases=1), fact_of(Request.from_mapping(c), paraphrases=1)
    assert fact_a["templates"] == ["{} was born in", "The hometown of {} is"]
    # C's neuron: C in both of A's trained wordings (another relation), A in C's template.
    assert sorted(p for p, _ in contrast_prompts(fact_c, [fact_a], 8, seed=0)) == [
        "A speaks", "C was born in", "The hometown of C is"]
    # A's neuron: C swapped into both of A's wordings, A in C's; "{} grew up in" stays unseen.
    assert sorted(p for p, _ in contrast_prompts(fact_a, [fact_c], 8, seed=0)) == [
        "A speaks", "C was born in", "The hometown of C is"]


def test_the_bank_keeps_the_hardest_contrasts_and_every_key_an_old_neuron_fired_on():
    torch.manual_seed(0)
    d_model, d_mlp, n_contrasts = 4, 16, 30
    config = ScenConfig(rank=1, neuron_contrasts=5, recalibrate_steps=0)
    old_key = torch.randn(1, d_mlp)
    bank = ExpertBank(0, d_model, d_mlp, config)
    bank.add([Expert("old", 0, torch.randn(1, d_mlp), torch.randn(d_model, 1))], [old_key],
             [(torch.randn(20, d_mlp), [None] * 20)])
    new_key = torch.randn(1, d_mlp)
    # Contrasts at growing distance from the new positive, and one on the old neuron's own key.
    contrasts = torch.cat([new_key + 0.2 * (i + 1) * torch.randn(1, d_mlp) for i in range(n_contrasts - 1)]
                          + [old_key + 0.05 * torch.randn(1, d_mlp)])
    questions = [f'["q{i}", "P1"]' for i in range(n_contrasts)]
    report = bank.add([Expert("new", 0, torch.randn(1, d_mlp), torch.randn(d_model, 1))], [new_key],
                      [(contrasts, questions)])
    kept = {q for q in bank.key_question if q is not None}
    assert report.old_firing == ["old"] and questions[-1] in kept  # kept for the old neuron's sake
    # With recalibration off the neurons score as they did when the bank chose: it kept every contrast
    # the old neuron fires on, and of the rest the 5 that come nearest to firing a neuron.
    fired = {questions[i] for i in (bank.scores(contrasts)[:, 0] > bank.theta).nonzero().squeeze(1).tolist()}
    hardness = (contrasts @ bank.neuron_w.T + bank.neuron_b).max(1).values
    hardest = {questions[i] for i in hardness.topk(config.neuron_contrasts).indices.tolist()}
    assert kept == fired | hardest and len(kept) < n_contrasts


def test_an_empty_batch_changes_nothing(gpt2, tok, bank):
    grown = bank.copy()
    version, keys = grown.version, grown.keys.clone()
    report = add_requests(gpt2, tok, grown, [])
    assert report.experts == [] and grown.version == version and grown.ids == bank.ids
    assert torch.equal(grown.keys, keys)


def test_a_full_bank_stores_and_serves_dense_experts_at_full_rank(gpt2, tok):
    """expert_kind='full' (the reference's Llama-2-7B setting) keeps each expert's dense delta: the
    routed layer computes base(h) + h @ denseᵀ, not the rank-r cut of it. Layer 0: a later layer's
    attention carries every position's delta to the target, so the trained delta has rank > 1."""
    full = replace(CONFIG, expert_kind="full")
    reqs = _requests()[:2]
    experts = [train_expert(gpt2, tok, r, 0, full) for r in reqs]
    bank = ExpertBank.for_model(gpt2, 0, full)
    add_requests(gpt2, tok, bank, reqs, experts)
    dense = experts[0].dense
    assert bank.a is None and bank.b is None and bank.dense.shape == (2, 32, 128)
    assert torch.equal(bank.dense[0], dense) and int(torch.linalg.matrix_rank(bank.dense[0])) > full.rank
    h = prompt_hidden(gpt2, tok, [reqs[0].prompt], 0)[0][None]  # [1, seq, d_mlp]
    ids = torch.tensor([tok.encode(reqs[0].prompt)])
    layer = attach(gpt2, 0, bank)
    try:
        layer.begin_prompt(None)
        out = layer(h)
        assert layer.routes.tolist() == [0]
        torch.testing.assert_close(out, layer.base(h) + h @ dense.T, rtol=0, atol=1e-5)
        routed = gpt2(input_ids=ids).logits
    finally:
        detach(gpt2)
    a, b = experts[0].factors(full.rank)
    assert float((h @ dense.T - (h @ a.T) @ b.T).abs().max()) > 1e-3  # what the rank-r cut would have served
    with expert_applied(gpt2, 0, lambda x: x.float() @ dense.T):
        torch.testing.assert_close(gpt2(input_ids=ids).logits, routed, rtol=0, atol=1e-5)
    loaded = from_safetensors(*to_safetensors(bank))
    assert isinstance(loaded, ExpertBank) and torch.equal(loaded.dense, bank.dense)
    # A rank-r bank refuses a dense expert rather than cut it.
    with pytest.raises(ValueError, match="dense expert in a rank-2 lora bank"):
        ExpertBank.for_model(gpt2, 0, CONFIG).add(experts[:1], [h[0, -1:]])


def test_a_full_bank_stored_before_full_experts_were_served_reads_as_its_factors(bank):
    tensors, meta = bank.to_tensors()  # factors, as every bank was stored, whatever its expert_kind
    legacy = {**meta, "format": "engramflow.scen/1",
              "config": json.dumps({**bank.config.to_dict(), "expert_kind": "full"})}
    old = ExpertBank.from_tensors(tensors, legacy)
    assert old.full and torch.equal(old.dense, bank.b @ bank.a)


def test_the_bank_is_an_artifact_that_attaches_and_detaches(gpt2, tok, bank, tmp_path: Path):
    assert ExpertBank.format == "engramflow.scen/1" and not ExpertBank.stacks
    assert bank.request_ids == bank.ids and "format" not in bank.to_tensors()[1]
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = Artifact.load(path)
    assert isinstance(loaded, ExpertBank) and loaded.request_ids == bank.request_ids
    again = from_safetensors(*to_safetensors(bank))
    for name in ("a", "b", "neuron_w", "neuron_b", "keys", "key_owner"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name))
        assert torch.equal(getattr(again, name), getattr(bank, name))
    reqs = _requests()[:4]
    module = adapter_for(gpt2).mlp_out_module(gpt2, 1)
    with loaded.applied(gpt2):
        assert route(gpt2, tok, [r.prompt for r in reqs]) == [r.request_id for r in reqs]
        with pytest.raises(RuntimeError, match="already attached"):
            bank.apply(gpt2)
        with pytest.raises(RuntimeError, match="another SCEN bank"):
            bank.revert(gpt2)
    assert adapter_for(gpt2).mlp_out_module(gpt2, 1) is module


def test_without_takes_one_fact_out_exactly_and_leaves_the_bank_alone(gpt2, tok, bank):
    r = _requests()[2]
    ids = torch.tensor([tok.encode(r.prompt)])
    base = gpt2(input_ids=ids).logits
    before = {name: t.clone() for name, t in bank.to_tensors()[0].items()}
    smaller = bank.without([r.request_id])
    assert smaller.request_ids == [x for x in bank.ids if x != r.request_id] and len(bank) == 4
    assert all(torch.equal(t, bank.to_tensors()[0][name]) for name, t in before.items())
    keep = [0, 1, 3]
    for name in ("a", "b", "neuron_w", "neuron_b"):
        assert torch.equal(getattr(smaller, name), getattr(bank, name)[keep])
    # Its keys go (owner 2: its positives, -2 - 2: its other tokens and contrasts), every other key stays.
    mask = (bank.key_owner != 2) & (bank.key_owner != -4)
    assert int(mask.sum()) < len(bank.keys) and torch.equal(smaller.keys, bank.keys[mask])
    with smaller.applied(gpt2):
        assert route(gpt2, tok, [r.prompt]) == [None]
        assert torch.equal(gpt2(input_ids=ids).logits, base)
        others = [x for i, x in enumerate(_requests()[:4]) if i != 2]
        assert route(gpt2, tok, [x.prompt for x in others]) == [x.request_id for x in others]
    with pytest.raises(KeyError, match="nobody"):
        bank.without(["nobody"])


# --- SCEN as a method -----------------------------------------------------------------------------------
def _same_bank(x: ExpertBank, y: ExpertBank) -> bool:
    tx, mx = x.to_tensors()
    ty, my = y.to_tensors()
    return mx == my and tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)


def test_scen_method_settings_resolve_the_layer_for_the_model(gpt2, tok):
    m = get_method("scen")
    assert m.artifact is ExpertBank and not m.needs_stats and m.shardable and m.default_shards == 2
    assert m.protocols == ("routing",)
    hp = m.hparams(gpt2)
    assert hp.layer == default_layer(2) == 1 and m.layers(hp) == [1] and m.hparams(gpt2.config).layer == 1
    assert m.hparams(gpt2, {"layers": [0, 1], "rank": 3}) == ScenConfig(layer=1, rank=3)
    assert m.hparams(gpt2, CONFIG) == replace(CONFIG, layer=1)
    assert m.with_layers(hp, [0]).layer == 0 and m.describe(hp) == hp.to_dict()
    with pytest.raises(ValueError, match=r"\['bogus', 'nope'\]"):
        m.hparams(gpt2, {"rank": 3, "bogus": 1, "nope": 2})
    with pytest.raises(ValueError, match="layer 5 out of range"):
        m.hparams(gpt2, {"layer": 5})
    scored = m.scored(_requests()[:1], hp)  # the first paraphrase trains the neuron: held out of scoring
    assert scored[0].paraphrase_prompts == _requests()[0].paraphrase_prompts[1:]


def test_scen_edit_returns_a_bank_and_continues_it_without_changing_the_old_one(gpt2, tok):
    reqs = _requests()
    first = editors.edit(gpt2, tok, reqs[:3], method="scen", hparams=CONFIG)
    assert isinstance(first, ExpertBank) and first.layer == 1 and first.request_ids == [r.request_id for r in reqs[:3]]
    with first.applied(gpt2):
        assert route(gpt2, tok, [r.prompt for r in reqs[:3]]) == [r.request_id for r in reqs[:3]]
        assert all(target_correct(gpt2, tok, r.prompt, r.target_new) for r in reqs[:3])
    before = first.copy()
    second = editors.edit(gpt2, tok, reqs[3:], method="scen", hparams=CONFIG, state=first)
    assert _same_bank(first, before) and first.version == 1  # the state passed in is untouched
    assert second.request_ids == [r.request_id for r in reqs] and torch.equal(second.a[:3], first.a)
    with second.applied(gpt2):
        assert route(gpt2, tok, [r.prompt for r in reqs]) == [r.request_id for r in reqs]
        assert route(gpt2, tok, UNRELATED) == [None, None]
        # With a bank attached, experts and keys are computed on the weights without it, and the same
        # routing layer is attached again after.
        layer = attached(gpt2)
        again = editors.edit(gpt2, tok, reqs[3:], method="scen", hparams=CONFIG, state=first)
        assert attached(gpt2) is layer and layer.bank is second
    assert _same_bank(again, second)
    with pytest.raises(ValueError, match="rank"):
        editors.edit(gpt2, tok, reqs[3:], method="scen", hparams=replace(CONFIG, rank=3), state=first)
    loaded = from_safetensors(*to_safetensors(second))
    assert isinstance(loaded, ExpertBank) and _same_bank(loaded, second)


def test_scen_experts_precomputed_in_shards_are_the_ones_the_edit_reads(gpt2, tok, tmp_path: Path, monkeypatch):
    """Stage-1 experts trained in two disjoint shards (as parallel workers do) fill the cache; the edit
    then trains none and gives the bank a cold edit gives."""
    reqs = _requests()[:4]
    cache = RequestCache(tmp_path)
    trained = [editors.precompute(gpt2, tok, shard, cache, method="scen", hparams=CONFIG)
               for shard in (reqs[::2], reqs[1::2])]
    assert trained == [2, 2]
    written = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")}
    assert len(written) == len(reqs)
    assert editors.precompute(gpt2, tok, reqs, cache, method="scen", hparams=CONFIG) == 0
    # Neuron settings do not determine an expert; stage-1 settings do.
    assert editors.precompute(gpt2, tok, reqs, cache, method="scen", hparams=replace(CONFIG, neuron_steps=7)) == 0
    cold = editors.edit(gpt2, tok, reqs, method="scen", hparams=CONFIG)

    def no_training(*args, **kwargs):
        raise AssertionError("an expert was trained although the cache holds it")

    with monkeypatch.context() as patched:
        patched.setattr("engramflow.editors.scen.experts.train_expert", no_training)
        warm = editors.edit(gpt2, tok, reqs, method="scen", hparams=CONFIG, cache=cache)
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")} == written
    assert _same_bank(warm, cold)
    assert editors.precompute(gpt2, tok, reqs[:1], cache, method="scen", hparams=replace(CONFIG, expert_lr=1e-2)) == 1
