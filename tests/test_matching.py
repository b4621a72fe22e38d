"""Whole and partial matches (hashdb.matching): a stolen backbone inside a bigger model is found by its layers,
with a calibrated "k of n layers" rate; independent models are not flagged; the library, the server and the
CLI give the same answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from frontend_helpers import run_cli, server_thread, short_socket_path
from safetensors.numpy import save_file
from torch import nn

import hashdb
from hashdb import HashDB
from hashdb.codec import ModelHasher
from hashdb.codec.null import layer_screen_radius

BITS = 256


def sd_of(model: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def backbone(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3),
                         nn.ReLU(), nn.Conv2d(64, 64, 3))  # fmt: skip


def head(seed: int, depth: int = 12) -> nn.Sequential:
    """New layers after a backbone: enough of them that the whole-model code moves past the copy radius."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(64 if i == 0 else 96, 96, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def thief_of(victim: dict[str, np.ndarray], seed: int, noise: float = 0.0) -> dict[str, np.ndarray]:
    """The victim's backbone (perhaps fine-tuned: relative noise) under another prefix, then new layers."""
    rng = np.random.default_rng(seed)
    stolen = {f"features.{k}": v + noise * v.std() * rng.standard_normal(v.shape).astype(v.dtype)
              for k, v in victim.items()}  # fmt: skip
    return {**stolen, **sd_of(head(seed), "classifier.")}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """A database of a victim and independent models (its architecture, other seeds; bigger ones)."""
    folder = tmp_path_factory.mktemp("matching")
    models = {"victim": sd_of(backbone(0))}
    for s in range(1, 5):
        models[f"independent-{s}"] = sd_of(backbone(s))
    for s in range(5, 7):
        models[f"bigger-{s}"] = {**sd_of(backbone(s), "features."), **sd_of(head(s), "classifier.")}
    h = ModelHasher(BITS)
    with HashDB(str(folder / "db"), bits=BITS, codec=h.config) as db:
        for key, sd in models.items():
            found = h.suspect(sd)
            db.insert(key, found.code, layers=found.layers)
    return folder, models


def test_a_stolen_backbone_is_a_partial_copy_and_independent_models_are_not_flagged(library) -> None:
    folder, models = library
    h = ModelHasher(BITS)
    with HashDB(str(folder / "db"), readonly=True) as db:
        for noise in (0.0, 0.02):
            suspect = h.suspect(thief_of(models["victim"], 11, noise))
            matches = db.find_matches(suspect.code, suspect.layers, radius=20, family=suspect.family)
            copies = [m for m in matches if m.verdict == "copy"]
            assert [m.key for m in copies] == ["victim"]
            found = copies[0]  # the whole codes are farther apart than 20 bits: only the layers match
            assert found.kind == "partial" and found.distance is not None and found.distance > 40
            assert found.expected_false is not None and found.expected_false <= 0.01
            pairs = {(t.suspect, t.stored) for t in found.layers}
            assert ("features.0.weight", "0.weight") in pairs and ("features.6.weight", "6.weight") in pairs
            assert all(t.distance <= layer_screen_radius(h.config, "2d") for t in found.layers)
        # the independent models themselves, asked as suspects, find nothing but themselves
        for key in ("independent-1", "bigger-5"):
            suspect = h.suspect(models[key])
            copies = [m for m in db.find_matches(suspect.code, suspect.layers, family=suspect.family)
                      if m.verdict == "copy"]  # fmt: skip
            assert [(m.key, m.kind, m.distance) for m in copies] == [(key, "whole", 0)]


def test_a_whole_copy_stays_whole_and_lists_its_layer_twins(library) -> None:
    folder, models = library
    h = ModelHasher(BITS)
    renamed = {f"net.{k}": v * 1.5 for k, v in models["victim"].items()}
    suspect = h.suspect(renamed)
    with HashDB(str(folder / "db"), readonly=True) as db:
        top = db.find_matches(suspect.code, suspect.layers, family=suspect.family)[0]
        assert (top.key, top.kind, top.distance, top.verdict) == ("victim", "whole", 0, "copy")
        assert len(top.layers) == 4 and all(t.distance == 0 for t in top.layers)
        # whole-model matches only: no layers asked, none reported; knn asks for the nearest model codes
        plain = db.find_matches(suspect.code)
        assert plain[0].key == "victim" and plain[0].layers == []
        thief = h.suspect(thief_of(models["victim"], 12))
        near = db.find_matches(thief.code, thief.layers, knn=2, family=thief.family)
        assert "victim" in [m.key for m in near if m.verdict == "copy"]


def test_query_json_server_and_library_agree_on_partial_matches(library, tmp_path: Path) -> None:
    folder, models = library
    path = tmp_path / "thief.safetensors"
    save_file(thief_of(models["victim"], 13, 0.01), str(path))
    out = run_cli("query", str(folder / "db"), str(path), "--json", "--radius", "20")  # whole codes: only close ones
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    victim = [m for m in doc["matches"] if m["key"] == "victim"]
    assert victim and victim[0]["kind"] == "partial" and victim[0]["verdict"] == "copy"
    assert any({"suspect_layer": "features.0.weight", "stored_layer": "0.weight"}.items() <= pair.items()
               for pair in victim[0]["layers"])  # fmt: skip
    assert victim[0]["fmr"] <= victim[0]["expected_false"] and doc["family"] == "2d"
    plain = json.loads(run_cli("query", str(folder / "db"), str(path), "--json", "--no-layers", "-r", "20").stdout)
    assert all(m["kind"] == "whole" for m in plain["matches"]) and not any(
        m["key"] == "victim" and m["verdict"] == "copy" for m in plain["matches"])  # fmt: skip
    human = run_cli("query", str(folder / "db"), str(path), "--radius", "20")
    assert "partial" in human.stdout and "features.0.weight = 0.weight" in human.stdout
    suspect = ModelHasher(BITS).suspect(str(path))
    with HashDB(str(folder / "db")) as db:
        local = db.find_matches(suspect.code, suspect.layers, radius=20, family=suspect.family)
        assert [m.kind for m in local if m.key == "victim"] == ["partial"]
        sock = short_socket_path(tmp_path)
        with server_thread(db, sock), hashdb.connect(sock, timeout=30) as client:
            assert client.layer_count() == db.layer_count() > 0
            assert client.find_matches(suspect.code, suspect.layers, radius=20, family=suspect.family) == local


def test_the_suspect_report_carries_partial_matches_and_says_which_layers(library, tmp_path: Path) -> None:
    from hashdb.evidence.report import suspect_report

    folder, models = library
    path = tmp_path / "thief.safetensors"
    save_file(thief_of(models["victim"], 14, 0.01), str(path))
    with HashDB(str(folder / "db"), readonly=True) as db:
        doc = suspect_report(db, str(path), radius=20, n_perm=19)
    victim = [m for m in doc["matches"] if m["key"] == "victim"]
    assert victim and victim[0]["kind"] == "partial" and victim[0]["expected_false"] <= 0.01
    assert any({"suspect_layer": "features.0.weight", "stored_layer": "0.weight"}.items() <= pair.items()
               for pair in victim[0]["layers"])  # fmt: skip
    assert doc["within_radius"] and "shares" in doc["verdict"]["words"] and "features.0.weight = 0.weight" in (
        doc["verdict"]["words"])  # fmt: skip


def flip(code: bytes, n: int, rng: np.random.Generator) -> bytes:
    bits = np.unpackbits(np.frombuffer(code, np.uint8))
    bits[rng.choice(len(bits), n, replace=False)] ^= 1
    return np.packbits(bits).tobytes()


def test_one_chance_layer_twin_is_no_answer_by_default_and_listed_when_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    random_code = lambda: rng.integers(0, 256, BITS // 8, dtype=np.uint8).tobytes()  # noqa: E731
    suspect_layers = [(f"s{i}", random_code()) for i in range(20)]
    stored_layers = [(f"t{i}", random_code()) for i in range(20)]
    stored_layers[3] = ("t3", flip(suspect_layers[0][1], 40, rng))  # e.g. a shared seeded first layer
    with HashDB(str(tmp_path / "db"), bits=BITS, codec=ModelHasher(BITS).config) as db:
        db.insert("other", random_code(), layers=stored_layers)
        code = random_code()
        assert db.find_matches(code, suspect_layers, family="2d") == []
        listed = db.find_matches(code, suspect_layers, family="2d", layer_radius=60)
        assert [(m.key, m.kind, m.verdict, [(t.suspect, t.stored, t.distance) for t in m.layers]) for m in listed] == [
            ("other", "partial", "not a copy", [("s0", "t3", 40)])]  # fmt: skip


def test_matches_of_a_database_of_bare_codes_come_nearest_first(tmp_path: Path) -> None:
    with HashDB(str(tmp_path / "db"), bits=BITS) as db:
        q = bytes(BITS // 8)
        db.insert_many(["z_near", "m_mid", "a_far"], [q[:-1] + b"\x01", q[:-2] + b"\xff\x03", b"\xff" * 5 + q[5:]])
        assert [(m.key, m.distance) for m in db.find_matches(q, knn=3)] == [("z_near", 1), ("m_mid", 10),
                                                                            ("a_far", 40)]  # fmt: skip
