"""The embedded fact world: a seeded generator of fictional facts in the CounterFact mould.

Subjects are fictional people, companies, cities and countries; eight relations (the Wikidata ids
CounterFact uses) link them to objects. Design choices, from `../shared/ORGANISM.md`:

- **Confusable names.** People are recombined first/last names, so every first and last name is
  shared by several people holding different objects. No single name token determines a fact; the model must combine them,
  which makes the subject's *last* token carry the fact (where ROME/MEMIT read their keys).
- **Held-out templates.** Each relation has six templates. For every fact two of them (rotating
  with the fact's index) are held out of training and become its `paraphrase_prompts`; every
  template is still trained with the other two thirds of the subjects. So the held-out metric asks
  "does the model know *this subject's* fact through a wording it has only seen with other
  subjects": a sign that the fact is stored with the subject, not memorised as a string. Wording
  never seen at all is not generalised by models this small (0.44-0.61 in the prototype), so it
  would measure the phrasing, not the fact.
- **Single-word objects.** Every object (companies too) is one word, which the organism's tokenizer
  makes one token, so first-token accuracy is exact and no two objects share a first token.
- **Targets.** `target_new` is drawn from the objects that relation actually uses, so every target
  is some fact's object and has a trained output embedding.
- **Neighbourhoods.** Other subjects with the same relation and the same true object, prompted with
  their own training template (prompts the model knows).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HELD_OUT_PER_FACT = 2
NEIGHBOURS_PER_FACT = 10
SEPARATORS = (" ", "\n")


@dataclass(frozen=True)
class Relation:
    """A relation: its CounterFact-style id, the kind of subject it takes and its templates."""

    relation_id: str
    name: str
    subject_kind: str
    object_kind: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple with its counterfactual and its template split."""

    case_id: int
    subject: str
    subject_kind: str
    relation_id: str
    target_true: str
    target_new: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The edit prompt: the first training template filled with the subject."""
        return self.train_templates[0].format(self.subject)

    def train_prompts(self) -> list[str]:
        return [t.format(self.subject) for t in self.train_templates]

    def heldout_prompts(self) -> list[str]:
        return [t.format(self.subject) for t in self.heldout_templates]


RELATIONS: tuple[Relation, ...] = (
    Relation("P19", "birthplace", "person", "city", (
        "{} was born in", "{} is originally from", "The birthplace of {} is",
        "{} spent early childhood in", "{} grew up in the city of", "The hometown of {} is",
    )),
    Relation("P103", "native language", "person", "language", (
        "The native language of {} is", "{} grew up speaking", "The mother tongue of {} is",
        "{} speaks natively", "{} was raised speaking", "From birth, {} spoke",
    )),
    Relation("P108", "employer", "person", "company", (
        "{} works for", "{} is employed by", "The employer of {} is",
        "{} earns a salary from", "{} has a job at", "Every morning, {} goes to work at",
    )),
    Relation("P27", "citizenship", "person", "country", (
        "{} is a citizen of", "{} holds citizenship of", "The citizenship of {} is",
        "{} carries a passport issued by", "{} is a national of", "The country {} belongs to is",
    )),
    Relation("P101", "field of work", "person", "field", (
        "{} works in the field of", "The field of work of {} is", "{} is a specialist in",
        "The profession of {} is in", "{} has published research on", "{} spends most days studying",
    )),
    Relation("P1303", "instrument", "person", "instrument", (
        "{} plays the", "The instrument of {} is the", "{} performs on the",
        "{} practises daily on the", "The favourite instrument of {} is the", "In the orchestra, {} is heard on the",
    )),
    Relation("P159", "headquarters", "company", "city", (
        "{} is headquartered in", "The headquarters of {} is in", "{} has its head office in",
        "The main office of {} is located in", "{} is based in", "The central offices of {} are in",
    )),
    Relation("P30", "continent", "place", "continent", (
        "{} is located on the continent of", "{} lies on the continent of", "The continent of {} is",
        "{} is part of the continent of", "{} can be found on the continent of", "Geographically, {} belongs to",
    )),
)

FIELDS = (
    "botany", "chemistry", "linguistics", "astronomy", "geology", "sculpture", "poetry", "medicine",
    "architecture", "economics", "philosophy", "mathematics", "zoology", "history", "law", "music",
)
INSTRUMENTS = (
    "piano", "violin", "cello", "flute", "harp", "trumpet", "clarinet", "oboe", "guitar", "drums",
    "accordion", "banjo", "saxophone", "trombone",
)
COMPANY_SUFFIXES = ("corp", "tek", "ware", "dyne", "tron", "soft")
KIND_WORDS = {"person": "person", "company": "company", "city": "city", "country": "country"}
GENERATION_TEMPLATES = ("{} is", "{} is known for", "People who met {} say that")

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "st", "th", "tr", "sh", "v", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ea")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "x")


@dataclass
class World:
    """A generated fact world: relations, facts and the text views the organism and ingest use."""

    seed: int
    relations: dict[str, Relation]
    facts: list[Fact]
    kinds: dict[str, str] = field(default_factory=dict)  # subject -> kind word

    # --- views -------------------------------------------------------------------------------------
    def objects(self, relation_id: str) -> list[str]:
        """Objects the relation uses, in first-use order."""
        return list(dict.fromkeys(f.target_true for f in self.facts if f.relation_id == relation_id))

    def train_pairs(self) -> list[tuple[str, str]]:
        """(prompt, object) for every fact and training template."""
        return [(p, f.target_true) for f in self.facts for p in f.train_prompts()]

    def heldout_pairs(self) -> list[tuple[str, str]]:
        """(prompt, object) for every fact and held-out template (never in the training text)."""
        return [(p, f.target_true) for f in self.facts for p in f.heldout_prompts()]

    def kind_statements(self) -> list[str]:
        return [f"{s} is a {k}." for s, k in self.kinds.items()]

    def training_texts(self) -> list[str]:
        """True statements with training templates, plus one "X is a <kind>." statement per subject."""
        return [f"{p} {o}." for p, o in self.train_pairs()] + self.kind_statements()

    def training_subjects(self) -> list[str]:
        """The subject of each of `training_texts()`, in the same order."""
        return [f.subject for f in self.facts for _ in f.train_templates] + list(self.kinds)

    def training_relations(self) -> list[str]:
        """The relation id of each of `training_texts()` ("" for the kind statements), in the same order."""
        return [f.relation_id for f in self.facts for _ in f.train_templates] + [""] * len(self.kinds)

    def corpus_text(self, seed: int = 0) -> str:
        """A text corpus for covariance statistics: every true statement in every template, shuffled,
        joined into short paragraphs."""
        rng = random.Random(seed)
        lines = [f"{t.format(f.subject)} {f.target_true}." for f in self.facts
                 for t in self.relations[f.relation_id].templates] + self.kind_statements()
        rng.shuffle(lines)
        paragraphs = [" ".join(lines[i:i + 6]) for i in range(0, len(lines), 6)]
        return "\n".join(paragraphs) + "\n"

    def counterfact_records(self) -> list[dict]:
        """The facts as ROME CounterFact records (one requested rewrite each)."""
        by_object: dict[tuple[str, str], list[Fact]] = {}
        for f in self.facts:
            by_object.setdefault((f.relation_id, f.target_true), []).append(f)
        ids = {o: f"W{i}" for i, o in enumerate(sorted({f.target_true for f in self.facts}))}
        records = []
        for f in self.facts:
            template = f.train_templates[0]
            neighbours = [g for g in by_object[(f.relation_id, f.target_true)] if g.subject != f.subject]
            attributes = [g for g in by_object[(f.relation_id, f.target_new)] if g.subject != f.subject]
            records.append({
                "case_id": f.case_id,
                "pararel_idx": f.case_id,
                "requested_rewrite": {
                    "prompt": template,
                    "relation_id": f.relation_id,
                    "subject": f.subject,
                    "target_new": {"str": f.target_new, "id": ids[f.target_new]},
                    "target_true": {"str": f.target_true, "id": ids[f.target_true]},
                },
                "paraphrase_prompts": f.heldout_prompts(),
                "neighborhood_prompts": [g.prompt for g in neighbours[:NEIGHBOURS_PER_FACT]],
                "attribute_prompts": [g.prompt for g in attributes[:NEIGHBOURS_PER_FACT]],
                "generation_prompts": [t.format(f.subject) for t in GENERATION_TEMPLATES],
            })
        return records

    def user_records(self) -> list[dict]:
        """The facts as records of the user file formats (jsonl/csv/parquet ingest): subject, prompt,
        target_new, target_true, paraphrase_prompts, relation, case_id."""
        return [{"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new, "target_true": f.target_true,
                 "paraphrase_prompts": f.heldout_prompts(), "relation": f.relation_id, "case_id": str(f.case_id)}
                for f in self.facts]

    def write_counterfact(self, path: str | Path) -> Path:
        """Write `counterfact_records()` as a CounterFact JSON file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.counterfact_records(), indent=1))
        return path


# --- generation ------------------------------------------------------------------------------------
def _words(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """`n` new capitalised fictional words, none in `taken` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS)
        word = word.capitalize()
        if word not in taken and 4 <= len(word) <= 10:
            taken.add(word)
            out.append(word)
    return out


def _pairs(rng: random.Random, firsts: list[str], lasts: list[str], n: int) -> list[str]:
    """`n` distinct "first last" names recombined from the pools."""
    if n > len(firsts) * len(lasts):
        raise ValueError(f"cannot make {n} distinct names from {len(firsts)}x{len(lasts)} parts")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _assign(rng: random.Random, n: int, pool: list[str]) -> list[str]:
    """Objects for `n` subjects: every object of the pool used when n allows, the rest at random."""
    objs = [pool[i % len(pool)] for i in range(min(n, len(pool)))]
    objs += [rng.choice(pool) for _ in range(n - len(objs))]
    rng.shuffle(objs)
    return objs


# Sizes of the embedded worlds: the counts `generate_world(size=...)` starts from.
WORLD_SIZES: dict[str, dict[str, int]] = {
    # 520 facts of 220 subjects: the default organism's world, a short step of `make demo`.
    "default": dict(n_subjects=150, relations_per_person=3, n_companies=24, n_cities=30, n_countries=16,
                    n_languages=14, n_continents=6),
    # 108 facts: the tests' world, still all eight relations and six templates each.
    "tiny": dict(n_subjects=40, relations_per_person=2, n_companies=12, n_cities=10, n_countries=6,
                 n_languages=6, n_continents=4),
    # 2,150 facts of 1,150 subjects, every kind: enough distinct subjects for 1,000 sequential edits
    # (one per subject) and 100 unrelated probes whose subjects are never edited.
    "large": dict(n_subjects=1000, relations_per_person=2, n_companies=60, n_cities=60, n_countries=30,
                  n_languages=20, n_continents=6),
}


def generate_world(
    seed: int = 0,
    n_subjects: int | None = None,
    relations_per_person: int | None = None,
    n_companies: int | None = None,
    n_cities: int | None = None,
    n_countries: int | None = None,
    n_languages: int | None = None,
    n_continents: int | None = None,
    name_pool: int | None = None,
    size: str = "default",
) -> World:
    """A seeded world: `n_subjects` people with `relations_per_person` facts each, companies with
    headquarters, cities and countries with continents; counts not given come from `WORLD_SIZES[size]`.
    Same seed and counts, same world. People's names recombine `name_pool` first and `name_pool` last
    names (default about sqrt(2 n_subjects), so each is shared by several people)."""
    if size not in WORLD_SIZES:
        raise ValueError(f"unknown world size {size!r}; sizes: {', '.join(WORLD_SIZES)}")
    given = dict(n_subjects=n_subjects, relations_per_person=relations_per_person, n_companies=n_companies,
                 n_cities=n_cities, n_countries=n_countries, n_languages=n_languages, n_continents=n_continents)
    counts = {**WORLD_SIZES[size], **{k: v for k, v in given.items() if v is not None}}
    n_subjects, relations_per_person = counts["n_subjects"], counts["relations_per_person"]
    n_companies, n_cities, n_countries = counts["n_companies"], counts["n_cities"], counts["n_countries"]
    n_languages, n_continents = counts["n_languages"], counts["n_continents"]
    rng = random.Random(seed)
    taken: set[str] = set()
    cities = _words(rng, n_cities, (2, 3), taken)
    countries = [w + rng.choice(("ia", "land", "stan", "ora")) for w in _words(rng, n_countries, (1, 2), taken)]
    languages = [w + rng.choice(("ish", "ic", "ese", "i")) for w in _words(rng, n_languages, (1, 2), taken)]
    continents = _words(rng, n_continents, (2, 3), taken)
    n_first = name_pool or max(4, round((2 * n_subjects) ** 0.5))
    firsts = _words(rng, n_first, (1, 2), taken)
    lasts = _words(rng, n_first, (2, 2), taken)
    people = _pairs(rng, firsts, lasts, n_subjects)
    companies = [w + rng.choice(COMPANY_SUFFIXES) for w in _words(rng, n_companies, (1, 1), taken)]

    pools = {"city": cities, "country": countries, "language": languages, "company": companies,
             "field": list(FIELDS), "instrument": list(INSTRUMENTS), "continent": continents}
    relations = {r.relation_id: r for r in RELATIONS}
    person_rels = [r for r in RELATIONS if r.subject_kind == "person"]

    triples: list[tuple[str, str, str]] = []  # (subject, kind, relation_id)
    for person in people:
        for r in rng.sample(person_rels, relations_per_person):
            triples.append((person, "person", r.relation_id))
    triples += [(c, "company", "P159") for c in companies]
    triples += [(p, kind, "P30") for kind, places in (("city", cities), ("country", countries)) for p in places]
    rng.shuffle(triples)

    by_rel: dict[str, list[int]] = {}
    for i, (_, _, rid) in enumerate(triples):
        by_rel.setdefault(rid, []).append(i)
    objects: dict[int, str] = {}
    for rid, idx in by_rel.items():
        for i, obj in zip(idx, _assign(rng, len(idx), pools[relations[rid].object_kind]), strict=True):
            objects[i] = obj

    facts: list[Fact] = []
    for i, (subject, kind, rid) in enumerate(triples):
        templates = relations[rid].templates
        used = sorted({objects[j] for j in by_rel[rid]})
        new = rng.choice([o for o in used if o != objects[i]])
        start = (i * HELD_OUT_PER_FACT) % len(templates)
        held = tuple(templates[(start + k) % len(templates)] for k in range(HELD_OUT_PER_FACT))
        train = tuple(t for t in templates if t not in held)
        train = train[i % len(train):] + train[: i % len(train)]  # rotate the edit prompt too
        facts.append(Fact(i, subject, kind, rid, objects[i], new, train, held))
    kinds = {s: KIND_WORDS[k] for s, k, _ in triples}
    return World(seed=seed, relations=relations, facts=facts, kinds=dict(sorted(kinds.items())))


@lru_cache(maxsize=1)
def default_world() -> World:
    """The world the default organism knows."""
    return generate_world(seed=0)


@lru_cache(maxsize=1)
def tiny_world() -> World:
    """A small world for fast tests: still all eight relations and six templates each."""
    return generate_world(seed=0, size="tiny")


@lru_cache(maxsize=1)
def large_world() -> World:
    """A large world (2,150 facts, 1,150 subjects) for runs at the papers' scale of sequential edits."""
    return generate_world(seed=0, size="large")


NAMED_WORLDS = {"world": default_world, "world-tiny": tiny_world, "world-large": large_world}


def named_world(name: str) -> World | None:
    """The embedded world called `name` (`world`, `world-tiny`, `world-large`), or None for any other name."""
    make = NAMED_WORLDS.get(name)
    return make() if make else None
