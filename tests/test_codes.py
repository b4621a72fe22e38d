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
