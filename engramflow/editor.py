"""One-call editing for notebooks and scripts, the way EasyEdit users know it; no Prefect, no Ray.

    editor = Editor.from_pretrained("path/to/model", method="memit")   # or Editor(model, tok, ...)
    result = editor.edit(requests, sequential=True, stats=corpus)       # metrics + the edited model
    result.metrics["counterfact/es"]; result.model(...)
    result.revert()                                                     # back, bit for bit

An edit call is scored with the evaluator registry (CounterFact when every request has `target_true`,
else zsRE's token accuracy), before and after. With `sequential=True` the edits stay in the model and
later calls build on them (AlphaEdit is given the earlier deltas, SCEN continues its bank); with
`sequential=False` every batch is edited into the model as it was, scored, and taken out again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramflow.editors.artifacts import Artifact
from engramflow.editors.evaluation import EvalContext, Row, asked_prompts, evaluate, get_evaluator, summarize
from engramflow.editors.methods import Method, get_method
from engramflow.editors.requests import Request, as_requests

log = logging.getLogger(__name__)


def protocol_for(requests: Sequence[Request]) -> str:
    """CounterFact when every request names the answer it replaces (`target_true`), else zsRE."""
    return "counterfact" if all(r.target_true for r in requests) else "zsre"


def read_hparams(hparams: Any) -> Any:
    """A YAML/JSON file's mapping when `hparams` names one (ours or EasyEdit's); anything else unchanged."""
    if isinstance(hparams, (str, os.PathLike)) and Path(hparams).suffix in (".yaml", ".yml", ".json"):
        import yaml

        path = Path(hparams)
        if not path.is_file():
            raise FileNotFoundError(f"hparams file {path} not found")
        return dict(yaml.safe_load(path.read_text()) or {})
    return hparams


def flat(summary: Mapping[tuple[str, str], float | None]) -> dict[str, float | None]:
    """{(protocol, metric): value} as {"protocol/metric": value}."""
    return {f"{protocol}/{metric}": value for (protocol, metric), value in summary.items()}


@dataclass
class EditResult:
    """What one `Editor.edit` call did: metrics before and after, per-request rows, the artifacts, and
    the model as the call left it (`revert()` takes this call's edits out, exactly)."""

    metrics: dict[str, float | None]  # after the edits: "counterfact/es", ... (means over requests)
    before: dict[str, float | None]  # the same, on the model before the call
    rows: list[Row]  # per request, after (request_id, protocol, metric, value)
    artifacts: list[Artifact]  # one per batch
    editor: Editor = field(repr=False)
    checkpoint: int = field(repr=False)  # how many artifacts the editor had applied before the call

    @property
    def model(self) -> Any:
        return self.editor.model

    def revert(self) -> None:
        """Take this call's edits (and any made after it) out of the model, bit for bit."""
        self.editor.revert(self.checkpoint)


class Editor:
    """A model, a method and its settings; `edit` edits requests into the model and scores them."""

    def __init__(self, model: Any, tok: Any, method: str = "memit", hparams: Any = None, stats: Any = None,
                 stats_cache_dir: str | Path | None = None) -> None:
        """`hparams`: None (the model's preset, or settings derived for a model without one), a mapping of
        overrides, an EasyEdit hparams mapping or file, our YAML file, a preset name, or resolved settings.
        `stats`: the corpus (path, list of texts, or `world`) the preservation statistics come from."""
        self.model, self.tok = model, tok
        self.method: Method = get_method(method)
        self.hparams = self.method.hparams(model, read_hparams(hparams))
        self.stats, self.stats_cache_dir = stats, stats_cache_dir
        self._moments: dict[int, Any] | None = None  # statistics of the unedited model, computed once
        self.applied: list[Artifact] = []  # in the model now, oldest first
        self._replaced: dict[int, Artifact | None] = {}  # id(state artifact) -> the state it replaced
        settings = self.settings
        level = logging.WARNING if str(settings.get("layers_from", "")).startswith("derived") else logging.INFO
        log.log(level, "%s settings for %s: preset %s, layers %s (%s)", self.method.name,
                getattr(model.config, "name_or_path", "") or model.config.model_type, settings.get("preset", "-"),
                self.method.layers(self.hparams), settings.get("layers_from", "-"))

    @classmethod
    def from_pretrained(cls, model_or_path: Any, method: str = "memit", hparams: Any = None, *, tok: Any = None,
                        device: str = "cpu", **kwargs: Any) -> Editor:
        """An editor for a model directory or hub id (its family is checked from its config before the
        weights load; `organism` / `organism-tiny` name the embedded model, built on first use), or for a
        loaded model with its tokenizer `tok`."""
        if not isinstance(model_or_path, (str, os.PathLike)):
            if tok is None:
                raise ValueError("a loaded model needs its tokenizer: Editor.from_pretrained(model, tok=tok)")
            return cls(model_or_path, tok, method, hparams, **kwargs)
        from engramflow.editors.adapters import check_supported
        from engramflow.models import load_model, resolve_model

        path = resolve_model(str(model_or_path))
        check_supported(path)
        model, loaded_tok = load_model(path, device)
        return cls(model, tok or loaded_tok, method, hparams, **kwargs)

    @classmethod
    def from_hparams(cls, hparams: Any, model: Any = None, **kwargs: Any) -> Editor:
        """EasyEdit's `BaseEditor.from_hparams`: the method from `alg_name`, the model from `model_name`
        (or `model`, a path or a loaded model with tok=...)."""
        from engramflow.editors.hparams import EASYEDIT_ALGORITHMS

        values = read_hparams(hparams)
        if not isinstance(values, Mapping) or "alg_name" not in values:
            raise ValueError("from_hparams takes an EasyEdit hparams file or mapping (with alg_name)")
        if values["alg_name"] not in EASYEDIT_ALGORITHMS:
            raise ValueError(f"EasyEdit alg_name {values['alg_name']!r} is not one engramflow implements "
                             f"({', '.join(EASYEDIT_ALGORITHMS)})")
        return cls.from_pretrained(model if model is not None else values["model_name"],
                                   EASYEDIT_ALGORITHMS[values["alg_name"]], values, **kwargs)

    @property
    def settings(self) -> dict[str, Any]:
        """The method's settings as recorded (`Method.describe`)."""
        return self.method.describe(self.hparams)

    # --- editing -----------------------------------------------------------------------------------
    def edit(self, requests: Sequence[Mapping[str, Any] | Request], sequential: bool = True,
             batch_size: int | None = None, stats: Any = None, protocols: Sequence[str] | None = None,
             ) -> EditResult:
        """Edit `requests` in batches of `batch_size` (default: one batch) and score them. `sequential`:
        the edits stay and later batches and calls build on them; else each batch is edited into the model
        as it was, scored and taken out. `protocols`: evaluators to score with (default `protocol_for`)."""
        requests = as_requests(requests)
        if not requests:
            raise ValueError("no requests to edit")
        if stats is not None:
            self.stats, self._moments = stats, None
        size = batch_size or len(requests)
        batches = [requests[i:i + size] for i in range(0, len(requests), size)]
        protocols = list(protocols or [protocol_for(requests)])
        scored = self.method.scored(requests, self.hparams)
        with self.unedited():
            reference = {e.name: e.reference(self.model, self.tok, scored)
                         for e in map(get_evaluator, protocols) if e.needs_reference}
        context = {"reference": reference, "asked": asked_prompts(requests)}
        before = flat(summarize(evaluate(EvalContext(self.model, self.tok, edited=scored, **context), protocols)))
        checkpoint = len(self.applied)
        artifacts, rows = [], []
        for batch in batches:
            artifact = self._edit_batch(batch)
            artifacts.append(artifact)
            self._apply(artifact)
            if not sequential:
                rows += evaluate(EvalContext(self.model, self.tok, edited=self.method.scored(batch, self.hparams),
                                             **context), protocols)
                self.revert(checkpoint)
        if sequential:
            rows = evaluate(EvalContext(self.model, self.tok, edited=scored, **context), protocols)
        return EditResult(flat(summarize(rows)), before, rows, artifacts, self, checkpoint)

    def revert(self, checkpoint: int = 0) -> None:
        """Take edits out of the model, newest first, until `checkpoint` artifacts remain (default: all),
        bit for bit; a method state (SCEN's bank) gives way to the one it replaced."""
        while len(self.applied) > checkpoint:
            artifact = self.applied.pop()
            artifact.revert(self.model)
            if not artifact.stacks:
                previous = self._replaced.pop(id(artifact))
                if previous is not None:
                    previous.apply(self.model)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[Any]:
        """Within: every edit of this editor taken out (exactly); after: put back as it was."""
        applied = list(self.applied)
        self.revert()
        try:
            yield self.model
        finally:
            for artifact in applied:
                self._apply(artifact)

    def _edit_batch(self, batch: list[Request]) -> Artifact:
        state = self._state()
        history = [a for a in self.applied if a.stacks]
        return self.method.edit(self.model, self.tok, batch, self.hparams, stats=self._stats(), state=state,
                                history=history, stats_cache_dir=self.stats_cache_dir)

    def _apply(self, artifact: Artifact) -> None:
        if not artifact.stacks:
            state = self._state()
            if state is not None:
                state.revert(self.model)
            self._replaced[id(artifact)] = state
        artifact.apply(self.model)
        self.applied.append(artifact)

    def _state(self) -> Artifact | None:
        """The method state in the model now (SCEN's bank), if any."""
        return next((a for a in reversed(self.applied) if not a.stacks), None)

    def _stats(self) -> Any:
        """Statistics for the method: computed once, on the unedited model, from the editor's corpus (per
        batch when the settings leave out the texts of the subjects being edited)."""
        spec = self.method.statistics(self.hparams)
        if spec is None:
            return None
        if self.stats is None:
            raise ValueError(f"{self.method.name} needs preservation statistics: pass stats= (a text file, a "
                             "list of texts, or 'world' for the embedded world's corpus)")
        corpus = self.stats
        if isinstance(corpus, str):
            from engramflow.data.world import named_world

            world = named_world(corpus)
            corpus = world.corpus_text().splitlines() if world is not None else corpus
        if spec.exclude_edited or isinstance(corpus, Mapping):
            return corpus
        if self._moments is None:
            from engramflow.editors.covariance import layer_stats

            with self.unedited():
                self._moments = layer_stats(self.model, self.tok, spec.layers, corpus, max_tokens=spec.max_tokens,
                                            max_samples=spec.max_samples, cache_dir=self.stats_cache_dir)
        return self._moments
