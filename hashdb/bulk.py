"""Bulk work: hash many models on all local cores or on a Ray cluster, and self-join codes on Ray.

``hash_units(sources, workers=N)`` expands paths into model units (``hashdb.codec.units.find_units``: folders
are walked, a Hugging Face folder is one unit), hashes them in N worker processes (or Ray actors with
``engine="ray"``) and yields one ``BulkResult`` per unit. Workers only read files and return codes; the caller
is the single writer, so a database stays one consistent LMDB environment (the CLI's ``hashdb add`` commits
what this yields in batches). Codes are identical whatever the engine and N: every worker runs the same
``ModelHasher`` with one BLAS/OpenMP thread.

Order: the local engine yields in input order (a slow model holds later results back, not the workers); Ray
yields as actors finish. Keys, not order, identify results.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from .errors import HashDBError, InvalidArgument, ModelFormatError

ENGINES = ("local", "ray")
# Set in every worker before numpy/torch load: N processes x N BLAS threads would oversubscribe the cores,
# and one thread per worker keeps each code bit-identical to the in-process one.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}
RAY_MISSING = "needs the optional 'ray' package: pip install hashdb[ray]"
RAY_BATCH = 2  # units per actor call: small, so progress streams and a slow model does not stall a batch


class BulkResult(NamedTuple):
    """One model unit's outcome: ``code`` (bytes) or ``error`` (a ModelFormatError naming the path)."""

    key: str
    path: str
    code: bytes | None
    error: ModelFormatError | None


def expand_sources(sources: Iterable[Any]) -> tuple[list[Any], list[BulkResult]]:
    """(units, errors): paths expanded into ModelUnits by the one key rule (ModelUnits pass through); a path
    that does not exist becomes an error result instead of stopping the others."""
    from .codec.units import ModelUnit, find_units, unit_key

    units: list[ModelUnit] = []
    errors: list[BulkResult] = []
    for source in sources:
        if isinstance(source, ModelUnit):
            units.append(source)
            continue
        try:
            units.extend(find_units(source))
        except ModelFormatError as e:
            errors.append(BulkResult(unit_key(source), os.fspath(source), None, e))
    return units, errors


def hash_units(
    sources: Iterable[Any],
    *,
    bits: int = 256,
    hasher_kwargs: dict[str, Any] | None = None,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> Generator[BulkResult, None, None]:
    """Hash every model unit found in ``sources`` (paths, or ModelUnits from ``find_units``).

    ``workers``: processes (local; default: the machine's cores; 1 hashes in this process, no pool) or Ray
    actors (default: the cluster's CPUs). ``engine``: 'local' or 'ray'; ``ray_address``: 'local' starts Ray
    on this machine, 'auto' (default) joins a running cluster, or a ``ray://`` address. A unit that cannot
    be hashed yields its error and the rest go on. Closing the iterator early stops the workers.
    """
    if engine not in ENGINES:
        raise InvalidArgument(f"engine must be one of {ENGINES}, got {engine!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidArgument(f"workers must be an int >= 1, got {workers!r}")
    kwargs = dict(hasher_kwargs or {})
    from .codec import ModelHasher

    ModelHasher(bits, **kwargs)  # a bad configuration fails here, once, not in every worker
    units, errors = expand_sources(sources)
    yield from errors
    if not units:
        return
    if engine == "ray":
        yield from _hash_on_ray(units, bits, kwargs, workers, ray_address)
        return
    n = min(workers or os.cpu_count() or 1, len(units))
    if n == 1:
        hasher = ModelHasher(bits, **kwargs)
        for unit in units:
            yield _hash_one(hasher, unit.key, os.fspath(unit.path))
        return
    yield from _hash_in_pool(units, bits, kwargs, n)


def _hash_one(hasher: Any, key: str, path: str) -> BulkResult:
    """Hash one unit; every failure becomes an error result naming the path (one bad file never ends a run)."""
    try:
        return BulkResult(key, path, hasher.hash(path), None)
    except ModelFormatError as e:
        return BulkResult(key, path, None, e if path in str(e) else ModelFormatError(f"{path}: {e}"))
    except OSError as e:
        return BulkResult(key, path, None, ModelFormatError(f"{path}: {e.strerror or e}"))
    except (HashDBError, ValueError, RuntimeError, MemoryError) as e:  # a reader's surprise, e.g. torch's
        return BulkResult(key, path, None, ModelFormatError(f"{path}: {type(e).__name__}: {e}"))


# ---- local processes --------------------------------------------------------------------------------------

_worker_hasher: Any = None


def _init_worker(bits: int, kwargs: dict[str, Any]) -> None:
    global _worker_hasher
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool and commits
    from .codec import ModelHasher

    _worker_hasher = ModelHasher(bits, **kwargs)


def _hash_in_worker(unit: tuple[str, str]) -> BulkResult:
    return _hash_one(_worker_hasher, unit[0], unit[1])


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for child processes started inside the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hash_in_pool(units: Sequence[Any], bits: int, kwargs: dict[str, Any], n: int) -> Iterator[BulkResult]:
    import multiprocessing

    # Not a plain fork (it would inherit this process's already-started BLAS and numba thread pools, and LMDB
    # handles): a forkserver, started clean with SINGLE_THREAD_ENV, imports hashdb.codec (numpy) once and
    # forks every worker from that, so N workers do not each pay the import (0.25 s apiece measured on 2
    # loaded cores); spawn where there is no forkserver.
    ctx: multiprocessing.context.BaseContext
    if "forkserver" in multiprocessing.get_all_start_methods():
        forkserver = multiprocessing.get_context("forkserver")
        forkserver.set_forkserver_preload(["hashdb.codec"])
        ctx = forkserver
    else:
        ctx = multiprocessing.get_context("spawn")
    with _environment(SINGLE_THREAD_ENV):
        pool = ctx.Pool(n, initializer=_init_worker, initargs=(bits, kwargs))
    try:
        items = [(u.key, os.fspath(u.path)) for u in units]
        yield from pool.imap(_hash_in_worker, items, chunksize=1)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---- Ray ----------------------------------------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HashDBError(f"--ray / engine='ray' {RAY_MISSING}") from None
    return ray


def ray_init(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray unless already connected; 'local' starts a private local instance. Returns True when
    this call started the connection (the caller then owns ``ray.shutdown()``)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    env = {"env_vars": dict(SINGLE_THREAD_ENV)}
    if address in (None, "auto") or address.startswith("ray://") or ":" in address:
        ray.init(address=address or "auto", runtime_env=env, log_to_driver=False)
    elif address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    else:
        raise InvalidArgument(f"ray address must be 'local', 'auto', host:port or ray://..., got {address!r}")
    return True


class _RayHasher:
    """A Ray actor: builds its ModelHasher once (hashdb.codec and numpy only: no torch, no Ray Data), then
    hashes batches of (key, path) into (key, path, code, error message) tuples."""

    def __init__(self, bits: int, kwargs: dict[str, Any]) -> None:
        os.environ.update(SINGLE_THREAD_ENV)
        from .codec import ModelHasher

        self.hasher = ModelHasher(bits, **kwargs)

    def hash_batch(self, batch: list[tuple[str, str]]) -> list[tuple[str, str, bytes | None, str | None]]:
        out = []
        for key, path in batch:
            res = _hash_one(self.hasher, key, path)
            out.append((res.key, res.path, res.code, str(res.error) if res.error is not None else None))
        return out


def _hash_on_ray(
    units: Sequence[Any], bits: int, kwargs: dict[str, Any], workers: int | None, address: str | None
) -> Iterator[BulkResult]:
    """N plain actors (one CPU each, started with SINGLE_THREAD_ENV), fed RAY_BATCH units at a time with two
    batches in flight per actor, so an actor never waits for the driver; results are yielded as batches end."""
    ray = _ray()
    started = ray_init(address, num_cpus=workers)
    actors: list[Any] = []
    try:
        n = min(workers or max(1, int(ray.cluster_resources().get("CPU", 1))), len(units))
        # Actors need SINGLE_THREAD_ENV from process start. A job connected by ray_init already has it (and
        # then reuses Ray's prestarted workers: 0.5-1 s sooner); otherwise each actor asks for it.
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
        if all(job_env.get(k) == v for k, v in SINGLE_THREAD_ENV.items()):
            cls = ray.remote(num_cpus=1)(_RayHasher)
        else:
            cls = ray.remote(num_cpus=1, runtime_env={"env_vars": dict(SINGLE_THREAD_ENV)})(_RayHasher)
        actors = [cls.remote(bits, kwargs) for _ in range(n)]
        items = [(u.key, os.fspath(u.path)) for u in units]
        batches = iter([items[i : i + RAY_BATCH] for i in range(0, len(items), RAY_BATCH)])
        pending: dict[Any, Any] = {}
        for _ in range(2):
            for actor in actors:
                batch = next(batches, None)
                if batch is not None:
                    pending[actor.hash_batch.remote(batch)] = actor
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            batch = next(batches, None)
            if batch is not None:
                pending[actor.hash_batch.remote(batch)] = actor
            for key, path, code, error in ray.get(ref):
                yield BulkResult(key, path, code, ModelFormatError(error) if error is not None else None)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


# ---- Ray self-join ---------------------------------------------------------------------------------------


def _join_block(codes: Any, r: int, i0: int, i1: int, j0: int, j1: int) -> tuple[Any, Any, Any]:
    from .index.join import rectangle_join

    return rectangle_join(codes, r, i0, i1, j0, j1)


def ray_self_join(codes: Any, r: int, *, address: str | None = None, block_rows: int | None = None) -> tuple:
    """``hashdb.index.join.self_join`` on Ray: the (n, words) uint64 codes go once into the object store, and
    one task per (rows x rows) block with i-block <= j-block returns its pairs. Same answer as the local join."""
    import numpy as np

    ray = _ray()
    started = ray_init(address)
    try:
        n = int(codes.shape[0])
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # About 4 blocks per CPU along the triangle, so stragglers do not decide the wall time.
        step = block_rows or max(1024, -(-n // max(1, int((8 * cpus) ** 0.5 + 0.5))))
        ref = ray.put(np.ascontiguousarray(codes, dtype=np.uint64))
        task = ray.remote(num_cpus=1)(_join_block)
        futures = [
            task.remote(ref, int(r), a, min(a + step, n), b, min(b + step, n))
            for a in range(0, n, step)
            for b in range(a, n, step)
        ]
        parts = ray.get(futures)
    finally:
        if started:
            ray.shutdown()
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
