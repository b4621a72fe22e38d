"""Bulk hashing: many models on all local cores or on a Ray cluster.

``hash_units(sources, workers=N)`` expands paths into model units (``hashdb.codec.units.expand``: folders
are walked, a Hugging Face folder is one unit), hashes them in N worker processes (or Ray actors with
``engine="ray"``) and yields one ``BulkResult`` per unit. Workers only read files and return codes (the
model's and each layer's, from one pass: ``ModelHasher.hash_with_layers``); the caller is the single writer,
so a database stays one consistent LMDB environment (``hashdb.ingest`` commits what this yields in chunks).
Codes are identical whatever the engine and N: every worker runs the same ``ModelHasher`` with one BLAS/OpenMP
thread. A worker that dies or passes the per-file time limit is an error
for its unit, never a hang (docs/scale.md).

Order: the local engine yields in input order (a slow model holds later results back, not the workers); Ray
yields as actors finish. Keys, not order, identify results. The self-join on Ray is hashdb.index.ray_join.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import DEFAULT_BITS
from .errors import HashDBError, InvalidArgument, ModelFormatError
from .raycluster import SINGLE_THREAD_ENV, import_ray, ray_init

ENGINES = ("local", "ray", "inline")
# Seconds one unit may take in a local worker before it counts as a bad file: generous (honest models hash in
# seconds, docs/scale.md); it stops a file whose parse would never end (issue 17.6).
FILE_TIMEOUT_S = 300.0
RAY_BATCH = 2  # units per actor call: small, so progress streams and a slow model does not stall a batch


Layers = list[tuple[str, bytes]]  # (tensor name, layer code) per layer, as ModelHasher.hash_with_layers gives them


class BulkResult(NamedTuple):
    """One model unit's outcome: ``code`` (bytes) and ``layers`` (each layer's own code, in chain order:
    ``ModelHasher.hash_with_layers``), or ``error`` (a ModelFormatError naming the path; layers None)."""

    key: str
    path: str
    code: bytes | None
    error: ModelFormatError | None
    layers: Layers | None = None


def hash_units(
    sources: Iterable[Any],
    *,
    bits: int = DEFAULT_BITS,
    hasher_kwargs: dict[str, Any] | None = None,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    timeout: float | None = FILE_TIMEOUT_S,
    _preload: Sequence[str] = (),
) -> Generator[BulkResult, None, None]:
    """Hash every model unit found in ``sources`` (paths, or ModelUnits from ``find_units``).

    ``engine``: 'local' (worker processes), 'ray' (Ray actors) or 'inline' (this process: no isolation and no
    time limit, for debugging). ``workers``: processes (default: the machine's cores) or Ray actors (default:
    the cluster's CPUs). ``ray_address``: 'local' starts Ray on this machine, 'auto' (default) joins a running
    cluster, or a ``ray://`` address. ``timeout``: seconds one unit may take in a local worker (None: no
    limit). A unit that cannot be hashed, kills its worker or runs out of time yields its error and the rest
    go on; a worker that cannot start raises HashDBError. Closing the iterator early stops the workers.
    ``_preload``: modules each local worker imports before its hasher (tests inject reader faults with it).
    """
    if engine not in ENGINES:
        raise InvalidArgument(f"engine must be one of {ENGINES}, got {engine!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidArgument(f"workers must be an int >= 1, got {workers!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0):
        raise InvalidArgument(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    kwargs = dict(hasher_kwargs or {})
    from .codec import ModelHasher

    ModelHasher(bits, **kwargs)  # a bad configuration fails here, once, not in every worker
    from .codec.units import ModelUnit, expand_in_order

    found = expand_in_order(sources)
    units = [u for u in found if isinstance(u, ModelUnit)]
    results: Iterator[BulkResult]
    if not units:
        results = iter(())
    elif engine == "ray":  # results come as actors finish: errors first
        yield from (BulkResult(e.key, e.path, None, e.error) for e in found if not isinstance(e, ModelUnit))
        yield from _hash_on_ray(units, bits, kwargs, workers, ray_address, _preload)
        return
    elif engine == "inline":
        hasher = ModelHasher(bits, **kwargs)
        results = (_hash_one(hasher, unit.key, os.fspath(unit.path)) for unit in units)
    else:
        n = min(workers or os.cpu_count() or 1, len(units))
        results = _hash_in_processes(units, bits, kwargs, n, timeout, _preload)
    try:
        for item in found:  # input order: a path's error where the path was
            if isinstance(item, ModelUnit):
                yield next(results)
            else:
                yield BulkResult(item.key, item.path, None, item.error)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def model_error(path: str, exc: BaseException) -> ModelFormatError:
    """What went wrong hashing ``path``, as one ModelFormatError that names the path once (every front end
    reports a bad file this way)."""
    if isinstance(exc, ModelFormatError):
        return exc if path in str(exc) else ModelFormatError(f"{path}: {exc}")
    if isinstance(exc, OSError):
        return ModelFormatError(f"{path}: {exc.strerror or exc}")
    return ModelFormatError(f"{path}: {type(exc).__name__}: {exc}")


def _hash_one(hasher: Any, key: str, path: str) -> BulkResult:
    """Hash one unit (its code and its layers' codes, one pass); every failure becomes an error result naming
    the path (one bad file never ends a run)."""
    try:
        code, layers = hasher.hash_with_layers(path)
        return BulkResult(key, path, code, None, layers)
    except (HashDBError, OSError, ValueError, RuntimeError, MemoryError) as e:  # a reader's surprise, e.g. torch's
        return BulkResult(key, path, None, model_error(path, e))


# ---- local processes --------------------------------------------------------------------------------------

# A worker is a fresh interpreter, not a fork: it inherits neither this process's thread pools nor its LMDB
# handles. Its first step drops the current directory from sys.path and makes sure the directory of *this*
# process's hashdb is on it (first, if it was not there already: site-packages keeps its place), so a folder
# named "hashdb" where the command runs (a clone's parent) cannot shadow the installed package.
_WORKER_BOOT = (
    "import os, sys; root = sys.argv[1]; cwd = os.getcwd(); "
    "path = [p for p in sys.path if p not in ('', '.', cwd)]; "
    "sys.path[:] = path if root in path else [root, *path]; "
    "from hashdb.bulk import _worker_main; _worker_main()"
)
_STDERR_TAIL = 4096  # bytes of a worker's stderr kept to explain a worker that cannot start


def _worker_main() -> None:
    """A hashing worker: reads one JSON path per line on stdin, writes one JSON result per line on the file
    descriptor named in argv[3]: {"code": hex, "layers": [[name, hex], ...]} or {"error": message}. The first
    line it writes is {"ready": true}, or {"fatal": message} when it cannot build its hasher."""
    import importlib
    import json
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers and commits
    out = os.fdopen(int(sys.argv[3]), "w", buffering=1, encoding="ascii")

    def send(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc) + "\n")

    try:
        config = json.loads(sys.argv[2])
        for module in config.get("preload", ()):  # tests load a reader fault here; see hash_units(_preload=)
            importlib.import_module(module)
        from .codec import ModelHasher

        hasher = ModelHasher(config["bits"], **config["kwargs"])
    except BaseException as e:  # noqa: BLE001 - whatever stops start-up is reported, in one line
        send({"fatal": f"{type(e).__name__}: {e}"})
        return
    send({"ready": True})
    for line in sys.stdin:
        path = json.loads(line)
        try:
            result = _hash_one(hasher, "", path)
            error = None if result.error is None else str(result.error)
            code = None if result.code is None else result.code.hex()
            layers = [[name, layer.hex()] for name, layer in result.layers or ()]
        except Exception as e:  # noqa: BLE001 - a reader's surprise is this file's error, not the worker's end
            code, error = None, f"{path}: {type(e).__name__}: {e}"
        send({"code": code, "layers": layers} if error is None else {"error": error})


class _Worker:
    """One hashing process and the unit it is working on."""

    def __init__(self, config: str, env: dict[str, str]) -> None:
        import subprocess
        import sys

        import hashdb

        root = os.path.dirname(os.path.dirname(os.path.abspath(hashdb.__file__)))
        results_r, results_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, root, config, str(results_w)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(results_w,),
                env=env,
            )  # fmt: skip
        except BaseException:
            os.close(results_r)
            raise
        finally:
            os.close(results_w)
        self.results = results_r
        self.buffer = b""
        self.stderr_tail = b""
        self.stderr_open = True
        self.ready = False
        self.item: int | None = None  # index of the unit being hashed
        self.started = 0.0  # when hashing of the current item began (set once the worker is ready)

    def send(self, index: int, path: str) -> None:
        import json
        import time

        self.item = index
        self.started = time.monotonic()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(path) + "\n").encode("ascii"))
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: its results pipe says so next

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        os.close(self.results)
        self.proc.wait()

    def why_not_started(self, fatal: str | None) -> str:
        if fatal:
            return fatal
        lines = [ln for ln in self.stderr_tail.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else _death(self.proc.wait())


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _hash_in_processes(
    units: Sequence[Any], bits: int, kwargs: dict[str, Any], n: int, timeout: float | None, preload: Sequence[str]
) -> Iterator[BulkResult]:
    """Hash ``units`` in ``n`` worker processes, yielding results in input order. A worker that dies (a
    segfault, os._exit, the kernel's OOM killer) or passes ``timeout`` seconds on one unit makes that unit an
    error and is replaced; a worker that cannot start ends the run with one HashDBError."""
    import json
    import selectors
    import time
    from collections import deque

    items = [(u.key, os.fspath(u.path)) for u in units]
    config = json.dumps({"bits": bits, "kwargs": kwargs, "preload": list(preload)})
    env = {**os.environ, **SINGLE_THREAD_ENV}
    waiting = deque(range(len(items)))
    done: dict[int, BulkResult] = {}
    selector = selectors.DefaultSelector()
    workers: list[_Worker] = []

    def start() -> _Worker:
        worker = _Worker(config, env)
        workers.append(worker)
        selector.register(worker.results, selectors.EVENT_READ, (worker, "results"))
        assert worker.proc.stderr is not None
        selector.register(worker.proc.stderr, selectors.EVENT_READ, (worker, "stderr"))
        return worker

    def retire(worker: _Worker, error: str | None) -> None:
        """Stop a worker; its unit (if any) gets ``error``; a fresh worker takes its place."""
        selector.unregister(worker.results)
        if worker.stderr_open and worker.proc.stderr is not None:
            selector.unregister(worker.proc.stderr)
        worker.stop()
        workers.remove(worker)
        if worker.item is not None and error is not None:
            key, path = items[worker.item]
            done[worker.item] = BulkResult(key, path, None, ModelFormatError(f"{path}: {error}"))
        if waiting:
            start()

    def handle(worker: _Worker, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        if "fatal" in doc or not worker.ready and "ready" not in doc:
            raise HashDBError(f"a hashing worker could not start: {worker.why_not_started(doc.get('fatal'))}")
        if "ready" in doc:
            worker.ready = True
            worker.started = time.monotonic()
            return
        if worker.item is None:
            return
        key, path = items[worker.item]
        error = doc.get("error")
        if error is None:
            layers = [(name, bytes.fromhex(layer)) for name, layer in doc["layers"]]
            done[worker.item] = BulkResult(key, path, bytes.fromhex(doc["code"]), None, layers)
        else:
            done[worker.item] = BulkResult(key, path, None, ModelFormatError(error))
        worker.item = None

    try:
        for _ in range(n):
            start()
        emitted = 0
        while emitted < len(items):
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
            if emitted >= len(items):
                break
            for worker in workers:
                if worker.item is None and waiting:
                    index = waiting.popleft()
                    worker.send(index, items[index][1])
            now = time.monotonic()
            deadlines = [w.started + timeout for w in workers if timeout is not None and w.ready and w.item is not None]
            wait = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in selector.select(wait):
                worker, what = key.data
                if worker not in workers:
                    continue  # retired earlier in this round
                if what == "stderr":
                    chunk = os.read(key.fd, 65536)
                    worker.stderr_tail = (worker.stderr_tail + chunk)[-_STDERR_TAIL:]
                    if not chunk:
                        selector.unregister(key.fileobj)
                        worker.stderr_open = False
                    continue
                chunk = os.read(worker.results, 65536)
                if not chunk:  # the worker is gone
                    worker.proc.wait()
                    if not worker.ready:
                        raise HashDBError(f"a hashing worker could not start: {worker.why_not_started(None)}")
                    retire(worker, f"the hashing worker died ({_death(worker.proc.returncode)}) on this file")
                    continue
                worker.buffer += chunk
                *lines, worker.buffer = worker.buffer.split(b"\n")
                for line in lines:
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        continue
                    handle(worker, doc)
            now = time.monotonic()
            for worker in list(workers):
                if timeout is not None and worker.ready and worker.item is not None and now - worker.started > timeout:
                    retire(worker, f"took longer than {timeout:g} s to hash (the per-file time limit)")
    finally:
        for worker in list(workers):
            try:
                worker.stop()
            except OSError:
                pass
        selector.close()


# ---- Ray ----------------------------------------------------------------------------------------------------


_RayRow = tuple[str, str, bytes | None, str | None, Layers | None]  # key, path, code, error message, layers


class _RayHasher:
    """A Ray actor: builds its ModelHasher once (hashdb.codec and numpy only: no torch, no Ray Data), then
    hashes batches of (key, path) into (key, path, code, error message, layers) tuples."""

    def __init__(self, bits: int, kwargs: dict[str, Any], preload: Sequence[str] = ()) -> None:
        os.environ.update(SINGLE_THREAD_ENV)
        import importlib

        for module in preload:  # as in the local workers: tests inject reader faults with it
            importlib.import_module(module)
        from .codec import ModelHasher

        self.hasher = ModelHasher(bits, **kwargs)

    def hash_batch(self, batch: list[tuple[str, str]]) -> list[_RayRow]:
        out: list[_RayRow] = []
        for key, path in batch:
            try:
                res = _hash_one(self.hasher, key, path)
            except Exception as e:  # noqa: BLE001 - as in the local workers: this unit's error, in one line
                res = BulkResult(key, path, None, model_error(path, e))
            out.append((res.key, res.path, res.code, str(res.error) if res.error is not None else None, res.layers))
        return out


def _actor_start_error(error: BaseException) -> str:
    """The one line that says why an actor's constructor failed (the last "Name: message" line of Ray's
    multi-line report)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (named or lines or [type(error).__name__])[-1]


def _hash_on_ray(
    units: Sequence[Any], bits: int, kwargs: dict[str, Any], workers: int | None, address: str | None,
    preload: Sequence[str] = (),
) -> Iterator[BulkResult]:
    """N plain actors (one CPU each, started with SINGLE_THREAD_ENV), fed RAY_BATCH units at a time with two
    batches in flight per actor, so an actor never waits for the driver; results are yielded as batches end."""
    ray = import_ray()
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
        actors = [cls.remote(bits, kwargs, list(preload)) for _ in range(n)]
        items = [(u.key, os.fspath(u.path)) for u in units]
        batches = [items[i : i + RAY_BATCH] for i in range(0, len(items), RAY_BATCH)]
        batches.reverse()  # popped from the end: input order
        # Units of a batch whose actor died, each tried again alone on an actor with nothing else in flight:
        # one that fails there is the unit that kills actors, and gets one error line (not Ray's report).
        alone: list[tuple[str, str]] = []
        pending: dict[Any, tuple[Any, list[tuple[str, str]], bool]] = {}  # ref -> (actor, batch, tried alone)

        def in_flight(actor: Any) -> int:
            return sum(1 for a, _, _ in pending.values() if a is actor)

        def feed(actor: Any) -> None:
            """Up to two batches in flight per actor; a unit tried alone has its actor to itself."""
            while in_flight(actor) < 2:
                if alone:
                    if in_flight(actor):
                        return
                    unit = alone.pop()
                    pending[actor.hash_batch.remote([unit])] = (actor, [unit], True)
                    return
                if not batches:
                    return
                batch = batches.pop()
                pending[actor.hash_batch.remote(batch)] = (actor, batch, False)

        for actor in actors:
            feed(actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, batch, solo = pending.pop(ref)
            rows: list[_RayRow] = []
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor died (a segfault, os._exit, OOM) or raised
                if "creation task" in str(e):  # its constructor failed: no actor will start, so the run ends
                    raise HashDBError(f"a Ray hashing actor could not start: {_actor_start_error(e)}") from None
                if solo:
                    key, path = batch[0]
                    why = type(e).__name__ if isinstance(e, ray.exceptions.RayActorError) else str(e).splitlines()[0]
                    rows = [(key, path, None, f"{path}: the hashing worker died on this file ({why})", None)]
                else:
                    alone.extend(reversed(batch))
                for stale in [r for r, (a, _, _) in pending.items() if a is actor]:  # never ran: try alone
                    alone.extend(reversed(pending.pop(stale)[1]))
                if actor in actors:
                    actors.remove(actor)
                    ray.kill(actor)
                    actors.append(cls.remote(bits, kwargs, list(preload)))
            for idle in actors:
                feed(idle)
            for key, path, code, error, layers in rows:
                yield BulkResult(key, path, code, ModelFormatError(error) if error is not None else None, layers)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
