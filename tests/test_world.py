"""The embedded fact world: determinism, shape, template split, targets, CounterFact export."""

from __future__ import annotations

import json
from pathlib import Path

from engramflow.data.world import World, default_world, generate_world


def test_same_seed_same_world_other_seed_other_world() -> None:
    a, b, c = generate_world(seed=3, n_subjects=30), generate_world(seed=3, n_subjects=30), generate_world(seed=4, n_subjects=30)
    assert a.facts == b.facts
    assert a.facts != c.facts


def test_relations_and_templates(tiny_world: World) -> None:
    assert len(tiny_world.relations) >= 8
    assert {f.relation_id for f in tiny_world.facts} == set(tiny_world.relations)
    for relation in tiny_world.relations.values():
        assert len(relation.templates) >= 5
        assert all(t.count("{}") == 1 for t in relation.templates)
    for fact in tiny_world.facts:
        assert fact.heldout_templates and len(fact.train_templates) >= 3
        assert set(fact.train_templates) | set(fact.heldout_templates) == set(tiny_world.relations[fact.relation_id].templates)


def test_heldout_prompts_never_in_training_text() -> None:
    world = default_world()
    text = "\n".join(world.training_texts())
    for fact in world.facts:
        for prompt in fact.heldout_prompts():
            assert f"{prompt} " not in text, prompt


def test_every_heldout_template_is_trained_with_other_subjects() -> None:
    world = default_world()
    trained = {(f.relation_id, t) for f in world.facts for t in f.train_templates}
    for fact in world.facts:
        for t in fact.heldout_templates:
            assert (fact.relation_id, t) in trained


def test_targets_are_objects_of_their_relation() -> None:
    world = default_world()
    for fact in world.facts:
        objects = world.objects(fact.relation_id)
        assert fact.target_new in objects and fact.target_new != fact.target_true


def test_names_are_confusable() -> None:
    """Every first and last name is shared by several people, so no single word identifies one."""
    world = default_world()
    people = sorted({f.subject for f in world.facts if f.subject_kind == "person"})
    firsts = [p.split()[0] for p in people]
    lasts = [p.split()[1] for p in people]
    assert len(set(people)) == len(people)
    assert min(firsts.count(x) for x in firsts) >= 2
    assert min(lasts.count(x) for x in lasts) >= 2


def test_a_larger_name_pool_makes_names_less_shared() -> None:
    """`name_pool` sets how many first and last names people are recombined from."""
    def most_shared_last_name(world: World) -> int:
        lasts = [s.split()[1] for s in {f.subject for f in world.facts if f.subject_kind == "person"}]
        return max(lasts.count(x) for x in lasts)

    wide = generate_world(seed=0, name_pool=75)
    people = {f.subject for f in wide.facts if f.subject_kind == "person"}
    assert len(people) == 150
    assert len({p.split()[0] for p in people}) <= 75 and len({p.split()[1] for p in people}) <= 75
    assert most_shared_last_name(wide) < most_shared_last_name(default_world())


def test_counterfact_export(tiny_world: World, tmp_path: Path) -> None:
    path = tiny_world.write_counterfact(tmp_path / "world.json")
    records = json.loads(path.read_text())
    assert len(records) == len(tiny_world.facts)
    facts = {f.case_id: f for f in tiny_world.facts}
    for rec in records:
        rw = rec["requested_rewrite"]
        assert "{}" in rw["prompt"] and rw["subject"] and rw["relation_id"] in tiny_world.relations
        assert set(rw["target_new"]) == {"str", "id"} == set(rw["target_true"])
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        fact = facts[rec["case_id"]]
        assert rw["prompt"].format(rw["subject"]) == fact.prompt
        assert rec["paraphrase_prompts"] == fact.heldout_prompts()
        assert all(rw["subject"] in p for p in rec["paraphrase_prompts"] + rec["generation_prompts"])
        neighbours = {f.prompt: f.target_true for f in tiny_world.facts if f.subject != rw["subject"]}
        for p in rec["neighborhood_prompts"]:
            assert neighbours[p] == rw["target_true"]["str"]
        for p in rec["attribute_prompts"]:
            assert neighbours[p] == rw["target_new"]["str"]
    ids = {}
    for rec in records:
        for t in ("target_new", "target_true"):
            ids.setdefault(rec["requested_rewrite"][t]["str"], set()).add(rec["requested_rewrite"][t]["id"])
    assert all(len(v) == 1 for v in ids.values())


def test_corpus_text_holds_every_statement(tiny_world: World) -> None:
    corpus = tiny_world.corpus_text()
    assert all(s in corpus for s in tiny_world.training_texts())


def test_the_large_world_holds_a_thousand_edits_of_every_kind() -> None:
    """world-large: at least 1,200 facts, every relation and kind of subject, and enough distinct subjects
    for 1,000 sequential edits (one per subject) beside 100 probes whose subjects are never edited."""
    from engramflow.data.selection import select_requests
    from engramflow.data.world import RELATIONS, large_world, named_world

    world = named_world("world-large")
    assert world is large_world() and len(world.facts) >= 1200
    assert {f.relation_id for f in world.facts} == {r.relation_id for r in RELATIONS}
    assert set(world.kinds.values()) == {"person", "company", "city", "country"}
    requests = [{"request_id": str(f.case_id), "subject": f.subject} for f in world.facts]
    edits, probes = select_requests(requests, 1000, 100, seed=0)
    assert len(edits) == 1000 and len(probes) == 100
    # Sizes are counts to start from; the default world is the one the default organism was built on.
    assert generate_world(size="default").facts == default_world().facts
    assert len(generate_world(size="large", n_subjects=100).facts) == 2 * 100 + 60 + 60 + 30
