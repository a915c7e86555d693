"""The organism learns any fact file: what it trains and holds out of real CounterFact records, and
builds on them that reach the world's accuracy targets or fail saying what they reached."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest

from engramflow.data.ingest import load_requests
from engramflow.organism import (
    DEFAULT_CONFIG,
    TINY_CONFIG,
    FactData,
    OrganismBuildError,
    build_organism,
    derive_config,
    organism_report,
    train_tokenizer,
)
from engramflow.organism.wordings import MIN_TRAINED_WITH, template_of


def _records(shared_data: Path, name: str, n: int, tmp: Path) -> Path:
    """The first n records of a shared CounterFact file, written where a build can read them."""
    records = json.loads(gzip.open(shared_data / "counterfact" / name).read())[:n]
    path = tmp / f"{name.split('.')[0]}-{n}.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def counterfact_requests(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    requests, rejects = load_requests(_records(shared_data, "counterfact.json.gz", 200, tmp_path_factory.mktemp("cf")),
                                      "counterfact")
    assert not rejects
    return requests


@pytest.fixture(scope="module")
def counterfact_data(counterfact_requests: list[dict]) -> FactData:
    return FactData.from_requests(counterfact_requests, "counterfact-200")


def test_every_edit_prompt_and_neighbour_is_trained(counterfact_requests: list[dict], counterfact_data: FactData) -> None:
    """ES and NS read the edit prompts and the neighbourhood prompts: the model is taught each with its
    true object."""
    trained = set(counterfact_data.train)
    for r in counterfact_requests:
        assert (r["prompt"], r["target_true"]) in trained
        for n in r["neighborhood"]:
            assert (n["prompt"], n["target"]) in trained
    # Most neighbours are facts of subjects found by their relation's wordings, not strings.
    assert counterfact_data.notes["neighbour_facts"] > 5 * counterfact_data.notes["plain_prompts"]


def test_held_out_wordings_are_learned_with_other_subjects(counterfact_requests: list[dict],
                                                          counterfact_data: FactData) -> None:
    """A held-out prompt is never in the training text; its wording is, with other subjects."""
    text = "\n".join(counterfact_data.statements)
    subjects = sorted({r["subject"] for r in counterfact_requests}, key=len, reverse=True)
    assert len(counterfact_data.heldout) >= len(counterfact_requests)  # about two per fact
    trained_templates: dict[str, set[str]] = {}
    for (prompt, _), subject in zip(counterfact_data.train, counterfact_data.subjects, strict=False):
        if subject and subject in prompt:
            trained_templates.setdefault(template_of(prompt, subject), set()).add(subject)
    for prompt, obj in counterfact_data.heldout:
        assert f"{prompt} {obj}" not in text
        subject = next(s for s in subjects if prompt.find(s) >= 0)
        others = trained_templates.get(template_of(prompt, subject), set()) - {subject}
        assert len(others) >= MIN_TRAINED_WITH - 1, prompt


def test_paraphrases_are_held_out_and_their_context_is_text(counterfact_requests: list[dict],
                                                            counterfact_data: FactData) -> None:
    """CounterFact's paraphrases (a context sentence, then a wording) never occur in the training text;
    their context sentences do, as plain text."""
    text = "\n".join(counterfact_data.statements)
    paraphrases = [p for r in counterfact_requests for p in r["paraphrase_prompts"]]
    assert len(counterfact_data.paraphrases) == len(set(paraphrases))
    assert not any(p in text for p in paraphrases)
    contexts = [p[: p.index(r["subject"])].strip() for r in counterfact_requests for p in r["paraphrase_prompts"]
                if p.find(r["subject"]) > 0 and p[: p.index(r["subject"])].rstrip().endswith(".")]
    assert contexts and all(c in counterfact_data.statements for c in contexts)


def test_derived_config_fits_the_data(counterfact_data: FactData) -> None:
    """A small base gets what real names, multi-word objects and a CounterFact neighbourhood need; the
    embedded worlds' configs stay as they are (their builds keep their cache keys)."""
    from engramflow.data.world import default_world, tiny_world

    small = replace(TINY_CONFIG, vocab_size=512, n_inner=256, max_epochs=1)
    cfg = derive_config(counterfact_data, small)
    assert cfg.vocab_size >= 256 + len(counterfact_data.objects) and cfg.vocab_size > small.vocab_size
    assert 2 * cfg.n_inner >= counterfact_data.notes["facts"] + counterfact_data.notes["neighbour_facts"]
    assert cfg.max_epochs > 1
    assert derive_config(FactData.from_world(default_world(), "world"), DEFAULT_CONFIG) == DEFAULT_CONFIG
    assert derive_config(FactData.from_world(tiny_world(), "world-tiny"), TINY_CONFIG) == TINY_CONFIG
    tok = train_tokenizer(counterfact_data, cfg.vocab_size, cfg.prefix_space, cfg.bos)
    for prompt, obj in counterfact_data.train[:500] + counterfact_data.heldout:
        whole = tok.encode(f"{prompt} {obj}")
        assert whole == tok.encode(prompt) + tok.encode(f" {obj}", add_special_tokens=False)


def test_a_file_without_held_out_wordings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"subject": f"Person {i}", "prompt": f"Person {i} number {i} likes",
                                          "target_new": "tea", "target_true": "coffee"}) for i in range(5)))
    with pytest.raises(OrganismBuildError, match="no fact has a wording held out"):
        build_organism(facts=path, format="jsonl", config=TINY_CONFIG, progress=False)


def test_a_build_short_of_its_targets_fails_saying_what_it_reached(shared_data: Path, tmp_path: Path) -> None:
    path = _records(shared_data, "counterfact.json.gz", 40, tmp_path)
    cfg = replace(TINY_CONFIG, name="organism-fail-test", max_epochs=1)
    with pytest.raises(OrganismBuildError, match=r"did not reach its targets .* in 1 epochs: best epoch 1 read") as err:
        build_organism(facts=path, format="counterfact", config=cfg, progress=False)
    failed = Path(str(err.value).rsplit(" ", 1)[-1])
    assert organism_report(failed)["targets_reached"] is False
    assert not (failed.parent.parent / failed.name).exists()  # kept under failed/, not cached


# The default run's real build: 40 ROME CounterFact records (and their 261 neighbours' facts, 800
# statements) on the tiny model, asked for the world's targets. Cached like the tiny organism
# (content-hashed, `.engramflow/test-models`).
FACTS_TEST_CONFIG = replace(TINY_CONFIG, name="organism-facts-test", target_heldout=0.85)


@pytest.fixture(scope="module")
def facts_organism(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _records(shared_data, "counterfact.json.gz", 40, tmp_path_factory.mktemp("cf-40"))
    return build_organism(facts=path, format="counterfact", config=FACTS_TEST_CONFIG, progress=False)


@pytest.mark.slow  # a two-minute build on CI's two cores; the failing build above runs the same path
def test_an_organism_of_counterfact_records_knows_them(facts_organism: Path) -> None:
    """Real names, multi-word objects, held-out wordings: the build reaches the world's targets on every
    prompt, and reports what it reached on the file's paraphrases as written."""
    from engramflow.models import default_corpus, load_model
    from engramflow.organism import evaluate_organism, fact_data

    report = organism_report(facts_organism)
    assert report["targets_reached"] and report["n_heldout_prompts"] >= 60
    model, tok = load_model(str(facts_organism))
    data, _ = fact_data(facts=report["source"].split(":", 1)[1], format="counterfact")
    acc = evaluate_organism(model, tok, data)
    # A fact file's build checks its targets on every prompt: the world's targets hold on all of them.
    assert acc["train_top1"] >= 0.97 and acc["heldout_top1"] >= 0.85
    assert acc == pytest.approx({k: report[k] for k in acc})
    assert 0.0 <= report["paraphrase_top1"] <= 1.0
    assert default_corpus(str(facts_organism)) == str(facts_organism / "corpus.txt")


@pytest.mark.slow
def test_a_few_hundred_counterfact_records_reach_the_world_targets(shared_data: Path, tmp_path: Path) -> None:
    """300 records of EasyEdit's split (the issue's failing case was 500 of them) on the default model:
    train >= 0.97 and held-out >= 0.85 on every prompt (minutes on two idle cores, cached after)."""
    path = _records(shared_data, "counterfact-edit.json.gz", 300, tmp_path)
    report = organism_report(build_organism(facts=path, format="easyedit-counterfact", progress=False))
    assert report["targets_reached"] and report["n_train_prompts"] <= 2000  # checked on every prompt
    assert report["train_top1"] >= 0.97 and report["heldout_top1"] >= 0.85
