"""The hashdb command: in-process through main(argv) where that is enough, as a subprocess where it matters
(exit codes of the real process, stdin, pipes, a server on a socket)."""

from __future__ import annotations

import io
import json
import signal

import numpy as np
import pytest
from frontend_helpers import run_cli, short_socket_path, start_server_process

from hashdb.cli import Progress, main
from hashdb.db import HashDB

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
    for command in ("add", "query", "delete", "get", "stats", "serve", "hash", "demo"):
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
    assert all(len(line.split()[0]) == BITS // 4 for line in lines)
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 3
    for bad, line in zip([models["linear"], models["empty"], models["missing"]], errors, strict=True):
        assert bad in line and line.startswith("hashdb: error:")
    assert "Traceback" not in done.stderr


def test_hash_json_is_stable_and_matches_the_library(models, capsys):
    from hashdb.codec import ModelHasher

    code, out, _ = cli(capsys, "hash", "--json", "--bits", "128", models["m0"], models["m2"])
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [sorted(d) for d in docs] == [["bits", "code", "path"]] * 2
    hasher = ModelHasher(bits=128)
    assert docs[0] == {"path": models["m0"], "code": hasher.hash(models["m0"]).hex(), "bits": 128}
    assert docs[1]["code"] == hasher.hash(models["m2"]).hex()


def test_add_models_then_query_finds_the_copy(models, tmp_path, capsys):
    db = str(tmp_path / "db")
    code, out, err = cli(capsys, "add", db, models["m0"], models["m1"], models["m2"], "--meta", '{"owner": "lab"}')
    assert code == 0, err
    assert len(out.splitlines()) == 3
    code, out, _ = cli(capsys, "query", db, models["copy0"], "--radius", "20", "--json")
    assert code == 0
    doc = json.loads(out)
    assert sorted(doc) == ["code", "matches", "query"]
    assert doc["matches"][0]["key"] == models["m0"]
    assert doc["matches"][0]["distance"] <= 20
    with HashDB(db, bits=None) as embedded:
        _, meta = embedded.get(models["m1"])
        assert embedded.codec == meta["codec"]
    assert meta["owner"] == "lab"
    assert meta["codec"]["bits"] == BITS and "encoding" in meta["codec"]


def test_add_reports_bad_files_but_stores_the_good_ones(models, tmp_path):
    db = str(tmp_path / "db")
    done = run_cli("add", db, models["m0"], models["linear"], models["m1"])
    assert done.returncode == 2
    assert models["linear"] in done.stderr and "\r" not in done.stderr  # no progress bar into a pipe
    with HashDB(db, bits=None) as embedded:
        assert sorted(embedded) == sorted([models["m0"], models["m1"]])


def test_add_with_key_query_get_delete_exit_codes(tmp_path, capsys):
    db = str(tmp_path / "db")
    a, b = hex_code(1), hex_code(2)
    assert cli(capsys, "add", db, "--key", "alpha", a, "--meta", '{"v": 1}')[0] == 0
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
    code, _, err = cli(capsys, "add", str(tmp_path / "db"), hex_code(3))
    assert code == 2 and "--key" in err


def test_query_reads_codes_from_stdin(tmp_path):
    db = str(tmp_path / "db")
    codes = [hex_code(i) for i in range(4)]
    for i, c in enumerate(codes):
        assert run_cli("add", db, "--key", f"k{i}", c).returncode == 0
    done = run_cli("query", db, "--radius", "0", "--json", stdin="\n".join(codes[1:3]) + "\n\n")
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["matches"] for d in docs] == [[{"key": "k1", "distance": 0}], [{"key": "k2", "distance": 0}]]
    done = run_cli("delete", db, "-", stdin="k0\nk3\n")
    assert done.returncode == 0
    with HashDB(db, bits=None) as embedded:
        assert sorted(embedded) == ["k1", "k2"]


def test_commands_through_a_running_server(tmp_path, models):
    db, sock = str(tmp_path / "db"), short_socket_path(tmp_path)
    proc = start_server_process(db, sock)
    try:
        assert run_cli("add", "--socket", sock, models["m0"], models["m1"]).returncode == 0
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
    proc = start_server_process(db, sock)
    try:
        done = run_cli("serve", str(tmp_path / "db2"), "--socket", sock)
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
    assert run_cli("add", db, "--key", "only", hex_code(0)).returncode == 0
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
        code, _, err = cli(capsys, "add", db, "--key", "k", hex_code(1), "--meta", meta)
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
    assert run_cli("add", db, "--key", "k1", hex_code(1)).returncode == 0
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
