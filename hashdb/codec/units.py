"""Model units: what one entry of a database is, found in a file or a folder.

A unit is a model file, or a folder that is one model: a Hugging Face style folder (``config.json`` beside
weight files, or an ``*.index.json`` with its shards), a snapshot of the Hugging Face cache
(``models--ORG--NAME/snapshots/REV/``), or a folder of another layout (``format_folder_weights``: TensorFlow
SavedModel or checkpoint folder, Core ML ``.mlpackage``, Paddle inference folder). A folder of many models
yields one unit per model, walked in sorted order; files with no model suffix (README, tokenizer files,
images) and hidden folders are passed over.
A model in two files is one unit, its graph or weights file: OpenVINO ``.xml`` (+ ``.bin``), ncnn ``.param``
(+ ``.bin``), Darknet ``.weights`` (+ ``.cfg``), MXNet ``.params`` (+ ``-symbol.json``); the reader finds the
other file beside it, and the ``.bin`` of a pair is never a unit of its own.
Only regular files count (through symlinks): a FIFO, a device or a symlink loop named like a model is an
error naming it, never opened; symlinked folders are not walked (no cycles). ``expand(paths)`` is the one
way every front end (library, CLI, workers) turns paths into units and errors.

Keys (one rule everywhere: library, CLI, workers): a unit's key is its path, normalized, relative to the
current directory when it lies inside it and absolute otherwise, with '/' separators, so ``./C.pt``,
``C.pt`` and ``$PWD/C.pt`` are one key. A Hugging Face cache snapshot is keyed by the repo id the layout
names, ``ORG/NAME@REV``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from ..errors import ModelFormatError

# Suffixes a file must have to count as a model when a folder is walked (a file named on its own is always read).
MODEL_SUFFIXES = frozenset({
    ".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors", ".npz", ".npy", ".onnx", ".h5", ".hdf5", ".keras",
    ".tflite", ".msgpack", ".pdparams",
    ".index", ".pdiparams", ".mlmodel",  # TensorFlow checkpoint index (SSTable), Paddle inference, Core ML
    ".caffemodel", ".weights", ".param", ".xml", ".params", ".mnn",  # Caffe, Darknet, ncnn, OpenVINO, MXNet, MNN
})  # fmt: skip
# Weight files that make a folder with a config.json one model (Hugging Face names, any of them).
_HF_WEIGHT_PREFIXES = ("model", "pytorch_model", "tf_model", "flax_model", "diffusion_pytorch_model", "adapter_model")


class ModelUnit(NamedTuple):
    key: str
    path: Path  # a file, or a folder that is one model


def unit_key(path: str | os.PathLike) -> str:
    """The key of a model at ``path``: normalized, relative to the current directory if inside it."""
    absolute = os.path.normpath(os.path.abspath(os.fspath(path)))
    cwd = os.getcwd()
    if absolute == cwd or absolute.startswith(cwd.rstrip(os.sep) + os.sep):
        key = os.path.relpath(absolute, cwd)
    else:
        key = absolute
    repo = _hf_cache_repo(Path(absolute))
    if repo is not None:
        return repo
    return key.replace(os.sep, "/")


def _hf_cache_repo(path: Path) -> str | None:
    """``ORG/NAME@REV`` for a folder ``.../models--ORG--NAME/snapshots/REV``, else None."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--") :].replace("--", "/")
        return f"{repo}@{parts[-1]}"
    return None


class UnitError(NamedTuple):
    """A source, or an entry of a walked folder, that is no model unit: its key, its path and why."""

    key: str
    path: str
    error: ModelFormatError


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (through symlinks): never a FIFO, a device such as /dev/zero, or a symlink loop,
    which would hang or never end a read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_model_folder(path: Path) -> bool:
    """True for a folder that holds one model (Hugging Face layout, sharded or not, or a format_folder_weights one)."""
    if _hf_cache_repo(path) is not None:
        return True
    if format_folder_weights(path) is not None:
        return True
    try:
        names = [e.name for e in os.scandir(path) if is_regular_file(e.path)]
    except OSError:
        return False
    if any(n.endswith(".index.json") for n in names):
        return True
    if "config.json" in names:
        return any(
            n.startswith(_HF_WEIGHT_PREFIXES) and Path(n).suffix.lower() in MODEL_SUFFIXES for n in names
        )
    return False


def format_folder_weights(folder: Path) -> list[Path] | None:
    """The file to read for a folder that is one model of a non-Hugging-Face layout, else None:

    - a TensorFlow SavedModel (``saved_model.pb`` + ``variables/variables.index``): the variables' index;
    - a TensorFlow checkpoint folder (a ``checkpoint`` file naming ``model_checkpoint_path``, no other model
      files beside its bundles): that checkpoint's ``.index``;
    - a Core ML ``.mlpackage`` (``Data/com.apple.CoreML/*.mlmodel``, weights under ``.../weights/``): the spec;
    - a Paddle inference folder (one ``X.pdmodel`` + ``X.pdiparams`` pair and no other model files): the
      ``.pdiparams`` (the reader takes the variable names from the ``.pdmodel`` beside it).
    """
    try:
        names = {e.name for e in os.scandir(folder) if e.is_file()}
    except OSError:
        return None
    variables = folder / "variables" / "variables.index"
    if names & {"saved_model.pb", "saved_model.pbtxt"} and variables.is_file():
        return [variables]
    spec_dir = folder / "Data" / "com.apple.CoreML"
    if (folder.suffix.lower() == ".mlpackage" or "Manifest.json" in names) and spec_dir.is_dir():
        specs = sorted(spec_dir.glob("*.mlmodel"))
        if len(specs) == 1:
            return specs
    models = {n for n in names if Path(n).suffix.lower() in MODEL_SUFFIXES}
    if "checkpoint" in names:
        latest = _latest_checkpoint(folder / "checkpoint")
        if latest is not None and (folder / f"{latest}.index").is_file() and all(n.endswith(".index") for n in models):
            return [folder / f"{latest}.index"]
    params = [n for n in models if n.endswith(".pdiparams")]
    if len(params) == 1 and len(models) == 1 and params[0][: -len(".pdiparams")] + ".pdmodel" in names:
        return [folder / params[0]]
    return None


def _latest_checkpoint(state: Path) -> str | None:
    """The basename of ``model_checkpoint_path`` in a TensorFlow ``checkpoint`` state file (text protobuf)."""
    import re

    try:
        with open(state, "rb") as f:
            text = f.read(65536).decode("utf-8", "replace")  # a few lines; never read a huge stray file whole
    except OSError:
        return None
    match = re.search(r'^model_checkpoint_path:\s*"([^"\n]+)"', text, re.MULTILINE)
    return os.path.basename(match.group(1).replace("\\", "/")) if match else None


def unit_files(path: str | os.PathLike) -> list[Path]:
    """Every regular file a unit's code is read from, the unit's own first (for its identity: an incremental
    add must see a change to any of them; reading goes through the readers). A file comes with the other
    file of its pair when that lies beside it (OpenVINO ``.xml``/``.bin``, ncnn ``.param``/``.bin``, Darknet
    ``.weights``/``.cfg``, MXNet ``.params``/``-symbol.json``, Paddle ``.pdiparams``/``.pdmodel``) and a
    TensorFlow ``.index`` with its data shards; a one-model folder gives its regular files, and a folder of
    another layout (format_folder_weights: a SavedModel's ``variables/``, an ``.mlpackage``'s weights) those
    of its subfolders too, in sorted order, hidden entries and symlinked folders passed over."""
    path = Path(path)
    if os.path.isdir(path):
        deep = format_folder_weights(path) is not None
        found = []
        for root, dirs, names in os.walk(path):  # followlinks=False: a symlinked folder is not walked
            dirs[:] = sorted(d for d in dirs if deep and not d.startswith("."))
            found += [Path(root, n) for n in names if not n.startswith(".") and is_regular_file(Path(root, n))]
        return sorted(found, key=lambda p: p.relative_to(path).as_posix())
    if not is_regular_file(path):
        return []
    return [path] + [p for p in dict.fromkeys(_companions(path)) if p != path and is_regular_file(p)]


def _companions(path: Path) -> list[Path]:
    """The files a reader takes from beside ``path`` (they may not exist)."""
    import glob

    suffix, name = path.suffix.lower(), path.name
    if suffix in (".xml", ".param"):
        return [path.with_suffix(".bin")]
    if suffix == ".bin":
        return [path.with_suffix(".xml"), path.with_suffix(".param")]
    if suffix in (".weights", ".cfg"):
        from .readers.darknet import cfg_path

        weights = path.with_suffix(".weights")
        try:
            return [weights, cfg_path(weights)]
        except ModelFormatError:  # no .cfg, or several: the reader names that
            return [weights]
    if suffix == ".params":
        from .readers.mxnet import symbol_path

        symbol = symbol_path(path)
        return [] if symbol is None else [symbol]
    if suffix in (".pdiparams", ".pdmodel"):
        return [path.with_suffix(".pdiparams"), path.with_suffix(".pdmodel")]
    if suffix == ".index" or ".data-" in name:
        from .readers.tensorflow import index_of

        index = index_of(path)
        prefix = index.name[: -len(".index")] if index.name.endswith(".index") else index.name
        return [index, *sorted(index.parent.glob(glob.escape(prefix) + ".data-*"))]
    return []


def find_units(source: str | os.PathLike) -> list[ModelUnit]:
    """The model units at ``source`` (a file, a one-model folder, or a folder of models), keys per the rule above.

    Raises ModelFormatError when ``source`` does not exist; a folder with no model in it yields [], and an
    entry that cannot be read (a symlink loop, an unreadable subfolder) is passed over (``expand`` names it).
    """
    units: list[ModelUnit] = []
    for found in _find(source):
        if isinstance(found, UnitError):
            if found.path == os.fspath(source):
                raise found.error
            continue
        units.append(found)
    return units


def expand(sources: Iterable[str | os.PathLike | ModelUnit | UnitError]) -> tuple[list[ModelUnit], list[UnitError]]:
    """The one way every front end turns paths into model units: (units, errors), each in input order.

    A file is one unit (whatever its suffix); a folder is walked (find_units). A path that does not exist, a
    folder with no model in it, and an entry of a folder that cannot be read (a symlink loop, a FIFO named
    like a model) are errors naming the path; the other units are still found. ModelUnits (and UnitErrors)
    pass through.
    """
    found = expand_in_order(sources)
    return [u for u in found if isinstance(u, ModelUnit)], [e for e in found if isinstance(e, UnitError)]


def expand_in_order(sources: Iterable[str | os.PathLike | ModelUnit | UnitError]) -> list[ModelUnit | UnitError]:
    """``expand``'s units and errors as one list in input order (for output that follows the input)."""
    out: list[ModelUnit | UnitError] = []
    for source in sources:
        if isinstance(source, ModelUnit | UnitError):
            out.append(source)
            continue
        before = len(out)
        out.extend(_find(source))
        if len(out) == before and os.path.isdir(source):
            error = ModelFormatError(f"{_shown(source)}: no model files found in the folder")
            out.append(UnitError(unit_key(source), os.fspath(source), error))
    return out


def _shown(path: str | os.PathLike) -> str:
    from ..text import shown

    return shown(os.fspath(path))


def _error(path: str | os.PathLike, why: str) -> UnitError:
    return UnitError(unit_key(path), os.fspath(path), ModelFormatError(f"{_shown(path)}: {why}"))


def _find(source: str | os.PathLike) -> Iterable[ModelUnit | UnitError]:
    path = Path(source)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            yield _error(source, "a broken symlink")
        else:
            yield _error(source, "no such file")
        return
    except OSError as exc:
        yield _error(source, f"cannot read ({exc.strerror or exc})")
        return
    if stat.S_ISREG(mode):
        yield ModelUnit(unit_key(path), path)
    elif stat.S_ISDIR(mode):
        yield from _walk(path)
    else:
        yield _error(source, "not a regular file or a folder")


def _walk(folder: Path) -> Iterable[ModelUnit | UnitError]:
    if is_model_folder(folder):
        yield ModelUnit(unit_key(folder), folder)
        return
    snapshots = folder / "snapshots"
    if folder.name.startswith("models--") and snapshots.is_dir():
        for rev in sorted(p for p in snapshots.iterdir() if p.is_dir()):
            yield ModelUnit(unit_key(rev), rev)
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield _error(folder, f"cannot list folder ({exc.strerror or exc})")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):  # symlinked folders are not walked: no cycles
            yield from _walk(path)
            continue
        if path.suffix.lower() not in MODEL_SUFFIXES:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:  # a symlink loop or a dangling link named like a model: name it, go on
            yield _error(path, f"skipped: cannot read ({exc.strerror or exc})")
            continue
        if not stat.S_ISREG(mode):
            if not stat.S_ISDIR(mode):
                yield _error(path, "skipped: not a regular file")
            continue
        if _looks_like_a_model(path):
            yield ModelUnit(unit_key(path), path)


def _looks_like_a_model(path: Path) -> bool:
    """Suffixes that other files share count only with the format's own leading bytes: ``.bin`` (raw data,
    ONNX external data, vocabularies) only when they are a torch checkpoint's (zip or pickle) and it is not the
    weights half of a pair (an OpenVINO ``.xml`` or ncnn ``.param`` beside it: that graph file is the unit);
    ``.index`` only when it is a TensorFlow table (not a faiss index); ``.xml``, ``.param`` and ``.params`` only
    with an OpenVINO IR's ``<net``, ncnn's ``7767517`` or MXNet's list magic. Every other model suffix counts
    as is."""
    suffix = path.suffix.lower()
    if suffix == ".index":
        from .readers.tensorflow import is_table

        return is_table(path)
    if suffix not in (".bin", ".xml", ".param", ".params"):
        return True
    if suffix == ".bin" and (path.with_suffix(".xml").is_file() or path.with_suffix(".param").is_file()):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(512 if suffix == ".xml" else 8)
    except OSError:
        return True  # let the reader name the problem
    if suffix == ".xml":
        return b"<net" in head
    if suffix == ".param":
        return head.startswith(b"7767517")
    if suffix == ".params":
        return head == (0x112).to_bytes(8, "little")
    return head.startswith((b"PK\x03\x04", b"\x80"))
