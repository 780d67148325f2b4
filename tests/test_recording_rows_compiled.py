"""The compiled reading of recorded rows (``row_values`` in pooler/masking/_rows.pyx) gives
exactly what the Python it twins gives (``_row_values`` in pooler/gateway/recorder.py, the
definition): the same values and byte counts, the same exceptions, over well-formed and
hostile DataRow bodies: NULLs, text, multi-byte and broken UTF-8, every control character,
binary values, short bodies, lengths past the end, negative counts. Seeded, so a failure names
the case that shows it."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pooler.gateway import recorder

pytestmark = pytest.mark.skipif(bool(os.environ.get("POOLER_PURE_PYTHON")),
                                reason="POOLER_PURE_PYTHON=1: the compiled twin is not loaded")

PY = recorder.python_row_values


def compiled():
    if recorder.compiled_row_values is None:
        pytest.fail("the compiled twin is not built (./dev.sh setup builds pooler/masking/_rows.pyx)")
    return recorder.compiled_row_values


def outcome(f, body):
    try:
        return ("ok", f(body))
    except Exception as e:  # noqa: BLE001 - the same exception type is part of the contract
        return ("raised", type(e).__name__)


def value(rng: random.Random) -> bytes | None:
    pick = rng.random()
    if pick < 0.15:
        return None
    if pick < 0.35:
        return "".join(rng.choice("abcé€😀 -@.0123456789") for _ in range(rng.randrange(0, 12))).encode()
    if pick < 0.5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 10)))
    if pick < 0.6:
        return bytes([rng.randrange(32)]) + b"x"  # every control character, tab/newline/CR included
    if pick < 0.7:
        return "ok\t\n\r\x7f".encode()
    if pick < 0.8:
        return "é".encode()[:1] + b"abc"  # a cut multi-byte sequence
    return struct.pack("!q", rng.randrange(-2**63, 2**63))


def body(values: list[bytes | None]) -> bytes:
    out = [struct.pack("!h", len(values))]
    for v in values:
        out.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return b"".join(out)


def test_well_formed_rows_read_the_same():
    f = compiled()
    rng = random.Random(1)
    for case in range(3000):
        b = body([value(rng) for _ in range(rng.randrange(0, 8))])
        assert outcome(f, b) == outcome(PY, b), (case, b)


def test_hostile_rows_read_the_same_or_raise_the_same():
    f = compiled()
    rng = random.Random(2)
    for case in range(3000):
        b = body([value(rng) for _ in range(rng.randrange(0, 6))])
        how = rng.randrange(5)
        if how == 0 and b:
            b = b[: rng.randrange(len(b))]  # cut anywhere
        elif how == 1:
            b = struct.pack("!h", rng.randrange(-3, 10)) + b[2:]  # a column count that lies
        elif how == 2 and len(b) > 6:
            p = rng.randrange(2, len(b) - 4)
            b = b[:p] + struct.pack("!i", rng.choice((-2, -1, 0, 5, 2**31 - 1))) + b[p + 4:]
        elif how == 3:
            b = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 12)))
        assert outcome(f, b) == outcome(PY, b), (case, b)


def test_fixed_cases():
    f = compiled()
    for b in (b"", b"\x00", b"\x00\x00", b"\xff\xff", b"\x00\x01\xff\xff\xff\xff", b"\x00\x01\x00\x00\x00\x00",
              b"\x00\x01\x00\x00\x00\x05abc", b"\x00\x02\x00\x00\x00\x01\x00\x00\x00\x00\x01\x1f",
              bytearray(b"\x00\x01\x00\x00\x00\x01a"), memoryview(b"\x00\x01\x00\x00\x00\x01a")):
        assert outcome(f, b) == outcome(PY, b), b
    assert f(b"\x00\x03\xff\xff\xff\xff\x00\x00\x00\x02\xc3\xa9\x00\x00\x00\x01\x07") == (
        [None, "é", {"hex": "07"}], 3)
