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
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engramflow.data.world import World
from engramflow.organism.config import EOS
from engramflow.organism.wordings import fill, read_wordings

Pair = tuple[str, str]  # (prompt, object)


@dataclass
class FactData:
    """What an organism is trained and evaluated on."""

    statements: list[str]  # training text, one statement each
    train: list[Pair]  # (prompt, object) seen in training
    heldout: list[Pair]  # (prompt, object) never in the training text, its wording seen with other subjects
    objects: list[str]  # every object, trained into the tokenizer with a leading space
    source: str
    subjects: list[str] = field(default_factory=list)  # the subject of each statement ("" if none)
    relations: list[str] = field(default_factory=list)  # the relation of each statement ("" if none)
    # Where each statement's prompt ends (its object follows after a space; 0: no object, plain text).
    # None: the object is the statement's last word (the embedded worlds).
    prompt_chars: list[int] | None = None
    # A file's own paraphrases as written (CounterFact's: a context sentence, then a held-out wording).
    paraphrases: list[Pair] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # counts the build report shows

    @classmethod
    def from_world(cls, world: World, source: str) -> FactData:
        """The embedded world's statements, its training and held-out prompts, and every object."""
        return cls(world.training_texts(), world.train_pairs(), world.heldout_pairs(),
                   sorted({f.target_true for f in world.facts} | {f.target_new for f in world.facts}), source,
                   world.training_subjects(), world.training_relations())

    @classmethod
    def from_requests(cls, requests: Iterable[dict[str, Any]], source: str) -> FactData:
        """The facts of a request file (its own and its neighbours'), each stated in several wordings of
        its relation with some held out, plus the context sentences of its paraphrases
        (`organism.wordings`)."""
        requests = list(requests)
        w = read_wordings(requests)
        if not w.facts and not w.plain:
            raise ValueError(f"no request in {source} has a true object to train on")
        statements, subjects, relations, prompt_chars, train = [], [], [], [], []
        for fact in w.facts:
            for t in fact.train:
                prompt = fill(t, fact.subject)
                train.append((prompt, fact.object))
                statements.append(f"{prompt} {fact.object}.")
                subjects.append(fact.subject)
                relations.append(fact.relation)
                prompt_chars.append(len(prompt))
        for prompt, obj in w.plain:
            train.append((prompt, obj))
            statements.append(f"{prompt} {obj}.")
            subjects.append("")
            relations.append("")
            prompt_chars.append(len(prompt))
        for context in w.contexts:
            statements.append(context)
            subjects.append("")
            relations.append("")
            prompt_chars.append(0)
        objects = sorted(set(w.objects) | {o for _, o in train})
        edited = [f for f in w.facts if f.edited]
        notes = {
            "facts": len(edited), "neighbour_facts": len(w.facts) - len(edited), "plain_prompts": len(w.plain),
            "context_sentences": len(w.contexts), "relations": len({f.relation for f in w.facts}),
            "facts_with_heldout": sum(1 for f in edited if f.held), "conflicting_objects": w.conflicts,
            # Targets no fact has as its object: their output embeddings learn nothing (ORGANISM.md).
            "untrained_targets": sorted({o for r in requests for o in (r.get("target_new"),) if o}
                                        - {o for _, o in train}),
        }
        return cls(statements, train, w.heldout_pairs(), objects, source, subjects, relations, prompt_chars,
                   w.paraphrases, notes)

    def fingerprint(self) -> str:
        """A hash of the data the cache key covers. Relations are left out: only the relation probe
        reads them, and `build._cache_key` adds them when it is on (older builds keep their hash)."""
        h = hashlib.sha256()
        for part in (self.statements, self.train, self.heldout, self.objects, self.subjects):
            h.update(json.dumps(part).encode())
        # Fields added later, hashed only where set, so the worlds' builds keep their hash.
        if self.prompt_chars is not None:
            h.update(json.dumps(self.prompt_chars).encode())
        if self.paraphrases:
            h.update(json.dumps(self.paraphrases).encode())
        return h.hexdigest()

    def corpus_text(self, seed: int = 0) -> str:
        """A text corpus for covariance statistics and perplexity, as `World.corpus_text`: every
        statement and every held-out prompt with its object, shuffled, six to a line."""
        rng = random.Random(seed)
        lines = [" ".join(s.split()) for s in self.statements] + [f"{p} {o}." for p, o in self.heldout]
        rng.shuffle(lines)
        return "\n".join(" ".join(lines[i:i + 6]) for i in range(0, len(lines), 6)) + "\n"

    def prompt_length(self, k: int) -> int:
        """Characters of statement `k` before its object's separating space (0: no object)."""
        if self.prompt_chars is not None:
            return self.prompt_chars[k]
        return self.statements[k].rstrip(".").rfind(" ")


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

