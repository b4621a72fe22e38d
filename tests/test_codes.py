"""Code parsing: every accepted form gives the same canonical bytes; everything else is InvalidCode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hashdb.codes import bytes_to_words, check_bits, hamming, many_to_bytes, to_bytes, words_to_bytes
from hashdb.errors import InvalidArgument, InvalidCode

widths = st.sampled_from([64, 128, 256, 512, 2048])


@given(widths.flatmap(lambda b: st.tuples(st.just(b), st.binary(min_size=b // 8, max_size=b // 8))))
def test_every_accepted_form_gives_the_same_canonical_bytes(case: tuple[int, bytes]) -> None:
    bits, raw = case
    as_bool = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).astype(bool)
    forms = [raw, bytearray(raw), raw.hex(), "0x" + raw.hex().upper(), np.frombuffer(raw, np.uint8), as_bool]
    forms.append(as_bool.astype(np.int64))
    for form in forms:
        assert to_bytes(form, bits) == raw
    assert words_to_bytes(bytes_to_words(raw, bits)) == raw


def test_bit_order_is_numpy_packbits_order() -> None:
    bits = np.zeros(64, dtype=bool)
    bits[0] = True  # bit 0 is the most significant bit of byte 0
    assert to_bytes(bits, 64) == b"\x80" + b"\x00" * 7


@pytest.mark.parametrize(
    "code, message",
    [
        (b"\x00" * 31, "31 bytes"),
        ("zz" * 32, "not valid hex"),
        ("ab" * 31, "62 digits"),
        (np.full(256, 2, dtype=np.int64), "only 0 and 1"),
        (np.zeros((2, 32), dtype=np.uint8), "1-D"),
        (np.zeros(32, dtype=np.float32), "neither"),
        (12345, "got int"),
    ],
)
def test_bad_codes_are_rejected_with_a_clear_message(code: object, message: str) -> None:
    with pytest.raises(InvalidCode, match=message):
        to_bytes(code, 256)


def test_many_to_bytes_accepts_matrices_and_rejects_a_single_code() -> None:
    rng = np.random.default_rng(1)
    packed = rng.integers(0, 256, (5, 16), dtype=np.uint8)
    assert many_to_bytes(packed, 128) == [row.tobytes() for row in packed]
    assert many_to_bytes(np.unpackbits(packed, axis=1).astype(bool), 128) == [row.tobytes() for row in packed]
    with pytest.raises(InvalidCode):
        many_to_bytes(b"\x00" * 16, 128)
    with pytest.raises(InvalidCode):
        many_to_bytes(np.zeros((5, 8), dtype=np.uint8), 128)


@pytest.mark.parametrize("bits", [0, 32, 100, 4096, 64.0, True, "256"])
def test_bits_must_be_a_multiple_of_64_in_range(bits: object) -> None:
    with pytest.raises(InvalidArgument):
        check_bits(bits)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_hamming_counts_differing_bits(a: bytes, b: bytes) -> None:
    expected = int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
    assert hamming(a, b) == expected


@pytest.mark.parametrize(
    "code, message",
    [
        ("0011223344 55 66", "not valid hex"),  # 16 characters, but bytes.fromhex would make 7 bytes of it
        ("00112233 4556677", "not valid hex"),
        ("\u00e9" * 16, "not valid hex"),
        ([[1], [1, 2]], "flat list"),  # ragged: numpy itself refuses it with a ValueError
        ([[0] * 8, [1] * 8], "1-D"),
        ([None] * 64, "neither"),
        ([2**70] * 64, "neither"),
        (np.zeros((), dtype=np.uint8), "1-D"),
    ],
)
def test_malformed_codes_are_invalid_code_never_a_bare_value_error(code: object, message: str) -> None:
    with pytest.raises(InvalidCode, match=message):
        to_bytes(code, 64)


@pytest.mark.parametrize("codes", [["0011223344 55 66"], [[[1], [1, 2]]], np.zeros((), np.uint8), [b"\x00" * 8, 3]])
def test_malformed_code_sequences_are_invalid_code(codes: object) -> None:
    with pytest.raises(InvalidCode):
        many_to_bytes(codes, 64)


def test_every_database_entry_point_rejects_malformed_codes_with_invalid_code(tmp_path) -> None:
    from hashdb import HashDB

    bad = ["0011223344 55 66", [[1], [1, 2]]]
    with HashDB(tmp_path / "db", bits=64) as db:
        db.insert("kept", bytes(8))
        for code in bad:
            for call in (
                lambda code=code: db.insert("x", code),
                lambda code=code: db.insert_many(["x"], [code]),
                lambda code=code: db.insert_many(["x", "y"], [bytes(8), code]),
                lambda code=code: db.radius(code, 3),
                lambda code=code: db.radius_many([code], 3),
                lambda code=code: db.knn(code, 1),
            ):
                with pytest.raises(InvalidCode):
                    call()
        assert db.keys() == ["kept"]
        assert db.stats()["log_seq"] == 1  # nothing of a rejected write reached the database
