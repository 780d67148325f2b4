"""The compiled sealing of recordings (``seal_run`` in pooler/recording/_seal.pyx) gives exactly
what the Python it twins gives (``python_seal_run`` in pooler/recording/writer.py, the
definition): the same bytes to write, the same offset to go on from, the same last hash, file size and
count, for chains with and without an HMAC key, records of every length (an empty line too),
in bytes or a bytearray, cut by the rotation limit anywhere; and what it writes verifies as a chain. Seeded, so a failure
names the case that shows it."""

from __future__ import annotations

import os
import random

import pytest

from pooler.recording import writer
from pooler.recording.format import GENESIS, link, unseal

pytestmark = pytest.mark.skipif(bool(os.environ.get("POOLER_PURE_PYTHON")),
                                reason="POOLER_PURE_PYTHON=1: the compiled twin is not loaded")

PY = writer.python_seal_run


def compiled():
    if writer.compiled_seal_run is None:
        pytest.fail("the compiled twin is not built (./dev.sh setup builds pooler/recording/_seal.pyx; "
                    "it needs OpenSSL's headers, Debian's libssl-dev)")
    return writer.compiled_seal_run


def records(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.05:
            out.append(b"")  # (never made by the recorder; sealed all the same)
        elif pick < 0.1:
            out.append(b"}")
        else:
            text = bytes(rng.choice(b'abc \\"\xc3\xa9\x00{}') for _ in range(rng.randrange(0, 400)))
            out.append(b'{"t":"stmt","sql":"' + text + b'"}')
    return out


@pytest.mark.parametrize("seed", range(40))
def test_compiled_sealing_gives_the_python_bytes(seed):
    rng = random.Random(seed)
    data = b"".join(r + b"\n" for r in records(rng, rng.randrange(0, 300)))
    if rng.random() < 0.3:
        data += b'{"cut":'  # (a chunk never ends so: what follows the last newline is no record)
    if rng.random() < 0.5:
        data = bytearray(data)  # (the recorder's buffer is one)
    key = rng.choice([None, b"", os.urandom(32), b"k", os.urandom(200)])
    prev = rng.choice([GENESIS, os.urandom(32).hex().encode(), b"", b"short"])
    size = rng.randrange(0, 10_000)
    limit = rng.choice([1 << 62, 0, 1, size + rng.randrange(0, 60_000)])
    pos = rng.choice([0, data.find(b"\n") + 1])
    while True:
        want = PY(data, pos, prev, size, limit, key)
        assert compiled()(data, pos, prev, size, limit, key) == want
        if want[4] == 0:
            break
        _, pos, prev, _, _ = want  # on from where the run stopped, into the next file
        size = 0


def test_what_the_compiled_sealing_writes_is_a_chain():
    rng = random.Random(7)
    lines = [r for r in records(rng, 500) if len(r) >= 2]  # as the recorder makes them
    data = b"".join(r + b"\n" for r in lines)
    for key in (None, b"a recording key"):
        out, pos, last, size, count = compiled()(data, 0, GENESIS, 0, 1 << 62, key)
        assert (pos, count) == (len(data), len(lines))
        written = out.split(b"\n")
        assert written.pop() == b""
        prev = GENESIS
        for line, body in zip(written, lines, strict=True):
            got = unseal(line)
            assert got is not None and got[0] == body
            assert got[1] == link(prev, body, key)
            prev = link(prev, body, key)
        assert last == prev
        assert size == len(out)


def test_the_rotation_limit_stops_after_the_record_that_reaches_it():
    data = b"".join(b'{"n":%d}\n' % k for k in range(10))
    one = len(b'{"n":0}') + 72  # a line as written: the record, its "h", a newline
    out, pos, _, size, count = compiled()(data, 0, GENESIS, 0, 3 * one, None)
    assert (count, size, out.count(b"\n"), pos) == (3, 3 * one, 3, 3 * len(b'{"n":0}\n'))
    out, pos, _, size, count = compiled()(data, 0, GENESIS, 0, 3 * one + 1, None)
    assert (count, size) == (4, 4 * one)
