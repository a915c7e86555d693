"""What an organism learns (`FactData`: statements, prompts with their objects, subjects, relations)
and the tokenizer trained on it.

The tokenizer is a ByteLevel BPE trained on the statements plus every object with a leading space, so
`enc(prompt + " " + obj) == enc(prompt) + enc(" " + obj)` and every world object is one token. Like
Llama's, it starts every text with BOS and spells the first word as if after a space, so a subject has
the same tokens at the start of a prompt as inside it (which ROME/MEMIT keys rely on).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engramflow.data.world import World
from engramflow.organism.config import EOS

Pair = tuple[str, str]  # (prompt, object)


@dataclass
class FactData:
    """What an organism is trained and evaluated on."""

    statements: list[str]  # training text, one statement each
    train: list[Pair]  # (prompt, object) seen in training
    heldout: list[Pair]  # (prompt, object) never in the training text
    objects: list[str]  # every object, trained into the tokenizer with a leading space
    source: str
    subjects: list[str] = field(default_factory=list)  # the subject of each statement ("" if none)
    relations: list[str] = field(default_factory=list)  # the relation of each statement ("" if none)

    @classmethod
    def from_world(cls, world: World, source: str) -> FactData:
        """The embedded world's statements, its training and held-out prompts, and every object."""
        return cls(world.training_texts(), world.train_pairs(), world.heldout_pairs(),
                   sorted({f.target_true for f in world.facts} | {f.target_new for f in world.facts}), source,
                   world.training_subjects(), world.training_relations())

    @classmethod
    def from_requests(cls, requests: Iterable[dict[str, Any]], source: str) -> FactData:
        """Prompts, paraphrases and neighbourhood prompts with their true objects (all trained)."""
        pairs: dict[Pair, str] = {}  # (prompt, object) -> subject ("" for neighbourhood prompts)
        relation_of: dict[Pair, str] = {}
        objects: set[str] = set()
        for r in requests:
            if r.get("target_new"):
                objects.add(r["target_new"])
            true = r.get("target_true")
            if true:
                subject = r["subject"]
                for p in [r["prompt"], *r.get("paraphrase_prompts", [])]:
                    pair = (p.format(subject) if "{}" in p else p, true)
                    pairs[pair] = subject
                    relation_of[pair] = str(r.get("relation") or "")
            for n in r.get("neighborhood", []):
                if n.get("prompt") and n.get("target"):
                    pairs.setdefault((n["prompt"], n["target"]), "")
        train = list(pairs)
        if not train:
            raise ValueError(f"no request in {source} has a true object to train on")
        objects |= {o for _, o in train}
        subjects = [pairs[pair] if pairs[pair] in pair[0] else "" for pair in train]
        relations = [relation_of.get(pair, "") for pair in train]
        return cls([f"{p} {o}." for p, o in train], train, [], sorted(objects), source, subjects, relations)

    def fingerprint(self) -> str:
        """A hash of the data the cache key covers. Relations are left out: only the relation probe
        reads them, and `build._cache_key` adds them when it is on (older builds keep their hash)."""
        h = hashlib.sha256()
        for part in (self.statements, self.train, self.heldout, self.objects, self.subjects):
            h.update(json.dumps(part).encode())
        return h.hexdigest()


def train_tokenizer(data: FactData, vocab_size: int, prefix_space: bool = False, bos: bool = False
                    ) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE tokenizer for the fact set, wrapped for `transformers`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Objects appear with a leading space (as scored) and bare; repeated so they win merges.
    texts = data.statements + [f" {o}" for o in data.objects] * 20 + data.objects
    tok.train_from_iterator(texts, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )

