"""The hashdb command: in-process through main(argv) where that is enough, as a subprocess where it matters
(exit codes of the real process, stdin, pipes, a server on a socket)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from frontend_helpers import run_cli, short_socket_path, start_server_process

from hashdb import DEFAULT_BITS
from hashdb.cli import Progress, main
from hashdb.codec import ModelHasher
from hashdb.db import HashDB
from hashdb.ingest import codec_fingerprint

BITS = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three small CNN state_dicts, a near copy of the first, and three files that are not usable models."""
    torch = pytest.importorskip("torch")
    from torch import nn

    root = tmp_path_factory.mktemp("models")
    paths = {}
    for seed in range(3):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
        paths[f"m{seed}"] = root / f"m{seed}.pt"
        torch.save(net.state_dict(), paths[f"m{seed}"])
        if seed == 0:
            copy = {k: v * 1.0001 for k, v in net.state_dict().items()}
            paths["copy0"] = root / "copy0.pt"
            torch.save(copy, paths["copy0"])
    paths["linear"] = root / "linear.pt"
    torch.save(nn.Linear(4, 2).state_dict(), paths["linear"])
    paths["empty"] = root / "empty.pt"
    paths["empty"].write_bytes(b"")
    paths["missing"] = root / "missing.pt"
    return {k: str(v) for k, v in paths.items()}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def hex_code(seed: int) -> str:
    return np.random.default_rng(seed).integers(0, 256, BITS // 8, dtype=np.uint8).tobytes().hex()


def test_version_and_help():
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("hashdb ")
    done = run_cli("--help")
    assert done.returncode == 0
    for command in ("add", "query", "delete", "get", "list", "stats", "export", "import", "serve", "hash", "demo"):
        assert command in done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "db-that-does-not-exist", "00", "--radius", "1"],
        ["query", "x"],  # neither --radius nor --knn
        ["frobnicate"],
        ["add", "--meta", "{not json", "somewhere"],
        ["hash", "--bits", "100", "x.pt"],
    ],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(argv, tmp_path):
    done = run_cli(*argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hashdb: error:"), done.stderr
    assert "Traceback" not in done.stderr


def test_hash_prints_one_line_per_model_and_names_each_bad_file(models):
    files = [models["m0"], models["linear"], models["m1"], models["empty"], models["missing"]]
    done = run_cli("hash", *files)
    assert done.returncode == 2
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [models["m0"], models["m1"]]
    assert all(len(line.split()[0]) == DEFAULT_BITS // 4 for line in lines)  # `hash` without --bits
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 3
    for bad, line in zip([models["linear"], models["empty"], models["missing"]], errors, strict=True):
        assert bad in line and line.startswith("hashdb: error:")
    assert "Traceback" not in done.stderr


def test_hash_json_is_stable_and_matches_the_library(models, capsys):
    from hashdb.codec.hasher import CODEC_VERSION

    code, out, _ = cli(capsys, "hash", "--json", "--bits", "128", models["m0"], models["m2"])
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [sorted(d) for d in docs] == [["bits", "code", "codec", "key", "layers", "path"]] * 2
    hasher = ModelHasher(bits=128)
    code0, layers0 = hasher.hash_with_layers(models["m0"])
    assert docs[0] == {"path": models["m0"], "key": models["m0"], "code": code0.hex(), "bits": 128,
                       "codec": CODEC_VERSION, "layers": [[name, layer.hex()] for name, layer in layers0]}  # fmt: skip
    assert docs[1]["code"] == hasher.hash(models["m2"]).hex()


def test_hash_lines_of_another_codec_version_are_refused_and_make_a_new_database_of_theirs(
    models, tmp_path, capsys, monkeypatch
):
    """A `hashdb hash --json` line names the codec that made its code: into a database of another version it
    fails alone, in one line, and nothing of it is stored; a new database takes the version of its first line
    and keeps hashing model files with it (the v4 lines a previous hashdb wrote make a v4 database)."""
    from hashdb.codec.hasher import CHAIN_V4, CODEC_VERSION

    code, out, _ = cli(capsys, "hash", "--json", "--bits", "256", models["m1"], models["m2"])
    assert code == 0
    lines = out.splitlines()
    v4 = ModelHasher(256, codec=CHAIN_V4)
    old = []  # the lines a hashdb of codec v4 wrote for the same files
    for line in lines:
        doc = json.loads(line)
        code4, layers4 = v4.hash_with_layers(doc["path"])
        old.append(json.dumps({**doc, "codec": CHAIN_V4, "code": code4.hex(),
                               "layers": [[name, layer.hex()] for name, layer in layers4]}))  # fmt: skip
    db = str(tmp_path / "db")
    assert cli(capsys, "add", db, "--bits", "256", models["m0"])[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(old[0] + "\n" + lines[1] + "\n"))
    code, _, err = cli(capsys, "add", db, "--json")
    assert code != 0
    refused = [e for e in err.splitlines() if "error" in e]
    assert len(refused) == 1 and CHAIN_V4 in refused[0] and CODEC_VERSION in refused[0] and "Traceback" not in err
    with HashDB(db, bits=None) as embedded:
        assert models["m1"] not in embedded and models["m2"] in embedded
        assert embedded.codec is not None and embedded.codec["codec"] == CODEC_VERSION
    fresh = str(tmp_path / "v4")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(old) + "\n"))
    assert cli(capsys, "add", fresh, "--bits", "256", "--json")[0] == 0
    assert cli(capsys, "add", fresh, models["m0"])[0] == 0
    with HashDB(fresh, bits=None) as embedded:
        assert embedded.codec == v4.config
        assert embedded.get(models["m0"])[0] == v4.hash(models["m0"])
    unknown = json.dumps({**json.loads(lines[0]), "codec": "chain-sketch-99"})  # a codec this hashdb does not know
    monkeypatch.setattr("sys.stdin", io.StringIO(unknown + "\n" + old[1] + "\n"))
    newest = str(tmp_path / "unknown")
    code, _, err = cli(capsys, "add", newest, "--bits", "256", "--json")
    assert code != 0 and "chain-sketch-99" in err and "does not know" in err
    with HashDB(newest, bits=None) as embedded:  # the unknown line decided nothing: the v4 line made it v4
        assert models["m1"] not in embedded and embedded.codec == v4.config


def test_add_models_then_query_finds_the_copy(models, tmp_path, capsys):
    db = str(tmp_path / "db")
    argv = ["add", db, "--bits", "256", models["m0"], models["m1"], models["m2"], "--meta", '{"owner": "lab"}']
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert len(out.splitlines()) == 3
    code, out, _ = cli(capsys, "query", db, models["copy0"], "--radius", "20", "--json")
    assert code == 0
    doc = json.loads(out)
    assert sorted(doc) == ["code", "codes", "copy_radius", "family", "layers", "matches", "query", "radius"]
    assert doc["matches"][0]["key"] == models["m0"]
    assert doc["matches"][0]["distance"] <= 20
    match = doc["matches"][0]  # every match says how likely it is to be chance, and what follows
    assert match["kind"] in ("whole", "partial") and isinstance(match["layers"], list)
    assert 0 <= match["fmr"] <= 1 and match["expected_false"] == pytest.approx(match["fmr"] * doc["codes"])
    assert match["verdict"] == ("copy" if match["expected_false"] <= 0.01 else "not a copy")
    with HashDB(db, bits=None) as embedded:
        _, meta = embedded.get(models["m1"])
        codec = embedded.codec
    assert meta["owner"] == "lab"
    assert codec["bits"] == BITS and "omega" in codec  # the config once, in the database; per entry its name
    assert meta["file"]["codec"] == codec_fingerprint(codec) and meta["file"]["size"] == os.path.getsize(models["m1"])
    assert meta["file"]["sha256"] == hashlib.sha256(Path(models["m1"]).read_bytes()).hexdigest()


def test_add_reports_bad_files_but_stores_the_good_ones(models, tmp_path):
    db = str(tmp_path / "db")
    done = run_cli("add", db, "--bits", "256", models["m0"], models["linear"], models["m1"])
    assert done.returncode == 2
    assert models["linear"] in done.stderr and "\r" not in done.stderr  # no progress bar into a pipe
    with HashDB(db, bits=None) as embedded:
        assert sorted(embedded) == sorted([models["m0"], models["m1"]])


def test_add_with_key_query_get_delete_exit_codes(tmp_path, capsys):
    db = str(tmp_path / "db")
    a, b = hex_code(1), hex_code(2)
    assert cli(capsys, "add", db, "--bits", "256", "--key", "alpha", a, "--meta", '{"v": 1}')[0] == 0
    assert cli(capsys, "add", db, "--key", "beta", b)[0] == 0
    code, out, _ = cli(capsys, "query", db, a, "--radius", "0")
    assert code == 0 and "alpha" in out and "beta" not in out
    code, out, _ = cli(capsys, "query", db, a, "--knn", "2", "--json")
    assert [m["key"] for m in json.loads(out)["matches"]] == ["alpha", "beta"]
    flipped = format(int(a, 16) ^ 1, f"0{BITS // 4}x")
    assert cli(capsys, "query", db, flipped, "--radius", "0")[0] == 1  # nothing within 0: exit 1
    code, out, _ = cli(capsys, "get", db, "alpha", "--json")
    assert code == 0 and json.loads(out) == {"key": "alpha", "code": a, "meta": {"v": 1}}
    code, _, err = cli(capsys, "get", db, "gamma")
    assert code == 1 and "gamma" in err
    code, out, _ = cli(capsys, "delete", db, "alpha", "gamma", "--json")
    assert code == 1
    assert [json.loads(line) for line in out.splitlines()] == [
        {"key": "alpha", "deleted": True},
        {"key": "gamma", "deleted": False},
    ]
    code, out, _ = cli(capsys, "stats", db, "--json")
    assert code == 0 and json.loads(out)["bits"] == BITS


def test_a_hex_code_without_key_is_a_usage_error(tmp_path, capsys):
    code, _, err = cli(capsys, "add", str(tmp_path / "db"), "--bits", "256", hex_code(3))
    assert code == 2 and "--key" in err


def test_query_reads_codes_from_stdin(tmp_path):
    db = str(tmp_path / "db")
    codes = [hex_code(i) for i in range(4)]
    for i, c in enumerate(codes):
        assert run_cli("add", db, "--bits", "256", "--key", f"k{i}", c).returncode == 0
    done = run_cli("query", db, "--radius", "0", "--json", stdin="\n".join(codes[1:3]) + "\n\n")
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["matches"] for d in docs] == [
        [{"key": "k1", "kind": "whole", "distance": 0, "layers": [], "verdict": None}],  # bare codes: no verdict
        [{"key": "k2", "kind": "whole", "distance": 0, "layers": [], "verdict": None}],
    ]
    done = run_cli("delete", db, "-", stdin="k0\nk3\n")
    assert done.returncode == 0
    with HashDB(db, bits=None) as embedded:
        assert sorted(embedded) == ["k1", "k2"]


def test_commands_through_a_running_server(tmp_path, models):
    db, sock = str(tmp_path / "db"), short_socket_path(tmp_path)
    proc = start_server_process(db, sock, "--bits", "256")
    try:
        assert run_cli("add", "--socket", sock, models["m0"], models["m1"]).returncode == 0
        done = run_cli("query", "--socket", sock, models["copy0"], "--json")  # the copy radius the server stores
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["copy_radius"] == ModelHasher(bits=BITS).copy_radius
        assert run_cli("add", "--socket", sock, "--key", "hexed", hex_code(5)).returncode == 0
        done = run_cli("query", "--socket", sock, models["copy0"], "--knn", "1", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["matches"][0]["key"] == models["m0"]
        done = run_cli("stats", "--socket", sock, "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["bits"] == BITS
        assert run_cli("delete", "--socket", sock, "hexed").returncode == 0
        assert run_cli("get", "--socket", sock, "hexed").returncode == 1
        done = run_cli("query", "--socket", sock + ".nothing", hex_code(1), "--radius", "1")
        assert done.returncode == 2 and "no hashdb server" in done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with HashDB(db, bits=None) as embedded:
        assert sorted(embedded) == sorted([models["m0"], models["m1"]])


def test_serve_refuses_a_second_server_on_the_same_socket(tmp_path):
    db, sock = str(tmp_path / "db"), short_socket_path(tmp_path)
    proc = start_server_process(db, sock, "--bits", "256")
    try:
        done = run_cli("serve", str(tmp_path / "db2"), "--socket", sock, "--bits", "256")
        assert done.returncode == 2 and "already running" in done.stderr
        assert not (tmp_path / "db2").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_progress_bar_draws_only_when_enabled():
    stream = io.StringIO()
    bar = Progress(4, "models", stream=stream, enabled=True)
    for _ in range(4):
        bar.advance()
    bar.close()
    assert "4/4 models" in stream.getvalue() and stream.getvalue().startswith("\r[")
    quiet = io.StringIO()
    bar = Progress(4, "models", stream=quiet)  # StringIO is not a terminal
    bar.advance(4)
    bar.close()
    assert quiet.getvalue() == ""


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    import os
    import select
    import subprocess
    import sys
    import time

    from frontend_helpers import REPO

    db = str(tmp_path / "db")
    assert run_cli("add", db, "--bits", "256", "--key", "only", hex_code(0)).returncode == 0
    # The queries come from a file, not a pipe fed by a thread: nothing in this test can block forever.
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(hex_code(i) for i in range(3000)) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(queries, "rb") as stdin, open(tmp_path / "stderr.txt", "w+b") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hashdb", "query", db, "--knn", "1"],
            stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, cwd=str(REPO), env=env,
        )  # fmt: skip
        try:
            first = b""
            deadline = time.monotonic() + 120
            while not first.endswith(b"\n") and time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 1)
                    if not chunk:
                        break
                    first += chunk
            proc.stdout.close()  # like `| head -1`: the reader goes away with output still coming
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        stderr.seek(0)
        errors = stderr.read()
    assert first.startswith(b"query "), (first, errors)
    assert b"Traceback" not in errors and errors == b"", errors


def test_json_output_is_strict_json_even_with_non_finite_floats(tmp_path, capsys):
    db = str(tmp_path / "db")
    for meta in ('{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}'):
        code, _, err = cli(capsys, "add", db, "--bits", "256", "--key", "k", hex_code(1), "--meta", meta)
        assert code == 2 and "--meta" in err
    with HashDB(db, bits=BITS) as embedded:
        assert len(embedded) == 0
        embedded.insert("k", hex_code(1), {"x": [float("nan"), float("-inf"), 1.5]})

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} in --json output")

    code, out, _ = cli(capsys, "get", db, "k", "--json")
    assert code == 0
    assert json.loads(out, parse_constant=strict)["meta"] == {"x": ["NaN", "-Infinity", 1.5]}


def test_hash_prints_one_error_line_per_bad_file_without_library_warnings(models, tmp_path):
    import pickle

    bad = tmp_path / "pickled.pt"
    bad.write_bytes(pickle.dumps({"weight": "not a tensor"}, protocol=4))  # torch warns about protocol 4
    done = run_cli("hash", str(bad), models["m0"])
    assert done.returncode == 2
    assert done.stdout.split() == [done.stdout.split()[0], models["m0"]]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hashdb: error:") and str(bad) in lines[0], done.stderr


def test_query_answers_every_good_input_and_names_each_bad_one(tmp_path):
    db = str(tmp_path / "db")
    assert run_cli("add", db, "--bits", "256", "--key", "k1", hex_code(1)).returncode == 0
    lines = [hex_code(1), "not-a-code", hex_code(1)[:-2], hex_code(2), hex_code(1)]
    done = run_cli("query", db, "--radius", "0", "--json", stdin="\n".join(lines) + "\n")
    assert done.returncode == 2  # an input error, even though the good ones were answered
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["query"] for d in docs] == [hex_code(1), hex_code(2), hex_code(1)]
    assert [len(d["matches"]) for d in docs] == [1, 0, 1]
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2 and "not-a-code" in errors[0] and hex_code(1)[:-2] in errors[1], done.stderr
    assert "Traceback" not in done.stderr


def test_json_documents_with_numpy_non_finite_values_stay_strict(capsys):
    from hashdb.cli import _emit

    _emit({"a": np.float64("nan"), "b": np.array([1.0, np.inf]), "c": np.int64(3), "d": b"\x01"})

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} in --json output")

    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=strict) == {"a": "NaN", "b": [1.0, "Infinity"], "c": 3, "d": "01"}


# -- the CLI as people use it ---------------------------------------------------------------------------


def npz_model(path, seed: int) -> str:
    """A small two-layer CNN as .npz (no torch needed to write or hash it)."""
    rng = np.random.default_rng(seed)
    weights = {"c1.weight": rng.standard_normal((16, 3, 3, 3)), "c2.weight": rng.standard_normal((16, 16, 3, 3))}
    with open(path, "wb") as f:
        np.savez(f, **{k: v.astype(np.float32) for k, v in weights.items()})
    return str(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["add", "{db}", "{model}"],  # no --bits: a typo must not create a database
        ["add", "{db}", "--key", "k", hex_code(0)],
        ["serve", "{db}", "--socket", "{db}.sock"],
        ["query", "{db}", hex_code(0)],
        ["get", "{db}", "k"],
        ["stats", "{db}"],
        ["list", "{db}"],
        ["export", "{db}"],
        ["delete", "{db}", "k"],
    ],
)
def test_a_mistyped_database_path_is_an_error_that_creates_nothing(argv, tmp_path, capsys):
    db = str(tmp_path / "modles.db")
    model = npz_model(tmp_path / "m.npz", 0)
    code, _, err = cli(capsys, *[a.format(db=db, model=model) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"no hashdb database at {db}" in lines[0], err
    if argv[0] in ("add", "serve"):
        assert "--bits" in lines[0]  # says how to create one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


def test_stats_of_something_that_is_not_a_database_says_so(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text("x")
    code, _, err = cli(capsys, "stats", str(tmp_path / "file.txt"))
    assert code == 2 and "is a file, not a hashdb database" in err
    code, _, err = cli(capsys, "stats", str(tmp_path / "folder"))
    assert code == 2 and "is not a hashdb database" in err
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["x"]


def test_stats_prints_dates_and_sizes_for_people_and_raw_numbers_in_json(tmp_path, capsys):
    db = str(tmp_path / "db")
    assert cli(capsys, "add", db, "--bits", "256", "--key", "k", hex_code(0))[0] == 0
    code, out, _ = cli(capsys, "stats", db, "--json")
    raw = json.loads(out)
    assert code == 0 and isinstance(raw["created"], float) and isinstance(raw["map_size"], int)
    assert raw["readonly"] is True  # a read-only command opens read-only
    code, out, _ = cli(capsys, "stats", db)
    fields = dict(line.split(None, 1) for line in out.splitlines() if len(line.split(None, 1)) == 2)
    import re
    import time

    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*", fields["created"].strip())
    assert fields["created"].startswith(time.strftime("%Y-%m-%d", time.localtime(raw["created"])))
    assert re.fullmatch(r"\d+\.\d (KiB|MiB|GiB)", fields["map_size"].strip()), fields["map_size"]
    assert fields["count"].strip() == "1"
    assert raw["codec"] is None and raw["copy_radius"] is None and fields["copy_radius"].strip() == "None"
    with HashDB(db) as embedded:
        embedded.set_codec({"codec": "test", "copy_radius": 9})
    code, out, _ = cli(capsys, "stats", db)
    assert code == 0 and "copy_radius  9" in out and "codec:" in out  # the codec shown, nested


def test_query_without_radius_uses_the_decision_radius_and_gives_verdicts(models, tmp_path, capsys):
    from hashdb.codec.null import match_rates
    from hashdb.codec.radius import decision_radius

    db = str(tmp_path / "db")
    assert cli(capsys, "add", db, "--bits", "256", models["m0"], models["m1"], models["m2"])[0] == 0
    config = ModelHasher(bits=BITS).config
    code, out, _ = cli(capsys, "query", db, models["copy0"], "--json")
    doc = json.loads(out)
    # the default radius: the largest distance whose expected false matches in these 3 codes stay <= 0.01
    # (a model file is a 2-D CNN: its kernel family's fitted null decides)
    assert doc["family"] == "2d" and doc["radius"] == decision_radius(config, 3, "2d")
    assert code == 0 and doc["copy_radius"] == config["copy_radius"]
    assert [m["key"] for m in doc["matches"]] == [models["m0"]]
    assert doc["matches"][0]["verdict"] == "copy"
    code, out, _ = cli(capsys, "query", db, models["copy0"], "--knn", "3", "--json")
    matches = json.loads(out)["matches"]
    assert len(matches) == 3
    expected = [match_rates(config, m["distance"], 3, "2d") for m in matches]
    assert [m["verdict"] for m in matches] == [r.verdict for r in expected]  # type: ignore[union-attr]
    assert [m["fmr"] for m in matches] == [r.fmr for r in expected]  # type: ignore[union-attr]
    assert "not a copy" in [m["verdict"] for m in matches]  # unrelated models are far apart
    code, out, _ = cli(capsys, "query", db, models["copy0"], "--knn", "3")
    assert f"(copy radius {config['copy_radius']})" in out.splitlines()[0]
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows[0][1] == "whole" and rows[0][3] == "copy" and rows[0][6] == models["m0"]
    assert any(row[3:5] == ["not", "a"] for row in rows)


def test_query_of_a_database_of_bare_codes_needs_a_radius(tmp_path, capsys):
    db = str(tmp_path / "db")
    assert cli(capsys, "add", db, "--bits", "256", "--key", "k", hex_code(0))[0] == 0
    code, _, err = cli(capsys, "query", db, hex_code(0))
    assert code == 2 and "--radius" in err
    code, out, _ = cli(capsys, "query", db, hex_code(0), "--radius", "0", "--json")
    assert code == 0 and json.loads(out)["matches"] == [{"key": "k", "kind": "whole", "distance": 0, "layers": [],
                                                         "verdict": None}]  # fmt: skip


def test_keys_of_model_files_follow_one_rule_and_a_replaced_key_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    npz_model(tmp_path / "C.npz", 1)
    db = str(tmp_path / "db")
    code, out, _ = cli(capsys, "add", db, "--bits", "256", "./C.npz")
    assert code == 0 and out.startswith("added ") and out.split()[-1] == "C.npz"
    code, out, err = cli(capsys, "add", db, str(tmp_path / "C.npz"), "C.npz")
    assert code == 0 and out == "" and "0 added, 0 replaced, 2 unchanged" in err  # stored and unchanged since
    code, out, _ = cli(capsys, "add", db, str(tmp_path / "C.npz"), "C.npz", "--rehash")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["replaced", "replaced"]
    with HashDB(db) as embedded:
        assert list(embedded) == ["C.npz"]
    code, out, _ = cli(capsys, "add", db, "--key", "C.npz", hex_code(2), "--json")
    assert json.loads(out) == {"key": "C.npz", "code": hex_code(2), "replaced": True}


def test_hash_output_pipes_into_add_as_text_and_as_json(tmp_path):
    files = [npz_model(tmp_path / f"m{i}.npz", i) for i in range(3)]
    hashed = run_cli("hash", "--bits", str(BITS), *files)
    assert hashed.returncode == 0, hashed.stderr
    text_db, json_db = str(tmp_path / "text.db"), str(tmp_path / "json.db")
    done = run_cli("add", text_db, "--bits", "256", stdin=hashed.stdout)
    assert done.returncode == 0, done.stderr
    hashed_json = run_cli("hash", "--json", "--bits", str(BITS), *files)
    done = run_cli("add", json_db, "--bits", "256", "--json", stdin=hashed_json.stdout)
    assert done.returncode == 0, done.stderr
    expected = {line.split()[1]: line.split()[0] for line in hashed.stdout.splitlines()}
    assert sorted(expected) == sorted(files)
    config = ModelHasher(bits=BITS).config
    for path, with_codec in ((text_db, False), (json_db, True)):
        with HashDB(path) as embedded:
            assert {k: embedded.get(k)[0].hex() for k in embedded} == expected
            assert (embedded.codec == config) is with_codec  # JSON lines name the codec; bare text does not
            assert embedded.get(files[0])[1] is None  # the config is stored once, with the database
    done = run_cli("query", json_db, files[1])  # the codec came along: the copy radius is known
    assert done.returncode == 0 and "copy" in done.stdout


def test_bad_lines_of_piped_input_are_named_and_the_rest_added(tmp_path):
    db = str(tmp_path / "db")
    good = f"{hex_code(1)}  k1\n{hex_code(2)}  k2\n"
    bad = f"{hex_code(3)[:-2]}  short\n" + '{"key": "j", "code": 5}\n'
    done = run_cli("add", db, "--bits", "256", stdin=good + bad)
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert any("62 digits" in e for e in errors) and any("'code'" in e for e in errors), done.stderr
    with HashDB(db) as embedded:
        assert sorted(embedded) == ["k1", "k2"]


def records_db(path, bits: int = BITS) -> str:
    with HashDB(str(path), bits=bits) as db:
        rng = np.random.default_rng(7)
        keys = ["alpha", "beta, with comma", 'quote "q"', "ünï/cödé", "z" * 300]
        metas = [{"v": 1}, None, {"nested": {"a": [1, 2.5, "x"]}, "ok": True}, {"s": "line\nbreak"}, {}]
        db.insert_many(keys, rng.integers(0, 256, (len(keys), bits // 8), dtype=np.uint8), metas)
        db.set_codec({"codec": "test", "copy_radius": 9})
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_import_export_round_trips_identically(tmp_path, capsys, fmt):
    db = records_db(tmp_path / "db")
    code, first, _ = cli(capsys, "export", db, "--format", fmt)
    assert code == 0 and first
    dump = tmp_path / f"dump.{fmt}"
    dump.write_text(first)
    copy = str(tmp_path / "copy")
    extra = ["--bits", "256"] if fmt == "csv" else []  # CSV says nothing about the width; it is inferred anyway
    code, out, err = cli(capsys, "import", copy, str(dump), *extra)
    assert code == 0, err
    assert "imported 5 records (0 replaced)" in out
    code, second, _ = cli(capsys, "export", copy, "--format", fmt)
    assert second == first
    with HashDB(db) as a, HashDB(copy) as b:
        assert list(a) == list(b)
        assert all(a.get(k) == b.get(k) for k in a)
        assert b.codec == a.codec is not None  # both carry the codec (CSV in its first line, '# {header}')
    code, out, _ = cli(capsys, "import", copy, str(dump), "-q")  # again: every key is replaced, nothing added twice
    assert code == 0 and out == ""
    with HashDB(copy) as b:
        assert len(b) == 5
    narrow = records_db(tmp_path / "narrow", bits=128)  # the header states the width: another width refuses it
    code, _, err = cli(capsys, "import", narrow, str(dump))
    assert code == 2 and "256-bit" in err and "128-bit" in err


def test_import_of_a_new_database_from_csv_infers_the_width_and_names_bad_rows(tmp_path, capsys):
    dump = tmp_path / "codes.csv"
    dump.write_text(f"key,code,meta\na,{hex_code(1)},\nb,{hex_code(2)[:-2]},\nc,{hex_code(3)},{{bad\n")
    db = str(tmp_path / "db")
    code, _, err = cli(capsys, "import", db, str(dump))
    assert code == 2
    assert "line 3" in err and "line 4" in err
    with HashDB(db) as embedded:
        assert embedded.bits == BITS and list(embedded) == ["a"]


def test_list_prints_every_key(tmp_path, capsys):
    db = records_db(tmp_path / "db")
    code, out, _ = cli(capsys, "list", db)
    with HashDB(db) as embedded:
        assert code == 0 and out.splitlines() == list(embedded)
    code, out, _ = cli(capsys, "list", db, "--json")
    assert [json.loads(line)["key"] for line in out.splitlines()][0] == "alpha"


def test_a_mistyped_command_gets_did_you_mean(capsys):
    code, _, err = cli(capsys, "qeury", "db")
    assert code == 2 and "did you mean 'query'?" in err
    code, _, err = cli(capsys, "zzzzzz")
    assert code == 2 and "did you mean" not in err


def test_query_with_socket_and_a_database_path_is_a_usage_error(tmp_path, capsys):
    db = records_db(tmp_path / "db")
    code, _, err = cli(capsys, "query", "--socket", str(tmp_path / "s.sock"), db, hex_code(1))
    assert code == 2 and "not both" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_silences_the_progress_bar(tmp_path, capsys, monkeypatch):
    files = [npz_model(tmp_path / f"m{i}.npz", i) for i in range(2)]
    for quiet, db in ((False, "loud.db"), (True, "quiet.db")):
        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        argv = ["add", str(tmp_path / db), "--bits", "256", *files] + (["-q"] if quiet else [])
        assert main(argv) == 0
        monkeypatch.undo()
        assert ("2/2 models" in terminal.getvalue()) is not quiet
        assert (capsys.readouterr().out == "") is quiet


def test_progress_bar_shows_rate_and_eta():
    stream = io.StringIO()
    bar = Progress(4, "models", stream=stream, enabled=True)
    bar.advance(1)
    bar._draw(bar.start + 2.0)  # 1 model in 2 s: 0.5/s, 3 left: 6 s
    assert "1/4 models 0.5/s ETA 00:06" in stream.getvalue()


def test_ctrl_c_during_add_commits_what_was_hashed_and_says_how_many(tmp_path):
    import os
    import subprocess
    import sys

    from frontend_helpers import REPO

    files = [npz_model(tmp_path / f"m{i:03d}.npz", i) for i in range(1000)]
    db = str(tmp_path / "db")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    import time

    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
        # one worker: hashing in this process is slow enough that the interrupt lands mid-way
        proc = subprocess.Popen([sys.executable, "-m", "hashdb", "add", db, "--bits", "256", "--workers", "1", *files],
                                stdout=out_file, stderr=err_file, cwd=str(REPO), env=env,
                                # a shell that started this run in the background ignores SIGINT, and the
                                # child would inherit that: give it the default a terminal would
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "\n" not in out_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the first commit (after ADD_FLUSH_S) is out: hashing is under way
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out, err = out_path.read_text(), err_path.read_text()
    assert out.startswith("added "), err
    assert proc.returncode == 130, err
    import re

    found = re.search(r"interrupted: added (\d+) of 1000 entries", err)
    assert found and "Traceback" not in err, err
    added = int(found.group(1))
    assert 0 < added < 1000
    assert len(out.splitlines()) == added  # every committed entry was reported, and only those
    with HashDB(db) as embedded:
        assert len(embedded) == added
        assert sorted(embedded) == sorted(files[:added])


def test_one_bad_key_among_good_files_is_rejected_alone(tmp_path):
    import os
    import subprocess
    import sys

    from frontend_helpers import REPO

    deep = tmp_path / ("a" * 200) / ("b" * 200)
    deep.mkdir(parents=True)
    too_long = npz_model(deep / ("c" * 200 + ".npz"), 1)  # over LMDB's key limit (511 bytes)
    assert len(os.fsencode(too_long)) > 600
    not_utf8 = os.path.join(os.fsencode(tmp_path), b"caf\xe9.npz")
    npz_model(not_utf8, 2)
    good = [npz_model(tmp_path / f"g{i}.npz", 10 + i) for i in range(3)]
    db = str(tmp_path / "db")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "hashdb", "add", db, "--bits", "256", good[0], too_long, good[1], not_utf8, good[2]]
    done = subprocess.run(argv, capture_output=True, cwd=str(REPO), env=env, timeout=120)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    errors = stderr.strip().splitlines()
    assert any("c" * 200 in e and "utf-8 bytes" in e for e in errors), stderr
    assert any("caf\\xe9.npz" in e for e in errors), stderr
    assert "2 of 5 entries could not be added" in errors[-1]
    with HashDB(db) as embedded:
        assert sorted(embedded) == sorted(good)


def test_a_library_error_during_add_is_one_line_not_a_traceback(tmp_path):
    """A full disk (here: a file size limit) while committing: one line, exit 2; earlier commits stay."""
    import os
    import resource
    import subprocess
    import sys

    from frontend_helpers import REPO

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))  # Python ignores SIGXFSZ

    lines = "".join(f"{hex_code(i % 50)}  key-{i:06d}-{'x' * 100}\n" for i in range(4000))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    db = str(tmp_path / "db")
    done = subprocess.run(
        [sys.executable, "-m", "hashdb", "add", db, "--bits", "256", "-q"],
        input=lines, capture_output=True, text=True, cwd=str(REPO), env=env, timeout=120, preexec_fn=small_files,
    )  # fmt: skip
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("hashdb: error:"), done.stderr
    with HashDB(db) as embedded:  # what was committed before the disk filled is intact
        assert len(embedded) < 4000
        assert all(embedded.get(key)[0].hex() == hex_code(int(key[4:10]) % 50) for key in embedded)


def test_torch_free_paths_hash_every_file_and_the_demo_names_the_extra(tmp_path):
    """Without torch (import blocked), .npz, .safetensors and .pt files (zip and legacy, read by hashdb's own
    unpickler) hash to the codes they get with torch present; `hashdb demo`, which trains, names the extra."""
    import os
    import subprocess
    import sys

    from frontend_helpers import REPO

    from hashdb.codec import hash_model

    torch = pytest.importorskip("torch")
    weights = {"c1.weight": torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(1))}
    legacy, zipped = tmp_path / "legacy.pt", tmp_path / "zipped.pt"
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    torch.save(weights, zipped)
    npz = npz_model(tmp_path / "m.npz", 0)
    from safetensors.numpy import save_file

    st = str(tmp_path / "m.safetensors")
    save_file({"c1.weight": np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32)}, st)
    files = [npz, st, str(legacy), str(zipped)]
    script = "import sys; sys.modules['torch'] = None; from hashdb.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script, "hash", *files],
                          capture_output=True, text=True, cwd=str(REPO), env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [line.split() for line in done.stdout.splitlines()] == [[hash_model(f).hex(), f] for f in files]
    demo = subprocess.run([sys.executable, "-c", script, "demo", "--seeds", "1"],
                          capture_output=True, text=True, cwd=str(REPO), env=env, timeout=120)  # fmt: skip
    assert demo.returncode == 2
    assert "pip install hashdb[torch]" in demo.stderr
    assert len(demo.stderr.strip().splitlines()) == 1


def test_installing_hashdb_does_not_pull_torch():
    import tomllib

    from frontend_helpers import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["torch"])
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["test"])


def test_a_query_by_code_from_a_fresh_process_loads_only_what_it_needs(tmp_path):
    """`hashdb query DB HEX` answers from the index file with numpy alone: no numba, no torch, not the hasher's
    modules (a query by code needs the codec's radius and null only), and not numpy.ma, which np.unique imports
    (each costs a fresh process milliseconds: bench/startup_bench.py)."""
    import subprocess
    import sys

    from db_helpers import REPO

    from hashdb.live_index import PERSIST_MIN_CODES

    path = str(tmp_path / "db")
    codes = np.random.default_rng(0).integers(0, 256, (PERSIST_MIN_CODES, 8), dtype=np.uint8)
    with HashDB(path, bits=64) as db:
        db.insert_many([f"k{i}" for i in range(len(codes))], codes)
    assert os.path.exists(os.path.join(path, "index.hashdb"))  # the query below reads the index file
    script = (
        "import sys\nfrom hashdb.cli import main\n"
        f"rc = main(['query', {path!r}, {codes[7].tobytes().hex()!r}, '--radius', '2'])\n"
        "print(rc, *[m for m in ('numpy.ma', 'hashdb.codec.hasher', 'numba', 'torch') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True,
                         timeout=120)  # fmt: skip
    assert "k7" in out.stdout and out.stdout.split("\n")[-2] == "0"
