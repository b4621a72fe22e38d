"""Per-layer codes through every pipeline (issue 15.1): hashing workers return them, `add` stores them with the
model's code, an entry stored before layer codes existed is hashed once more, the server and client carry them
(insert, insert_many, layers, layer_radius, layer_radius_many), and export/import keeps them."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from evidence_helpers import make_cnn, numpy_sd
from frontend_helpers import frames, raw_connect, read_reply, run_cli, server_thread, short_socket_path

import hashdb
from hashdb import HashDB
from hashdb.bulk import hash_units
from hashdb.codec import ModelHasher
from hashdb.codec.units import unit_key
from hashdb.errors import ERROR_TYPES, InvalidArgument
from hashdb.ingest import add_models
from hashdb.transfer import export, import_rows, read_export

BITS = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small untrained CNNs (16-32 filters per conv: each conv gets a layer code), as .npz and torch .pt."""
    folder = tmp_path_factory.mktemp("models")
    np.savez(folder / "cnn1.npz", **numpy_sd(make_cnn(1)))
    torch.save(make_cnn(2).state_dict(), folder / "cnn2.pt")
    return folder


def key_of(models: Path, name: str) -> str:
    return unit_key(models / name)


@pytest.fixture(scope="module")
def expected(models: Path) -> dict[str, tuple[bytes, list[tuple[str, bytes]]]]:
    """What hash_with_layers gives each model, by its key in a database."""
    hasher = ModelHasher(BITS)
    return {unit_key(models / name): hasher.hash_with_layers(models / name) for name in ("cnn1.npz", "cnn2.pt")}


def test_the_models_have_layer_codes(expected: dict[str, tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    for code, layers in expected.values():  # the tests below would prove little with no layers to carry
        assert len(layers) >= 3 and all(len(c) == BITS // 8 for _, c in layers) and len(code) == BITS // 8
    first, second = expected.values()
    assert first[1] != second[1]


@pytest.mark.parametrize("engine, workers", [("inline", None), ("local", 2)])
def test_hashing_workers_return_each_layers_code(
    models: Path, expected: dict, engine: str, workers: int | None
) -> None:
    results = {r.key: r for r in hash_units([models], bits=BITS, engine=engine, workers=workers)}
    assert set(results) == set(expected)
    for key, (code, layers) in expected.items():
        assert results[key].error is None
        assert (results[key].code, results[key].layers) == (code, layers)


def test_a_failed_unit_has_no_layers(tmp_path: Path, models: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    bad, good = hash_units([tmp_path / "bad.npz", models / "cnn1.npz"], bits=BITS, workers=1)
    assert bad.error is not None and bad.code is None and bad.layers is None
    assert good.error is None and good.layers


@pytest.mark.parametrize("workers", [1, 2])
def test_add_models_stores_the_layer_codes_of_hash_with_layers(
    tmp_path: Path, models: Path, expected: dict, workers: int
) -> None:
    with HashDB(tmp_path / "db", bits=BITS) as db:
        outcomes = list(add_models(db, [models], workers=workers))
        assert {o.key: o.status for o in outcomes} == dict.fromkeys(expected, "added")
        for key, (code, layers) in expected.items():
            assert db.get(key)[0] == code
            assert db.layers(key) == layers
            assert db.get(key)[1]["file"]["layers"] == len(layers)  # type: ignore[index]
        cnn2 = key_of(models, "cnn2.pt")
        name, first = expected[cnn2][1][0]
        assert (cnn2, name, 0) in db.layer_radius(first, 0)


def test_a_model_stored_before_layer_codes_is_hashed_once_more_then_unchanged(
    tmp_path: Path, models: Path, expected: dict
) -> None:
    with HashDB(tmp_path / "db", bits=BITS) as db:
        list(add_models(db, [models], workers=1))
        cnn1, cnn2 = key_of(models, "cnn1.npz"), key_of(models, "cnn2.pt")
        code, meta = db.get(cnn1)
        assert meta is not None
        old = {**meta, "file": {k: v for k, v in meta["file"].items() if k != "layers"}}
        db.insert(cnn1, code, old)  # as an add before this change stored it: no layers, no marker
        assert db.layers(cnn1) == []
        again = {o.key: o.status for o in add_models(db, [models], workers=1)}
        assert again == {cnn1: "replaced", cnn2: "unchanged"}
        assert db.layers(cnn1) == expected[cnn1][1]
        assert {o.key: o.status for o in add_models(db, [models], workers=1)} == dict.fromkeys(expected, "unchanged")


def test_a_code_without_layers_replaces_a_models_layers(tmp_path: Path, models: Path, expected: dict) -> None:
    from hashdb.ingest import Entry

    cnn1, cnn2 = key_of(models, "cnn1.npz"), key_of(models, "cnn2.pt")
    with HashDB(tmp_path / "db", bits=BITS) as db:
        list(add_models(db, [models], workers=1))
        list(add_models(db, [Entry(cnn1, expected[cnn2][0])]))  # a `hashdb hash` line: a code, no layers
        assert db.get(cnn1)[0] == expected[cnn2][0]
        assert db.layers(cnn1) == [] and db.layers(cnn2) == expected[cnn2][1]


# ---- server and client ----------------------------------------------------------------------------------


def layer_code(i: int) -> bytes:
    return int(i).to_bytes(BITS // 8, "big")


@pytest.fixture
def served(tmp_path: Path):
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    path = short_socket_path(tmp_path)
    with server_thread(db, path):
        yield db, path
    db.close()


def test_client_insert_with_layers_and_layer_queries_round_trip(served) -> None:
    db, path = served
    with hashdb.connect(path, timeout=30) as client:
        client.insert("a", layer_code(1), {"n": 1}, layers=[("conv1", layer_code(1)), ("conv2", layer_code(3))])
        assert client.insert_many(["b", "c"], [layer_code(2), layer_code(4)],
                                  layers=[[("stem", layer_code(3).hex())], None]) == 2  # fmt: skip
        assert client.layers("a") == [("conv1", layer_code(1)), ("conv2", layer_code(3))] == db.layers("a")
        assert client.layers("b") == [("stem", layer_code(3))] and client.layers("c") == []
        hits = client.layer_radius(layer_code(3), 0)
        assert hits == [("a", "conv2", 0), ("b", "stem", 0)] == db.layer_radius(layer_code(3), 0)
        many = client.layer_radius_many([layer_code(1), layer_code(3)], 1)
        assert many == db.layer_radius_many([layer_code(1), layer_code(3)], 1)
        assert ("a", "conv1", 0) in many[0] and len(many[1]) >= 2
        with pytest.raises(hashdb.KeyNotFound):
            client.layers("nope")
        with pytest.raises(InvalidArgument):
            client.insert("d", layer_code(5), layers=[("only a name",)])  # type: ignore[list-item]
        client.insert("a", layer_code(1))  # replacing a model without layers removes its layers
        assert client.layers("a") == [] and client.layer_radius(layer_code(1), 0) == []


@pytest.mark.parametrize(
    "op, layers",
    [
        ("insert", "conv1"),
        ("insert", [["conv1"]]),
        ("insert", [["conv1", layer_code(1), "extra"]]),
        ("insert", [["", layer_code(1)]]),
        ("insert", [[7, layer_code(1)]]),
        ("insert", [["conv1", b"short"]]),
        ("insert_many", [["conv1", layer_code(1)]]),
        ("insert_many", "conv1"),
        ("insert_many", [[["conv1", layer_code(1)]], None]),  # two entries for one key
    ],
)
def test_a_bad_layers_argument_gets_an_error_reply_and_the_server_serves_on(served, op: str, layers) -> None:
    db, path = served
    db.insert("keep", layer_code(9), layers=[("conv", layer_code(9))])
    args = {"key": "x", "code": layer_code(1)} if op == "insert" else {"keys": ["x"], "codes": [layer_code(1)]}
    with raw_connect(path) as sock:
        sock.sendall(frames({"id": 1, "op": op, "layers": layers, **args}, {"id": 2, "op": "layers", "key": "keep"}))
        reply = read_reply(sock)
        assert reply is not None and reply["id"] == 1 and "error" in reply, reply
        assert reply["error"]["type"] in ERROR_TYPES and reply["error"]["type"] != "ServerError"
        assert read_reply(sock) == {"id": 2, "ok": [["conv", layer_code(9)]]}
        sock.sendall(frames({"id": 3, "op": "layer_radius", "code": layer_code(9), "r": 0}))
        assert read_reply(sock) == {"id": 3, "ok": [["keep", "conv", 0]]}
    assert "x" not in db and len(db) == 1


def test_layer_answers_over_the_reply_bound_are_refused_and_the_server_serves_on(served, monkeypatch) -> None:
    import hashdb.dispatch

    db, path = served
    db.insert_many(["a", "b"], [layer_code(1), layer_code(2)],
                   layers=[[("x", layer_code(1)), ("y", layer_code(2))], [("z", layer_code(3))]])  # fmt: skip
    monkeypatch.setattr(hashdb.dispatch, "MAX_REPLY_MATCHES", 2)
    with hashdb.connect(path, timeout=30) as client:
        with pytest.raises(hashdb.ProtocolError, match="layer_radius answer has more than 2 matches"):
            client.layer_radius(layer_code(1), BITS)
        with pytest.raises(hashdb.ProtocolError, match="layer_radius_many answer has more than 2 matches"):
            client.layer_radius_many([layer_code(1)], BITS)
        assert client.layer_radius(layer_code(3), 0) == [("b", "z", 0)]
        assert client.layer_radius_many([layer_code(1), layer_code(2)], 0) == [[("a", "x", 0)], [("a", "y", 0)]]


def test_add_through_the_server_stores_layer_codes(served, models: Path, expected: dict) -> None:
    db, path = served
    with hashdb.connect(path, timeout=60) as client:
        outcomes = list(add_models(client, [models], workers=1))
        assert {o.key: o.status for o in outcomes} == dict.fromkeys(expected, "added")
        for key, (code, layers) in expected.items():
            assert client.get(key)[0] == code
            assert client.layers(key) == layers == db.layers(key)


# ---- export and import ----------------------------------------------------------------------------------


def layered_db(path: Path) -> HashDB:
    rng = np.random.default_rng(5)
    db = HashDB(path, bits=BITS)
    keys = [f"m{i}" for i in range(6)]
    layers = [[(f"layer{j}", rng.bytes(BITS // 8)) for j in range(i % 3 + 1)] if i != 4 else None for i in range(6)]
    db.insert_many(keys, [rng.bytes(BITS // 8) for _ in keys], [{"i": i} for i in range(6)], layers=layers)
    db.set_codec({"codec": "test", "bits": BITS})
    return db


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_then_import_keeps_layer_codes_and_their_answers(tmp_path: Path, fmt: str) -> None:
    out = io.StringIO()
    with layered_db(tmp_path / "a") as db:
        assert export(db, out, fmt) == 6
        stored = {key: (db.get(key), db.layers(key)) for key in db}
        probes = [layers[0][1] for _, layers in stored.values() if layers]
        answers = db.layer_radius_many(probes, BITS // 2)
    header, rows = read_export(io.StringIO(out.getvalue()))
    with HashDB(tmp_path / "b", bits=BITS) as copy:
        done = import_rows(copy, header, rows)
        assert (done.added, done.failed) == (6, 0)
        assert {key: (copy.get(key), copy.layers(key)) for key in copy} == stored
        assert copy.layer_radius_many(probes, BITS // 2) == answers
        assert sum(map(len, answers)) > len(probes)  # the radius reaches other layers: the answers are not trivial


def test_an_export_written_before_layer_codes_still_imports(tmp_path: Path) -> None:
    code = layer_code(3).hex()
    header = {"format": "hashdb-export", "version": 1, "bits": BITS, "codec": None}
    jsonl = json.dumps(header) + "\n" + json.dumps({"key": "a", "code": code, "meta": {"n": 1}}) + "\n"
    csv = f"# {json.dumps(header)}\nkey,code,meta\nb,{code},\nc,{code},{{\"n\": 2}}\n"
    with HashDB(tmp_path / "db", bits=BITS) as db:
        db.insert("a", layer_code(1), layers=[("conv", layer_code(1))])  # replaced: its layers go with it
        for text, added in ((jsonl, 1), (csv, 2)):
            head, rows = read_export(io.StringIO(text))
            done = import_rows(db, head, rows)
            assert (done.added, done.failed) == (added, 0)
        assert db.get("a") == (layer_code(3), {"n": 1}) and db.get("c") == (layer_code(3), {"n": 2})
        assert db.layers("a") == db.layers("b") == db.layers("c") == []
        assert db.layer_radius(layer_code(1), 0) == []


def test_a_record_with_bad_layers_is_reported_and_the_others_import(tmp_path: Path) -> None:
    code = layer_code(3).hex()
    lines = [
        {"key": "good", "code": code, "layers": [["conv", code]]},
        {"key": "not_pairs", "code": code, "layers": ["conv"]},
        {"key": "bad_code", "code": code, "layers": [["conv", "zz"]]},
        {"key": "empty_name", "code": code, "layers": [["", code]]},  # refused by the store, not the reader
        {"key": "also_good", "code": code, "layers": [["a", code], ["b", code]]},
    ]
    errors: list[str] = []
    with HashDB(tmp_path / "db", bits=BITS) as db:
        head, rows = read_export(io.StringIO("".join(json.dumps(line) + "\n" for line in lines)))
        done = import_rows(db, head, rows, on_error=errors.append)
        assert (done.added, done.failed) == (2, 3)
        assert sorted(db) == ["also_good", "good"]
        assert db.layers("also_good") == [("a", layer_code(3)), ("b", layer_code(3))]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3", "line 4"]
    assert all(os.linesep not in e for e in errors)


def test_an_export_piped_into_add_keeps_layer_codes(tmp_path: Path) -> None:
    out = io.StringIO()
    with layered_db(tmp_path / "a") as db:
        export(db, out)
        stored = {key: (db.get(key), db.layers(key)) for key in db}
    added = run_cli("add", str(tmp_path / "b"), "--bits", str(BITS), "-q", stdin=out.getvalue())
    assert added.returncode == 0, added.stderr
    with HashDB(tmp_path / "b", bits=None) as copy:
        assert {key: (copy.get(key), copy.layers(key)) for key in copy} == stored


def test_add_names_an_export_line_with_bad_layers_and_adds_the_rest(tmp_path: Path) -> None:
    code = layer_code(3).hex()
    lines = [{"key": "good", "code": code, "layers": [["conv", code]]}, {"key": "bad", "code": code, "layers": 5}]
    added = run_cli("add", str(tmp_path / "b"), "--bits", str(BITS), stdin="".join(json.dumps(x) + "\n" for x in lines))
    assert added.returncode != 0 and "bad: layers must be a list" in added.stderr
    with HashDB(tmp_path / "b", bits=None) as db:
        assert list(db) == ["good"] and db.layers("good") == [("conv", layer_code(3))]


def test_hash_json_piped_into_add_stores_the_layer_codes(
    tmp_path: Path, models: Path, expected: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from hashdb.cli import main

    assert main(["hash", "--json", "-q", "--workers", "1", "--bits", str(BITS), str(models)]) == 0
    hashed = capsys.readouterr().out
    added = run_cli("add", str(tmp_path / "db"), "--bits", str(BITS), "-q", stdin=hashed)
    assert added.returncode == 0, added.stderr
    with HashDB(tmp_path / "db", bits=None) as db:
        assert {key: (db.get(key)[0], db.layers(key)) for key in db} == expected
