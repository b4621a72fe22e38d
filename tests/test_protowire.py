"""The shared protobuf wire decoder against messages serialized by the protobuf runtime (onnx's TensorProto)."""

from __future__ import annotations

import numpy as np
import pytest
from formats_writers import f_bytes

from hashdb.codec.readers import protowire as pw

onnx = pytest.importorskip("onnx")


def test_decodes_a_tensor_proto_written_by_protobuf() -> None:
    t = onnx.TensorProto()
    t.name = "conv.weight"
    t.dims.extend([4, 3, 300, 2])
    t.data_type = onnx.TensorProto.FLOAT
    t.float_data.extend([1.5, -2.0, 3.25])
    msg = pw.message(t.SerializeToString())
    assert pw.varints(msg[1]) == [4, 3, 300, 2]  # dims (packed int64)
    assert pw.as_int(msg[2][0]) == onnx.TensorProto.FLOAT
    assert pw.text(msg[8][0]) == "conv.weight"
    np.testing.assert_array_equal(pw.packed_array(msg[4], "<f4"), [1.5, -2.0, 3.25])


def test_negative_int64_reads_back_signed() -> None:
    t = onnx.TensorProto()
    t.dims.append(-7)
    (value,) = pw.varints(pw.message(t.SerializeToString())[1])
    assert pw.signed(value) == -7


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05ab", b"\x08" + b"\xff" * 11, b"\x0d\x00\x00", b"\x00\x01", b"\x0b", b"\x11\x00"],
)
def test_malformed_messages_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        pw.message(data)


def test_records_span_each_record_so_a_message_can_be_rebuilt_without_one_field() -> None:
    t = onnx.TensorProto()
    t.name = "w"
    t.dims.extend([2, 3])
    t.data_type = onnx.TensorProto.FLOAT
    t.raw_data = np.arange(6, dtype="<f4").tobytes()
    blob = t.SerializeToString()
    spans = list(pw.records(blob))
    assert b"".join(blob[start:end] for *_, start, end in spans) == blob  # the records tile the message
    raw = next(r for r in spans if r[0] == 9)
    assert bytes(blob[raw[4] - len(raw[2]) : raw[4]]) == t.raw_data  # the payload ends its record
    kept = b"".join(blob[start:end] for number, *_, start, end in spans if number != 9)
    rebuilt = onnx.TensorProto.FromString(kept + f_bytes(9, b"\x00" * 24))
    assert (rebuilt.name, list(rebuilt.dims), rebuilt.raw_data) == ("w", [2, 3], b"\x00" * 24)
    for value in (0, 1, 127, 128, 300, 2**35, 2**64 - 1):
        assert pw.read_varint(pw.encode_varint(value), 0) == (value, len(pw.encode_varint(value)))
