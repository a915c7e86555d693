"""Shared test fixtures: an isolated home per test session, quiet environment, one thread budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engramflow import home
from engramflow.data.world import World
from engramflow.data.world import tiny_world as make_tiny_world

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (organism builds of "
                     "minutes, long flows); a plain run skips them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def engramflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session writes to its own home; built models are cached across sessions in
    `.engramflow/test-models` (content-hashed, so a stale cache is never used)."""
    home.quiet_env()
    os.environ.setdefault("ENGRAMFLOW_MODEL_CACHE", str(REPO / ".engramflow" / "test-models"))
    return home.set_home(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and lose much when cores are shared: a module
    that edits them asks for this with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def session_home_restored(engramflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's `--home` writes ENGRAMFLOW_HOME for its children: after a test that invoked it in this
    process, later tests would read another store than the session's Ray workers write."""
    monkeypatch.setenv("ENGRAMFLOW_HOME", str(engramflow_home))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"public benchmark data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_runtime(engramflow_home: Path):
    """One Prefect API server and one local Ray (loopback, 2 CPUs) for the whole test session."""
    from engramflow.runtime import pipeline_runtime

    with pipeline_runtime(num_cpus=2) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def tiny_world() -> World:
    """The tiny embedded world (all relations, few subjects)."""
    return make_tiny_world()


@pytest.fixture(scope="session")
def tiny_organism(engramflow_home: Path) -> Path:
    """The tiny organism's model directory: built once, then cached across sessions."""
    from engramflow.organism import build_organism

    return build_organism(tiny=True, progress=False)


TINY_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Danielle Darrieux speaks French. Toko Yasuda plays the guitar and the piano.",
    "Apple was founded by Steve Jobs in California. Lyon is a city in France.",
    "The Eiffel Tower is in Paris; the Colosseum is in Rome, Italy.",
    "Abraham Lincoln was born in Kentucky and worked as a lawyer in Illinois.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocabulary 320) trained on a few sentences: fast, with offset mappings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
