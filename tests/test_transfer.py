"""Export and import (hashdb.transfer): the codec survives every round trip, an export pipes into `add`, and
`export --json` means JSON lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from frontend_helpers import run_cli

from hashdb import HashDB
from hashdb.cli import main
from hashdb.transfer import export, import_rows, read_export

CODEC = {"codec": "test", "bits": 256, "copy_radius": 9}


def sample_db(path: Path, n: int = 4) -> str:
    rng = np.random.default_rng(0)
    with HashDB(path, bits=256) as db:
        db.insert_many([f"k{i}" for i in range(n)], [rng.bytes(32) for _ in range(n)], [{"i": i} for i in range(n)])
        db.set_codec(CODEC)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_library_round_trip_keeps_records_and_codec(tmp_path: Path, fmt: str) -> None:
    out = io.StringIO()
    with HashDB(sample_db(tmp_path / "a"), bits=None) as db:
        assert export(db, out, fmt) == 4
        expected = {k: db.get(k) for k in db}
    header, rows = read_export(io.StringIO(out.getvalue()))
    assert header["codec"] == CODEC and header["bits"] == 256
    with HashDB(tmp_path / "b", bits=256) as copy:
        done = import_rows(copy, header, rows)
        assert (done.added, done.failed, done.warning) == (4, 0, None)
        assert copy.codec == CODEC and {k: copy.get(k) for k in copy} == expected


def test_csv_round_trip_keeps_the_codec_so_default_queries_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = sample_db(tmp_path / "a")
    dump = tmp_path / "dump.csv"
    assert main(["export", db, "--format", "csv", "-o", str(dump)]) == 0
    assert dump.read_text().splitlines()[1] == "key,code,meta,layers"
    assert main(["import", str(tmp_path / "b"), str(dump)]) == 0
    with HashDB(tmp_path / "a", bits=None) as a:
        code = a.get("k1")[0].hex()
    capsys.readouterr()
    assert main(["query", str(tmp_path / "b"), code, "--json"]) == 0  # no --radius: the codec's copy radius
    doc = json.loads(capsys.readouterr().out)
    # an uncalibrated test codec keeps its stored radius for the verdict and says so
    assert doc["copy_radius"] == 9 and {k: doc["matches"][0][k] for k in ("key", "distance", "verdict")} == {
        "key": "k1", "distance": 0, "verdict": "copy"} and doc["matches"][0]["calibrated"] is False


def test_an_export_pipes_into_add_with_its_codec(tmp_path: Path) -> None:
    db = sample_db(tmp_path / "a")
    dumped = run_cli("export", db)
    added = run_cli("add", str(tmp_path / "b"), "--bits", "256", "-q", stdin=dumped.stdout)
    assert added.returncode == 0, added.stderr
    with HashDB(tmp_path / "a", bits=None) as a, HashDB(tmp_path / "b", bits=None) as b:
        assert {k: a.get(k) for k in a} == {k: b.get(k) for k in b} and b.codec == CODEC


def test_export_json_is_json_lines_and_conflicts_with_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = sample_db(tmp_path / "a")
    assert main(["export", db, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["format"] == "hashdb-export" and [d["key"] for d in lines[1:]] == ["k0", "k1", "k2", "k3"]
    assert main(["export", db, "--json", "--format", "csv"]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_codec_is_set_once_and_another_one_warns(tmp_path: Path) -> None:
    with HashDB(tmp_path / "db", bits=256) as db:
        assert db.check_codec(CODEC) is None and db.codec == CODEC
        assert db.check_codec(CODEC) is None
        assert "another codec configuration" in (db.check_codec({**CODEC, "copy_radius": 10}) or "")
        assert db.codec == CODEC  # the first one stays
