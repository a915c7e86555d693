"""What an organism learns from a fact file: its facts, the wordings of each relation, and which
wordings of each fact are trained and which are held out.

A file of edit requests (CounterFact, zsRE, a user's JSONL) says little directly: one prompt per fact,
paraphrases, neighbourhood prompts about other subjects. Read together, they say more:

- **Wordings.** A prompt with its subject cut out is a template ("The mother tongue of {} is").
  A relation id, where the file has one, joins its templates (a template belongs to its relation:
  CounterFact words P176 and P178 alike). Without ids, a prompt's template and its paraphrase's join
  where the paraphrase's is some request's prompt template too and the answers the file gives the
  two look like one relation's (`_alike`). So every relation gets the wordings the file uses for it
  (about seven per CounterFact relation), and every fact can be stated in several of them, as the
  embedded world's are.
- **Neighbours' facts.** A neighbourhood prompt that fills a known template names another subject;
  that subject's fact is learned too (its prompt and one more wording), so neighbourhood scores
  measure facts the model knows.
- **Paraphrases.** CounterFact's paraphrases are a context sentence and then a wording of the
  relation ("Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"). The
  wording is held out for that fact (trained with other subjects), the context sentence is trained as
  plain text; the paraphrase itself is never in the training text.
- **Shared wordings.** Only a template the file uses for at least two subjects (or the fact's own
  prompt) is a wording of its relation; one that occurs once (a paraphrase that is not a context and a
  wording) is no wording others can be trained in.
- **Held out.** As in the world: for every fact, wordings of its relation that the model met only
  with other subjects (at least `MIN_TRAINED_WITH` of them). The file's paraphrases as written are a
  second, harder held-out set (`FactData.paraphrases`), reported but not a build target.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SLOT = "{}"
TRAIN_PER_FACT = 4  # wordings each edited fact is trained in (the world: 4 of its relation's 6)
HELDOUT_PER_FACT = 2  # wordings held out per fact (the world: 2)
NEIGHBOUR_TRAIN = 2  # wordings of a neighbour's fact: its neighbourhood prompt's and one more
MIN_TRAINED_WITH = 3  # a held-out wording must be trained with at least this many other facts
MAX_SUBJECT_CHARS = 80
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*\s+$""")


def template_of(prompt: str, subject: str) -> str:
    """The prompt with the first occurrence of its subject replaced by `{}`."""
    i = prompt.index(subject)
    return prompt[:i] + SLOT + prompt[i + len(subject):]


def fill(template: str, subject: str) -> str:
    return template.replace(SLOT, subject, 1)


def split_context(prompt: str, subject: str, wordings: set[str] | frozenset[str] = frozenset()
                  ) -> tuple[str, str] | None:
    """(context, wording) when the prompt is some text and then a wording that starts with the subject:
    the text ends a sentence or a line, or the wording is one of `wordings` (CounterFact's paraphrases);
    None otherwise."""
    i = prompt.find(subject)
    if i <= 0:
        return None
    context, wording = prompt[:i].strip(), SLOT + prompt[i + len(subject):]
    if context and (_SENTENCE_END.search(prompt[:i]) or prompt[:i].rstrip(" ").endswith("\n") or wording in wordings):
        return context, wording
    return None


def match_template(prompt: str, templates: Iterable[str]) -> tuple[str, str] | None:
    """(template, subject) for the most specific template the prompt fills, or None."""
    best: tuple[str, str] | None = None
    for t in templates:
        before, after = t.split(SLOT, 1)
        if len(prompt) > len(before) + len(after) and prompt.startswith(before) and prompt.endswith(after):
            subject = prompt[len(before): len(prompt) - len(after)]
            if subject == subject.strip() and 0 < len(subject) <= MAX_SUBJECT_CHARS and SLOT not in subject:
                if best is None or len(t) > len(best[0]):
                    best = (t, subject)
    return best


def _alike(a: set[str], b: set[str]) -> bool:
    """Whether two wordings' answers look like one relation's: either has none yet, or they share a
    quarter of the smaller set (one stray answer in common does not make a language a country)."""
    return not a or not b or len(a & b) >= max(1, min(len(a), len(b)) / 4)


class _Groups:
    """Union-find over templates: which wordings belong to one relation. A group holds at most one
    relation id, so the file's own relation ids are never merged."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.ids: dict[str, set[str]] = {}  # root -> relation ids
        self.answers: dict[str, set[str]] = {}  # root -> objects the file gives its wordings

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def name(self, x: str, relation: str) -> bool:
        """Give x's group the relation id; False if it has another."""
        root = self.find(x)
        ids = self.ids.setdefault(root, set())
        if ids and relation not in ids:
            return False
        ids.add(relation)
        return True

    def answer(self, x: str, obj: str) -> None:
        """Note an object the file gives x's wording."""
        self.answers.setdefault(self.find(x), set()).add(obj)

    def union(self, a: str, b: str, same_id: bool = False) -> bool:
        """Join a's and b's groups unless they hold different relation ids or (unless the file's ids
        join them, `same_id`) their answers are not `_alike`; True if joined."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        ids = self.ids.get(ra, set()) | self.ids.get(rb, set())
        answers_a, answers_b = self.answers.get(ra, set()), self.answers.get(rb, set())
        if len(ids) > 1 or (not same_id and not _alike(answers_a, answers_b)):
            return False
        root, child = min(ra, rb), max(ra, rb)  # deterministic: the smaller name is the root
        self.parent[child] = root
        self.ids[root] = ids
        self.ids.pop(child, None)
        self.answers[root] = answers_a | answers_b
        self.answers.pop(child, None)
        return True

    def relation(self, x: str) -> str | None:
        ids = self.ids.get(self.find(x))
        return min(ids) if ids else None


@dataclass
class Fact:
    """A subject's object under one relation, and the wordings it is trained and held out in."""

    subject: str
    relation: str  # the relation group's name: a relation id where the file gives one
    object: str
    edited: bool  # a request's own fact (else a neighbour's)
    required: list[str] = field(default_factory=list)  # wordings the file asks it in: always trained
    prefer_held: list[str] = field(default_factory=list)  # its paraphrases' wordings
    train: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)


@dataclass
class Wordings:
    """The facts of a request file with their trained and held-out wordings."""

    facts: list[Fact]
    plain: list[tuple[str, str]]  # (prompt, object) with no recognisable subject: trained as written
    contexts: list[str]  # context sentences of paraphrases: trained as plain text
    paraphrases: list[tuple[str, str]]  # the file's paraphrase prompts with their true object
    objects: list[str]
    trained_with: Counter[str]  # template -> facts trained in it
    conflicts: int  # facts a later record gave another object (the first is kept, the later prompt trained as written)

    def heldout_pairs(self) -> list[tuple[str, str]]:
        return [(fill(t, f.subject), f.object) for f in self.facts for t in f.held]


def _rank(subject: str, template: str) -> str:
    """A fact's order of preference among its relation's wordings: a stable hash, so the wordings
    rotate between subjects as the world's held-out templates do."""
    return hashlib.sha256(f"{subject}\x00{template}".encode()).hexdigest()


def _nested(a: str, b: str) -> bool:
    """Whether one wording (a node) ends with the other: filled with a subject, one prompt holds the other."""
    a, b = _text(a), _text(b)
    return a.endswith(b) or b.endswith(a)


def _node(relation: str | None, template: str) -> str:
    """A wording's key: its template within its relation (CounterFact words two relations alike:
    "{}, created by" is P176's and P178's)."""
    return f"{relation or ''}\x1f{template}"


def _text(node: str) -> str:
    return node.split("\x1f", 1)[1]


def read_wordings(requests: Iterable[Mapping[str, Any]]) -> Wordings:
    """The facts, wordings and held-out split of normalised requests (`data.ingest` rows)."""
    # Requests as the ingest stage normalises them: the prompt filled, the subject in it.
    requests = [{**r, "prompt": fill(r["prompt"], r["subject"])} for r in requests if r.get("subject")]
    plain: dict[tuple[str, str], None] = {
        (r["prompt"], r["target_true"]): None for r in requests if r.get("target_true") and r["subject"] not in r["prompt"]}
    requests = [r for r in requests if r["subject"] in r["prompt"]]
    groups = _Groups()
    objects: dict[str, None] = {}
    # 1. Wordings of the requests' prompts and paraphrases, joined into relations.
    bare = {template_of(r["prompt"], r["subject"]) for r in requests}
    contexts: dict[str, None] = {}
    edit_nodes: list[str] = []
    paraphrase_nodes: list[list[str]] = []
    used_by: dict[str, set[str]] = {}  # wording -> subjects the file uses it with
    anchors: dict[str, str] = {}  # relation id -> its first wording
    pairs: dict[tuple[str, str], None] = {}  # (prompt's wording, paraphrase's wording), in order
    for r in requests:
        subject, relation = r["subject"], r.get("relation")
        t0 = _node(relation, template_of(r["prompt"], subject))
        edit_nodes.append(t0)
        groups.find(t0)
        if r.get("target_true"):
            groups.answer(t0, r["target_true"])
        used_by.setdefault(t0, set()).add(subject)
        if relation:  # the file's relation id joins its wordings
            groups.name(t0, str(relation))
            groups.union(t0, anchors.setdefault(str(relation), t0), same_id=True)
        wordings = []
        for p in r.get("paraphrase_prompts") or []:
            if subject not in p:
                continue
            split = split_context(p, subject, bare)
            if split is not None:
                contexts.setdefault(split[0])
            wording = _node(relation, split[1] if split is not None else template_of(p, subject))
            groups.find(wording)
            if r.get("target_true"):
                groups.answer(wording, r["target_true"])
            used_by.setdefault(wording, set()).add(subject)
            pairs.setdefault((t0, wording))
            wordings.append(wording)
        paraphrase_nodes.append(wordings)
    # A prompt's wording and its paraphrase's are one relation's where the file says so (a relation id).
    # Without an id, only wordings that are some request's own prompt join (CounterFact's relation
    # templates); a paraphrase in a wording of its own ("Where {} is from, people speak the language
    # of", EasyEdit's rephrases of several relations) stays that fact's.
    for t0, wording in pairs:
        if groups.relation(t0) is not None:
            groups.union(t0, wording, same_id=True)
        elif _text(wording) in bare:
            groups.union(t0, wording)
    nodes = list(groups.parent)
    by_group: dict[str, list[str]] = {}
    for t in nodes:
        by_group.setdefault(groups.find(t), []).append(t)

    def match(prompt: str, candidates: Iterable[str]) -> tuple[str, str] | None:
        """(wording, subject) of the most specific candidate wording the prompt fills."""
        candidates = list(candidates)
        found = match_template(prompt, (_text(t) for t in candidates))
        if found is None:
            return None
        return next(t for t in candidates if _text(t) == found[0]), found[1]

    # 2. Facts: each request's own, then its neighbours' (a neighbour that fills a wording of the
    #    request's relation; in a file without relation ids, any wording of the file).
    facts: dict[tuple[str, str], Fact] = {}
    conflicts = 0

    def add(subject: str, wording: str, obj: str, edited: bool, held: Iterable[str] = ()) -> bool:
        """Record a fact; False if the subject already has another object under this relation."""
        nonlocal conflicts
        key = (subject, groups.find(wording))
        fact = facts.get(key)
        if fact is None:
            fact = facts[key] = Fact(subject, "", obj, edited)
        elif fact.object != obj:
            conflicts += 1
            return False
        fact.edited |= edited
        if wording not in fact.required:
            fact.required.append(wording)
        fact.prefer_held += [t for t in held if t not in fact.prefer_held]
        return True

    for r, t0, wordings in zip(requests, edit_nodes, paraphrase_nodes, strict=True):
        for obj in (r.get("target_new"), r.get("target_true")):
            if obj:
                objects.setdefault(obj)
        if r.get("target_true"):
            add(r["subject"], t0, r["target_true"], True, wordings)
    unlabelled = [t for t in nodes if t.startswith("\x1f")]
    for r, t0 in zip(requests, edit_nodes, strict=True):
        for n in r.get("neighborhood") or []:
            prompt, target = n["prompt"], n["target"]
            objects.setdefault(target)
            found = match(prompt, by_group.get(groups.find(t0), []))
            if found is None and not r.get("relation"):
                # Without relation ids, any wording the file uses will do; it joins no relations (two
                # relations share answers: French is a language of people, films and countries).
                found = match(prompt, unlabelled)
            if found is not None:
                used_by.setdefault(found[0], set()).add(found[1])
            # A neighbour whose subject is unknown, or holds another object here, is trained as written.
            if found is None or not add(found[1], found[0], target, False):
                plain.setdefault((prompt, target))
    # Neighbours may have joined groups: regroup. A wording of a relation is one the file uses for two
    # subjects or more; one used once is that prompt's own phrasing.
    by_group = {}
    for t in nodes:
        if len(used_by.get(t, ())) >= 2:
            by_group.setdefault(groups.find(t), []).append(t)
    merged: dict[tuple[str, str], Fact] = {}
    for (subject, _), fact in facts.items():
        key = (subject, groups.find(fact.required[0]))
        if key in merged:
            other = merged[key]
            if other.object != fact.object:
                conflicts += 1
                continue
            other.required += [t for t in fact.required if t not in other.required]
            other.prefer_held += [t for t in fact.prefer_held if t not in other.prefer_held]
            other.edited |= fact.edited
        else:
            merged[key] = fact

    # 3. Wordings per fact: the file's own always trained, its paraphrases' wordings held out first.
    for fact in merged.values():
        root = groups.find(fact.required[0])
        fact.relation = groups.relation(root) or _text(root)
        others = sorted((t for t in by_group.get(root, []) if t not in fact.required),
                        key=lambda t: _rank(fact.subject, t))
        if fact.edited:
            n_held = min(HELDOUT_PER_FACT, max(0, len(others) - 1))
            # A held-out wording must not be the end of a trained one ("{} is in" inside "The
            # headquarters of {} is in"), nor end with one: the prompt would be trained after all.
            candidates = [t for t in others if not any(_nested(t, u) for u in fact.required)]
            preferred = [t for t in fact.prefer_held if t in candidates]
            fact.held = (preferred + [t for t in candidates if t not in preferred])[:n_held]
            rest = [t for t in others if t not in fact.held and not any(_nested(t, h) for h in fact.held)]
            fact.train = fact.required + rest[: max(0, TRAIN_PER_FACT - len(fact.required))]
        else:
            fact.train = fact.required + others[: max(0, NEIGHBOUR_TRAIN - len(fact.required))]
    trained_with = Counter(t for f in merged.values() for t in f.train)
    for fact in merged.values():
        # A wording held out here must be one the model has learned with others, else it measures nothing.
        fact.held = [t for t in fact.held if trained_with[t] >= MIN_TRAINED_WITH]
        fact.train = [_text(t) for t in fact.train]
        fact.held = [_text(t) for t in fact.held]
        fact.required = [_text(t) for t in fact.required]
        fact.prefer_held = [_text(t) for t in fact.prefer_held]

    trained = {(fill(t, f.subject), f.object) for f in merged.values() for t in f.train} | set(plain)
    paraphrases = list(dict.fromkeys(
        (p, r["target_true"]) for r in requests if r.get("target_true")
        for p in r.get("paraphrase_prompts") or [] if (p, r["target_true"]) not in trained))
    return Wordings(list(merged.values()), list(plain), list(contexts), paraphrases, list(objects),
                    Counter({_text(t): c for t, c in trained_with.items()}), conflicts)
