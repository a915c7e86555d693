"""The embedded model ("organism"): a small Llama-architecture LM pretrained here on a fact set.

It gives the pipeline a model whose facts are known and live where editors look for them (the first
MLP at the subject's last token). `config` sets its size and training, `data` its facts and tokenizer,
`training` the loop and its losses, `build` the cache that builds it once per config and data.
"""

from engramflow.organism.build import build_organism, organism_report
from engramflow.organism.config import BUILD_VERSION, DEFAULT_CONFIG, EOS, TINY_CONFIG, OrganismConfig
from engramflow.organism.data import FactData, train_tokenizer
from engramflow.organism.training import (
    _batches,
    evaluate_organism,
    first_token_accuracy,
    idle_threads,
    train_organism,
)

__all__ = [
    "BUILD_VERSION",
    "DEFAULT_CONFIG",
    "EOS",
    "TINY_CONFIG",
    "FactData",
    "OrganismConfig",
    "_batches",
    "build_organism",
    "evaluate_organism",
    "first_token_accuracy",
    "idle_threads",
    "organism_report",
    "train_organism",
    "train_tokenizer",
]
