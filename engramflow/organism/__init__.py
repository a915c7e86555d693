"""The embedded model ("organism"): a small Llama-architecture LM pretrained here on a fact set.

It gives the pipeline a model whose facts are known and live where editors look for them (the first
MLP at the subject's last token). `config` sets its size and training, `data` its facts and tokenizer,
`training` the loop and its losses, `build` the cache that builds it once per config and data.
"""

from engramflow.organism.build import (
    OrganismBuildError,
    build_organism,
    derive_config,
    fact_data,
    organism_report,
)
from engramflow.organism.config import BUILD_VERSION, DEFAULT_CONFIG, EOS, TINY_CONFIG, OrganismConfig
from engramflow.organism.data import FactData, train_tokenizer
from engramflow.organism.training import (
    _batches,
    evaluate_organism,
    first_token_accuracy,
    idle_threads,
    object_accuracy,
    train_organism,
)

__all__ = [
    "BUILD_VERSION",
    "DEFAULT_CONFIG",
    "EOS",
    "TINY_CONFIG",
    "FactData",
    "OrganismBuildError",
    "OrganismConfig",
    "_batches",
    "build_organism",
    "derive_config",
    "evaluate_organism",
    "fact_data",
    "first_token_accuracy",
    "idle_threads",
    "object_accuracy",
    "organism_report",
    "train_organism",
    "train_tokenizer",
]
