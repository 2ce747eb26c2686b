"""The results database as an input: `report`, `results list|show` and the commands that store a result never damage
it or another program's database, refuse what they cannot read in one line, and read around one damaged row."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from edgeq import store
from edgeq.cli.main import main
from edgeq.errors import EdgeqError

from .test_compare import _add


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    assert err.startswith("edgeq: error:") and err.strip().count("\n") == 0, err
    return err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path) -> Path:
    """Two stored runs (an FP32 and an INT8 file on one board)."""
    path = tmp_path / "r.sqlite"
    _add(path, "fp32", "pi5", 10.0, (9.8, 10.2), 50.0)
    _add(path, "int8", "pi5", 5.0, (4.9, 5.1), 20.0)
    return path


def _foreign_db(path: Path) -> Path:
    """Another program's SQLite database."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('mine')")
    conn.close()
    return path


@pytest.fixture
def foreign_db(tmp_path) -> Path:
    return _foreign_db(tmp_path / "foreign.db")


# 1. the report's output


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_report_onto_the_database_itself_is_refused(db, tmp_path, capsys, overwrite):
    as_report = tmp_path / "r.json"
    db.rename(as_report)  # a database whose name reads as a report, so only the path says it is the input
    link = tmp_path / "link.json"
    link.symlink_to(as_report)
    before = _digest(as_report)
    for out in (as_report, link, tmp_path / "sub" / ".." / "r.json"):
        code, _, err = _run(capsys, "report", "--db", as_report, "-o", out, *overwrite)
        assert code == 2 and "is the results database" in _one_line_error(err)
    code, _, err = _run(capsys, "report", "--db", link, "--compare", "1", "2", "-o", as_report, *overwrite)
    assert code == 2 and "is the results database" in _one_line_error(err)
    assert _digest(as_report) == before and len(store.list_results(as_report)) == 2


def test_report_keeps_an_existing_output_unless_overwrite(db, tmp_path, capsys):
    quant = tmp_path / "quant.json"
    quant.write_text('{"mine": true}')
    for argv in (["-o", quant], ["--compare", "1", "2", "-o", quant]):
        code, _, err = _run(capsys, "report", "--db", db, *argv)
        assert code == 2 and "already exists (pass --overwrite to replace it)" in _one_line_error(err)
    assert quant.read_text() == '{"mine": true}'
    code, out, err = _run(capsys, "report", "--db", db, "-o", quant, "--overwrite")
    assert code == 0 and out.strip() == str(quant), err
    assert '"edgeq_report"' in quant.read_text()


# 2. reading never creates or changes a database


READERS = [["results", "list"], ["results", "show", "1"], ["report", "-o", "{tmp}/r.html"],
           ["report", "--compare", "1", "2"]]


def test_reading_a_missing_database_is_one_line_and_creates_nothing(tmp_path, capsys):
    nope = tmp_path / "nope.db"
    for argv in READERS:  # the error `report` gave already, from every command that reads
        code, _, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv], "--db", nope)
        assert code == 2 and f"db: {nope} does not exist" in _one_line_error(err), argv
        assert list(tmp_path.iterdir()) == [], argv


@pytest.mark.parametrize("argv", READERS)
@pytest.mark.parametrize("kind", ["empty file", "foreign"])
def test_reading_what_is_not_an_edgeq_database_changes_nothing(argv, kind, tmp_path, capsys):
    path = tmp_path / "empty.txt"
    if kind == "foreign":
        _foreign_db(path)
    else:
        path.write_bytes(b"")
    before = _digest(path)
    code, _, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv], "--db", path)
    assert code == 2 and f"db: {path} is not an edgeq results database" in _one_line_error(err)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# 3. storing a result never adds edgeq's tables to another program's database


def test_storing_into_another_programs_database_is_refused_before_any_work(foreign_db, artifacts, tmp_path, capsys):
    before = _digest(foreign_db)
    for argv in (["profile", artifacts["fp32"], "--local", "--runs", "10", "--min-seconds", "0.05"],
                 ["eval", artifacts["fp32"], "--task", "cosine"]):
        code, _, err = _run(capsys, *argv, "--db", foreign_db)
        assert code == 2 and f"db: {foreign_db} is not an edgeq results database (its tables: notes; schema " \
                             "version 0)" in _one_line_error(err), argv
        assert _digest(foreign_db) == before, argv
    with pytest.raises(EdgeqError, match="is not an edgeq results database"):
        store.record_eval(foreign_db, target_sha256="a" * 64, target_path=None, model_ref="m", task="ppl",
                          metrics={"ppl": 1.0})
    assert _digest(foreign_db) == before
    new = tmp_path / "new.sqlite"  # an empty file is still a new database, for a first result
    new.write_bytes(b"")
    store.check_db(new)
    _add(new, "fp32", "pi5", 10.0, (9.8, 10.2), 50.0)
    assert len(store.list_results(new)) == 1


# 4. one damaged row


@pytest.fixture
def damaged_db(db) -> Path:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE results SET export_json = '{broken' WHERE id = 2")
    conn.close()
    return db


def test_show_of_a_damaged_row_names_it(damaged_db, capsys):
    code, _, err = _run(capsys, "results", "show", "2", "--db", damaged_db)
    assert code == 2
    assert _one_line_error(err).strip() == (f"edgeq: error: db: {damaged_db}: result 2 is damaged: column export_json "
                                            "is not a valid JSON object")
    code, out, _ = _run(capsys, "results", "show", "1", "--db", damaged_db)
    assert code == 0 and "artifact_sha256" in out


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_list_shows_a_damaged_row_and_says_so(damaged_db, capsys, as_json):
    code, out, err = _run(capsys, "results", "list", "--db", damaged_db, *as_json)
    assert code == 0
    assert err == "edgeq: note: result 2 is damaged (column export_json is not a valid JSON object); its other " \
                  "columns are listed\n"
    if as_json:
        import json

        assert [r["id"] for r in json.loads(out)] == [2, 1]
    else:
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["2", "1"]
        assert " int8 " in out.splitlines()[1] and " valid " in out.splitlines()[1]


def test_report_leaves_a_damaged_row_out_and_says_so(damaged_db, tmp_path, capsys):
    store.record_eval(damaged_db, target_sha256="a" * 64, target_path=None, model_ref="m", task="ppl",
                      metrics={"ppl": 1.0})
    with sqlite3.connect(damaged_db) as conn:
        conn.execute("UPDATE evals SET metrics = '[1]' WHERE id = 1")
    conn.close()
    out = tmp_path / "r.md"
    code, _, err = _run(capsys, "report", "--db", damaged_db, "-o", out)
    assert code == 0, err
    assert err.splitlines() == [
        "edgeq: note: result 2 is damaged (column export_json is not a valid JSON object); left out of the report",
        "edgeq: note: eval 1 is damaged (column metrics is not a valid JSON object); left out of the report"]
    text = out.read_text()
    assert "run #2 (pi5, int8) damaged: column export_json is not a valid JSON object; not in the report." in text
    code, _, err = _run(capsys, "report", "--db", damaged_db, "--compare", "1", "2")
    assert code == 2 and "result 2 is damaged: column export_json" in _one_line_error(err)


# 5. --limit


@pytest.mark.parametrize("limit", ["0", "-1", "99999999999999999999"])
def test_list_limit_out_of_range_is_refused(db, capsys, limit):
    code, _, err = _run(capsys, "results", "list", "--db", db, "--limit", limit)
    assert code == 2 and "--limit" in _one_line_error(err) and "1<=x<=1000000" in err
    code, out, _ = _run(capsys, "results", "list", "--db", db, "--limit", "1")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["2"]


def test_first_writers_at_once_do_not_race_to_create_the_schema(tmp_path):
    """Two boards' first results (threads of `edgeq profile`, or two processes) create the tables together: one saw
    the other's tables before its schema version and called the database another program's."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeq import store

    for trial in range(10):
        db = tmp_path / f"r{trial}.sqlite"
        with ThreadPoolExecutor(8) as pool:
            writes = [pool.submit(store.init_db, db) for _ in range(8)]
        for w in writes:
            w.result()  # raises a writer's error
