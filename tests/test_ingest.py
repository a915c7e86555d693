"""Ingest: every public benchmark file and user formats normalise to `requests`; bad records go to
`rejects` with a reason; re-ingesting adds nothing; the CLI answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from engramflow.data.ingest import IngestError, ingest_file, load_requests
from engramflow.storage import Store

# file -> (format, accepted, rejected, duplicates within the file) on the read-only public copies
SHARED_FILES = {
    "counterfact/counterfact.json.gz": ("counterfact", 4868, 0, 0),
    "counterfact/counterfact-edit.json.gz": ("easyedit-counterfact", 10000, 0, 0),
    "counterfact/counterfact-train.json.gz": ("easyedit-counterfact", 10000, 0, 0),
    "zsre/zsre_mend_eval_portability_gpt4.json.gz": ("zsre", 1037, 0, 0),
    "zsre/zsre_mend_train-1k.json.gz": ("zsre", 998, 2, 0),  # two records have an empty `alt`
    "knowedit/ZsRE-test-all.json.gz": ("knowedit", 1301, 0, 0),
    "mquake/MQuAKE-hard.json.gz": ("mquake", 769, 0, 947),  # 429 cases x 4 rewrites, shared rewrites
    "misc/known_1000.json": ("known", 1208, 0, 1),
}
NOT_FACTS = {"README.md", "wikitext/wikitext-2-raw-v1.wiki.test.raw.gz"}  # docs and a text corpus


def test_every_shared_file_ingests(shared_data: Path, tmp_path: Path) -> None:
    files = {str(p.relative_to(shared_data)) for p in shared_data.rglob("*") if p.is_file()}
    assert files - NOT_FACTS == set(SHARED_FILES), "a new shared data file needs a format here"
    store = Store(str(tmp_path / "store"))
    for name, (fmt, accepted, rejected, duplicates) in SHARED_FILES.items():
        result = ingest_file(shared_data / name, fmt, store)
        assert (result.accepted, result.rejected, result.duplicates) == (accepted, rejected, duplicates), name
        assert all(r["reason"] and r["position"] is not None for r in result.rejects)
    total = sum(v[1] for v in SHARED_FILES.values())
    con = store.connect()
    assert con.sql("SELECT count(*), count(DISTINCT request_id) FROM requests").fetchall() == [(total, total)]
    # the contract of the requests table holds for every row of every dataset
    bad = con.sql("""SELECT dataset, count(*) FROM requests
                     WHERE strpos(prompt, subject) = 0 OR contains(prompt, '{}') OR target_new = ''
                        OR target_new <> trim(target_new) OR NOT json_valid(extra) GROUP BY 1""").fetchall()
    assert bad == []
    rows = {r[0]: r[1:] for r in con.sql("""SELECT dataset, count(*) FILTER (len(paraphrase_prompts) > 0),
        count(*) FILTER (len(neighborhood) > 0), count(*) FILTER (target_true IS NULL) FROM requests GROUP BY 1""")
        .fetchall()}
    assert rows["counterfact"] == (4868, 4868, 0) and rows["zsre"] == (2035, 2035, 0)
    assert rows["knowedit"] == (1301, 1301, 0) and rows["easyedit-counterfact"] == (20000, 20000, 0)
    case0 = con.sql("""SELECT prompt, target_new, target_true, neighborhood[1].target, extra->>'$.pararel_idx'
                       FROM requests WHERE dataset = 'counterfact' AND case_id = '0'""").fetchall()
    assert case0 == [("The mother tongue of Danielle Darrieux is", "English", "French", "French", "2796")]
    assert con.sql("""SELECT count(*) FROM requests, unnest(neighborhood) AS n(n)
                      WHERE dataset = 'zsre' AND n.prompt ILIKE 'nq question%'""").fetchall() == [(0,)]
    mquake = con.sql("""SELECT count(*) FROM requests WHERE dataset = 'mquake'
                        AND json_array_length(extra->'$.questions') = 3""").fetchall()
    assert mquake == [(769,)]
    # re-ingesting adds nothing to either table
    n_rejects = store.read("rejects").num_rows
    again = ingest_file(shared_data / "zsre/zsre_mend_train-1k.json.gz", "zsre", store)
    assert (again.accepted, again.rejected, again.duplicates) == (0, 2, 998)
    assert store.read("requests").num_rows == total and store.read("rejects").num_rows == n_rejects == 2


def test_world_loader(tmp_path: Path) -> None:
    """`world` is the embedded world; a path is a CounterFact-format export of a world."""
    from engramflow.data.world import default_world

    records = default_world().counterfact_records()
    store = Store(str(tmp_path / "store"))
    result = ingest_file("world", "world", store)
    assert result.rejected == 0 and result.accepted + result.duplicates == len(records)
    assert set(store.read("requests").column("source").to_pylist()) == {"world"}
    export = tmp_path / "tiny-world.json"
    export.write_text(json.dumps([{
        "case_id": 7, "requested_rewrite": {"prompt": "{} was born in", "relation_id": "birthplace",
                                            "subject": "Tovan Brelk", "target_new": {"str": "Quarn", "id": "W1"},
                                            "target_true": {"str": "Ostrel", "id": "W2"}},
        "paraphrase_prompts": ["The birthplace of Tovan Brelk is"],
        "neighborhood_prompts": ["Mira Solt was born in"], "attribute_prompts": [], "generation_prompts": [],
    }]))
    (req,), rejects = load_requests(export, "world")
    assert rejects == []
    assert (req["prompt"], req["target_new"], req["neighborhood"]) == (
        "Tovan Brelk was born in", "Quarn", [{"prompt": "Mira Solt was born in", "target": "Ostrel"}])


USER_RECORDS = [
    {"subject": "Lyon", "prompt": "{} is located in the country of", "target_new": "Peru", "target_true": "France",
     "paraphrase_prompts": ["Lyon lies in"], "neighborhood_prompts": ["Paris is located in the country of"],
     "relation": "P17", "case_id": "a1", "source_ticket": "JIRA-7"},
    {"subject": "Ada Lovelace", "prompt": "Ada Lovelace worked as a", "target_new": "pilot",
     "neighborhood": [{"prompt": "Alan Turing worked as a", "target": "mathematician"}]},
]


def _write(path: Path, fmt: str, records: list[dict]) -> Path:
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif fmt == "csv":
        fields = sorted({k for r in records for k in r})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:  # every column in every row, or pyarrow infers the schema from the first row alone
        fields = sorted({k for r in records for k in r})
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in fields} for r in records]), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_user_formats_normalise_alike(tmp_path: Path, fmt: str) -> None:
    requests, rejects = load_requests(_write(tmp_path / f"facts.{fmt}", fmt, USER_RECORDS), fmt)
    assert rejects == []
    lyon, ada = requests
    assert lyon["prompt"] == "Lyon is located in the country of"
    assert lyon["neighborhood"] == [{"prompt": "Paris is located in the country of", "target": "France"}]
    assert (lyon["relation"], lyon["case_id"], json.loads(lyon["extra"])) == ("P17", "a1", {"source_ticket": "JIRA-7"})
    assert ada["target_true"] is None and ada["neighborhood"][0]["target"] == "mathematician"
    # the id is a hash of the content, not of the file or format
    jsonl, _ = load_requests(_write(tmp_path / "other.jsonl", "jsonl", USER_RECORDS), "jsonl")
    assert [r["request_id"] for r in requests] == [r["request_id"] for r in jsonl]


GOOD = {"subject": "Lyon", "prompt": "Lyon is in", "target_new": "Peru"}


@pytest.mark.parametrize(("line", "field", "reason"), [
    (json.dumps({**GOOD, "subject": ""}), "subject", "empty"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "target_new"}), "target_new", "missing"),
    (json.dumps({**GOOD, "subject": "Paris"}), "subject", "does not occur in the prompt"),
    (json.dumps({**GOOD, "target_new": 3}), "target_new", "expected a string, got int"),
    (json.dumps({**GOOD, "prompt": "Lyon " + "x" * 5000}), "prompt", "too long"),
    (json.dumps({**GOOD, "paraphrase_prompts": [1]}), "paraphrase_prompts[0]", "expected a string"),
    (json.dumps({**GOOD, "neighborhood_prompts": ["Paris is in"]}), "neighborhood_prompts", "need target_true"),
    (json.dumps({**GOOD, "target_new": "Pe\u0000ru"}), "target_new", "control"),
    (json.dumps([GOOD]), None, "not an object"),
    ('{"subject": "Lyon", "prompt": "Lyon is in", "target_new": "Pe\\ud800ru"}', "target_new", "undecodable"),
    ('{"subject": "Lyon", ', None, "invalid JSON"),
])
def test_bad_records_are_rejected_with_reason(tmp_path: Path, line: str, field: str | None, reason: str) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    requests, rejects = load_requests(path, "jsonl")
    assert [r["subject"] for r in requests] == ["Lyon"]
    assert len(rejects) == 1
    assert (rejects[0]["position"], rejects[0]["field"]) == (1, field)
    assert reason in rejects[0]["reason"]
    assert rejects[0]["source"] == str(path) and rejects[0]["raw"]


def test_undecodable_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"subject": "Ly\xffon", "prompt": "Ly\xffon is", "target_new": "x"}\n')
    requests, rejects = load_requests(path, "jsonl")
    assert len(requests) == 1 and [(r["position"], r["field"]) for r in rejects] == [(1, "subject")]
    assert "undecodable" in rejects[0]["reason"]


@pytest.mark.parametrize(("content", "fmt", "message"), [
    (None, "jsonl", "file not found"),
    (b"{not json", "counterfact", "not valid JSON"),
    (b'{"a": 1}', "zsre", "expected a JSON list"),
    (b"\x1f\x8b broken gzip", "counterfact", "cannot read"),
    (b"", "csv", "empty CSV"),
    (b"not parquet", "parquet", "not a readable Parquet"),
    (b"[]", "nope", "unknown format 'nope'"),
])
def test_unreadable_files_raise_a_clear_error(tmp_path: Path, content: bytes | None, fmt: str, message: str) -> None:
    path = tmp_path / ("data.json.gz" if content and content.startswith(b"\x1f\x8b") else "data")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IngestError, match=message):
        load_requests(path, fmt)


def test_cli_ingest_and_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engramflow.cli import app

    home = tmp_path / "home"
    monkeypatch.setenv("ENGRAMFLOW_HOME", str(home))
    monkeypatch.delenv("ENGRAMFLOW_STORE", raising=False)
    facts = _write(tmp_path / "facts.jsonl", "jsonl", [*USER_RECORDS, {"subject": "x", "prompt": "y"}])
    runner = CliRunner()
    out = runner.invoke(app, ["--home", str(home), "ingest", str(facts), "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    assert "accepted 2" in out.output and "rejected 1" in out.output and "target_new" in out.output and "missing" in out.output
    out = runner.invoke(app, ["--home", str(home), "sql", "select count(*) as n_requests from requests"])
    assert out.exit_code == 0, out.output
    assert "n_requests" in out.output and "│ 2 " in out.output
    out = runner.invoke(app, ["--home", str(home), "sql", "delete from requests"])
    assert out.exit_code == 1 and "read-only" in out.output


# ---- property: malformed records never crash the loader, good ones are all kept ----------------
# Printable text, mixed with the characters that break naive line splitting, quoting and encodings
# (hypothesis rarely draws them on its own).
_TEXT = st.lists(st.one_of(st.sampled_from(["\u2028", "\u2029", "\u00a0", "é", "中", "\U0001f600", "\\", '"', " "]),
                           st.text(st.characters(blacklist_categories=("Cc", "Cs"),
                                                 blacklist_characters="{}\ufffd§"), min_size=1, max_size=8)),
                 min_size=1, max_size=4).map("".join).filter(lambda s: s.strip())


@st.composite
def good_records(draw: st.DrawFn) -> dict:
    subject = draw(_TEXT)
    record = {"subject": subject, "prompt": f"{draw(_TEXT)} {subject} {draw(_TEXT)}", "target_new": draw(_TEXT)}
    if draw(st.booleans()):
        record["target_true"] = draw(_TEXT)
        record["neighborhood_prompts"] = draw(st.lists(_TEXT, max_size=3))
    record["paraphrase_prompts"] = draw(st.lists(_TEXT, max_size=3))
    record["note"] = draw(st.one_of(st.none(), st.integers(), _TEXT, st.lists(st.integers(), max_size=2)))
    return record


_WRONG = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(_TEXT, min_size=1),
                   st.dictionaries(_TEXT, _TEXT, min_size=1), st.just(""), st.just("   "))


@st.composite
def bad_lines(draw: st.DrawFn) -> bytes:
    record = draw(good_records())
    kind = draw(st.sampled_from(["drop", "wrong", "absent_subject", "too_long", "bad_list", "not_object",
                                 "bad_bytes", "bad_json", "control"]))
    field = draw(st.sampled_from(["subject", "prompt", "target_new"]))
    if kind == "drop":
        del record[field]
    elif kind == "wrong":
        record[field] = draw(_WRONG)
    elif kind == "absent_subject":
        record["subject"] = record["subject"] + "§"
    elif kind == "too_long":
        record[field] = record[field] + " " + "y" * 3000
    elif kind == "bad_list":
        record["paraphrase_prompts"] = draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1)))
    elif kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(st.integers()), st.integers(), _TEXT))).encode()
    elif kind == "bad_bytes":
        return json.dumps({**record, "target_new": "PLACEHOLDER"}).encode().replace(b"PLACEHOLDER", b"\xff\xfe")
    elif kind == "bad_json":
        return json.dumps(record).encode()[:-1]
    elif kind == "control":
        record[field] = record[field] + "\x07"
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(good_records().map(lambda r: ("good", r)), bad_lines().map(lambda b: ("bad", b))),
                      max_size=12))
def test_malformed_records_property(tmp_path: Path, lines: list[tuple[str, object]]) -> None:
    path = tmp_path / "drop.jsonl"
    path.write_bytes(b"\n".join(json.dumps(x, ensure_ascii=False).encode() if kind == "good" else x
                                for kind, x in lines))
    requests, rejects = load_requests(path, "jsonl")
    good = {i: r for i, (kind, r) in enumerate(lines) if kind == "good"}
    bad = {i for i, (kind, _) in enumerate(lines) if kind == "bad"}
    kept = {(r["subject"], r["prompt"], r["target_new"]) for r in requests}
    assert kept == {(r["subject"].strip(), r["prompt"].strip(), r["target_new"].strip()) for r in good.values()}
    assert {r["position"] for r in requests} <= set(good)
    assert sorted(r["position"] for r in rejects) == sorted(bad)
    assert all(r["reason"] and r["raw"] for r in rejects)
