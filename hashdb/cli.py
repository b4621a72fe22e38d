"""The ``hashdb`` command: parse arguments, call HashDB / ModelHasher (or a server), print.

Exit status: 0 success, 1 a query / get / delete found nothing, 2 a usage or input error (one line on
stderr, no traceback; also for any error of the library or the system, e.g. a full disk), 130 interrupted.
``--json`` prints one JSON document per line; the field names are stable.

Every command is written against ``hashdb.types.Database``, which HashDB and the socket Client both satisfy.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NamedTuple, NoReturn

from . import DEFAULT_BITS, __version__
from .errors import HashDBError, InvalidCode, InvalidMeta, KeyNotFound, ModelFormatError

if TYPE_CHECKING:
    from .codec import ModelHasher
    from .codec.hasher import Suspect
    from .matching import ModelMatch
    from .types import Database, Match

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command line or input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- inputs --------------------------------------------------------------------------------------------


def _inputs(items: Sequence[str], stdin: IO[str] | None = None, waiting_note: bool = True) -> Iterator[str]:
    """The arguments, or stdin lines (stripped, blank lines skipped) when there are none or one is '-'. When
    stdin is a terminal, say that the command waits for it (a forgotten argument otherwise looks like a hang)."""
    if not items:
        items = ["-"]
    for item in items:
        if item == "-":
            source = stdin or sys.stdin
            if waiting_note and source.isatty():
                _warn("reading inputs from the terminal, one per line (end with Ctrl-D)")
            for line in source:
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


def _add_input(text: str, bits: int) -> Any:
    """What one `add` input is: a path (a model file or folder, hashed by the ingest), or an Entry with a code
    (a `hashdb hash` line, a `hashdb hash --json` or export line)."""
    from .ingest import Entry

    if os.path.lexists(text):
        return text
    if text.startswith("{"):
        return _json_record(text, bits)
    pair = _HASH_LINE.fullmatch(text)
    if pair is not None:
        from .codes import to_bytes

        return Entry(pair.group(2), to_bytes(pair.group(1), bits))
    if _is_hex_code(text, bits):
        raise UsageError(f"a hex code needs a key: hashdb add DB --key KEY {text[:16]}...")
    return text  # the ingest names the missing file


def _export_header(text: str) -> dict | None:
    """The header of a `hashdb export` (JSON lines or CSV) when ``text`` is one, else None."""
    if not text.lstrip().startswith(("{", "#")):
        return None
    from .transfer import header_of

    return header_of(text)


def _json_record(text: str, bits: int) -> Any:
    from .codes import to_bytes
    from .ingest import Entry

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidCode(f"not a JSON line: {e}: {_shown(text[:80])}") from None
    key = doc.get("key", doc.get("path")) if isinstance(doc, dict) else None
    if not isinstance(key, str) or not isinstance(doc.get("code"), str):
        raise InvalidCode(f"a JSON line needs string fields 'key' (or 'path') and 'code': {_shown(text[:80])}")
    meta = doc.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidMeta(f"{_shown(key)}: 'meta' must be an object")
    from .transfer import layers_of

    try:
        layers = layers_of(doc.get("layers"), bits)  # an export line's layer codes go in with its code
    except InvalidCode as e:
        raise InvalidCode(f"{_shown(key)}: {e}") from None
    # a `hashdb hash --json` line names its codec: ingest checks it against the database's and, if it is the
    # same, counts the code as hashed with it
    codec = doc.get("codec") if isinstance(doc.get("codec"), str) else None
    return Entry(key, to_bytes(doc["code"], bits), meta=meta, layers=layers, codec=codec)


def _key_of(path: str) -> str:
    """The database key of a model file (hashdb.codec.units: one rule for every front end)."""
    from .codec.units import unit_key

    return unit_key(path)


def _shown(text: str) -> str:
    """``text`` as one printable line (hashdb.text.shown): control characters such as a newline or ESC in a
    file name, key, tensor name or error message are shown escaped, so they cannot forge output lines or
    drive the terminal; bytes that are not UTF-8 show as ``\\xNN``."""
    from .text import shown

    return shown(text)


class _Hashers:
    """Builds the ModelHasher on first use, so commands given hex codes never import the codec (or torch).
    A database's stored codec configuration decides how its suspects are hashed (codes of another codec
    version are not comparable); without one, the default codec at the database's width."""

    def __init__(self, bits: int, codec: dict | None = None):
        self.bits = bits
        self.codec = codec
        self._hasher: ModelHasher | None = None

    @property
    def hasher(self) -> ModelHasher:
        if self._hasher is None:
            from .codec import ModelHasher

            self._hasher = ModelHasher.from_config(self.codec) if self.codec else ModelHasher(bits=self.bits)
        return self._hasher

    def hash_file(self, path: str, or_code: bool = False) -> bytes:
        return self.suspect(path, or_code).code

    def suspect(self, path: str, or_code: bool = False) -> Suspect:
        """The code, layer codes and kernel family of a model file (hasher.suspect), or one ModelFormatError."""
        if not os.path.exists(path):
            also = f" (and not a {self.bits}-bit hex code)" if or_code else ""
            raise ModelFormatError(f"{_shown(path)}: no such file{also}")
        from .bulk import model_error

        try:
            return self.hasher.suspect(path)
        except (ModelFormatError, OSError) as e:
            raise ModelFormatError(_shown(str(model_error(path, e)))) from None

    def code_or_model(self, text: str) -> tuple[bytes, Suspect | None]:
        """(code, the model's hasher.suspect or None for a hex code) for a CODE_OR_MODEL argument."""
        if _is_hex_code(text, self.bits):
            from .codes import to_bytes

            return to_bytes(text, self.bits), None
        found = self.suspect(text, or_code=True)
        return found.code, found


# -- output --------------------------------------------------------------------------------------------


def _emit(doc: Any) -> None:
    try:
        text = json.dumps(doc, sort_keys=True, default=_json_default, allow_nan=False)
    except ValueError:  # NaN or infinity (in metadata stored through the Python API): not valid JSON
        text = json.dumps(_finite(doc), sort_keys=True, default=_json_default, allow_nan=False)
    sys.stdout.write(text + "\n")


def _finite(obj: Any) -> Any:
    from .transfer import finite

    return finite(obj)


def _json_default(obj: Any) -> Any:
    from .transfer import json_default

    return json_default(obj)


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
        also = " (a new database is created only in a new or empty folder)" if create else ""
        return UsageError(f"{_shown(path)} is not a hashdb database{also}")
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
        occupied = os.path.isdir(args.db) and bool(os.listdir(args.db))
        if not (create and bits is not None) or os.path.isfile(args.db) or occupied:
            raise _missing_database(args.db, create)
        return HashDB(args.db, bits=bits)
    return HashDB(args.db, bits=bits, readonly=readonly)


# -- commands ------------------------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    """A thin loop over hashdb.ingest: parse the inputs, print each outcome, end with a one-line summary."""
    from .ingest import Entry, Ingest

    inputs = _split_target(args)
    user_meta = _parse_meta(args.meta)
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("--timeout must be > 0 seconds")
    if args.key is not None and (len(inputs) != 1 or inputs == ["-"]):
        raise UsageError("--key KEY takes exactly one CODE_OR_MODEL argument")
    texts = inputs if args.key is not None else list(_inputs(inputs, waiting_note=True))
    if not texts:
        raise UsageError("no model files given")
    with _created_only_if_used(args), _open(args, create=True) as db:
        failed = 0  # inputs that are no entry at all (bad piped lines); the ingest counts its own
        sources: list[Any] = []
        if args.key is not None:
            text = texts[0]
            if _is_hex_code(text, db.bits):
                from .codes import to_bytes

                sources.append(Entry(args.key, to_bytes(text, db.bits)))
            else:
                sources.append(Entry(args.key, path=text))
        export_codec = None  # the codec an export's header names (`hashdb export DB | hashdb add OTHER`)
        for text in texts if args.key is None else []:
            header = _export_header(text)
            if header is not None:
                if header.get("bits") not in (None, db.bits):
                    raise UsageError(f"the export holds {header['bits']}-bit codes and the database {db.bits}-bit ones")
                export_codec = header.get("codec")
                from .ingest import refuse_other_version

                refuse_other_version(db, export_codec)  # before anything of it is added
                continue
            try:
                sources.append(_add_input(text, db.bits))
            except (InvalidCode, InvalidMeta) as e:  # a bad line of piped input: name it, add the others
                failed += 1
                _warn(f"error: {e}")
        ingest = Ingest(db, meta=user_meta, incremental=not args.rehash and args.key is None)  # --key: always
        progress = Progress(0, "models", enabled=False if args.quiet else None)
        outcomes = ingest.run(sources, workers=args.workers, engine="ray" if args.ray else "local",
                              ray_address=args.ray, timeout=args.timeout)  # fmt: skip
        interrupted = False
        try:
            for outcome in outcomes:
                progress.total = ingest.total
                _report_outcome(args, outcome, progress)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
        if isinstance(export_codec, dict) and ingest.added + ingest.replaced:
            from .ingest import check_codec

            ingest.warnings.append(check_codec(db, export_codec) or "")
        for warning in filter(None, ingest.warnings):
            _warn(f"warning: {warning}")
        failed += ingest.failed
        total = ingest.total + failed - ingest.failed
        if interrupted:
            _warn(f"interrupted: added {ingest.added + ingest.replaced} of {total} entries")
            return EXIT_INTERRUPTED
        if not args.quiet and args.key is None:
            _warn(f"{ingest.added} added, {ingest.replaced} replaced, {ingest.unchanged} unchanged (not hashed "
                  f"again), {failed} failed, of {total} entries")  # fmt: skip
        if failed:
            _warn(f"{failed} of {total} entries could not be added")
            return EXIT_ERROR
    return EXIT_OK


def _report_outcome(args: argparse.Namespace, outcome: Any, progress: Progress) -> None:
    """Print one ingest outcome: added/replaced lines on stdout, errors and notes on stderr."""
    if outcome.status != "failed":
        progress.advance()
    if outcome.status == "failed":
        progress.advance()
        progress.message(f"hashdb: error: {outcome.error}")
        return
    if outcome.status == "unchanged":
        if args.json:
            progress.clear()
            _emit({"key": outcome.key, "unchanged": True})
            progress.redraw()
        return
    if outcome.same_content:
        others = ", ".join(_shown(k) for k in outcome.same_content[:3])
        more = f" and {len(outcome.same_content) - 3} more" if len(outcome.same_content) > 3 else ""
        progress.message(f"hashdb: note: {outcome.key} has the same bytes as {others}{more}")
    progress.clear()  # stdout and the bar may share one terminal
    _report_added(args, [(outcome.key, outcome.code, outcome.status == "replaced")], outcome.same_content)
    sys.stdout.flush()
    progress.redraw()


@contextlib.contextmanager
def _created_only_if_used(args: argparse.Namespace) -> Iterator[None]:
    """Remove a database this command created when nothing was stored in it (a failed first add leaves the
    folder as it was: no LMDB files in a new or empty folder)."""
    path = None if args.socket else args.db
    fresh = path is not None and not _is_database(path)
    existed = path is not None and os.path.isdir(path)
    try:
        yield
    finally:
        if fresh and path is not None and _is_database(path) and _holds_nothing(path):
            for name in ("data.mdb", "lock.mdb"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(path, name))
            if not existed:
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def _holds_nothing(path: str) -> bool:
    """True for a database with no entry (and False when it cannot be read: then it is left alone)."""
    from .db import HashDB

    try:
        with HashDB(path, bits=None, readonly=True) as db:
            return len(db) == 0
    except HashDBError:
        return False


def _report_added(args: argparse.Namespace, added: list[tuple[str, bytes | None, bool]],
                  same_content: Sequence[str] = ()) -> None:  # fmt: skip
    for key, code, replaced in added:
        hex_code = code.hex() if code is not None else None
        if args.json:
            doc: dict[str, Any] = {"key": key, "code": hex_code, "replaced": replaced}
            if same_content:
                doc["same_content"] = list(same_content)
            _emit(doc)
        elif not args.quiet:
            print(f"{'replaced' if replaced else 'added'} {hex_code}  {_shown(key)}")


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
    from .codec.radius import copy_radius_of

    return copy_radius_of(codec)


def cmd_query(args: argparse.Namespace) -> int:
    inputs = _split_target(args)
    if args.radius is not None and args.radius < 0:
        raise UsageError("--radius must be >= 0")
    if args.knn is not None and args.knn < 1:
        raise UsageError("--knn must be >= 1")
    from .codec.radius import decision_radius
    from .matching import find_matches

    found_any = False
    failed = 0
    with _open(args, readonly=True) as db:
        copy_radius = _copy_radius(db.codec)
        n_codes = len(db)
        radius = args.radius
        if radius is None and args.knn is None:
            if decision_radius(db.codec, n_codes) is None:
                raise UsageError("this database stores no codec configuration (no model was added with "
                                 "'hashdb add'), so it has no copy radius: give --radius R or --knn K")  # fmt: skip
        hashers = _Hashers(db.bits, db.codec)
        for query in _query_codes(_inputs(inputs), hashers):
            if not isinstance(query.code, bytes):  # a bad input: say so, and answer the others
                failed += 1
                _warn(f"error: {query.code}")
                continue
            code, model = query.code, query.model
            family = None if model is None else model.family
            layers = None if model is None or not args.layers else model.layers
            asked = radius if radius is not None or args.knn is not None else decision_radius(db.codec, n_codes, family)
            matches = find_matches(db, code, layers, radius=asked, knn=args.knn, family=family)
            found_any = found_any or bool(matches)
            same = _same_bytes(db, query.path, [(m.key, m.distance) for m in matches if m.distance is not None])
            if args.json:
                _emit({"query": query.text, "code": code.hex(), "copy_radius": copy_radius, "radius": asked,
                       "codes": n_codes, "family": family, "layers": None if layers is None else len(layers),
                       "matches": [{**m.as_dict(), **({"same_bytes": True} if m.key in same else {})}
                                   for m in matches]})  # fmt: skip
            else:
                _print_matches(query.text, matches, db.codec, same)
            sys.stdout.flush()  # each answer is out before a later input can fail
    if failed:
        return EXIT_ERROR
    return EXIT_OK if found_any else EXIT_NOT_FOUND


class _Query(NamedTuple):
    """One query: what was asked, its code (or why it has none), and for a model its path and hasher.suspect."""

    text: str
    code: bytes | HashDBError
    path: str | None = None
    model: Suspect | None = None


def _query_codes(texts: Iterator[str], hashers: _Hashers) -> Iterator[_Query]:
    """One _Query per query: a hex code, a model file, or each model unit of a folder of suspects
    (hashdb.codec.units.expand, asked under its key)."""
    from .codec.units import expand

    for text in texts:
        if not _is_hex_code(text, hashers.bits) and os.path.isdir(text):
            units, problems = expand([text])
            for problem in problems:
                yield _Query(problem.key, problem.error)
            for unit in units:
                try:
                    found = hashers.suspect(os.fspath(unit.path))
                    yield _Query(unit.key, found.code, os.fspath(unit.path), found)
                except ModelFormatError as e:
                    yield _Query(unit.key, e)
            continue
        try:
            code, model = hashers.code_or_model(text)
            yield _Query(text, code, None if model is None else text, model)
        except (ModelFormatError, InvalidCode) as e:
            yield _Query(text, e)


def _same_bytes(db: Database, path: str | None, matches: list[Match]) -> set[str]:
    """The matched keys at distance 0 whose stored file identity has the query file's sha256 (the same
    bytes, stored under another key or from another folder)."""
    exact = [key for key, dist in matches if dist == 0]
    if path is None or not exact:
        return set()
    from .ingest import file_identity

    identity = file_identity(path)
    if identity is None:
        return set()
    same = set()
    for key in exact:
        try:
            _, meta = db.get(key)
        except KeyNotFound:
            continue
        stored = meta.get("file") if isinstance(meta, dict) else None
        if isinstance(stored, dict) and stored.get("sha256") == identity["sha256"]:
            same.add(key)
    return same


def _print_matches(query: str, matches: list[ModelMatch], codec: dict | None, same: set[str] | None = None) -> None:
    copy_radius = _copy_radius(codec)
    within = f" (copy radius {copy_radius})" if copy_radius is not None else ""
    print(f"query {_shown(query)}: {len(matches)} match{'es' if len(matches) != 1 else ''}{within}")
    if not matches:
        return
    if codec is None:
        print(f"  {'distance':>8}  key")
        for m in matches:
            print(f"  {m.distance:>8}  {_shown(m.key)}{' (same bytes)' if same and m.key in same else ''}")
        return
    print(f"  {'distance':>8}  {'kind':<7}  {'layers':>6}  {'verdict':<10}  {'fmr':>8}  {'expected':>8}  key")
    for m in matches:
        tail = " (same bytes)" if same and m.key in same else ""
        distance = "-" if m.distance is None else str(m.distance)
        fmr = "-" if m.fmr is None else f"{m.fmr:.1e}"  # a codec config without a usable width has no rates
        expected = "-" if m.expected_false is None else f"{m.expected_false:.1e}"
        print(f"  {distance:>8}  {m.kind:<7}  {len(m.layers):>6}  {m.verdict or '-':<10}  {fmr:>8}  {expected:>8}  "
              f"{_shown(m.key)}{tail}")
        if m.kind == "partial":
            for t in m.layers:
                print(f"  {'':>8}  {'':<7}  {t.distance:>6}  {_shown(t.suspect)} = {_shown(t.stored)}")


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
        codec = db.codec
    stats.setdefault("codec", codec)  # the configuration the codes were made with, and its copy radius
    stats.setdefault("copy_radius", _copy_radius(codec))
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
            print(f"{indent}{_shown(str(name))}:")
            _print_mapping(value, indent + "  ")
        else:
            print(f"{indent}{_shown(str(name)):<{width}}  {_shown(str(value))}")


def cmd_clusters(args: argparse.Namespace) -> int:
    if args.radius is not None and args.radius < 0:
        raise UsageError("--radius must be >= 0")
    if not _is_database(args.db):  # the same checks and words as every other command's DB argument
        raise _missing_database(args.db, create=False)
    from .db import HashDB

    with HashDB(args.db, bits=None, readonly=True) as db:
        from .codec.radius import decision_radius

        radius = args.radius if args.radius is not None else decision_radius(db.codec, len(db))
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
            if args.edges:
                _print_cluster(n, cluster)
            else:
                _print_cluster_summary(n, cluster)
            if tree is not None:
                _print_tree(tree)
    if not args.json:
        models = sum(len(c.keys) for c in clusters)
        print(f"{len(clusters)} cluster{'s' if len(clusters) != 1 else ''} of {models} models within radius {radius}")
    return EXIT_OK if clusters else EXIT_NOT_FOUND


def _print_cluster_summary(n: int, cluster: Any) -> None:
    """One line per cluster: its size, the tightest and loosest edge, and a representative (the model with the
    most edges: the one the others are copies of, in a star around an original)."""
    degree: dict[str, int] = {}
    for a, b, _ in cluster.edges:
        degree[a] = degree.get(a, 0) + 1
        degree[b] = degree.get(b, 0) + 1
    representative = max(cluster.keys, key=lambda k: degree.get(k, 0))
    distances = [int(d) for _, _, d in cluster.edges]
    print(f"cluster {n}: {len(cluster.keys)} models, {len(distances)} pairs, distance {min(distances)}-"
          f"{max(distances)}, representative {_shown(representative)}")  # fmt: skip


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
        print(f"  {_shown(key)}")
    width = max(len(_shown(a)) for a, _, _ in cluster.edges)
    print(f"  {'distance':>8}  {'key_a':<{width}}  key_b")
    for a, b, d in cluster.edges:
        print(f"  {int(d):>8}  {_shown(a):<{width}}  {_shown(b)}")


def cmd_hash(args: argparse.Namespace) -> int:
    """Hash model files and folders in worker processes (hashdb.bulk), printing `CODE  KEY` lines in input order.

    A key with a control character (a newline in a file name) has no plain line: `add` reading it back could
    not tell it from two lines, so it is an error naming the file; `--json` prints it exactly."""
    from .bulk import hash_units
    from .codec.hasher import CODEC_VERSION
    from .codec.units import expand_in_order
    from .codes import check_bits

    bits = check_bits(args.bits if args.bits is not None else DEFAULT_BITS)
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("--timeout must be > 0 seconds")
    found = expand_in_order(_inputs(args.models))
    failed = 0
    progress = Progress(len(found), "models", enabled=False if args.quiet else None)
    limit: dict[str, Any] = {} if args.timeout is None else {"timeout": args.timeout}
    results = hash_units(found, bits=bits, workers=args.workers, **limit)
    try:
        for res in results:
            progress.advance()
            if res.error is None and not args.json and _has_control(res.key):
                res = res._replace(code=None, error=ModelFormatError(
                    f"{_shown(res.key)}: the name holds a control character, so a plain output line could be "
                    "read back as another key: use --json for its exact key"))  # fmt: skip
            if res.error is not None or res.code is None:
                failed += 1
                progress.message(f"hashdb: error: {res.error}")
                continue
            progress.clear()
            if args.json:
                layers = [[name, layer.hex()] for name, layer in res.layers or ()]  # `add` stores them too
                _emit({"key": res.key, "path": res.path, "code": res.code.hex(), "bits": bits, "codec": CODEC_VERSION,
                       "layers": layers})  # fmt: skip
            else:
                print(f"{res.code.hex()}  {_shown(res.key)}")
            sys.stdout.flush()
            progress.redraw()
    finally:
        results.close()
        progress.close()
    return EXIT_ERROR if failed else EXIT_OK


def _has_control(text: str) -> bool:
    from .text import shown

    # Escapes of undecodable bytes (\\xNN) are not control characters: such a key is refused by `add` anyway.
    return shown(text) != text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def cmd_export(args: argparse.Namespace) -> int:
    """Every record as JSON lines (a header line, then {"key", "code", "meta"} in key order) or CSV
    (hashdb.transfer; --json is JSON lines)."""
    from .transfer import export

    if _split_target(args):
        raise UsageError("export takes no arguments besides DB (write to a file with -o FILE)")
    if args.json and args.format == "csv":
        raise UsageError("--json writes JSON lines: give it or --format csv, not both")
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8", newline="")
    try:
        with _open(args, readonly=True) as db:
            export(db, out, "jsonl" if args.json else args.format)
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    """Insert the records of an export (JSON lines or CSV); existing keys are replaced."""
    from .transfer import import_rows, read_export

    items = _split_target(args)
    if len(items) != 1:
        raise UsageError("import takes DB and one FILE ('-' for stdin)")
    source = sys.stdin if items[0] == "-" else _open_text(items[0])
    try:
        header, rows = read_export(source, args.format)
        if args.socket is None and not _is_database(args.db) and args.bits is None:
            args.bits = header.get("bits", header.get("bits_guess"))  # the file's width is enough to create it
        with _created_only_if_used(args), _open(args, create=True) as db:
            done = import_rows(db, header, rows, on_error=lambda line: _warn(f"error: {line}"))
    finally:
        if source is not sys.stdin:
            source.close()
    if done.warning:
        _warn(f"warning: {done.warning}")
    if args.json:
        _emit({"imported": done.added, "replaced": done.replaced, "failed": done.failed})
    elif not args.quiet:
        print(f"imported {done.added} records ({done.replaced} replaced) into {_shown(args.db or args.socket)}")
    if done.failed:
        _warn(f"{done.failed} records could not be imported")
        return EXIT_ERROR
    return EXIT_OK


def _open_text(path: str) -> IO[str]:
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise UsageError(f"cannot read {_shown(path)}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

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


EXAMPLES = {
    "add": "hashdb add models.db --bits 768 zoo/ --workers 4   (again later: only new and changed files are hashed)",
    "clusters": "hashdb clusters models.db   (--edges lists every pair; --tree orders each into a derivation tree)",
    "compare": "hashdb compare original.pt suspect.safetensors --html evidence.html",
    "report": "hashdb report models.db suspect.pt -o report.html",
    "query": "hashdb query models.db suspect.safetensors suspects/   (a folder: one answer per model)",
    "delete": "hashdb delete models.db zoo/m0.pt",
    "get": "hashdb get models.db zoo/m0.pt --json",
    "list": "hashdb list models.db | head",
    "stats": "hashdb stats models.db",
    "export": "hashdb export models.db -o models.jsonl   (or: hashdb export models.db | hashdb add other.db)",
    "import": "hashdb import other.db models.jsonl",
    "serve": "hashdb serve models.db --socket /tmp/hashdb.sock",
    "hash": "hashdb hash zoo/*.pt | hashdb add models.db --bits 768",
}


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
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="per-file time limit of a hashing worker (default 300); over it: an error")  # fmt: skip
    p.add_argument("--rehash", action="store_true",
                   help="hash every file again (default: skip files stored before and unchanged since)")  # fmt: skip
    p.set_defaults(func=cmd_add)

    usage = "hashdb clusters DB [--radius R] [--json] [--ray ADDRESS] [--tree]"
    p = sub.add_parser("clusters", help="groups of stored models within a radius of each other", usage=usage)
    p.add_argument("db", metavar="DB")
    p.add_argument("--radius", "-r", type=int, help="Hamming radius of an edge (default: the stored copy radius)")
    p.add_argument("--json", action="store_true", help='one JSON object per cluster per line: "keys", "edges"')
    p.add_argument("--ray", metavar="ADDRESS", help="split the self-join into Ray tasks ('local' or 'auto')")
    p.add_argument("--edges", action="store_true", help="list every model and pair (default: one line per cluster)")
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
    p.add_argument("--no-layers", dest="layers", action="store_false",
                   help="whole-model matches only (no search for shared layers)")  # fmt: skip
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
    p.add_argument("models", nargs="*", metavar="MODEL", help="model files or folders; '-' or none: stdin")
    p.add_argument("--bits", type=int, help=f"code width (default {DEFAULT_BITS})")
    p.add_argument("--json", action="store_true", help="one JSON document per line")
    p.add_argument("--workers", "-j", type=int, metavar="N", help="hashing processes (default: the machine's cores)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-file time limit (default 300)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_hash)

    sub.add_parser("demo", help="end-to-end demo: train CNNs, copy them, find the copies (see 'hashdb demo -h')",
                   add_help=False)  # fmt: skip
    for name, example in EXAMPLES.items():
        sub.choices[name].epilog = f"example: {example}"
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
