"""The embedded model: tokenizer properties, the tiny build, its cache and what it knows."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from engramflow.data.world import World
from engramflow.models import load_model, resolve_model
from engramflow.organism import (
    TINY_CONFIG,
    FactData,
    build_organism,
    evaluate_organism,
    organism_report,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def world_tokenizer(tiny_world: World):
    return train_tokenizer(FactData.from_world(tiny_world, "world-tiny"), TINY_CONFIG.vocab_size)


def test_tokenizer_concatenation_property(tiny_world: World, world_tokenizer) -> None:
    """Scoring `' ' + target` after a prompt sees the same tokens as the whole sentence."""
    for rec in tiny_world.counterfact_records():
        rw = rec["requested_rewrite"]
        for prompt in [rw["prompt"].format(rw["subject"]), *rec["paraphrase_prompts"]]:
            for target in (rw["target_new"]["str"], rw["target_true"]["str"]):
                whole = world_tokenizer.encode(f"{prompt} {target}")
                assert whole == world_tokenizer.encode(prompt) + world_tokenizer.encode(f" {target}")


def test_objects_are_single_tokens(tiny_world: World, world_tokenizer) -> None:
    objects = {f.target_true for f in tiny_world.facts} | {f.target_new for f in tiny_world.facts}
    assert all(len(world_tokenizer.encode(f" {o}")) == 1 for o in objects)


def test_fact_data_from_requests_trains_prompts_and_neighbours_and_holds_out_paraphrases() -> None:
    requests = [{"prompt": "{} was born in", "subject": "Ada Vell", "target_new": "Orsk", "target_true": "Brin",
                 "relation": "P19", "paraphrase_prompts": ["Ada Vell grew up in"],
                 "neighborhood": [{"prompt": "Tom Vell was born in", "target": "Brin"}]},
                {"prompt": "Zed plays", "subject": "Zed", "target_new": "harp", "target_true": None}]
    data = FactData.from_requests(requests, "test")
    # The neighbour fills the request's wording: Tom Vell's fact, learned with its subject.
    assert data.train == [("Ada Vell was born in", "Brin"), ("Tom Vell was born in", "Brin")]
    assert data.statements[0] == "Ada Vell was born in Brin."
    assert data.subjects == ["Ada Vell", "Tom Vell"] and data.relations == ["P19", "P19"]
    assert data.paraphrases == [("Ada Vell grew up in", "Brin")]  # held out as written, never trained
    assert set(data.objects) == {"Orsk", "Brin", "harp"}
    # No wording here is used with two subjects or more: nothing to hold out besides the paraphrase.
    assert data.heldout == [] and data.notes["untrained_targets"] == ["Orsk", "harp"]


def test_packed_sequences_mark_the_token_before_each_object(tiny_world: World, world_tokenizer) -> None:
    """The subject and relation probes read the token that predicts the object (a fact's object or a
    subject's kind): the statement goes on with that one word, and the subject and relation named are
    the statement's ("" for a kind statement, which has no relation)."""
    import random

    from engramflow.organism import _batches

    data = FactData.from_world(tiny_world, "world-tiny")
    seqs = _batches(data, world_tokenizer, TINY_CONFIG, random.Random(0))
    marked = 0
    for seq in seqs:
        text = world_tokenizer.decode(seq.ids)
        for position, subject, relation in seq.answers:
            before = world_tokenizer.decode(seq.ids[: position + 1])
            after = text[len(before):]
            assert text.startswith(before)
            # One statement of this subject has its prompt end here and its last word come next.
            assert any(before.endswith(st.rsplit(" ", 1)[0]) and after.startswith(" " + st.rsplit(" ", 1)[1])
                       for st, sub, rel in zip(data.statements, data.subjects, data.relations, strict=True)
                       if sub == subject and rel == relation)
            marked += 1
    # Every statement with a subject is marked once (none is cut off at this sequence length).
    assert marked == sum(1 for s in data.subjects if s)


def test_tiny_organism_builds_and_knows_its_facts(tiny_organism: Path, tiny_world: World) -> None:
    assert (tiny_organism / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_organism)
    tok = AutoTokenizer.from_pretrained(tiny_organism)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == TINY_CONFIG.n_layer
    acc = evaluate_organism(model, tok, tiny_world)
    assert acc["train_top1"] >= 0.9
    assert acc["heldout_top1"] >= 0.6
    report = organism_report(tiny_organism)
    assert report["train_top1"] == pytest.approx(acc["train_top1"])


def test_tiny_organism_is_cached(tiny_organism: Path) -> None:
    started = time.perf_counter()
    assert build_organism(tiny=True, progress=False) == tiny_organism
    assert time.perf_counter() - started < 5
    assert resolve_model("organism-tiny") == str(tiny_organism)
    assert not [p for p in tiny_organism.parent.iterdir() if p.name.startswith(".")]  # no half builds left


def test_load_model_spec(tiny_organism: Path) -> None:
    model, tok = load_model(str(tiny_organism))
    assert not model.training and tok.pad_token_id is not None
    assert resolve_model("some/hub-id") == "some/hub-id"


def test_cli_build_prints_the_model_dir_last(tiny_organism: Path, engramflow_home: Path) -> None:
    from typer.testing import CliRunner

    from engramflow.cli import app

    result = CliRunner().invoke(app, ["--home", str(engramflow_home), "organism", "build", "--tiny", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "train top-1" in result.output
    assert lines[-1] == str(tiny_organism)


def test_train_threads_can_be_set(monkeypatch) -> None:
    from engramflow.organism import idle_threads

    monkeypatch.setenv("ENGRAMFLOW_TRAIN_THREADS", "3")
    assert idle_threads() == 3
    monkeypatch.delenv("ENGRAMFLOW_TRAIN_THREADS")
    assert 1 <= idle_threads() <= (os.cpu_count() or 1)


def test_a_run_on_an_organism_reads_its_own_corpus(tiny_organism: Path, tmp_path: Path) -> None:
    """Statistics and perplexity default to what the organism learned: its world's corpus, or the
    corpus a fact file's organism keeps; any other model gets the embedded world's."""
    from engramflow.models import default_corpus

    assert default_corpus(str(tiny_organism)) == "world-tiny"
    assert default_corpus(str(tmp_path)) == "world"
