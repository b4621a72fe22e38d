"""The ``hashdb`` command: parse arguments, call HashDB / ModelHasher (or a server), print.

Exit status: 0 success, 1 a query / get / delete found nothing, 2 a usage or input error (one line on
stderr, no traceback; also for any error of the library or the system, e.g. a full disk), 130 interrupted.
``--json`` prints one JSON document per line; the field names are stable.

Every command is written against ``hashdb.types.Database``, which HashDB and the socket Client both satisfy.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from . import __version__
from .errors import HashDBError, InvalidCode, InvalidKey, InvalidMeta, KeyNotFound, ModelFormatError

if TYPE_CHECKING:
    from .codec import ModelHasher
    from .types import Database, Match

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_BITS = 256  # of `hashdb hash`; creating a database needs an explicit --bits
# Models are inserted in chunks: a crash loses at most one chunk (or ADD_FLUSH_S) of hashing, a chunk stays
# far below the server's frame limit, and slow models still show their results every second.
ADD_CHUNK = 256
ADD_FLUSH_S = 1.0


class UsageError(Exception):
    """A bad command line or input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- inputs --------------------------------------------------------------------------------------------


def _inputs(items: Sequence[str], stdin: IO[str] | None = None) -> Iterator[str]:
    """The arguments, or stdin lines (stripped, blank lines skipped) when there are none or one is '-'."""
    if not items:
        items = ["-"]
    for item in items:
        if item == "-":
            for line in stdin or sys.stdin:
                line = line.strip()
                if line:
                    yield line
        else:
            yield item


def _is_hex_code(text: str, bits: int) -> bool:
    body = text[2:] if text[:2].lower() == "0x" else text
    return len(body) == bits // 4 and re.fullmatch(r"[0-9a-fA-F]+", body) is not None


# A line of `hashdb hash` output: a hex code, two spaces, the key.
_HASH_LINE = re.compile(r"(?:0[xX])?([0-9a-fA-F]{16,})\s+(\S.*)")


class _Record:
    """One entry to store: a key and its code, or a model file still to hash (code None)."""

    __slots__ = ("key", "code", "path", "meta", "codec")

    def __init__(self, key: str, code: bytes | None = None, path: str | None = None, meta: dict | None = None,
                 codec: bool = False) -> None:  # fmt: skip
        self.key, self.code, self.path, self.meta = key, code, path, meta
        self.codec = codec  # the code came from this hashdb's default codec (it gets the codec meta)


def _add_input(text: str, bits: int) -> _Record:
    """What one `add` input is: a model file, a `hashdb hash` line, a `hashdb hash --json` / export line."""
    if os.path.exists(text):
        return _Record(_key_of(text), path=text)
    if text.startswith("{"):
        return _json_record(text, bits)
    pair = _HASH_LINE.fullmatch(text)
    if pair is not None:
        from .codes import to_bytes

        return _Record(pair.group(2), to_bytes(pair.group(1), bits))
    if _is_hex_code(text, bits):
        raise UsageError(f"a hex code needs a key: hashdb add DB --key KEY {text[:16]}...")
    return _Record(_key_of(text), path=text)  # hashing it names the missing file


def _json_record(text: str, bits: int) -> _Record:
    from .codes import to_bytes

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidCode(f"not a JSON line: {e}: {text[:80]}") from None
    key = doc.get("key", doc.get("path")) if isinstance(doc, dict) else None
    if not isinstance(key, str) or not isinstance(doc.get("code"), str):
        raise InvalidCode(f"a JSON line needs string fields 'key' (or 'path') and 'code': {text[:80]}")
    meta = doc.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidMeta(f"{key}: 'meta' must be an object")
    from .codec.hasher import CODEC_VERSION

    same_codec = doc.get("codec") == CODEC_VERSION and doc.get("bits") == bits  # a `hashdb hash --json` line
    return _Record(key, to_bytes(doc["code"], bits), meta=meta, codec=same_codec)


def _key_of(path: str) -> str:
    """The database key of a model file (hashdb.codec.units: one rule for every front end)."""
    from .codec.units import unit_key

    return unit_key(path)


def _shown(text: str) -> str:
    """``text`` printable on any terminal: a file name that is not valid UTF-8 shows its bytes as escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Hashers:
    """Builds the ModelHasher on first use, so commands given hex codes never import the codec (or torch)."""

    def __init__(self, bits: int):
        self.bits = bits
        self._hasher: ModelHasher | None = None

    @property
    def hasher(self) -> ModelHasher:
        if self._hasher is None:
            from .codec import ModelHasher

            self._hasher = ModelHasher(bits=self.bits)
        return self._hasher

    def hash_file(self, path: str, or_code: bool = False) -> bytes:
        if not os.path.exists(path):
            also = f" (and not a {self.bits}-bit hex code)" if or_code else ""
            raise ModelFormatError(f"{_shown(path)}: no such file{also}")
        try:
            return self.hasher.hash(path)
        except ModelFormatError as e:
            raise ModelFormatError(_shown(str(e) if path in str(e) else f"{path}: {e}")) from None
        except OSError as e:
            raise ModelFormatError(f"{_shown(path)}: {e.strerror or e}") from None

    def code_or_model(self, text: str) -> tuple[bytes, bool]:
        """(code, came_from_a_model) for a CODE_OR_MODEL argument."""
        if _is_hex_code(text, self.bits):
            from .codes import to_bytes

            return to_bytes(text, self.bits), False
        return self.hash_file(text, or_code=True), True


def _model_units(paths: Sequence[str]) -> list[tuple[str, str | ModelFormatError]]:
    """(key, path to hash or the error) per model unit: a file as given, each model found in a folder."""
    from .codec.units import find_units, unit_key

    out: list[tuple[str, str | ModelFormatError]] = []
    for path in paths:
        if not os.path.isdir(path):
            out.append((unit_key(path), path))
            continue
        try:
            units = find_units(path)
        except ModelFormatError as e:
            out.append((unit_key(path), e))
            continue
        if not units:
            out.append((unit_key(path), ModelFormatError(f"{path}: no model files found in the folder")))
        out.extend((u.key, str(u.path)) for u in units)
    return out


# -- output --------------------------------------------------------------------------------------------


def _emit(doc: Any) -> None:
    try:
        text = json.dumps(doc, sort_keys=True, default=_json_default, allow_nan=False)
    except ValueError:  # NaN or infinity (in metadata stored through the Python API): not valid JSON
        text = json.dumps(_finite(doc), sort_keys=True, default=_json_default, allow_nan=False)
    sys.stdout.write(text + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by the string JSON parsers print for it."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # numpy scalars and arrays (in stats)
        obj = obj.tolist() if hasattr(obj, "tolist") else obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if hasattr(obj, "item"):  # numpy scalars in stats
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _warn(message: str) -> None:
    sys.stderr.write(f"hashdb: {_shown(message)}\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A one-line progress bar on stderr with rate and ETA, drawn only when stderr is a terminal.

    Our own ~40 lines rather than tqdm: a dependency (and its import time) for one bar is not worth it."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.label = label
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        eta = f"ETA {_duration(left / rate)}" if rate > 0 and left else f"in {_duration(elapsed)}"
        self.stream.write(
            f"\r[{'#' * filled}{' ' * (width - filled)}] {self.done}/{self.total} {self.label} "
            f"{rate:.1f}/s {eta}\033[K"
        )
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def redraw(self) -> None:
        if self.enabled and self.done:
            self._draw(time.monotonic())

    def message(self, line: str) -> None:
        """Print a line on the stream above the bar (clearing the bar's line first)."""
        self.stream.write(("\r\033[K" if self.enabled else "") + _shown(line) + "\n")
        if self.enabled and self.done:
            self._draw(time.monotonic())
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _size(n: Any) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- opening a database or a server --------------------------------------------------------------------


def _is_database(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def _split_target(args: argparse.Namespace, name: str = "DB") -> list[str]:
    """With --socket every positional is an input; otherwise the first one is the database path."""
    items: list[str] = list(args.items)
    if args.socket:
        args.db = None
        if items and _is_database(items[0]):
            raise UsageError(f"give DB or --socket PATH, not both ({items[0]} is a database)")
        return items
    if not items:
        raise UsageError(f"{name} is required (or --socket PATH to use a running server)")
    args.db = items[0]
    return items[1:]


def _missing_database(path: str, create: bool) -> UsageError:
    """The error for a DB argument with no database behind it."""
    if os.path.isfile(path):
        return UsageError(f"{path} is a file, not a hashdb database")
    if os.path.isdir(path) and os.listdir(path):
        return UsageError(f"{path} is not a hashdb database")
    hint = f" (to create one, give --bits N, e.g. --bits {DEFAULT_BITS})" if create else ""
    return UsageError(f"no hashdb database at {path}{hint}")


def _open(args: argparse.Namespace, create: bool = False, readonly: bool = False) -> Database:
    """The database named by DB (read-only for readonly), or a connection to the server at --socket.

    A new database is created only when ``create`` and --bits are both given: a mistyped path creates nothing.
    """
    if args.socket:
        from .client import connect

        client: Database = connect(args.socket)
        return client
    from .db import HashDB

    bits = getattr(args, "bits", None)
    if not _is_database(args.db):
        if not (create and bits is not None) or os.path.isfile(args.db):
            raise _missing_database(args.db, create)
        return HashDB(args.db, bits=bits)
    return HashDB(args.db, bits=bits, readonly=readonly)


# -- commands ------------------------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    inputs = _split_target(args)
    user_meta = _parse_meta(args.meta)
    with _open(args, create=True) as db:
        hashers = _Hashers(db.bits)
        if args.key is not None:
            if len(inputs) != 1 or inputs == ["-"]:
                raise UsageError("--key KEY takes exactly one CODE_OR_MODEL argument")
            code, from_model = hashers.code_or_model(inputs[0])
            meta = _model_meta(user_meta, hashers) if from_model else user_meta
            replaced = args.key in db
            db.insert(args.key, code, meta)
            if from_model:
                _record_codec(db, hashers)
            _report_added(args, [(args.key, code, replaced)])
            return EXIT_OK
        texts = list(_inputs(inputs))
        if not texts:
            raise UsageError("no model files given")
        failed = 0  # entries that could not be added (the batch counts its own)
        records: list[_Record] = []
        for text in texts:
            if os.path.isdir(text):  # a folder: one entry per model unit found in it
                for key, path in _model_units([text]):
                    if isinstance(path, ModelFormatError):
                        failed += 1
                        _warn(f"error: {path}")
                    else:
                        records.append(_Record(key, path=path))
                continue
            try:
                records.append(_add_input(text, db.bits))
            except (InvalidCode, InvalidMeta) as e:  # a bad line of piped input: name it, add the others
                failed += 1
                _warn(f"error: {e}")
        total = len(records) + failed  # entries: a folder counts each model in it
        progress = Progress(len(records), "models", enabled=False if args.quiet else None)
        batch = _Batch(db, hashers, user_meta, args, progress)
        interrupted = False
        try:
            try:
                _hash_and_insert(records, hashers, batch, progress, args.workers, args.ray)
            except KeyboardInterrupt:  # keep what was hashed: commit it below and say how far we got
                interrupted = True
            batch.flush()
            if batch.from_models:
                _record_codec(db, hashers)
        finally:
            progress.close()
        failed += batch.failed
        if interrupted:
            _warn(f"interrupted: added {batch.added} of {total} entries")
            return EXIT_INTERRUPTED
        if failed:
            _warn(f"{failed} of {total} entries could not be added")
            return EXIT_ERROR
    return EXIT_OK


def _hash_and_insert(records: list[_Record], hashers: _Hashers, batch: _Batch, progress: Progress,
                     workers: int | None = None, ray: str | None = None) -> None:  # fmt: skip
    """Hand every record to the batch (which inserts in chunks), hashing the model files on the way: in
    ``workers`` processes, or Ray actors with ``ray`` (hashdb.bulk), while this process stays the one writer."""
    from .bulk import hash_units
    from .codec.units import ModelUnit

    if workers is not None and workers < 1:
        raise UsageError("--workers must be >= 1")
    waiting: dict[str, list[_Record]] = {}  # key -> the records that take that file's code
    units: list[ModelUnit] = []
    for record in records:
        if record.code is not None:
            _hand_over(record, batch, progress)
            continue
        if record.key not in waiting:  # a missing file comes back as its error, like any unreadable one
            units.append(ModelUnit(record.key, Path(record.path or record.key)))
        waiting.setdefault(record.key, []).append(record)
    if not units:
        return
    results = hash_units(units, bits=hashers.bits, workers=workers, engine="ray" if ray else "local",
                         ray_address=ray)  # fmt: skip
    try:
        for result in results:
            for record in waiting.pop(result.key, []):
                if result.error is not None:
                    batch.failed += 1
                    progress.message(f"hashdb: error: {_shown(str(result.error))}")
                    progress.advance()
                    continue
                record.code, record.codec = result.code, True
                _hand_over(record, batch, progress)
    finally:
        results.close()  # on Ctrl-C: stop the workers before what was hashed is committed


def _hand_over(record: _Record, batch: _Batch, progress: Progress) -> None:
    batch.append(record)
    progress.advance()
    if len(batch.records) >= ADD_CHUNK or time.monotonic() - batch.since >= ADD_FLUSH_S:
        batch.flush()


class _Batch:
    """Records waiting to be inserted as one insert_many (one transaction; a crash loses at most this)."""

    def __init__(self, db: Database, hashers: _Hashers, user_meta: dict | None, args: argparse.Namespace,
                 progress: Progress) -> None:  # fmt: skip
        self.db, self.hashers, self.user_meta, self.args, self.progress = db, hashers, user_meta, args, progress
        self.records: list[_Record] = []
        self.since = time.monotonic()  # of the last flush
        self.added = self.failed = 0
        self.from_models = False
        from .db import key_bytes

        self._check_key = key_bytes

    def append(self, record: _Record) -> None:
        try:
            self._check_key(record.key)  # one bad key (too long, not UTF-8) is rejected alone
        except InvalidKey as e:
            self.failed += 1
            self.progress.message(f"hashdb: error: {_shown(record.key)}: {e}")
            return
        self.records.append(record)

    def _meta(self, record: _Record) -> dict | None:
        meta = record.meta if record.meta is not None else self.user_meta
        if record.codec:
            meta = dict(meta or {})
            meta["codec"] = self.hashers.hasher.config
        return meta

    def flush(self) -> None:
        self.since = time.monotonic()
        records, self.records = self.records, []
        if records:
            with _interrupts_held():  # Ctrl-C waits for the commit, so what we report is what was stored
                self._insert(records)

    def _insert(self, records: list[_Record]) -> None:
        keys = [r.key for r in records]
        codes = [r.code or b"" for r in records]
        metas = [self._meta(r) for r in records]
        replaced = [key in self.db for key in keys]
        try:
            self.db.insert_many(keys, codes, metas)
            done = list(zip(keys, codes, replaced, strict=True))
        except (InvalidKey, InvalidMeta, InvalidCode):  # find the bad entries; the good ones are still added
            done = []
            for key, code, meta, was in zip(keys, codes, metas, replaced, strict=True):
                try:
                    self.db.insert(key, code, meta)
                except (InvalidKey, InvalidMeta, InvalidCode) as e:
                    self.failed += 1
                    self.progress.message(f"hashdb: error: {_shown(key)}: {e}")
                else:
                    done.append((key, code, was))
        self.added += len(done)
        self.from_models = self.from_models or any(r.codec for r in records)
        self.progress.clear()  # stdout and the bar may share one terminal
        _report_added(self.args, done)
        sys.stdout.flush()
        self.progress.redraw()


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


def _model_meta(user_meta: dict | None, hashers: _Hashers) -> dict:
    meta = dict(user_meta or {})
    meta["codec"] = hashers.hasher.config
    return meta


def _record_codec(db: Database, hashers: _Hashers) -> None:
    """Store the codec config in the database's meta the first time models are added to it."""
    config = hashers.hasher.config
    stored = db.codec
    if stored is None:
        db.set_codec(config)
    elif stored != config:
        _warn("warning: the database's codes were made with another codec configuration; distances may mislead")


def _report_added(args: argparse.Namespace, added: list[tuple[str, bytes, bool]]) -> None:
    for key, code, replaced in added:
        if args.json:
            _emit({"key": key, "code": code.hex(), "replaced": replaced})
        elif not args.quiet:
            print(f"{'replaced' if replaced else 'added'} {code.hex()}  {_shown(key)}")


def _parse_meta(text: str | None) -> dict | None:
    if text is None:
        return None
    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"number {number} is out of range")
        return value

    def no_constant(name: str) -> NoReturn:
        raise ValueError(f"{name} is not valid JSON")

    try:
        meta = json.loads(text, parse_float=finite, parse_constant=no_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"--meta is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise UsageError("--meta must be a JSON object")
    return meta


def _copy_radius(codec: dict | None) -> int | None:
    """The copy radius stored with a database's codec configuration (None for databases of bare codes)."""
    radius = codec.get("copy_radius") if isinstance(codec, dict) else None
    return radius if isinstance(radius, int) and not isinstance(radius, bool) and radius >= 0 else None


def cmd_query(args: argparse.Namespace) -> int:
    inputs = _split_target(args)
    if args.radius is not None and args.radius < 0:
        raise UsageError("--radius must be >= 0")
    if args.knn is not None and args.knn < 1:
        raise UsageError("--knn must be >= 1")
    found_any = False
    failed = 0
    with _open(args, readonly=True) as db:
        copy_radius = _copy_radius(db.codec)
        radius = args.radius
        if radius is None and args.knn is None:
            if copy_radius is None:
                raise UsageError("this database stores no codec configuration (no model was added with "
                                 "'hashdb add'), so it has no copy radius: give --radius R or --knn K")  # fmt: skip
            radius = copy_radius
        hashers = _Hashers(db.bits)
        for text in _inputs(inputs):
            try:
                code, _ = hashers.code_or_model(text)
            except (ModelFormatError, InvalidCode) as e:  # a bad input: say so, and answer the others
                failed += 1
                _warn(f"error: {e}")
                continue
            matches = db.radius(code, radius) if radius is not None else db.knn(code, args.knn)
            found_any = found_any or bool(matches)
            if args.json:
                _emit({"query": text, "code": code.hex(), "copy_radius": copy_radius,
                       "matches": [{"key": key, "distance": int(dist), "verdict": _verdict(dist, copy_radius)}
                                   for key, dist in matches]})  # fmt: skip
            else:
                _print_matches(text, matches, copy_radius)
            sys.stdout.flush()  # each answer is out before a later input can fail
    if failed:
        return EXIT_ERROR
    return EXIT_OK if found_any else EXIT_NOT_FOUND


def _verdict(distance: int, copy_radius: int | None) -> str | None:
    if copy_radius is None:
        return None
    return "copy" if distance <= copy_radius else "not a copy"


def _print_matches(query: str, matches: list[Match], copy_radius: int | None) -> None:
    within = f" (copy radius {copy_radius})" if copy_radius is not None else ""
    print(f"query {_shown(query)}: {len(matches)} match{'es' if len(matches) != 1 else ''}{within}")
    if not matches:
        return
    if copy_radius is None:
        print(f"  {'distance':>8}  key")
        for key, dist in matches:
            print(f"  {int(dist):>8}  {_shown(key)}")
        return
    print(f"  {'distance':>8}  {'verdict':<10}  key")
    for key, dist in matches:
        print(f"  {int(dist):>8}  {_verdict(dist, copy_radius):<10}  {_shown(key)}")


def cmd_delete(args: argparse.Namespace) -> int:
    keys = _split_target(args)
    missing = 0
    with _open(args) as db:
        for key in _inputs(keys):
            deleted = bool(db.delete(key))
            missing += not deleted
            if args.json:
                _emit({"key": key, "deleted": deleted})
            elif deleted:
                print(f"deleted {_shown(key)}")
            else:
                _warn(f"not found: {key}")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    keys = _split_target(args)
    missing = 0
    with _open(args, readonly=True) as db:
        for key in _inputs(keys):
            try:
                code, meta = db.get(key)
            except KeyNotFound:
                missing += 1
                if args.json:
                    _emit({"key": key, "code": None, "meta": None})
                else:
                    _warn(f"not found: {key}")
                continue
            if args.json:
                _emit({"key": key, "code": code.hex(), "meta": meta})
            else:
                tail = f"  {json.dumps(meta, sort_keys=True, default=_json_default)}" if meta is not None else ""
                print(f"{code.hex()}  {_shown(key)}{tail}")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    if _split_target(args):
        raise UsageError("list takes no arguments besides DB")
    with _open(args, readonly=True) as db:
        for key in db:
            if args.json:
                _emit({"key": key})
            else:
                print(_shown(key))
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    if _split_target(args):
        raise UsageError("stats takes no arguments besides DB")
    with _open(args, readonly=True) as db:
        stats = db.stats()
    if args.json:
        _emit(stats)
    else:
        _print_mapping(_human_stats(stats))
    return EXIT_OK


_SIZES = ("map_size", "map_used", "index_bytes", "nbytes", "bytes")


def _human_stats(stats: dict) -> dict:
    """Dates and sizes as people read them (``--json`` keeps the raw numbers)."""
    out: dict[str, Any] = {}
    for name, value in stats.items():
        if isinstance(value, dict):
            out[name] = _human_stats(value)
        elif name == "created" and isinstance(value, int | float):
            out[name] = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(value))
        elif (name in _SIZES or name.endswith("_bytes")) and isinstance(value, int | float) and value >= 0:
            out[name] = _size(value)
        else:
            out[name] = value
    return out


def _print_mapping(mapping: dict, indent: str = "") -> None:
    width = max((len(str(k)) for k in mapping), default=0)
    for name, value in mapping.items():
        if isinstance(value, dict):
            print(f"{indent}{name}:")
            _print_mapping(value, indent + "  ")
        else:
            print(f"{indent}{str(name):<{width}}  {value}")


def cmd_clusters(args: argparse.Namespace) -> int:
    if args.radius is not None and args.radius < 0:
        raise UsageError("--radius must be >= 0")
    if not _is_database(args.db):  # the same checks and words as every other command's DB argument
        raise _missing_database(args.db, create=False)
    from .db import HashDB

    with HashDB(args.db, bits=None, readonly=True) as db:
        radius = args.radius if args.radius is not None else _copy_radius(db.codec)
        if radius is None:  # codes added as hex, no codec recorded: the codec's default at this width
            from .codec.hasher import ModelHasher

            radius = ModelHasher(db.bits).copy_radius
            _warn(f"no codec recorded in {args.db}: using the default copy radius {radius} of {db.bits}-bit codes")
        clusters = db.clusters(int(radius), engine="ray" if args.ray else "local", ray_address=args.ray)
        trees = [_cluster_tree(db, c.keys) for c in clusters] if args.tree else [None] * len(clusters)
    for n, (cluster, tree) in enumerate(zip(clusters, trees, strict=True), 1):
        if args.json:
            doc = {"cluster": n, "radius": int(radius), "keys": cluster.keys,
                   "edges": [[a, b, int(d)] for a, b, d in cluster.edges]}  # fmt: skip
            _emit(doc if tree is None else {**doc, "tree": tree})
        else:
            _print_cluster(n, cluster)
            if tree is not None:
                _print_tree(tree)
    if not args.json:
        models = sum(len(c.keys) for c in clusters)
        print(f"{len(clusters)} cluster{'s' if len(clusters) != 1 else ''} of {models} models within radius {radius}")
    return EXIT_OK if clusters else EXIT_NOT_FOUND


def _cluster_tree(db: Any, keys: list[str]) -> dict:
    from .evidence.lineage import cluster_tree

    return cluster_tree(db, keys)


def _print_tree(tree: dict) -> None:
    how = "estimated original (lowest weight kurtosis)" if tree["rooted_by"] == "kurtosis" else "medoid"
    print(f"  derivation tree, root = {how}" + (f" ({tree['note']})" if tree.get("note") else ""))
    children: dict[str, list[tuple[str, int]]] = {}
    for parent, child, d in tree["edges"]:
        children.setdefault(parent, []).append((child, d))
    stack: list[tuple[str, int, int | None]] = [(tree["root"], 0, None)]
    while stack:
        key, depth, d = stack.pop()
        print(f"    {'  ' * depth}{_shown(key)}" + (f"  ({d} bits from its parent)" if d is not None else ""))
        stack.extend((child, depth + 1, dd) for child, dd in reversed(children.get(key, [])))


def cmd_compare(args: argparse.Namespace) -> int:
    from .evidence import compare

    if args.permutations < 1:
        raise UsageError("--permutations must be >= 1")
    a, b = args.a, args.b
    if args.db is not None:  # an argument that is no file is a stored key of DB, compared with its file
        if not _is_database(args.db):
            raise _missing_database(args.db, create=False)
        from .db import HashDB
        from .evidence.lineage import stored_model_file

        with HashDB(args.db, bits=None, readonly=True) as db:
            a, b = (x if os.path.exists(x) else stored_model_file(db, x) for x in (a, b))
    result = compare(a, b, n_perm=args.permutations, seed=args.seed)
    if args.html:
        from .evidence.report import write_page

        write_page(args.html, result)
    if args.json:
        _emit(result)
    else:
        _print_comparison(result)
    return EXIT_OK


def _print_comparison(result: dict) -> None:
    print(f"{result['verdict']['call']}: {result['verdict']['words']}")
    print(f"  {'correlation':>11}  {'change':>6}  {'in place':>9}  layer of a -> layer of b")
    for x in result["layers"]:
        kept = "" if x["units_in_place"] is None else f"{x['units_in_place']}/{x['units']}"
        print(f"  {x['correlation']:>11.3f}  {x['relative_change']:>6.3f}  {kept:>9}  {x['layer_a']} -> {x['layer_b']}")


def cmd_report(args: argparse.Namespace) -> int:
    if not _is_database(args.db):
        raise _missing_database(args.db, create=False)
    from .db import HashDB
    from .evidence.report import suspect_report, write_page

    with HashDB(args.db, bits=None, readonly=True) as db:
        doc = suspect_report(db, args.suspect, radius=args.radius, n_perm=args.permutations)
    write_page(args.output, doc)
    if args.json:
        _emit(doc)
    else:
        print(f"{doc['verdict']['call']}: {doc['verdict']['words']}")
        print(f"report written to {args.output}")
    return EXIT_OK if doc["within_radius"] else EXIT_NOT_FOUND


def _print_cluster(n: int, cluster: Any) -> None:
    print(f"cluster {n}: {len(cluster.keys)} models, {len(cluster.edges)} pairs within the radius")
    for key in cluster.keys:
        print(f"  {key}")
    width = max(len(a) for a, _, _ in cluster.edges)
    print(f"  {'distance':>8}  {'key_a':<{width}}  key_b")
    for a, b, d in cluster.edges:
        print(f"  {int(d):>8}  {a:<{width}}  {b}")


def cmd_hash(args: argparse.Namespace) -> int:
    from .codec.hasher import CODEC_VERSION
    from .codes import check_bits

    bits = check_bits(args.bits if args.bits is not None else DEFAULT_BITS)
    hashers = _Hashers(bits)
    paths = list(_inputs(args.models))
    failed = 0
    for key, path in _model_units(paths):
        try:
            if isinstance(path, ModelFormatError):
                raise path
            code = hashers.hash_file(path)
        except ModelFormatError as e:
            failed += 1
            _warn(f"error: {e}")
            continue
        if args.json:
            _emit({"key": key, "path": path, "code": code.hex(), "bits": bits, "codec": CODEC_VERSION})
        else:
            print(f"{code.hex()}  {_shown(key)}")
        sys.stdout.flush()
    return EXIT_ERROR if failed else EXIT_OK


EXPORT_FORMAT = "hashdb-export"
EXPORT_VERSION = 1
IMPORT_CHUNK = 4096


def cmd_export(args: argparse.Namespace) -> int:
    """Every record as JSON lines (a header line, then {"key", "code", "meta"} in key order) or CSV."""
    if _split_target(args):
        raise UsageError("export takes no arguments besides DB (write to a file with -o FILE)")
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8", newline="")
    try:
        with _open(args, readonly=True) as db:
            writer = csv.writer(out, lineterminator="\n") if args.format == "csv" else None
            if writer is not None:
                writer.writerow(["key", "code", "meta"])
            else:
                header = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "bits": db.bits, "codec": db.codec}
                out.write(_json_line(header))
            for key in db:
                try:
                    code, meta = db.get(key)
                except KeyNotFound:  # deleted while we were exporting
                    continue
                if writer is not None:
                    text = "" if meta is None else json.dumps(_finite(meta), sort_keys=True, default=_json_default)
                    writer.writerow([key, code.hex(), text])
                else:
                    out.write(_json_line({"key": key, "code": code.hex(), "meta": meta}))
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


def _json_line(doc: Any) -> str:
    return json.dumps(_finite(doc), sort_keys=True, default=_json_default, allow_nan=False) + "\n"


def cmd_import(args: argparse.Namespace) -> int:
    """Insert the records of an export (JSON lines or CSV); existing keys are replaced."""
    items = _split_target(args)
    if len(items) != 1:
        raise UsageError("import takes DB and one FILE ('-' for stdin)")
    source = sys.stdin if items[0] == "-" else _open_text(items[0])
    try:
        rows = _import_rows(source, args.format)
        header = next(rows)
        if args.socket is None and not _is_database(args.db) and args.bits is None:
            args.bits = header.get("bits", header.get("bits_guess"))  # the file's width is enough to create it
        with _open(args, create=True) as db:
            failed, added, replaced = _import_into(db, rows, header)
    finally:
        if source is not sys.stdin:
            source.close()
    if args.json:
        _emit({"imported": added, "replaced": replaced, "failed": failed})
    elif not args.quiet:
        print(f"imported {added} records ({replaced} replaced) into {args.db or args.socket}")
    if failed:
        _warn(f"{failed} records could not be imported")
        return EXIT_ERROR
    return EXIT_OK


def _open_text(path: str) -> IO[str]:
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def _import_rows(source: IO[str], fmt: str) -> Iterator[Any]:
    """Yields the header (a dict, maybe empty), then (line number, key, code hex, meta or None) per record."""
    first = source.readline()
    if fmt == "auto":
        fmt = "jsonl" if first.lstrip().startswith("{") or not first.strip() else "csv"
    if fmt == "csv":
        reader = csv.reader([first, *source] if first else source)
        head = next(reader, None)
        if head is None or [h.strip() for h in head[:2]] != ["key", "code"]:
            raise UsageError("a CSV import starts with the header row key,code[,meta]")
        rows = list(reader)
        header: dict[str, Any] = {}
        if rows and len(rows[0]) >= 2:
            header["bits_guess"] = len(rows[0][1]) * 4  # CSV states no width: the first code's
        yield header
        for number, row in enumerate(rows, start=2):
            if len(row) < 2:
                yield number, None, None, f"expected key,code[,meta], got {len(row)} fields"
                continue
            text = row[2] if len(row) > 2 else ""
            try:
                meta = json.loads(text) if text else None
            except ValueError as e:
                yield number, row[0], None, f"meta is not JSON: {e}"
                continue
            yield number, row[0], row[1], meta
        return
    lines = iter([first, *source])
    header = {}
    doc = _json_or_none(first)
    if isinstance(doc, dict) and doc.get("format") == EXPORT_FORMAT:
        if doc.get("version") != EXPORT_VERSION:
            raise UsageError(f"export version {doc.get('version')!r}; this hashdb reads {EXPORT_VERSION}")
        header = doc
        next(lines)
    yield header
    for number, line in enumerate(lines, start=2 if header else 1):
        if not line.strip():
            continue
        doc = _json_or_none(line)
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or not isinstance(doc.get("code"), str):
            yield number, None, None, "expected a JSON object with string 'key' and 'code'"
            continue
        yield number, doc["key"], doc["code"], doc.get("meta")


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _import_into(db: Database, rows: Iterator[Any], header: dict) -> tuple[int, int, int]:
    from .codes import to_bytes
    from .db import key_bytes

    if header.get("bits") not in (None, db.bits):
        raise UsageError(f"the export holds {header['bits']}-bit codes and the database {db.bits}-bit ones")
    failed = added = replaced = 0
    keys: list[str] = []
    codes: list[bytes] = []
    metas: list[dict | None] = []

    def flush() -> None:
        nonlocal added, replaced
        if keys:
            replaced += sum(key in db for key in keys)
            added += db.insert_many(keys, codes, metas)
            keys.clear()
            codes.clear()
            metas.clear()

    for number, key, code, meta in rows:
        try:
            if key is None or code is None:
                raise InvalidCode(str(meta))
            key_bytes(key)
            if meta is not None and not isinstance(meta, dict):
                raise InvalidMeta("meta must be an object")
            raw = to_bytes(code, db.bits)
        except HashDBError as e:
            failed += 1
            _warn(f"error: line {number}: {e}")
            continue
        keys.append(key)
        codes.append(raw)
        metas.append(meta)
        if len(keys) >= IMPORT_CHUNK:
            flush()
    flush()
    codec = header.get("codec")
    if isinstance(codec, dict):
        stored = db.codec
        if stored is None:
            db.set_codec(codec)
        elif stored != codec:
            _warn("warning: the export was made with another codec configuration than the database's")
    return failed, added, replaced


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.max_frame < 64:
        raise UsageError("--max-frame must be at least 64 bytes")
    if args.bits is None and not _is_database(args.db):
        raise _missing_database(args.db, create=True)
    serve(args.db, args.socket, bits=args.bits, max_frame=args.max_frame)
    return EXIT_OK


def cmd_demo(argv: list[str]) -> int:
    try:
        from . import demo
    except ImportError as e:
        raise UsageError(f"the demo is not available: {e}") from None
    return int(demo.main(argv) or 0)


# -- argument parsing ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; its subcommand parsers are in ``parser.commands`` (name -> parser)."""
    parser = _Parser(prog="hashdb", description="Find copies of neural-network models among millions.")
    parser.add_argument("--version", action="version", version=f"hashdb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def target(p: argparse.ArgumentParser, inputs: str) -> None:
        if inputs:
            text = f"database directory (omit with --socket), then {inputs}; '-' or none: stdin"
            p.add_argument("items", nargs="*", metavar=f"DB {inputs}", help=text)
        else:
            p.add_argument("items", nargs="*", metavar="DB", help="database directory (omit with --socket)")
        p.add_argument("--socket", metavar="PATH", help="use the server listening on PATH instead of opening DB")
        p.add_argument("--json", action="store_true", help="one JSON document per line")

    bits_help = "code width, to create a new database (required then; an existing one keeps its own)"
    usage = "hashdb add (DB | --socket PATH) (--key KEY CODE_OR_MODEL | MODEL...) [--bits N] [--meta JSON]"
    p = sub.add_parser("add", help="store hashed models, or codes piped from 'hashdb hash'", usage=usage)
    target(p, "MODEL...")
    p.add_argument("--key", help="store one CODE_OR_MODEL under KEY (default: models are keyed by their path)")
    p.add_argument("--meta", metavar="JSON", help="metadata object stored with every code")
    p.add_argument("--bits", type=int, help=bits_help)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, print nothing on success")
    cores = "hash in N worker processes (default: the machine's cores), or N Ray actors with --ray"
    p.add_argument("--workers", "-j", type=int, metavar="N", help=cores)
    ray = "hash on Ray: 'local' starts Ray here, 'auto' joins a running cluster (needs pip install hashdb[ray])"
    p.add_argument("--ray", metavar="ADDRESS", help=ray)
    p.set_defaults(func=cmd_add)

    usage = "hashdb clusters DB [--radius R] [--json] [--ray ADDRESS] [--tree]"
    p = sub.add_parser("clusters", help="groups of stored models within a radius of each other", usage=usage)
    p.add_argument("db", metavar="DB")
    p.add_argument("--radius", "-r", type=int, help="Hamming radius of an edge (default: the stored copy radius)")
    p.add_argument("--json", action="store_true", help='one JSON object per cluster per line: "keys", "edges"')
    p.add_argument("--ray", metavar="ADDRESS", help="split the self-join into Ray tasks ('local' or 'auto')")
    p.add_argument("--tree", action="store_true", help="order each cluster into a derivation tree (reads the files)")
    p.set_defaults(func=cmd_clusters)

    usage = "hashdb compare A B [--db DB] [--json] [--html OUT.html] [--permutations N]"
    p = sub.add_parser("compare", help="verify a pair of models: aligned layers, exact p-value, direction",
                       usage=usage)  # fmt: skip
    p.add_argument("a", metavar="A", help="model file or folder")
    p.add_argument("b", metavar="B", help="model file or folder")
    p.add_argument("--json", action="store_true", help="the whole result as one JSON document")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained HTML report")
    p.add_argument("--permutations", type=int, default=999, metavar="N", help="permutations of the test (999)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    p.add_argument("--db", metavar="DB", help="A or B may be a key of DB whose model file is still readable")
    p.set_defaults(func=cmd_compare)

    usage = "hashdb report DB SUSPECT -o OUT.html [--radius R] [--json]"
    p = sub.add_parser("report", help="an HTML report of a suspect model's matches in a database", usage=usage)
    p.add_argument("db", metavar="DB")
    p.add_argument("suspect", metavar="SUSPECT", help="model file or folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="HTML file to write")
    p.add_argument("--radius", "-r", type=int, help="Hamming radius of a match (default: the stored copy radius)")
    p.add_argument("--json", action="store_true", help="also print the report's JSON")
    p.add_argument("--permutations", type=int, default=999, metavar="N", help="permutations of each test (999)")
    p.set_defaults(func=cmd_report)

    usage = "hashdb query (DB | --socket PATH) CODE_OR_MODEL... [--radius R | --knn K] [--json]"
    p = sub.add_parser("query", help="find stored codes near a code or a model", usage=usage)
    target(p, "CODE_OR_MODEL...")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--radius", "-r", type=int,
                     help="every code within Hamming distance R (default: the database's copy radius)")  # fmt: skip
    how.add_argument("--knn", "-k", type=int, help="the K nearest codes")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("delete", help="delete keys", usage="hashdb delete (DB | --socket PATH) KEY... [--json]")
    target(p, "KEY...")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("get", help="print the code and metadata of keys",
                       usage="hashdb get (DB | --socket PATH) KEY... [--json]")  # fmt: skip
    target(p, "KEY...")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("list", help="print every key", usage="hashdb list (DB | --socket PATH) [--json]")
    target(p, "")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("stats", help="database statistics", usage="hashdb stats (DB | --socket PATH) [--json]")
    target(p, "")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export", help="write every key, code and metadata (JSON lines or CSV)",
                       usage="hashdb export (DB | --socket PATH) [--format jsonl|csv] [-o FILE]")  # fmt: skip
    target(p, "")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="default jsonl (keeps the codec)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_export)

    usage = "hashdb import (DB | --socket PATH) FILE [--format auto|jsonl|csv] [--bits N]"
    p = sub.add_parser("import", help="insert the records of an export (existing keys are replaced)", usage=usage)
    target(p, "FILE")
    p.add_argument("--format", choices=["auto", "jsonl", "csv"], default="auto")
    p.add_argument("--bits", type=int, help="code width of a new database (default: the width the export states)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("serve", help="serve a database on a Unix socket")
    p.add_argument("db", metavar="DB")
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to create (mode 0600)")
    p.add_argument("--bits", type=int, help=bits_help)
    p.add_argument("--max-frame", type=int, default=None, metavar="BYTES", help="largest request accepted")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("hash", help="print the perceptual hash of model files")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model files; '-' or none: stdin")
    p.add_argument("--bits", type=int, help=f"code width (default {DEFAULT_BITS})")
    p.add_argument("--json", action="store_true", help="one JSON document per line")
    p.set_defaults(func=cmd_hash)

    sub.add_parser("demo", help="end-to-end demo: train CNNs, copy them, find the copies (see 'hashdb demo -h')",
                   add_help=False)  # fmt: skip
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "demo":  # the demo parses its own arguments
            return cmd_demo(argv[1:])
        parser = build_parser()
        if not argv or argv[0].startswith("-"):  # --help, --version, or nothing
            parser.parse_args(argv)
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        commands: dict[str, argparse.ArgumentParser] = parser.commands  # type: ignore[attr-defined]
        command = commands.get(argv[0])
        if command is None:
            close = difflib.get_close_matches(argv[0], list(commands), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (see 'hashdb --help')"
            raise UsageError(f"unknown command {argv[0]!r}{hint}")
        # Intermixed: `add DB --key K CODE` puts a positional after an option, which plain parse_args rejects.
        args = command.parse_intermixed_args(argv[1:])
        if getattr(args, "max_frame", "unset") is None:
            from .protocol import DEFAULT_MAX_FRAME

            args.max_frame = DEFAULT_MAX_FRAME
        return int(args.func(args))
    except UsageError as e:
        _warn(f"error: {e}")
        return EXIT_ERROR
    except KeyNotFound as e:
        _warn(f"error: {e}")
        return EXIT_NOT_FOUND
    except HashDBError as e:
        _warn(f"error: {e}")
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader (e.g. `head`) went away: exit quietly, and keep Python from complaining at shutdown.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        _warn(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _warn("interrupted")
        return EXIT_INTERRUPTED
    except MemoryError:
        _warn("error: out of memory")
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - a library or system error never reaches the user as a traceback
        if os.environ.get("HASHDB_DEBUG"):
            raise
        _warn(f"error: {type(e).__module__.split('.')[0]}.{type(e).__name__}: {e} (HASHDB_DEBUG=1 shows where)")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
