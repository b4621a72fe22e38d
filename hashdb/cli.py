"""The ``hashdb`` command: parse arguments, call HashDB / ModelHasher (or a server), print.

Exit status: 0 success, 1 a query / get / delete found nothing, 2 a usage or input error (one line on
stderr, no traceback). ``--json`` prints one JSON document per line; the field names are stable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, NoReturn

from . import __version__
from .errors import HashDBError, InvalidCode, KeyNotFound, ModelFormatError

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2
DEFAULT_BITS = 256
# Models are inserted in chunks: a crash loses at most one chunk of hashing, and a chunk stays far below
# the server's frame limit.
ADD_CHUNK = 256


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


class _Hashers:
    """Builds the ModelHasher on first use, so commands given hex codes never import the codec (or torch)."""

    def __init__(self, bits: int):
        self.bits = bits
        self._hasher: Any = None

    @property
    def hasher(self) -> Any:
        if self._hasher is None:
            from .codec import ModelHasher

            self._hasher = ModelHasher(bits=self.bits)
        return self._hasher

    def hash_file(self, path: str, or_code: bool = False) -> bytes:
        if not os.path.exists(path):
            also = f" (and not a {self.bits}-bit hex code)" if or_code else ""
            raise ModelFormatError(f"{path}: no such file{also}")
        try:
            return self.hasher.hash(path)
        except ModelFormatError as e:
            raise ModelFormatError(e if path in str(e) else f"{path}: {e}") from None
        except OSError as e:
            raise ModelFormatError(f"{path}: {e.strerror or e}") from None

    def code_or_model(self, text: str) -> tuple[bytes, bool]:
        """(code, came_from_a_model) for a CODE_OR_MODEL argument."""
        if _is_hex_code(text, self.bits):
            from .codes import to_bytes

            return to_bytes(text, self.bits), False
        return self.hash_file(text, or_code=True), True


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
    sys.stderr.write(f"hashdb: {message}\n")


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

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
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        eta = f" ETA {int(left // 60)}:{int(left % 60):02d}" if self.done < self.total else ""
        self.stream.write(
            f"\r[{'#' * filled}{' ' * (width - filled)}] {self.done}/{self.total} {self.label} {rate:.1f}/s{eta}"
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
        self.stream.write(("\r\033[K" if self.enabled else "") + line + "\n")
        if self.enabled and self.done:
            self._draw(time.monotonic())
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


# -- opening a database or a server --------------------------------------------------------------------


def _split_target(args: argparse.Namespace, name: str = "DB") -> list[str]:
    """With --socket every positional is an input; otherwise the first one is the database path."""
    items: list[str] = list(args.items)
    if args.socket:
        args.db = None
        return items
    if not items:
        raise UsageError(f"{name} is required (or --socket PATH to use a running server)")
    args.db = items[0]
    return items[1:]


def _open(args: argparse.Namespace, create: bool = False) -> Any:
    if args.socket:
        from .client import connect

        return connect(args.socket)
    if not create and not os.path.exists(args.db):
        raise UsageError(f"no database at {args.db}")
    from .db import HashDB

    bits = getattr(args, "bits", None)
    if create and bits is None and not os.path.exists(args.db):
        bits = DEFAULT_BITS
    return HashDB(args.db, bits=bits)


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
            db.insert(args.key, code, meta)
            if from_model:
                _record_codec(db, hashers)
            _report_added(args, [(args.key, code)])
            return EXIT_OK
        paths = list(_inputs(inputs))
        if not paths:
            raise UsageError("no model files given")
        for path in paths:
            if _is_hex_code(path, db.bits):
                raise UsageError(f"a hex code needs a key: hashdb add DB --key KEY {path[:16]}...")
        return _add_models(db, paths, user_meta, hashers, args)
    return EXIT_OK


def _add_models(db: Any, paths: list[str], user_meta: dict | None, hashers: _Hashers,
                args: argparse.Namespace) -> int:  # fmt: skip
    """Hash the model units under ``paths`` in workers (hashdb.bulk) and commit them here in chunks, the only
    writer. A bad file is reported and skipped; Ctrl-C commits what is hashed and says how many."""
    from .bulk import expand_sources, hash_units

    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    units, missing = expand_sources(paths)
    total = len(units) + len(missing)
    if total == 0:
        raise UsageError("no model files found in " + ", ".join(paths))
    progress = Progress(total, "models")
    failed, added = 0, 0
    keys: list[str] = []
    codes: list[bytes] = []
    results = hash_units(units, bits=db.bits, workers=args.workers, engine="ray" if args.ray else "local",
                         ray_address=args.ray)  # fmt: skip
    try:
        for res in itertools.chain(missing, results):
            if res.error is not None:
                failed += 1
                progress.message(f"hashdb: error: {res.error}")
            else:
                keys.append(res.key)
                codes.append(res.code)
            progress.advance()
            if len(keys) >= ADD_CHUNK:
                _insert_chunk(db, keys, codes, user_meta, hashers, args, progress)
                added += len(keys)
                keys, codes = [], []
    except KeyboardInterrupt:
        results.close()  # stops the workers before the last chunk is committed
        if keys:
            _insert_chunk(db, keys, codes, user_meta, hashers, args, progress)
            added += len(keys)
        if added:
            _record_codec(db, hashers)
        progress.close()
        _warn(f"interrupted: {added} models committed, {total - added - failed} not hashed")
        return 130
    finally:
        results.close()
    if keys:
        _insert_chunk(db, keys, codes, user_meta, hashers, args, progress)
        added += len(keys)
    if added:
        _record_codec(db, hashers)
    progress.close()
    if failed:
        _warn(f"{failed} of {total} model files could not be hashed")
        return EXIT_ERROR
    return EXIT_OK


def _insert_chunk(db: Any, keys: list[str], codes: list[bytes], user_meta: dict | None, hashers: _Hashers,
                  args: argparse.Namespace, progress: Progress) -> None:  # fmt: skip
    meta = _model_meta(user_meta, hashers)
    db.insert_many(keys, codes, [meta] * len(keys))
    progress.clear()  # stdout and the bar may share one terminal
    _report_added(args, list(zip(keys, codes, strict=True)))
    sys.stdout.flush()
    progress.redraw()


def _model_meta(user_meta: dict | None, hashers: _Hashers) -> dict:
    meta = dict(user_meta or {})
    meta["codec"] = hashers.hasher.config
    return meta


def _record_codec(db: Any, hashers: _Hashers) -> None:
    """Store the codec config in an embedded database's meta the first time models are added to it."""
    if not hasattr(db, "set_codec"):  # a server connection: the per-code meta still carries the config
        return
    config = hashers.hasher.config
    stored = db.codec
    if stored is None:
        db.set_codec(config)
    elif stored != config:
        _warn("warning: the database's codes were made with another codec configuration; distances may mislead")


def _report_added(args: argparse.Namespace, added: list[tuple[str, bytes]]) -> None:
    for key, code in added:
        if args.json:
            _emit({"key": key, "code": code.hex()})
        elif not args.quiet:
            print(f"added {code.hex()}  {key}")


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


def cmd_query(args: argparse.Namespace) -> int:
    inputs = _split_target(args)
    if args.radius is not None and args.radius < 0:
        raise UsageError("--radius must be >= 0")
    if args.knn is not None and args.knn < 1:
        raise UsageError("--knn must be >= 1")
    found_any = False
    failed = 0
    with _open(args) as db:
        hashers = _Hashers(db.bits)
        for text in _inputs(inputs):
            try:
                code, _ = hashers.code_or_model(text)
            except (ModelFormatError, InvalidCode) as e:  # a bad input: say so, and answer the others
                failed += 1
                _warn(f"error: {e}")
                continue
            matches = db.radius(code, args.radius) if args.radius is not None else db.knn(code, args.knn)
            found_any = found_any or bool(matches)
            if args.json:
                _emit({"query": text, "code": code.hex(),
                       "matches": [{"key": key, "distance": int(dist)} for key, dist in matches]})  # fmt: skip
            else:
                _print_matches(text, matches)
            sys.stdout.flush()  # each answer is out before a later input can fail
    if failed:
        return EXIT_ERROR
    return EXIT_OK if found_any else EXIT_NOT_FOUND


def _print_matches(query: str, matches: list[tuple[str, int]]) -> None:
    print(f"query {query}: {len(matches)} match{'es' if len(matches) != 1 else ''}")
    if matches:
        print(f"  {'distance':>8}  key")
        for key, dist in matches:
            print(f"  {int(dist):>8}  {key}")


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
                print(f"deleted {key}")
            else:
                _warn(f"not found: {key}")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    keys = _split_target(args)
    missing = 0
    with _open(args) as db:
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
                print(f"{code.hex()}  {key}{tail}")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    if _split_target(args):
        raise UsageError("stats takes no arguments besides DB")
    with _open(args) as db:
        stats = db.stats()
    if args.json:
        _emit(stats)
    else:
        _print_mapping(stats)
    return EXIT_OK


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
    if not os.path.exists(args.db):
        raise UsageError(f"no database at {args.db}")
    from .db import HashDB

    with HashDB(args.db, bits=None, readonly=True) as db:
        radius = args.radius
        if radius is None:
            radius = (db.codec or {}).get("copy_radius")
        if radius is None:  # codes added as hex, no codec recorded: the codec's default at this width
            from .codec.hasher import ModelHasher

            radius = ModelHasher(db.bits).copy_radius
            _warn(f"no codec recorded in {args.db}: using the default copy radius {radius} of {db.bits}-bit codes")
        clusters = db.clusters(int(radius), engine="ray" if args.ray else "local", ray_address=args.ray)
    for n, cluster in enumerate(clusters, 1):
        if args.json:
            _emit({"cluster": n, "radius": int(radius), "keys": cluster.keys,
                   "edges": [[a, b, int(d)] for a, b, d in cluster.edges]})  # fmt: skip
        else:
            _print_cluster(n, cluster)
    if not args.json:
        models = sum(len(c.keys) for c in clusters)
        print(f"{len(clusters)} cluster{'s' if len(clusters) != 1 else ''} of {models} models within radius {radius}")
    return EXIT_OK if clusters else EXIT_NOT_FOUND


def _print_cluster(n: int, cluster: Any) -> None:
    print(f"cluster {n}: {len(cluster.keys)} models, {len(cluster.edges)} pairs within the radius")
    for key in cluster.keys:
        print(f"  {key}")
    width = max(len(a) for a, _, _ in cluster.edges)
    print(f"  {'distance':>8}  {'key_a':<{width}}  key_b")
    for a, b, d in cluster.edges:
        print(f"  {int(d):>8}  {a:<{width}}  {b}")


def cmd_hash(args: argparse.Namespace) -> int:
    from .codes import check_bits

    bits = check_bits(args.bits if args.bits is not None else DEFAULT_BITS)
    hashers = _Hashers(bits)
    paths = list(_inputs(args.models))
    failed = 0
    for path in paths:
        try:
            code = hashers.hash_file(path)
        except ModelFormatError as e:
            failed += 1
            _warn(f"error: {e}")
            continue
        if args.json:
            _emit({"path": path, "code": code.hex(), "bits": bits})
        else:
            print(f"{code.hex()}  {path}")
        sys.stdout.flush()
    return EXIT_ERROR if failed else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.max_frame < 64:
        raise UsageError("--max-frame must be at least 64 bytes")
    if args.bits is None and not os.path.exists(args.db):
        args.bits = DEFAULT_BITS
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

    usage = "hashdb add (DB | --socket PATH) (--key KEY CODE_OR_MODEL | MODEL...) [--meta JSON]"
    p = sub.add_parser("add", help="store codes or hashed models", usage=usage)
    target(p, "MODEL...")
    p.add_argument("--key", help="store one CODE_OR_MODEL under KEY (default: models are keyed by their path)")
    p.add_argument("--meta", metavar="JSON", help="metadata object stored with every code")
    p.add_argument("--bits", type=int, help=f"code width when creating the database (default {DEFAULT_BITS})")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    cores = "hash in N worker processes (default: the machine's cores), or N Ray actors with --ray"
    p.add_argument("--workers", "-j", type=int, metavar="N", help=cores)
    ray = "hash on Ray: 'local' starts Ray here, 'auto' joins a running cluster (needs pip install hashdb[ray])"
    p.add_argument("--ray", metavar="ADDRESS", help=ray)
    p.set_defaults(func=cmd_add)

    usage = "hashdb clusters DB [--radius R] [--json] [--ray ADDRESS]"
    p = sub.add_parser("clusters", help="groups of stored models within a radius of each other", usage=usage)
    p.add_argument("db", metavar="DB")
    p.add_argument("--radius", "-r", type=int, help="Hamming radius of an edge (default: the stored copy radius)")
    p.add_argument("--json", action="store_true", help='one JSON object per cluster per line: "keys", "edges"')
    p.add_argument("--ray", metavar="ADDRESS", help="split the self-join into Ray tasks ('local' or 'auto')")
    p.set_defaults(func=cmd_clusters)

    usage = "hashdb query (DB | --socket PATH) CODE_OR_MODEL... (--radius R | --knn K) [--json]"
    p = sub.add_parser("query", help="find stored codes near a code or a model", usage=usage)
    target(p, "CODE_OR_MODEL...")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--radius", "-r", type=int, help="every code within Hamming distance R")
    how.add_argument("--knn", "-k", type=int, help="the K nearest codes")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("delete", help="delete keys", usage="hashdb delete (DB | --socket PATH) KEY... [--json]")
    target(p, "KEY...")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("get", help="print the code and metadata of keys",
                       usage="hashdb get (DB | --socket PATH) KEY... [--json]")  # fmt: skip
    target(p, "KEY...")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("stats", help="database statistics", usage="hashdb stats (DB | --socket PATH) [--json]")
    target(p, "")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("serve", help="serve a database on a Unix socket")
    p.add_argument("db", metavar="DB")
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to create (mode 0600)")
    p.add_argument("--bits", type=int, help=f"code width when creating the database (default {DEFAULT_BITS})")
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
        command = parser.commands.get(argv[0])  # type: ignore[attr-defined]
        if command is None:
            raise UsageError(f"unknown command {argv[0]!r} (see 'hashdb --help')")
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
        _warn(f"error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
