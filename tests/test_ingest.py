"""The ingest pipeline (hashdb.ingest, HashDB.add_models, `hashdb add`) and what flows through it from hostile
folders and file names: incremental adds, same-content notes, databases created only where they belong,
folders walked without hanging, names that cannot forge output lines or records."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from cnn_format_writers import openvino_files, torch_layers
from formats_writers import keras_names, tf_checkpoint
from frontend_helpers import run_cli

from hashdb import HashDB
from hashdb.cli import main
from hashdb.codec import ModelHasher
from hashdb.codec.units import expand, find_units

BITS = 256


def npz_model(path: Path | str, seed: int) -> str:
    """A small two-layer CNN as .npz (no torch needed to write or hash it)."""
    rng = np.random.default_rng(seed)
    weights = {"c1.weight": rng.standard_normal((16, 3, 3, 3)), "c2.weight": rng.standard_normal((16, 16, 3, 3))}
    with open(path, "wb") as f:
        np.savez(f, **{k: v.astype(np.float32) for k, v in weights.items()})
    return str(path)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "zoo"
    folder.mkdir()
    for seed in range(3):
        npz_model(folder / f"m{seed}.npz", seed)
    return folder


# -- the library pipeline -----------------------------------------------------------------------------------


def test_add_models_stores_codes_and_file_identity_and_skips_unchanged_files(zoo: Path, tmp_path: Path) -> None:
    with HashDB(tmp_path / "db", bits=BITS) as db:
        first = list(db.add_models([zoo], workers=1))
        assert sorted((o.key, o.status) for o in first) == [(f"zoo/m{i}.npz", "added") for i in range(3)]
        _, meta = db.get("zoo/m1.npz")
        assert meta is not None and meta["file"]["size"] == (zoo / "m1.npz").stat().st_size
        assert db.codec is not None and db.codec["bits"] == BITS
        again = list(db.add_models([zoo], workers=1))
        assert [o.status for o in again] == ["unchanged"] * 3
        npz_model(zoo / "m1.npz", 7)  # changed bytes (and size/mtime): hashed again
        os.utime(zoo / "m1.npz", ns=(time.time_ns(), time.time_ns() + 10**9))
        changed = {o.key: o for o in db.add_models([zoo], workers=1)}
        assert changed["zoo/m1.npz"].status == "replaced" and changed["zoo/m0.npz"].status == "unchanged"
        assert db.get("zoo/m1.npz")[0] == changed["zoo/m1.npz"].code
        forced = list(db.add_models([zoo], workers=1, incremental=False))
        assert [o.status for o in forced] == ["replaced"] * 3


def _layers_sd(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"c1.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
            "c2.weight": rng.standard_normal((16, 16, 3, 3)).astype(np.float32)}  # fmt: skip


def test_a_changed_weights_file_of_a_pair_or_a_nested_folder_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An OpenVINO unit is its .xml, its weights are the .bin beside it; a SavedModel's weights lie under
    # variables/. Both must count in the stored identity, or a changed model reads as "unchanged".
    monkeypatch.chdir(tmp_path)
    ov, other, saved = tmp_path / "zoo" / "ov", tmp_path / "other", tmp_path / "zoo" / "saved"
    for folder in (ov, other, saved / "variables"):
        folder.mkdir(parents=True)
    xml, weights = openvino_files(ov, torch_layers(_layers_sd(1)))
    other_xml, other_weights = openvino_files(other, torch_layers(_layers_sd(2)))
    assert xml.read_bytes() == other_xml.read_bytes() and weights.read_bytes() != other_weights.read_bytes()
    (saved / "saved_model.pb").write_bytes(b"\x08\x01graph, not read")
    tf_checkpoint(saved / "variables" / "variables", keras_names(_layers_sd(3), optimizer=False))
    with HashDB(tmp_path / "db", bits=BITS) as db:
        first = sorted((o.key, o.status) for o in db.add_models(["zoo"], workers=1))
        assert first == [("zoo/ov/model.xml", "added"), ("zoo/saved", "added")]
        assert [o.status for o in db.add_models(["zoo"], workers=1)] == ["unchanged"] * 2
        later = time.time_ns() + 10**9
        weights.write_bytes(other_weights.read_bytes())  # the same size: only the weights differ
        os.utime(weights, ns=(later, later))
        tf_checkpoint(saved / "variables" / "variables", keras_names(_layers_sd(4), optimizer=False))
        for data in (saved / "variables").iterdir():
            os.utime(data, ns=(later, later))
        changed = {o.key: o for o in db.add_models(["zoo"], workers=1)}
        assert {k: o.status for k, o in changed.items()} == {"zoo/ov/model.xml": "replaced", "zoo/saved": "replaced"}
        hasher = ModelHasher(BITS)
        assert db.get("zoo/ov/model.xml")[0] == hasher.hash(other_xml)
        assert db.get("zoo/saved")[0] == hasher.hash(saved)


def test_identical_bytes_under_another_key_are_named(zoo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "same.npz").write_bytes((zoo / "m2.npz").read_bytes())
    with HashDB(tmp_path / "db", bits=BITS) as db:
        list(db.add_models([zoo], workers=1))
        [outcome] = list(db.add_models([other / "same.npz"], workers=1))
        assert outcome.status == "added" and outcome.same_content == ("zoo/m2.npz",)
    (other / "third.npz").write_bytes((zoo / "m2.npz").read_bytes())
    code, _, err = cli(capsys, "add", str(tmp_path / "db"), "elsewhere/third.npz")
    assert code == 0 and "elsewhere/third.npz has the same bytes as elsewhere/same.npz, zoo/m2.npz" in err


def test_add_ends_with_a_one_line_summary(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (zoo / "bad.npz").write_bytes(b"not a model")
    code, out, err = cli(capsys, "add", str(tmp_path / "db"), "--bits", "256", "zoo", "--workers", "1")
    assert code == 2 and len(out.splitlines()) == 3
    assert "3 added, 0 replaced, 0 unchanged (not hashed again), 1 failed, of 4 entries" in err


# -- where a database may be created -------------------------------------------------------------------------


def test_add_never_turns_a_folder_of_files_into_a_database(zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(os.listdir(zoo))
    code, _, err = cli(capsys, "add", "zoo", "--bits", "256", "zoo/m0.npz")
    assert code == 2 and "zoo is not a hashdb database" in err and "new or empty folder" in err
    assert sorted(os.listdir(zoo)) == before


def test_a_failed_first_add_leaves_nothing_behind(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.npz").write_bytes(b"junk")
    code, _, _ = cli(capsys, "add", "newdb", "--bits", "256", "bad.npz")
    assert code == 2 and not (tmp_path / "newdb").exists()
    (tmp_path / "empty").mkdir()
    code, _, _ = cli(capsys, "add", "empty", "--bits", "256", "bad.npz")
    assert code == 2 and os.listdir(tmp_path / "empty") == []
    code, _, _ = cli(capsys, "add", "empty", "--bits", "256", "zoo/m0.npz")  # an empty folder may become one
    assert code == 0 and (tmp_path / "empty" / "data.mdb").is_file()


def test_query_takes_a_folder_of_suspects(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "add", "db", "--bits", "256", "zoo", "-q")[0] == 0
    code, out, _ = cli(capsys, "query", "db", "zoo", "--radius", "0", "--json")
    docs = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [d["query"] for d in docs] == [f"zoo/m{i}.npz" for i in range(3)]
    assert all({k: d["matches"][0][k] for k in ("key", "distance", "verdict", "same_bytes")}
               == {"key": d["query"], "distance": 0, "verdict": "copy", "same_bytes": True} for d in docs)  # fmt: skip
    (tmp_path / "moved.npz").write_bytes((zoo / "m1.npz").read_bytes())
    code, out, _ = cli(capsys, "query", "db", "moved.npz", "--radius", "0")
    assert code == 0 and "zoo/m1.npz (same bytes)" in out


# -- folders walked: regular files only, bad entries named (issue 17.7, 17.9) --------------------------------


def test_a_fifo_or_dev_zero_named_like_a_shard_index_does_not_hang_hash(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    npz_model(hf / "model.npz", 1)
    os.mkfifo(hf / "model.safetensors.index.json")
    zero = tmp_path / "zero"
    zero.mkdir()
    npz_model(zero / "model.npz", 2)
    os.symlink("/dev/zero", zero / "pytorch_model.bin.index.json")
    started = time.monotonic()
    done = run_cli("hash", str(hf), str(zero), "--workers", "1", timeout=60)
    assert time.monotonic() - started < 60
    assert [line.split()[1] for line in done.stdout.splitlines()] == [str(hf / "model.npz"), str(zero / "model.npz")]


def test_a_symlink_loop_in_a_folder_is_named_and_the_good_models_are_added(
    zoo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.symlink("loop.npz", zoo / "loop.npz")
    os.mkfifo(zoo / "pipe.npz")
    units, errors = expand([zoo])
    assert [u.key for u in units] == [f"zoo/m{i}.npz" for i in range(3)]
    assert [(e.key, "skipped" in str(e.error)) for e in errors] == [("zoo/loop.npz", True), ("zoo/pipe.npz", True)]
    assert [u.key for u in find_units(zoo)] == [u.key for u in units]
    code, out, err = cli(capsys, "add", "db", "--bits", "256", "zoo", "--workers", "1")
    assert code == 2 and len(out.splitlines()) == 3
    assert "zoo/loop.npz: skipped" in err and "zoo/pipe.npz: skipped: not a regular file" in err


def test_a_shard_linked_from_outside_the_folder_is_refused_without_its_bytes(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08 top secret")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    os.symlink(secret, hf / "model-1.safetensors")
    done = run_cli("hash", str(hf), timeout=60)
    assert done.returncode == 2 and "outside the model folder" in done.stderr
    assert str(int.from_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08", "little")) not in done.stderr
    assert "top secret" not in done.stderr


# -- names that forge output (issue 17.4) --------------------------------------------------------------------


FORGED = "m.npz\n" + "0" * 64 + "  resnet50-official"


def test_a_file_name_cannot_forge_a_record_through_hash_and_add(tmp_path: Path) -> None:
    inj = tmp_path / "inj"
    inj.mkdir()
    with open(inj / FORGED, "wb") as f:  # .npy bytes: read by their leading bytes whatever the name's suffix
        np.save(f, np.random.default_rng(1).standard_normal((16, 3, 3, 3)).astype(np.float32))
    npz_model(inj / "ok.npz", 2)
    db = str(tmp_path / "db")
    official = npz_model(tmp_path / "r.npz", 3)
    assert run_cli("add", db, "--bits", "256", "--key", "resnet50-official", official).returncode == 0
    names = [str(inj / FORGED), str(inj / "ok.npz")]  # as a shell glob (inj/*) names them
    hashed = run_cli("hash", "--bits", "256", *names)
    assert hashed.returncode == 2 and "control character" in hashed.stderr and "\\n" in hashed.stderr
    assert len(hashed.stdout.splitlines()) == 1  # ok.npz only
    run_cli("add", db, stdin=hashed.stdout)
    with HashDB(db) as stored:
        assert stored.get("resnet50-official")[0] != bytes(32)
        assert sorted(stored) == sorted(["resnet50-official", str(inj / "ok.npz")])
    exact = run_cli("hash", *names, "--json")  # --json keeps the exact name
    assert FORGED in [Path(json.loads(line)["key"]).name for line in exact.stdout.splitlines()]


def test_keys_and_errors_with_control_characters_print_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "db")
    code_hex = "ab" * 32
    assert cli(capsys, "add", db, "--bits", "256", "--key", "evil\n  999  forged\x1b[2J", code_hex)[0] == 0
    for argv in (["list", db], ["query", db, code_hex, "--radius", "0"], ["get", db, "evil\n  999  forged\x1b[2J"]):
        code, out, err = cli(capsys, *argv)
        assert code == 0 and "\x1b" not in out and "\\x1b[2J" in out, argv
        assert not any(line.lstrip().startswith("999") for line in out.splitlines()), out
    code, out, _ = cli(capsys, "list", db, "--json")
    assert json.loads(out)["key"] == "evil\n  999  forged\x1b[2J"  # --json stays exact
    code, _, err = cli(capsys, "hash", str(tmp_path / "no\x1b[31mfile.npz"))
    assert code == 2 and "\x1b" not in err and "\\x1b[31m" in err and len(err.strip().splitlines()) == 1


# -- CLI niceties ---------------------------------------------------------------------------------------------


def test_every_command_help_ends_with_an_example() -> None:
    from hashdb.cli import build_parser

    commands = build_parser().commands  # type: ignore[attr-defined]
    for name, parser in commands.items():
        if name != "demo":  # the demo parses its own arguments
            assert f"example: hashdb {name} " in " ".join(parser.format_help().split()), name


def test_reading_inputs_from_a_terminal_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from hashdb.cli import _inputs

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert list(_inputs([], Terminal("a\n\nb\n"))) == ["a", "b"]
    assert "reading inputs from the terminal" in capsys.readouterr().err
    assert list(_inputs([], io.StringIO("a\n"))) == ["a"]  # a pipe: nothing said
    assert capsys.readouterr().err == ""


def test_add_key_of_a_model_always_stores_it(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "add", "db", "--bits", "256", "--key", "k", "zoo/m0.npz")[0] == 0
    code, out, _ = cli(capsys, "add", "db", "--key", "k", "zoo/m0.npz")
    assert code == 0 and out.startswith("replaced ")
