"""Bulk hashing (hashdb.bulk, `hashdb add --workers/--ray`) and copy clusters on the CLI and on Ray.

Ray runs locally: one instance started by a module fixture for every Ray test, with a bounded start."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from hashdb import DEFAULT_BITS, HashDB, HashDBError, InvalidArgument
from hashdb.bulk import BulkResult, hash_units
from hashdb.cli import main
from hashdb.codec import ModelHasher
from hashdb.codec.units import unit_key

RAY_START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A folder of six small CNNs (two of them near copies), a file that is no model, and a nested folder."""
    torch = pytest.importorskip("torch")
    from torch import nn

    root = tmp_path_factory.mktemp("zoo")
    (root / "nested").mkdir()
    for seed in range(4):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
        where = root / "nested" if seed == 3 else root
        torch.save(net.state_dict(), where / f"m{seed}.pt")
        if seed < 2:
            noisy = {k: v + 0.05 * v.std() * torch.randn_like(v) for k, v in net.state_dict().items()}
            torch.save(noisy, root / f"copy{seed}.pt")
    torch.save(nn.Linear(4, 2).state_dict(), root / "linear.pt")  # no convolution: a bad file
    (root / "README.md").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs) for all Ray tests in this module, started within a bound and stopped at the end."""
    ray = pytest.importorskip("ray")

    def too_slow(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"local Ray did not start within {RAY_START_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(RAY_START_TIMEOUT_S)
    saved = os.environ.get("PYTHONPATH")
    # Ray's workers inherit this environment: tests/ on their path lets them import worker_faults.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    yield ray
    ray.shutdown()


def as_dict(results: list[BulkResult]) -> dict[str, bytes | str]:
    return {r.key: (r.code if r.code is not None else f"error: {r.error}") for r in results}


def expected_codes(zoo, bits: int = DEFAULT_BITS) -> dict[str, bytes | str]:  # type: ignore[no-untyped-def]
    hasher = ModelHasher(bits)  # by default hash_units' default length
    out: dict[str, bytes | str] = {}
    for path in sorted(zoo.rglob("*.pt")):
        try:
            out[unit_key(path)] = hasher.hash(path)
        except HashDBError as e:
            out[unit_key(path)] = f"error: {e}"
    return out


def test_one_and_two_local_workers_give_the_in_process_codes(zoo) -> None:  # type: ignore[no-untyped-def]
    expected = expected_codes(zoo)
    one = list(hash_units([zoo], workers=1))
    two = list(hash_units([zoo], workers=2))
    assert as_dict(one) == as_dict(two) == expected
    assert [r.key for r in one] == [r.key for r in two]  # the local engine keeps input order
    bad = [r for r in two if r.error is not None]
    assert [r.key for r in bad] == [unit_key(zoo / "linear.pt")] and "linear.pt" in str(bad[0].error)
    assert len(expected) == 7


def test_missing_paths_become_error_results_and_bad_arguments_raise(zoo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = list(hash_units([tmp_path / "nope.pt", zoo / "m0.pt"], workers=1))
    assert results[0].error is not None and "nope.pt" in str(results[0].error)
    assert results[1].code == ModelHasher(DEFAULT_BITS).hash(zoo / "m0.pt")
    with pytest.raises(InvalidArgument):
        list(hash_units([zoo], workers=0))
    with pytest.raises(InvalidArgument):
        list(hash_units([zoo], engine="dask"))
    with pytest.raises(InvalidArgument):
        list(hash_units([zoo], hasher_kwargs={"prune": 2.0}))


def test_hasher_settings_reach_the_workers(zoo) -> None:  # type: ignore[no-untyped-def]
    got = as_dict(list(hash_units([zoo / "m0.pt", zoo / "m1.pt"], bits=128, hasher_kwargs={"prune": 0.3}, workers=2)))
    hasher = ModelHasher(128, prune=0.3)
    assert got == {unit_key(zoo / f"m{i}.pt"): hasher.hash(zoo / f"m{i}.pt") for i in range(2)}


def test_without_ray_the_error_says_how_to_install_it(zoo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(HashDBError, match=r"pip install hashdb\[ray\]"):
        list(hash_units([zoo], engine="ray"))


def test_cli_add_with_two_workers_commits_every_good_model_and_reports_the_bad_one(zoo, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "db")
    code = main(["add", db, "--bits", "256", str(zoo), "--workers", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "linear.pt" in err and "1 of 7" in err
    expected = {k: v for k, v in expected_codes(zoo, 256).items() if isinstance(v, bytes)}
    assert {d["key"]: bytes.fromhex(d["code"]) for d in map(json.loads, out.splitlines())} == expected
    with HashDB(db, bits=None) as stored:
        assert {k: stored.get(k)[0] for k in stored} == expected
        assert stored.codec["copy_radius"] == ModelHasher(256).copy_radius


def test_cli_add_interrupted_commits_what_was_hashed(zoo, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hashdb.bulk

    real = hashdb.bulk.hash_units

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        for n, res in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield res

    monkeypatch.setattr(hashdb.bulk, "hash_units", interrupted)
    db = str(tmp_path / "db")
    code = main(["add", db, "--bits", "256", str(zoo), "--workers", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted: added 2 of 7 entries" in err  # linear.pt was the 3rd
    with HashDB(db, bits=None) as stored:
        assert len(stored) == 2 and stored.codec is not None


def test_cli_clusters_json_and_table(zoo, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "db")
    main(["add", db, "--bits", "256", str(zoo), "--workers", "1", "-q"])
    capsys.readouterr()
    assert main(["clusters", db, "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from hashdb.codec.radius import decision_radius

    with HashDB(db, bits=None) as stored:  # edges: matches expected by chance <= 0.01 times in this database
        radius = decision_radius(stored.codec, len(stored))
        assert radius is not None and radius >= stored.codec["copy_radius"]
        clusters = stored.clusters(radius)
    assert [d["keys"] for d in docs] == [c.keys for c in clusters]
    assert [d["edges"] for d in docs] == [[list(e) for e in c.edges] for c in clusters]
    assert all(d["radius"] == radius for d in docs)
    pairs = {(d["keys"][0], d["keys"][1]) for d in docs if len(d["keys"]) == 2}
    assert (unit_key(zoo / "copy0.pt"), unit_key(zoo / "m0.pt")) in pairs  # each near copy clusters with its original
    assert main(["clusters", db, "--radius", "0"]) == 1  # no two models are equal
    capsys.readouterr()
    assert main(["clusters", db]) == 0
    out = capsys.readouterr().out  # a summary: one line per cluster, and the total
    assert len(out.splitlines()) == len(clusters) + 1 and "within radius" in out
    assert all(f"{len(c.keys)} models, {len(c.edges)} pairs, distance " in line
               for c, line in zip(clusters, out.splitlines(), strict=False))  # fmt: skip
    assert main(["clusters", db, "--edges"]) == 0
    out = capsys.readouterr().out
    assert "cluster 1:" in out and "key_a" in out and "within radius" in out
    assert main(["clusters", db, "--radius", "-1"]) == 2
    assert main(["clusters", str(tmp_path / "missing")]) == 2  # named like every command's missing DB
    assert "no hashdb database at" in capsys.readouterr().err


# ---- Ray ----------------------------------------------------------------------------------------------------


def test_cli_add_on_ray_then_clusters_on_ray_match_local(zoo, tmp_path, ray_local, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "db")
    argv = ["add", db, "--bits", "256", str(zoo), "--ray", "local", "--workers", "2", "-q"]
    assert main(argv) == 2  # linear.pt is bad
    assert ray_local.is_initialized()  # the fixture's connection is reused, not shut down
    with HashDB(db, bits=None) as stored:
        assert {k: stored.get(k)[0] for k in stored} == {
            k: v for k, v in expected_codes(zoo, 256).items() if isinstance(v, bytes)
        }
        local = stored.pairs(200)
        assert stored.pairs(200, engine="ray") == local and len(local) == 15  # all pairs of 6 models
    capsys.readouterr()
    assert main(["clusters", db, "--json", "--ray", "local"]) == 0
    on_ray = capsys.readouterr().out
    assert main(["clusters", db, "--json"]) == 0
    assert capsys.readouterr().out == on_ray


def test_a_ray_actor_that_dies_is_one_error_line_for_its_file_and_the_rest_are_hashed(ray_local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for seed, name in enumerate(["a", "exit1", "b", "segv1", "c"]):
        np.save(zoo / f"{name}.npy", np.random.default_rng(seed).standard_normal((16, 4, 3, 3)).astype(np.float32))
    expected = {r.key: (r.code, r.layers) for r in hash_units([zoo], engine="inline")}
    assert all(layers for _, layers in expected.values())  # 16 filters: each model has a layer code to carry
    got = {r.key: r for r in hash_units([zoo], engine="ray", workers=2, _preload=["worker_faults"])}
    assert sorted(got) == sorted(expected)
    for key, result in got.items():
        if "exit1" in key or "segv1" in key:
            assert result.code is None and "hashing worker died on this file" in str(result.error)
            assert "\n" not in str(result.error) and str(result.error).startswith(str(zoo))
        else:
            assert (result.code, result.layers) == expected[key] and result.error is None


def test_ray_actors_that_cannot_start_end_the_run_in_one_line(ray_local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "a.npy", np.ones((8, 4, 3, 3), np.float32))
    with pytest.raises(HashDBError, match="Ray hashing actor could not start: .*No module named") as e:
        list(hash_units([tmp_path], engine="ray", workers=1, _preload=["hashdb_no_such_module"]))
    assert "\n" not in str(e.value)


def test_ray_self_join_blocks_equal_the_local_join(ray_local) -> None:  # type: ignore[no-untyped-def]
    from hashdb.index.join import self_join
    from hashdb.index.ray_join import ray_self_join

    rng = np.random.default_rng(5)
    codes = rng.integers(0, 2**63, (3000, 4), dtype=np.uint64)
    codes[1000:1100] = codes[:100] ^ (rng.integers(0, 2, (100, 4), dtype=np.uint64) << np.uint64(7))
    for r in (8, 100):
        local = set(zip(*(x.tolist() for x in self_join(codes, r)), strict=True))
        ray = ray_self_join(codes, r, block_rows=700)
        assert set(zip(*(x.tolist() for x in ray), strict=True)) == local and len(ray[0]) == len(local)
