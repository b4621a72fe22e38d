"""The restricted unpickler: the security boundary every pickle-based format goes through.

Nothing from the file is imported or called. ``find_class`` answers every GLOBAL with one of our own
objects (the allow-list ``_ALLOWED``): torch's tensor-rebuild functions and numpy's array reconstruction are
re-implemented here (they build numpy views of the storages, so torch is not needed), torch dtypes and
storage types become tokens, ``collections.OrderedDict`` and a few builtin containers are allowed, and every
other class or function becomes an inert ``Stub`` that only records what the pickle hands it (constructor
arguments, state, items). The formats that hold such pickles (torch zip, legacy, TorchScript, .pdparams) are
in ``pickle.py``; they attach the storages' bytes and walk the result for tensors.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle as _pickle
import pickletools
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from . import MAX_NESTING, bf16_to_float32, float8_table

# torch dtype name -> (numpy storage dtype, how the values decode to float32)
TORCH_DTYPES: dict[str, tuple[str, str]] = {
    "float32": ("<f4", "float"), "float": ("<f4", "float"), "float64": ("<f8", "float"), "double": ("<f8", "float"),
    "float16": ("<f2", "float"), "half": ("<f2", "float"), "bfloat16": ("<u2", "bf16"),
    "float8_e4m3fn": ("u1", "e4m3fn"), "float8_e5m2": ("u1", "e5m2"),
    "int64": ("<i8", "int"), "long": ("<i8", "int"), "int32": ("<i4", "int"), "int": ("<i4", "int"),
    "int16": ("<i2", "int"), "short": ("<i2", "int"), "int8": ("i1", "int"), "uint8": ("u1", "int"),
    "bool": ("?", "int"), "qint8": ("i1", "quant"), "quint8": ("u1", "quant"), "qint32": ("<i4", "quant"),
}  # fmt: skip
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "Float8_e4m3fnStorage": "float8_e4m3fn", "Float8_e5m2Storage": "float8_e5m2",
    "UntypedStorage": "uint8",
}  # fmt: skip
NUMPY_KINDS = frozenset("fiub?")


class _Frozen:
    """Base of the objects find_class hands out: BUILD cannot set attributes on them."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise Refused("a pickle tried to set an attribute on a reader object")

    def __setstate__(self, state: Any) -> None:
        raise Refused("a pickle tried to set the state of a reader object")


class Refused(Exception):
    pass


class Token(_Frozen):
    """A torch dtype, storage type or qscheme: data, never called."""

    __slots__ = ("kind", "name")
    kind: str  # "dtype", "storage", "qscheme" or "numpy"
    name: str

    def __init__(self, kind: str, name: str) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)

    def __call__(self, *args: Any) -> Any:
        raise Refused(f"a pickle tried to call torch.{self.name}")


class _Function(_Frozen):
    """One of our re-implementations of an allowed function (a tensor rebuild, numpy reconstruction)."""

    __slots__ = ("func",)
    func: Callable[..., Any]

    def __init__(self, func: Callable[..., Any]) -> None:
        object.__setattr__(self, "func", func)

    def __call__(self, *args: Any) -> Any:
        try:
            return self.func(*args)
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise Refused(f"bad arguments to {self.func.__name__.lstrip('_')}: {exc}") from None


class Stub:
    """An inert stand-in for a class or function the pickle names: records what it is given, runs nothing."""

    __module_name__ = ""
    __class_name__ = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_stub"] = {"args": args, "state": None, "items": {}, "list": []}

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = object.__new__(cls)
        obj.__dict__["_stub"] = {"args": args, "state": None, "items": {}, "list": []}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_stub"]["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_stub"]["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["_stub"]["list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_stub"]["list"].extend(values)

    def __setattr__(self, name: str, value: Any) -> None:  # BUILD's slot state
        state = self.__dict__["_stub"]
        if not isinstance(state["state"], dict):
            state["state"] = {}
        state["state"][name] = value

    def __reduce__(self) -> Any:
        raise TypeError("stubs are not picklable")


def _stub_class(module: str, name: str, cache: dict[tuple[str, str], type]) -> type:
    key = (module, name)
    if key not in cache:
        cls = type(name, (Stub,), {"__module_name__": module, "__class_name__": name, "__slots__": ()})
        cache[key] = cls
    return cache[key]


# ---------------------------------------------------------------- storages and tensors


class StorageRef(_Frozen):
    """A storage named by a persistent id; its bytes are attached (mapped or read) after unpickling."""

    __slots__ = ("key", "dtype", "numel", "data")
    key: str
    dtype: str  # a key of TORCH_DTYPES
    numel: int
    data: np.ndarray | None

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "data", None)  # np.ndarray of uint8 once attached

    def attach(self, data: np.ndarray) -> None:
        object.__setattr__(self, "data", data)


class TensorRef(_Frozen):
    """A tensor as the pickle describes it: a strided view of a storage, maybe quantized; decoded later."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype", "quant")
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str  # a key of TORCH_DTYPES
    quant: Any  # the quantizer tuple of a quantized tensor, checked by _dequantize

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: str, quant: Any = None) -> None:
        if not isinstance(storage, StorageRef):
            raise ValueError("tensor storage is not a storage reference")
        size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
        if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
            raise ValueError("tensor size, stride and offset do not match")
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"unsupported tensor dtype {dtype}")
        for name, value in (("storage", storage), ("offset", offset), ("size", size), ("stride", stride)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "quant", quant)

    def values(self) -> np.ndarray:
        """The raw values (storage dtype) as a strided view of the storage, bounds checked."""
        data = self.storage.data
        if data is None:
            raise ValueError(f"storage {self.storage.key} has no data")
        np_dtype = np.dtype(TORCH_DTYPES[self.dtype][0])
        count = data.size // np_dtype.itemsize
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=np_dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= count:
            raise ValueError(f"tensor of shape {list(self.size)} runs past its storage ({count} values)")
        flat = data[: count * np_dtype.itemsize].view(np_dtype)
        return np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * np_dtype.itemsize for s in self.stride], writeable=False
        )

    def float32(self) -> np.ndarray | None:
        """float32 values (dequantized, decoded), or None for integer/bool tensors."""
        decode = TORCH_DTYPES[self.dtype][1]
        if decode == "int":
            return None
        raw = self.values()
        if decode == "float":
            return np.ascontiguousarray(raw, dtype=np.float32)
        if decode == "bf16":
            return bf16_to_float32(raw)
        if decode in ("e4m3fn", "e5m2"):
            return float8_table(decode)[raw]
        return _dequantize(raw, self.quant)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > 16:
        raise ValueError(f"tensor {what} is not a short tuple")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise ValueError(f"tensor {what} holds a negative or non-integer entry")
    return out


def _dequantize(raw: np.ndarray, quant: Any) -> np.ndarray:
    if not isinstance(quant, tuple) or not quant or not isinstance(quant[0], Token):
        raise ValueError("quantized tensor without its quantizer parameters")
    scheme = quant[0].name
    if scheme == "per_tensor_affine" and len(quant) == 3:
        scale, zero = float(quant[1]), int(quant[2])
        return ((raw.astype(np.float64) - zero) * scale).astype(np.float32)
    if scheme in ("per_channel_affine", "per_channel_affine_float_qparams") and len(quant) == 4:
        scales, zeros, axis = _vector(quant[1]), _vector(quant[2]), quant[3]
        if not isinstance(axis, int) or not 0 <= axis < raw.ndim:
            raise ValueError(f"per-channel axis {axis!r} out of range")
        if scales.shape != (raw.shape[axis],) or zeros.shape != scales.shape:
            raise ValueError("per-channel scales do not match the tensor")
        shape = [1] * raw.ndim
        shape[axis] = -1
        return ((raw.astype(np.float64) - zeros.reshape(shape)) * scales.reshape(shape)).astype(np.float32)
    raise ValueError(f"unsupported quantization scheme {scheme}")


def _vector(value: Any) -> np.ndarray:
    if isinstance(value, TensorRef):
        return np.asarray(value.values(), dtype=np.float64).reshape(-1)
    if isinstance(value, list | tuple):
        return np.asarray([float(v) for v in value], dtype=np.float64)
    raise ValueError("quantizer parameters are not a tensor or a list")


def _dtype_of(storage: Any) -> str:
    if not isinstance(storage, StorageRef):
        raise ValueError("tensor storage is not a storage reference")
    return storage.dtype


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
    return TensorRef(storage, offset, size, stride, _dtype_of(storage))


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, rg: Any, hooks: Any, dtype: Any,
                       *_: Any) -> TensorRef:  # fmt: skip
    if not isinstance(dtype, Token) or dtype.kind != "dtype":
        raise ValueError("tensor dtype is not a torch dtype")
    return TensorRef(storage, offset, size, stride, dtype.name)


def _rebuild_qtensor(storage: Any, offset: Any, size: Any, stride: Any, quant: Any, *_: Any) -> TensorRef:
    return TensorRef(storage, offset, size, stride, _dtype_of(storage), quant)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    if not isinstance(func, _Function) or not isinstance(args, tuple):
        raise ValueError("tensor subclass rebuild names no tensor rebuild")
    return func(*args)


def _rebuild_from_numpy(data: Any, *_: Any) -> Any:
    return data


class NDArrayRef(_Frozen):
    """numpy's ``_reconstruct`` + BUILD: the array is made from the raw bytes of the state, nothing called."""

    __slots__ = ("array",)
    array: np.ndarray | None

    def __init__(self) -> None:
        object.__setattr__(self, "array", None)

    def __setstate__(self, state: Any) -> None:
        if self.array is not None or not isinstance(state, tuple) or len(state) != 5:
            raise Refused("malformed numpy array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NPDType) or dtype.dtype is None:
            raise Refused("numpy array without a numeric dtype")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes | bytearray):
            raise Refused("numpy array data is not bytes")
        shape = _int_tuple(shape, "shape")
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.dtype.itemsize != len(raw):
            raise Refused(f"numpy array of shape {list(shape)} does not match its {len(raw)} data bytes")
        arr = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")
        object.__setattr__(self, "array", arr)


class _NPDType(_Frozen):
    __slots__ = ("dtype",)
    dtype: np.dtype | None  # None: not a numeric dtype we read

    def __init__(self, descr: Any) -> None:
        dtype = None
        if isinstance(descr, str) and len(descr) <= 4:
            try:
                candidate = np.dtype(descr)
            except TypeError:
                candidate = None
            if candidate is not None and candidate.kind in NUMPY_KINDS and candidate.fields is None:
                dtype = candidate
        object.__setattr__(self, "dtype", dtype)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">") and self.dtype is not None:
            object.__setattr__(self, "dtype", self.dtype.newbyteorder(state[1]))


def _np_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> NDArrayRef:
    return NDArrayRef()


def _np_dtype(descr: Any, *_: Any) -> _NPDType:
    return _NPDType(descr)


def _np_scalar(dtype: Any, raw: Any = None) -> Any:
    if isinstance(dtype, _NPDType) and dtype.dtype is not None and isinstance(raw, bytes | str):
        data = raw.encode("latin1") if isinstance(raw, str) else raw
        if len(data) == dtype.dtype.itemsize:
            return np.frombuffer(data, dtype=dtype.dtype)[0].item()
    raise ValueError("malformed numpy scalar")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:  # how protocol-2 pickles spell bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise ValueError("bytes spelled with an unsupported codec")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:  # copyreg._reconstructor of protocol 0/1 pickles
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls)
    if cls is collections.OrderedDict or cls is dict:
        return cls()
    raise ValueError("copyreg reconstruction of a class that is not a stub")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Function(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_qtensor"): _Function(_rebuild_qtensor),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _Function(_rebuild_from_numpy),
    ("torch._tensor", "_rebuild_from_type"): _Function(_rebuild_from_type),
    ("torch._tensor", "_rebuild_from_type_v2"): _Function(_rebuild_from_type),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _Function(_reconstructor), ("copy_reg", "_reconstructor"): _Function(_reconstructor),
}  # fmt: skip
for _numpy in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_numpy, "_reconstruct")] = _Function(_np_reconstruct)
    _ALLOWED[(_numpy, "scalar")] = _Function(_np_scalar)
_ALLOWED[("numpy", "dtype")] = _Function(_np_dtype)
_ALLOWED[("_codecs", "encode")] = _Function(_codecs_encode)
_ALLOWED[("torch.storage", "UntypedStorage")] = Token("storage", "uint8")
_ALLOWED[("numpy", "ndarray")] = Token("numpy", "ndarray")
_QSCHEMES = ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams")


class _Unpickler(_pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, storage: Callable[[tuple], Any]) -> None:
        super().__init__(file, encoding="latin1")
        self._storage = storage
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return Token("storage", _STORAGE_DTYPES[name])
            if name in TORCH_DTYPES:
                return Token("dtype", name)
            if name in _QSCHEMES:
                return Token("qscheme", name)
        # everything else (os.system, builtins.eval, a model class) is an inert stub: calling it records its
        # arguments and nothing more
        return _stub_class(module, name, self._stubs)

    def persistent_load(self, pid: Any) -> Any:
        return self._storage(pid)


_PLAIN, _PUT, _MEMOIZE, _GET, _DUP, _MUTATE, _MARK, _STOP = range(8)
_NEWLINE, _NEWLINE_PAIR = -1, -6  # argument ends at the next newline (GLOBAL and INST: at the second one)


def _effects() -> dict[int, tuple[int, bool, int, int, int]]:
    """opcode byte -> (kind, pops to a mark, entries popped below the mark or in all, entries pushed, how its
    argument is laid out: a fixed size > 0, 0 for none, or one of pickletools' negative length codes)."""
    kinds = {"PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE, "GET": _GET,
             "BINGET": _GET, "LONG_BINGET": _GET, "DUP": _DUP, "MARK": _MARK, "STOP": _STOP}  # fmt: skip
    for name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"):
        kinds[name] = _MUTATE  # the container stays; it now holds the items one level down
    out = {}
    for op in pickletools.opcodes:
        before = op.stack_before
        mark = pickletools.markobject in before
        below = before.index(pickletools.markobject) if mark else len(before)
        arg = 0 if op.arg is None else _NEWLINE_PAIR if op.arg.name == "stringnl_noescape_pair" else op.arg.n
        out[ord(op.code)] = (kinds.get(op.name, _PLAIN), mark, below, len(op.stack_after), arg)
    return out


_EFFECTS = _effects()
_LENGTHS = {-2: (1, False), -3: (4, True), -4: (4, False), -5: (8, False)}  # length prefix: bytes, signed


def _pickle_bytes(file: Any) -> tuple[Any, int]:
    """The bytes a pickle starts in (the file mapped, not read) and where it starts."""
    if isinstance(file, io.BytesIO):
        return file.getvalue(), file.tell()  # the bytes it was made from, not a copy
    try:
        fd = file.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return file.read(), 0
    start = file.tell()
    if start >= os.fstat(fd).st_size:
        raise Refused("malformed pickle (no bytes left)")
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), start


def check_pickle(file: Any) -> None:
    """Walk one pickle's opcodes (without running them, without decoding their arguments) and refuse what
    the C unpickler would crash or blow up on: nesting deeper than MAX_NESTING, and memo indices that are
    not the next free ones (the C unpickler sizes its memo by the largest index: one LONG_BINPUT of 2**31
    allocates 16 GiB), besides truncated arguments and unknown opcodes.

    Each stack entry carries the nesting depth of the object it stands for; a container mutated after it was
    nested elsewhere makes that parent's depth stale, but tuples and frozensets (the only containers that
    are hashed, so the only ones whose depth can crash anything) are immutable, so their depths are exact."""
    buf, pos = _pickle_bytes(file)
    try:
        _scan(buf, pos)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _scan(buf: Any, pos: int) -> None:
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    end = len(buf)
    while True:
        if pos >= end:
            raise Refused("malformed pickle (truncated: no STOP)")
        code = buf[pos]
        effect = _EFFECTS.get(code)
        if effect is None:
            raise Refused(f"malformed pickle (unknown opcode {code:#04x} at byte {pos})")
        kind, mark, below, after, arg_layout = effect
        pos += 1
        arg_at = pos
        if arg_layout > 0:
            pos += arg_layout
        elif arg_layout in (_NEWLINE, _NEWLINE_PAIR):
            for _ in range(2 if arg_layout == _NEWLINE_PAIR else 1):
                newline = buf.find(b"\n", pos)
                if newline < 0:
                    raise Refused("malformed pickle (truncated: a line without its end)")
                pos = newline + 1
        elif arg_layout < 0:
            width, signed = _LENGTHS[arg_layout]
            length = int.from_bytes(buf[pos : pos + width], "little", signed=signed)
            if length < 0:
                raise Refused("malformed pickle (negative length)")
            pos += width + length
        if pos > end:
            raise Refused("malformed pickle (truncated argument)")
        if kind == _PLAIN and not below and not mark:  # an atom (a string, a number, an empty container)
            if after:
                stack.append(0)
            continue
        if kind == _STOP:
            return
        if kind == _MARK:
            marks.append(len(stack))
            continue
        if kind in (_PUT, _MEMOIZE, _GET):
            if kind == _MEMOIZE:
                index = len(memo)
            elif arg_layout > 0:
                index = int.from_bytes(buf[arg_at:pos], "little")
            else:
                try:
                    index = int(bytes(buf[arg_at : pos - 1]))
                except ValueError:
                    raise Refused("malformed pickle (a memo index that is not a number)") from None
            if kind != _GET:
                if index > len(memo):
                    raise Refused(f"pickle memo index {index} is not the next free one ({len(memo)})")
                memo[index] = stack[-1] if stack else 0
                continue
            if index not in memo:
                raise Refused(f"pickle reads memo entry {index} it never stored")
            stack.append(memo[index])
            continue
        items: list[int] = []
        if mark:
            if not marks:
                raise Refused("pickle pops a mark it never pushed")
            at = marks.pop()
            items = stack[at:]
            del stack[at:]
        if below > len(stack):
            raise Refused("malformed pickle (an opcode pops more than its stack holds)")
        popped = stack[len(stack) - below :] if below else []
        if below:
            del stack[len(stack) - below :]
        if kind == _DUP:
            depth = popped[0]
        elif kind == _MUTATE:
            rest = popped[1:] + items
            depth = max(popped[0], 1 + max(rest)) if rest else popped[0]
        elif popped or items:
            depth = 1 + max(popped + items)
        else:
            depth = 0
        if depth > MAX_NESTING:
            raise Refused(f"pickle nests objects over {MAX_NESTING} deep")
        stack.extend([depth] * after)


def unpickle(file: Any, storage: Callable[[tuple], Any]) -> Any:
    """One pickle from ``file`` through the restricted unpickler, after check_pickle passed over its opcodes
    (``file`` must be seekable); any failure is a ValueError."""
    try:
        start = file.tell()
        check_pickle(file)
        file.seek(start)
        return _Unpickler(file, storage).load()
    except Refused as exc:
        raise ValueError(str(exc)) from None
    except (_pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, ValueError,
            UnicodeDecodeError, struct.error, OverflowError, MemoryError, RecursionError) as exc:  # fmt: skip
        raise ValueError(f"malformed pickle ({type(exc).__name__}: {str(exc)[:120]})") from None
