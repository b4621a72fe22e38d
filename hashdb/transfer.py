"""Export and import: every record of a database as JSON lines or CSV, and back (``hashdb export`` / ``import``).

JSON lines: a header ``{"format": "hashdb-export", "version": 1, "bits", "codec"}``, then ``{"key", "code",
"meta", "layers"?}`` per record in key order, ``layers`` being the model's layer codes as ``[[name, hex],
...]`` in stored order (absent when it has none). CSV: the same header as a first line ``# {...}`` (so the
codec survives a CSV round trip; readers that do not know it skip one row), then ``key,code,meta,layers`` rows
with meta and layers as JSON text. Exports written before layer codes existed (no ``layers``) import as
models without layer codes; a hashdb that predates them reads a newer export and skips the layers. An import
records the export's codec in a database that has none and warns when it holds another
(``hashdb.ingest.check_codec``). ``hashdb export DB | hashdb add OTHER`` reads the same lines.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from .errors import HashDBError, InvalidArgument, InvalidCode, InvalidKey, InvalidMeta, KeyNotFound

if TYPE_CHECKING:
    from .types import Database

EXPORT_FORMAT = "hashdb-export"
EXPORT_VERSION = 1
IMPORT_CHUNK = 4096  # records per insert_many: one transaction each
# What the store raises for one bad record of a chunk: that record is reported and the others still go in.
_RECORD_ERRORS = (InvalidArgument, InvalidCode, InvalidKey, InvalidMeta)
_CSV_HEADER_PREFIX = "# "


class ExportFormatError(HashDBError):
    """An export this hashdb cannot read (another format version, a CSV without its header row)."""


class Row(NamedTuple):
    """One record line of an export: its line number, and key/code/meta/layers (layers as read: [[name, hex],
    ...] or None), or ``error`` saying what is wrong."""

    number: int
    key: str | None
    code: str | None
    meta: Any
    error: str | None = None
    layers: Any = None


class Imported(NamedTuple):
    added: int
    replaced: int
    failed: int
    warning: str | None  # the codec warning, if the database holds another codec


def export_header(db: Database) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "bits": db.bits, "codec": db.codec}


def header_of(line: str) -> dict[str, Any] | None:
    """The export header a line holds (JSON, or CSV's ``# {...}``), else None; another version raises."""
    text = line.strip()
    if text.startswith(_CSV_HEADER_PREFIX.strip()):
        text = text[1:].strip()
    if not text.startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        return None
    if doc.get("version") != EXPORT_VERSION:
        raise ExportFormatError(f"export version {doc.get('version')!r}; this hashdb reads {EXPORT_VERSION}")
    return doc


def export(db: Database, out: IO[str], fmt: str = "jsonl") -> int:
    """Write every record of ``db`` to ``out`` (``fmt``: 'jsonl' or 'csv'); returns the number written."""
    if fmt not in ("jsonl", "csv"):
        raise HashDBError(f"export format must be 'jsonl' or 'csv', got {fmt!r}")
    header = json_line(export_header(db))
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        out.write(_CSV_HEADER_PREFIX + header)
        writer.writerow(["key", "code", "meta", "layers"])
    else:
        out.write(header)
    written = 0
    for key in db:
        try:
            code, meta = db.get(key)
            layers = [[name, bytes(layer).hex()] for name, layer in db.layers(key)]
        except KeyNotFound:  # deleted while we were exporting
            continue
        if writer is not None:
            text = "" if meta is None else json.dumps(finite(meta), sort_keys=True, default=json_default)
            writer.writerow([key, code.hex(), text, json.dumps(layers) if layers else ""])
        else:
            record: dict[str, Any] = {"key": key, "code": code.hex(), "meta": meta}
            if layers:
                record["layers"] = layers
            out.write(json_line(record))
        written += 1
    return written


def read_export(source: IO[str], fmt: str = "auto") -> tuple[dict[str, Any], Iterator[Row]]:
    """(header, rows) of an export; the header is {} for a file without one (a CSV's holds ``bits_guess``,
    the width of its first code). ``fmt``: 'auto', 'jsonl' or 'csv'."""
    first = source.readline()
    header = header_of(first) or {}
    if header:
        first = source.readline()
    if fmt == "auto":
        fmt = "jsonl" if first.lstrip().startswith("{") or not first.strip() else "csv"
    if fmt == "csv":
        reader = csv.reader([first, *source] if first else source)
        head = next(reader, None)
        if head is None or [h.strip() for h in head[:2]] != ["key", "code"]:
            raise ExportFormatError("a CSV import starts with the header row key,code[,meta[,layers]]")
        rows = list(reader)
        if rows and len(rows[0]) >= 2 and "bits" not in header:
            header["bits_guess"] = len(rows[0][1]) * 4  # a CSV without the header line states no width
        start = 3 if header.get("format") else 2
        return header, _csv_rows(rows, start)
    return header, _json_rows(first, source, 2 if header else 1)


def _csv_rows(rows: list[list[str]], start: int) -> Iterator[Row]:
    for number, row in enumerate(rows, start=start):
        if len(row) < 2:
            yield Row(number, None, None, None, f"expected key,code[,meta[,layers]], got {len(row)} fields")
            continue
        text = row[2] if len(row) > 2 else ""
        try:
            meta = json.loads(text) if text else None
        except ValueError as e:
            yield Row(number, row[0], None, None, f"meta is not JSON: {e}")
            continue
        text = row[3] if len(row) > 3 else ""
        try:
            layers = json.loads(text) if text else None
        except ValueError as e:
            yield Row(number, row[0], None, None, f"layers is not JSON: {e}")
            continue
        yield Row(number, row[0], row[1], meta, layers=layers)


def _json_rows(first: str, source: IO[str], start: int) -> Iterator[Row]:
    for number, line in enumerate([first, *source] if first else source, start=start):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or not isinstance(doc.get("code"), str):
            yield Row(number, None, None, None, "expected a JSON object with string 'key' and 'code'")
            continue
        yield Row(number, doc["key"], doc["code"], doc.get("meta"), layers=doc.get("layers"))


def import_rows(db: Database, header: dict[str, Any], rows: Iterator[Row],
                on_error: Callable[[str], None] | None = None) -> Imported:  # fmt: skip
    """Insert ``rows`` (existing keys are replaced) in chunks of IMPORT_CHUNK; a bad row is reported through
    ``on_error`` (one line naming its line number) and the rest still go in. The header's codec is recorded
    in a database without one."""
    from .codes import to_bytes
    from .db import key_bytes
    from .ingest import check_codec, refuse_other_version
    from .text import shown

    if header.get("bits") not in (None, db.bits):
        raise ExportFormatError(f"the export holds {header['bits']}-bit codes and the database {db.bits}-bit ones")
    codec = header.get("codec")
    refuse_other_version(db, codec)
    failed = added = replaced = 0
    keys: list[str] = []
    codes: list[bytes] = []
    metas: list[dict | None] = []
    layers: list[list[tuple[str, bytes]] | None] = []
    numbers: list[int] = []

    def flush() -> None:
        nonlocal added, replaced, failed
        if not keys:
            return
        replaced += sum(key in db for key in keys)
        try:
            added += db.insert_many(keys, codes, metas, layers=layers if any(layers) else None)
        except _RECORD_ERRORS:  # one record the store refuses (e.g. a layer name it does not keep): one by one
            stored: set[str] = set()
            for number, key, code, meta, row_layers in zip(numbers, keys, codes, metas, layers, strict=True):
                try:
                    db.insert(key, code, meta, layers=row_layers)
                    stored.add(key)
                except _RECORD_ERRORS as e:
                    failed += 1
                    replaced -= key in db and key not in stored
                    if on_error is not None:
                        on_error(f"line {number}: {shown(str(e))}")
            added += len(stored)
        for column in (keys, codes, metas, layers, numbers):
            column.clear()

    for row in rows:
        try:
            if row.key is None or row.code is None:
                raise InvalidCode(str(row.error))
            key_bytes(row.key)
            if row.meta is not None and not isinstance(row.meta, dict):
                raise InvalidMeta("meta must be an object")
            raw = to_bytes(row.code, db.bits)
            row_layers = layers_of(row.layers, db.bits)
        except HashDBError as e:
            failed += 1
            if on_error is not None:
                on_error(f"line {row.number}: {shown(str(e))}")
            continue
        keys.append(row.key)
        codes.append(raw)
        metas.append(row.meta)
        layers.append(row_layers)
        numbers.append(row.number)
        if len(keys) >= IMPORT_CHUNK:
            flush()
    flush()
    warning = check_codec(db, codec) if isinstance(codec, dict) and added else None
    return Imported(added, replaced, failed, warning)


def layers_of(value: Any, bits: int) -> list[tuple[str, bytes]] | None:
    """An export record's ``layers`` ([[name, hex code], ...] or None) as (name, code bytes) pairs; InvalidCode
    saying what is wrong otherwise (names and counts are the store's to judge: it refuses them before writing)."""
    from .codes import to_bytes

    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidCode(f"layers must be a list of [name, code] pairs, got {type(value).__name__}")
    out: list[tuple[str, bytes]] = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)):
            raise InvalidCode(f"layers[{i}] must be a [name, hex code] pair")
        try:
            out.append((pair[0], to_bytes(pair[1], bits)))
        except InvalidCode as e:
            raise InvalidCode(f"layers[{i}]: {e}") from None
    return out


def json_line(doc: Any) -> str:
    """``doc`` as one JSON line (sorted keys; NaN and infinities as strings, bytes as hex)."""
    return json.dumps(finite(doc), sort_keys=True, default=json_default, allow_nan=False) + "\n"


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by the string JSON parsers print for it."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # numpy scalars and arrays (in stats)
        obj = obj.tolist() if hasattr(obj, "tolist") else obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def json_default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if hasattr(obj, "item"):  # numpy scalars in stats
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
