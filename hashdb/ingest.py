"""Adding models to a database: the one ingest pipeline (``hashdb add`` is a loop printing what this yields).

``add_models(db, sources)`` expands paths into model units (``hashdb.codec.units.expand``), skips units whose
file is unchanged since it was stored, hashes the rest in worker processes or Ray actors (``hashdb.bulk``),
and commits the codes as the single writer, in chunks of ADD_CHUNK entries or every ADD_FLUSH_S seconds
(one transaction each: a crash loses at most one chunk). It yields one ``Outcome`` per entry once its chunk
is committed, and a bad entry's error at once. Ctrl-C (KeyboardInterrupt) stops the workers, commits what
was hashed, yields it, then re-raises. The codec configuration is recorded in the database the first time
models are hashed into it, or checked against the stored one (``check_codec``).

Each entry hashed from a file is stored with its layers' codes (``ModelHasher.hash_with_layers``, in the same
transaction as the model's code) and stores the file's identity in ``meta["file"]``: size, mtime_ns, sha256 of
its bytes (with the other file of a pair and a folder's files: ``units.unit_files``), format, a fingerprint of
the codec configuration that made the code, and ``layers``: how many layer codes were stored with it. A later
add of the same key skips the file when size, mtime and codec still match and its layers were stored
(``Outcome.status == "unchanged"``): an entry stored before layer codes existed (no ``layers`` in its file
identity) is hashed once more so that its layers are stored. An entry whose bytes equal another key's says so
(``Outcome.same_content``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import HashDBError, InvalidArgument, InvalidCode, InvalidKey, InvalidMeta
from .text import shown

if TYPE_CHECKING:
    from .types import Database

# What one bad entry raises (a key too long, meta that is no map, a code or layer list the store refuses, e.g.
# more layers than it keeps per model): that entry fails and the rest are stored. Anything else (a full disk)
# ends the run.
_ENTRY_ERRORS = (InvalidKey, InvalidMeta, InvalidCode, InvalidArgument)
# A crash loses at most one chunk (or ADD_FLUSH_S) of hashing, a chunk stays far below the server's frame
# limit, and slow models still show their results every second.
ADD_CHUNK = 256
ADD_FLUSH_S = 1.0
_READ_BLOCK = 1 << 20


@dataclass
class Entry:
    """One thing to store: a key with its code (e.g. a ``hashdb hash`` line), or a model unit to hash
    (``code`` None: ``path`` is hashed with the database's codec). ``from_codec``: the code came from the
    database's codec (set for a hashed unit, and for a hash line that names that codec), so it counts as hashed.
    ``layers``: the model's layer codes, (layer name, code) in chain order, stored with its code (None: none;
    a hashed unit gets the hasher's). ``codec``: the codec version a hash line says made ``code`` (None: a line
    that names none); a code of another version than the database's is refused, and a new database takes the
    version of its first such line."""

    key: str
    code: bytes | None = None
    path: str | None = None
    meta: dict[str, Any] | None = None
    from_codec: bool = False
    file: dict[str, Any] | None = field(default=None, repr=False)
    layers: list[tuple[str, bytes]] | None = field(default=None, repr=False)
    codec: str | None = None


class Outcome(NamedTuple):
    """What became of one entry. ``status``: 'added', 'replaced', 'unchanged' (its file was stored before
    and has not changed: not hashed again) or 'failed' (``error`` says why, naming the file or key)."""

    key: str
    status: str
    code: bytes | None = None
    error: HashDBError | None = None
    same_content: tuple[str, ...] = ()  # other keys whose stored file has the same sha256


def codec_fingerprint(config: dict[str, Any]) -> str:
    """A short stable name of a codec configuration, stored with each entry's file identity."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """size, mtime_ns and sha256 of a model unit's files (units.unit_files: a file with the other file of its
    pair, or a one-model folder's regular files; names and bytes, in sorted order); None when it cannot be
    read (hashing it then names the problem)."""
    from .codec.units import unit_files

    path = os.fspath(path)
    try:
        st = os.stat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None
        files = unit_files(path)
        digest = hashlib.sha256()
        size = mtime = 0
        for file in files:
            with open(file, "rb") as f:
                fst = os.fstat(f.fileno())
                size += fst.st_size
                mtime = max(mtime, fst.st_mtime_ns)
                if len(files) > 1:
                    digest.update(_role(file, path, files[0]).encode("utf-8", "surrogateescape") + b"\0")
                while block := f.read(_READ_BLOCK):
                    digest.update(block)
    except OSError:
        return None
    return {"size": size, "mtime_ns": mtime, "sha256": digest.hexdigest()}


def _role(file: Path, unit: str, first: Path) -> str:
    """What names a file in a unit's digest: its path inside a folder unit; for a file and its pair, the
    part of its name after what it shares with the unit's own name (``xml``, ``bin``), so a renamed copy of a
    pair digests alike."""
    if os.path.isdir(unit):
        return file.relative_to(unit).as_posix()
    return file.name[len(os.path.commonprefix([first.name, file.name])) :] if file != first else ""


def _unchanged(stored: dict[str, Any] | None, path: str, fingerprint: str) -> bool:
    """True when the entry's stored file identity matches the file now (size and mtime: no read needed) and its
    layer codes were stored with it (``layers``: absent in entries stored before layer codes existed)."""
    if not isinstance(stored, dict) or stored.get("codec") != fingerprint or "layers" not in stored:
        return False
    from .codec.units import unit_files

    try:
        stats = [os.stat(file) for file in unit_files(path)]
    except OSError:
        return False
    if not stats:
        return False
    size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
    return bool(stored.get("size") == size and stored.get("mtime_ns") == mtime)


def refuse_other_version(db: Database, config: dict[str, Any] | None) -> None:
    """Raise InvalidArgument, before anything is written, when ``config`` names another codec version than the
    one the database's codes were made with (every writer of codes calls it: add, import, export | add)."""
    stored = db.codec
    if isinstance(stored, dict) and isinstance(config, dict) and stored.get("codec") != config.get("codec"):
        raise InvalidArgument(
            f"the database was made with codec {stored.get('codec')!r} and these codes with "
            f"{config.get('codec')!r}; codes of two codecs do not compare: re-hash the models into a new "
            f"database (hashdb add NEW.db --bits N FOLDER...)"
        )


def check_codec(db: Database, config: dict[str, Any]) -> str | None:
    """Record ``config`` as the database's codec if it has none; return a warning when it holds another
    (its codes were made otherwise and distances between the two kinds may mislead), else None."""
    stored = db.codec
    if stored is None:
        db.set_codec(config)
        return None
    if stored != config:
        return "the database's codes were made with another codec configuration; distances may mislead"
    return None


class Ingest:
    """One add run against ``db``: counters for its summary, and ``run`` yielding Outcomes.

    ``meta``: metadata stored with every entry that brings none of its own. ``incremental``: skip files whose
    stored identity still matches. ``hasher_kwargs`` go to ModelHasher (the database's width is the bits)."""

    def __init__(self, db: Database, *, meta: dict[str, Any] | None = None, incremental: bool = True,
                 hasher_kwargs: dict[str, Any] | None = None, chunk: int = ADD_CHUNK,
                 flush_s: float = ADD_FLUSH_S) -> None:  # fmt: skip
        self.db = db
        self.meta = meta
        self.incremental = incremental
        self.hasher_kwargs = dict(hasher_kwargs or {})
        self.chunk = chunk
        self.flush_s = flush_s
        self.total = self.added = self.replaced = self.unchanged = self.failed = 0
        self.warnings: list[str] = []
        self._config: dict[str, Any] | None = None
        self._pending: list[Entry] = []
        self._since = time.monotonic()
        self._hashed_any = False
        self._by_sha: dict[str, list[str]] | None = None
        self._codec_matches: bool | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The codec configuration models are hashed with (built on first use: codes alone need no codec)."""
        if self._config is None:
            from .codec import ModelHasher

            stored = self.db.codec
            if isinstance(stored, dict) and not self.hasher_kwargs and stored.get("bits") == self.db.bits:
                # a database keeps hashing with the codec it was made with (codes of two codecs do not compare)
                try:
                    self._config = ModelHasher.from_config(stored).config
                    self.hasher_kwargs = {k: v for k, v in stored.items()
                                          if k not in ("bits", "copy_radius", "directions")}  # fmt: skip
                except InvalidArgument:
                    pass  # an unknown codec: refused by check_version below
            if self._config is None:
                self._config = ModelHasher(self.db.bits, **self.hasher_kwargs).config
        return self._config

    def check_version(self) -> None:
        """Refuse, before hashing anything, to add codes of another codec version than the database's."""
        refuse_other_version(self.db, self.config)

    def run(
        self, sources: Iterable[Any], *, workers: int | None = None, engine: str = "local",
        ray_address: str | None = None, timeout: float | None = None,
    ) -> Generator[Outcome, None, None]:  # fmt: skip
        """Add ``sources``: paths (files or folders, expanded into model units), ModelUnits, or Entries.

        ``workers``, ``engine``, ``ray_address``, ``timeout``: as ``hashdb.bulk.hash_units`` (timeout None:
        its default per-file limit)."""
        from . import bulk
        from .codec.units import ModelUnit, expand

        if self.db.codec is not None:
            self.check_version()
        entries: list[Entry] = []
        paths: list[Any] = []
        for source in sources:
            (entries if isinstance(source, Entry) else paths).append(source)
        units, problems = expand(paths)
        self.total = len(entries) + len(units) + len(problems)
        for problem in problems:
            yield self._fail(problem.key, problem.error)
        to_hash: dict[str, list[Entry]] = {}
        for entry in entries:
            if entry.code is None:
                to_hash.setdefault(entry.key, []).append(entry)
        for unit in units:
            to_hash.setdefault(unit.key, []).append(Entry(unit.key, path=os.fspath(unit.path)))
        interrupted = False
        results: Any = None
        try:
            for entry in entries:
                if entry.code is not None:
                    yield from self._take(entry)
            todo: list[ModelUnit] = []
            for key, waiting in list(to_hash.items()):
                path = waiting[0].path or key
                if self.incremental and self._is_unchanged(key, path):
                    del to_hash[key]
                    for _ in waiting:
                        self.unchanged += 1
                        yield Outcome(key, "unchanged")
                    continue
                todo.append(ModelUnit(key, Path(path)))
            if todo:
                kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
                results = bulk.hash_units(todo, bits=self.db.bits, hasher_kwargs=self.hasher_kwargs, workers=workers,
                                          engine=engine, ray_address=ray_address, **kwargs)  # fmt: skip
                for result in results:
                    for entry in to_hash.pop(result.key, []):
                        if result.error is not None:
                            yield self._fail(entry.key, result.error)
                            continue
                        entry.code, entry.layers, entry.from_codec = result.code, result.layers or [], True
                        entry.file = file_identity(result.path)
                        yield from self._take(entry)
        except KeyboardInterrupt:  # keep what was hashed: commit it below, then re-raise
            interrupted = True
        finally:
            if results is not None:
                results.close()  # stop the workers before what was hashed is committed
            if self._pending:
                committed = self._flush()
            else:
                committed = []
            if self._hashed_any:
                warning = check_codec(self.db, self.config)
                if warning is not None and warning not in self.warnings:
                    self.warnings.append(warning)
        yield from committed
        if interrupted:
            raise KeyboardInterrupt

    # -- internals ---------------------------------------------------------------------------------------

    def _fail(self, key: str, error: HashDBError) -> Outcome:
        self.failed += 1
        return Outcome(key, "failed", error=error)

    def _is_unchanged(self, key: str, path: str) -> bool:
        if key not in self.db:
            return False
        try:
            _, meta = self.db.get(key)
        except HashDBError:
            return False
        stored = meta.get("file") if isinstance(meta, dict) else None
        return self._db_codec_is_ours() and _unchanged(stored, path, codec_fingerprint(self.config))

    def _db_codec_is_ours(self) -> bool:
        if self._codec_matches is None:
            self._codec_matches = self.db.codec == self.config
        return self._codec_matches

    def _take(self, entry: Entry) -> Iterator[Outcome]:
        """Queue an entry for the next commit; commit when the chunk is full or a second has passed."""
        from .db import key_bytes

        try:
            key_bytes(entry.key)  # one bad key (too long, not UTF-8) is refused alone
        except InvalidKey as e:
            yield self._fail(entry.key, InvalidKey(f"{shown(entry.key)}: {e}"))
            return
        if entry.codec is not None:
            why = self._other_codec(entry.codec)
            if why is not None:
                yield self._fail(entry.key, InvalidCode(f"{shown(entry.key)}: {why}"))
                return
            entry.from_codec = True  # a code of the database's own codec: it counts as hashed (check_codec)
        self._pending.append(entry)
        if len(self._pending) >= self.chunk or time.monotonic() - self._since >= self.flush_s:
            yield from self._flush()

    def _other_codec(self, codec: str) -> str | None:
        """Why a code that a hash line says ``codec`` made cannot be stored here (another codec version than the
        database's, or one this hashdb does not know), else None. A database that holds no codec yet takes the
        version of its first such line (v4 lines make a v4 database)."""
        from .codec.hasher import CODECS

        if codec not in CODECS:
            known = ", ".join(CODECS)
            return f"this code was made with codec {codec!r}, which this hashdb does not know (it knows {known})"
        if self._config is None and self.db.codec is None and "codec" not in self.hasher_kwargs:
            self.hasher_kwargs = {**self.hasher_kwargs, "codec": codec}
        mine = self.config.get("codec")
        if codec == mine:
            return None
        whose = "the database's" if self.db.codec is not None else "this run's"
        return (f"this code was made with codec {codec!r} and {whose} codes with {mine!r}; codes of two codecs do "
                "not compare: hash the model again (hashdb add DB MODEL)")

    def _meta(self, entry: Entry) -> dict[str, Any] | None:
        meta = entry.meta if entry.meta is not None else self.meta
        if entry.file is not None:
            meta = dict(meta or {})
            # "layers" also marks an entry whose layer codes were stored: one without it is hashed again
            meta["file"] = {**entry.file, "codec": codec_fingerprint(self.config), "layers": len(entry.layers or ())}
        return meta

    def _same_content(self, entries: list[Entry]) -> list[tuple[str, ...]]:
        """Per entry, the other keys whose stored file has the same sha256 (one scan of the database's
        metadata, on the first entry hashed from a file, then kept up to date)."""
        if not any(e.file for e in entries):
            return [()] * len(entries)
        if self._by_sha is None:
            self._by_sha = {}
            for key in self.db:
                try:
                    _, meta = self.db.get(key)
                except HashDBError:
                    continue
                sha = meta.get("file", {}).get("sha256") if isinstance(meta, dict) and isinstance(
                    meta.get("file"), dict) else None  # fmt: skip
                if isinstance(sha, str):
                    self._by_sha.setdefault(sha, []).append(key)
        out: list[tuple[str, ...]] = []
        for entry in entries:
            sha = entry.file.get("sha256") if entry.file else None
            if sha is None:
                out.append(())
                continue
            keys = self._by_sha.setdefault(sha, [])
            out.append(tuple(k for k in keys if k != entry.key))
            if entry.key not in keys:
                keys.append(entry.key)
        return out

    def _flush(self) -> list[Outcome]:
        self._since = time.monotonic()
        entries, self._pending = self._pending, []
        if not entries:
            return []
        with _interrupts_held():  # Ctrl-C waits for the commit, so what is reported is what was stored
            return self._insert(entries)

    def _insert(self, entries: list[Entry]) -> list[Outcome]:
        keys = [e.key for e in entries]
        codes = [e.code or b"" for e in entries]
        metas = [self._meta(e) for e in entries]
        layers = [e.layers for e in entries]
        # Batches without layer codes (codes read from hash lines) carry no layers argument: the same meaning
        # (None removes a replaced key's layers), and a server that predates layer codes still takes them.
        with_layers = any(layers)
        was = [key in self.db for key in keys]
        same = self._same_content(entries)
        errors: list[Any]
        write_batch = getattr(self.db, "write_batch", None)
        if write_batch is not None:  # HashDB: one insert_many, falling back to one by one on a bad entry
            ops = []
            for key, code, meta, layer_codes in zip(keys, codes, metas, layers, strict=True):
                args: dict[str, Any] = {"key": key, "code": code, "meta": meta}
                if with_layers:
                    args["layers"] = layer_codes
                ops.append(("insert", args))
            errors = write_batch(ops)
        else:  # a server connection
            try:
                self.db.insert_many(keys, codes, metas, layers=layers if with_layers else None)
                errors = [None] * len(keys)
            except _ENTRY_ERRORS:
                errors = []
                for key, code, meta, layer_codes in zip(keys, codes, metas, layers, strict=True):
                    try:
                        self.db.insert(key, code, meta, layers=layer_codes)
                        errors.append(None)
                    except _ENTRY_ERRORS as e:
                        errors.append(e)
        out: list[Outcome] = []
        for entry, error, existed, twins in zip(entries, errors, was, same, strict=True):
            if error is not None:
                if not isinstance(error, _ENTRY_ERRORS):
                    raise error  # the store failed (a full disk): the run ends, in one error, nothing half-written
                out.append(self._fail(entry.key, type(error)(f"{shown(entry.key)}: {error}")))
                continue
            self._hashed_any = self._hashed_any or entry.from_codec
            if existed:
                self.replaced += 1
            else:
                self.added += 1
            out.append(Outcome(entry.key, "replaced" if existed else "added", entry.code, None, twins))
        return out


def add_models(db: Database, sources: Iterable[Any], *, workers: int | None = None, engine: str = "local",
               ray_address: str | None = None, meta: dict[str, Any] | None = None, incremental: bool = True,
               timeout: float | None = None, hasher_kwargs: dict[str, Any] | None = None,
               ) -> Generator[Outcome, None, None]:  # fmt: skip
    """Hash the models at ``sources`` (files, folders, ModelUnits, or Entries with codes) into ``db`` and
    yield one Outcome per entry; see the module docstring and ``Ingest`` for the details."""
    yield from Ingest(db, meta=meta, incremental=incremental, hasher_kwargs=hasher_kwargs).run(
        sources, workers=workers, engine=engine, ray_address=ray_address, timeout=timeout
    )


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT until the block is done (then raise KeyboardInterrupt): a commit is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


__all__ = ["ADD_CHUNK", "ADD_FLUSH_S", "Entry", "Ingest", "Outcome", "add_models", "check_codec", "file_identity"]
