"""Hashing workers (hashdb.bulk's local engine): a worker that dies, hangs or cannot start is an error for its
file (or, if it cannot start, for the run), never a hang; workers import this hashdb whatever the current
directory holds. Faults are injected with a module each worker imports before its hasher (``_preload``:
tests/worker_faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hashdb import HashDBError
from hashdb.bulk import hash_units


def models(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        kernels = np.random.default_rng(seed).standard_normal((8, 4, 3, 3)).astype(np.float32)
        np.save(folder / f"{name}.npy", kernels)
    return folder


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an importable module that makes the hasher die or hang on files named exit*, segv*, slow*."""
    where = tmp_path / "modules"
    where.mkdir()
    (where / "hashdb_test_broken.py").write_text("raise ImportError('cannot import name __version__')\n")
    tests = str(Path(__file__).parent)  # worker_faults.py
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(where), tests, os.environ.get("PYTHONPATH", "")]))
    return "worker_faults"


def outcome(results: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {r.key.rsplit("/", 1)[-1]: ("ok" if r.code is not None else str(r.error)) for r in results}


def test_a_worker_that_dies_is_an_error_for_its_file_and_the_rest_are_hashed(tmp_path: Path, faults: str) -> None:
    zoo = models(tmp_path / "zoo", ["a", "exit1", "b", "segv1", "c", "exit2", "d"])
    expected = {r.key: r.code for r in hash_units([zoo], engine="inline")}
    started = time.monotonic()
    results = list(hash_units([zoo], workers=2, _preload=[faults]))
    assert time.monotonic() - started < 60
    got = outcome(results)
    assert [r.key for r in results] == sorted(expected)  # input order, every unit once
    assert {k: v for k, v in got.items() if v == "ok"} == {f"{n}.npy": "ok" for n in "abcd"}
    assert "died (exit status 3)" in got["exit1.npy"] and "exit1.npy" in got["exit1.npy"]
    assert "died (killed by SIGSEGV)" in got["segv1.npy"]
    assert "\n" not in got["segv1.npy"]
    good = {r.key: r.code for r in results if r.code is not None}
    assert good == {k: v for k, v in expected.items() if k in good}  # the same codes as in-process


def test_a_file_over_the_time_limit_is_an_error_and_its_worker_is_replaced(tmp_path: Path, faults: str) -> None:
    zoo = models(tmp_path / "zoo", ["a", "slow1", "b", "c"])
    started = time.monotonic()
    got = outcome(list(hash_units([zoo], workers=1, timeout=2.0, _preload=[faults])))
    assert time.monotonic() - started < 30
    assert "took longer than 2 s" in got["slow1.npy"]
    assert [name for name, v in got.items() if v == "ok"] == ["a.npy", "b.npy", "c.npy"]


def test_a_worker_that_cannot_start_ends_the_run_with_one_error(tmp_path: Path, faults: str) -> None:
    zoo = models(tmp_path / "zoo", ["a", "b", "c"])
    started = time.monotonic()
    with pytest.raises(HashDBError, match=r"hashing worker could not start: ImportError: cannot import name") as e:
        list(hash_units([zoo], workers=2, _preload=["hashdb_test_broken"]))
    assert "\n" not in str(e.value) and time.monotonic() - started < 60


def test_bad_timeouts_are_refused(tmp_path: Path) -> None:
    for bad in (0, -1, "5", True):
        with pytest.raises(HashDBError, match="timeout"):
            list(hash_units([tmp_path], timeout=bad))  # type: ignore[arg-type]


def test_workers_import_this_hashdb_even_beside_a_folder_named_hashdb(tmp_path: Path) -> None:
    """Run from the parent of a clone (a folder named hashdb that is not the installed package), workers
    once imported that folder, died on start-up and were respawned forever."""
    models(tmp_path / "zoo", ["a", "b", "c"])
    shadow = tmp_path / "hashdb"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError(\"cannot import name '__version__'\")\n")
    script = textwrap.dedent(f"""
        import os, sys
        from hashdb.bulk import hash_units
        os.chdir({str(tmp_path)!r})
        results = list(hash_units(["zoo"], workers=2))
        print(sorted((r.key, r.code is not None) for r in results))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str([("zoo/a.npy", True), ("zoo/b.npy", True), ("zoo/c.npy", True)])


def test_a_pickle_that_segfaults_its_reader_is_one_bad_file_for_add_and_hash(tmp_path: Path) -> None:
    """Issue 17.1: a 300 KB pickle whose dict key is a tuple nested 300,000 deep crashed every process that
    hashed it (CPython's tuple hash recurses without a guard), and `add` with the pool never finished. Now
    the file is an error (its worker died, or the unpickler refuses the depth) and the others are added."""
    from frontend_helpers import run_cli

    zoo = models(tmp_path / "zoo", ["m0", "m1", "m2"])
    (zoo / "bomb.pt").write_bytes(b"\x80\x02})" + b"\x85" * 300_000 + b"Ns.")
    db = str(tmp_path / "db")
    done = run_cli("add", db, "--bits", "256", str(zoo), "--workers", "2", timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [error] = [line for line in done.stderr.splitlines() if line.startswith("hashdb: error:")]
    assert "bomb.pt" in error
    assert sorted(line.split()[-1].rsplit("/", 1)[-1] for line in done.stdout.splitlines()) == [
        "m0.npy", "m1.npy", "m2.npy"]  # fmt: skip
    hashed = run_cli("hash", str(zoo / "bomb.pt"), str(zoo / "m0.npy"), timeout=120)
    assert hashed.returncode == 2 and "bomb.pt" in hashed.stderr and len(hashed.stdout.splitlines()) == 1
