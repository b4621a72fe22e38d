"""The ONNX reader takes the weights' bytes out of the file's map itself and has onnx parse only the rest
(hashdb/codec/readers/onnx.py, _without_payloads), so a model's weights are never held twice. What it reads
must be what onnx's own parse of the whole file gives, however protobuf lets the file spell it: a graph in
several records (they merge), a raw_data given twice (the last counts), a Constant's tensor in two records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from formats_writers import f_bytes, varint  # the tests' own protobuf writers

from hashdb.codec import load_tensors
from hashdb.errors import ModelFormatError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

M = TypeVar("M", bound=Any)  # a protobuf message


def _model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Convs whose weights lie in raw float32, raw float16, typed float_data and a Constant node."""
    rng = np.random.default_rng(7)
    w = [rng.standard_normal(s).astype(np.float32) for s in ((8, 3, 3, 3), (8, 8, 3, 3), (6, 8, 1, 1))]
    b = rng.standard_normal(8).astype(np.float32)
    half = numpy_helper.from_array(w[1].astype(np.float16), "w1")
    typed = helper.make_tensor("b0", TensorProto.FLOAT, [8], b.tolist())  # float_data, no raw_data
    const = helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w[2], "c"))
    convs = [helper.make_node("Conv", [x, w, *b], [y]) for x, w, b, y in
             (("x", "w0", ["b0"], "y0"), ("y0", "w1", [], "y1"), ("y1", "w2", [], "y2"))]  # fmt: skip
    nodes = [const, *convs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w[0], "w0"), half, typed],
    )  # fmt: skip
    want = {"w0": w[0], "w1": w[1].astype(np.float16).astype(np.float32), "b0": b, "w2": w[2]}
    return helper.make_model(graph), want


def _copy(message: M) -> M:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _with_graph(model: onnx.ModelProto, *graphs: bytes) -> bytes:
    """The model's other fields, then a ``graph`` record holding each of ``graphs`` (protobuf merges them)."""
    rest = _copy(model)
    rest.ClearField("graph")
    return rest.SerializeToString() + b"".join(f_bytes(7, g) for g in graphs)


def _graph_split(model: onnx.ModelProto) -> bytes:
    """The graph in two records, each holding part of the initializers and of the nodes."""
    first, second = _copy(model.graph), onnx.GraphProto()
    del first.initializer[1:], first.node[2:]
    second.initializer.extend(model.graph.initializer[1:])
    second.node.extend(model.graph.node[2:])
    return _with_graph(model, first.SerializeToString(), second.SerializeToString())


def _raw_data_twice(model: onnx.ModelProto) -> bytes:
    """w0's raw_data given twice, zeros first (the runtime writes it once; protobuf keeps the last)."""
    meta = _copy(model.graph.initializer[0])
    meta.ClearField("raw_data")
    values = model.graph.initializer[0].raw_data
    tensor = meta.SerializeToString() + f_bytes(9, b"\0" * len(values)) + f_bytes(9, values)
    graph = _copy(model.graph)
    del graph.initializer[0]  # w0 comes back first, as its own record
    return _with_graph(model, f_bytes(5, tensor) + graph.SerializeToString())


def _constant_in_two_records(model: onnx.ModelProto) -> bytes:
    """The Constant's tensor attribute ``t`` in two records: its name, dims and type, then its raw_data."""
    node = _copy(model.graph.node[0])
    (attribute,) = node.attribute
    meta, raw = _copy(attribute.t), onnx.TensorProto()
    meta.ClearField("raw_data")
    raw.raw_data = attribute.t.raw_data
    head = _copy(attribute)
    head.ClearField("t")
    node.ClearField("attribute")
    node_bytes = node.SerializeToString() + f_bytes(5, head.SerializeToString() + f_bytes(
        5, meta.SerializeToString()) + f_bytes(5, raw.SerializeToString()))  # fmt: skip
    graph = _copy(model.graph)
    del graph.node[0]  # the Constant comes back first, as its own record
    return _with_graph(model, f_bytes(1, node_bytes) + graph.SerializeToString())


def _onnx_own(blob: bytes) -> dict[str, np.ndarray]:
    """What onnx's parse of the whole file holds: initializers and Constant values, as float32."""
    model = onnx.load_model_from_string(blob)
    out = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(np.float32)
    return out


@pytest.mark.parametrize("spelling", ["plain", "graph split", "raw_data twice", "constant in two records"])
def test_the_tensors_read_are_onnx_own_parse_of_the_whole_file(tmp_path: Path, spelling: str) -> None:
    model, want = _model()
    blob = {"plain": model.SerializeToString, "graph split": lambda: _graph_split(model),
            "raw_data twice": lambda: _raw_data_twice(model),
            "constant in two records": lambda: _constant_in_two_records(model)}[spelling]()  # fmt: skip
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    reference = _onnx_own(blob)
    assert set(reference) == set(want)
    for name, values in want.items():
        np.testing.assert_array_equal(reference[name], values, err_msg=f"onnx's own parse, {name}")
    got = {t.name: t for t in load_tensors(path)}
    assert set(got) == set(want), sorted(got)
    for name, values in want.items():
        np.testing.assert_array_equal(got[name].array, values, err_msg=name)
    assert got["w0"].layout == "oihw" and got["w2"].layout == "oihw"


def test_the_arrays_are_the_readers_own_not_views_of_the_file(tmp_path: Path) -> None:
    """The map is closed when the read returns: arrays copied out of it stay as read when the file changes."""
    model, want = _model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    tensors = load_tensors(path)
    path.write_bytes(b"\0" * path.stat().st_size)  # the same inode, every byte overwritten
    for t in tensors:
        np.testing.assert_array_equal(t.array, want[t.name], err_msg=t.name)


def test_a_name_that_is_not_utf8_is_read_with_its_bytes_replaced(tmp_path: Path) -> None:
    """ONNX strings are proto2: protobuf hands an undecodable one back as bytes (found by fuzzing: a TypeError
    escaped from the pruning pass). Names are only labels: the undecodable bytes are replaced."""
    model, want = _model()
    blob = model.SerializeToString()
    assert blob.count(b"w1") == 2  # the initializer and the Conv reading it: both renamed, so the graph holds
    path = tmp_path / "m.onnx"
    path.write_bytes(blob.replace(b"w1", b"\xff\xfe"))
    got = {t.name: t.array for t in load_tensors(path)}
    assert set(got) == {"w0", "\ufffd\ufffd", "b0", "w2"}, sorted(got)
    np.testing.assert_array_equal(got["\ufffd\ufffd"], want["w1"])


def test_a_present_but_empty_raw_data_is_read_as_onnx_reads_it(tmp_path: Path) -> None:
    """A raw_data record counts even when it is empty or follows a full one (protobuf keeps the last): onnx then
    reads raw_data, not float_data, and so does the reader: b0's 8 values do not fit 0 bytes, one line."""
    model, _ = _model()
    typed = model.graph.initializer[2]  # b0, its values in float_data
    assert typed.name == "b0" and not typed.raw_data
    for tail in (f_bytes(9, b""), f_bytes(9, b"\0" * 32) + f_bytes(9, b"")):
        graph = _copy(model.graph)
        del graph.initializer[2]
        path = tmp_path / "m.onnx"
        path.write_bytes(_with_graph(model, f_bytes(5, typed.SerializeToString() + tail)
                                     + graph.SerializeToString()))  # fmt: skip
        with pytest.raises(ValueError, match="cannot reshape"):  # onnx's own reading of the same file
            numpy_helper.to_array(onnx.load_model_from_string(path.read_bytes()).graph.initializer[0])
        with pytest.raises(ModelFormatError, match=r"^\S+m\.onnx: tensor 'b0': cannot reshape array of size 0"):
            load_tensors(path)


def test_a_file_with_protobuf_groups_is_parsed_whole_by_onnx(tmp_path: Path) -> None:
    """The wire-format walker does not read protobuf's deprecated groups; onnx keeps them as unknown fields. Such a
    file is parsed whole by onnx, as before the walker: the same tensors."""
    model, want = _model()
    group = varint(99 << 3 | 3) + varint(1 << 3 | 0) + b"\x05" + varint(99 << 3 | 4)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString() + group)
    got = {t.name: t.array for t in load_tensors(path)}
    assert set(got) == set(want)
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
