"""The compiled masked-row rewrite (pooler/masking/_rows.pyx) gives exactly what the Python it
twins gives (RowPlan.rewrite_run in plan.py, the methods in methods.py): the same bytes, the
same counts, the same errors, over hostile DataRows, every masking method, text and binary
formats, NULLs, multi-byte and broken encodings, and e-mail addresses at every edge of the
ASCII domain check. Seeded, so a failure names the case that shows it."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pooler.masking import plan as P
from pooler.masking.methods import (KIND_INT4, KIND_INT8, KIND_JSON, KIND_JSONB, KIND_OTHER, KIND_TEXT,
                                    parse_method)

pytestmark = pytest.mark.skipif(bool(os.environ.get("POOLER_PURE_PYTHON")),
                                reason="POOLER_PURE_PYTHON=1: the compiled twin is not loaded")

METHODS = ["null", "redact", "redact:[gone]", "partial", "partial:2", "partial:1:3", "partial:0:0", "email",
           "hash", "detect"]
KINDS = [KIND_TEXT, KIND_TEXT, KIND_TEXT, KIND_INT4, KIND_INT8, KIND_JSON, KIND_JSONB, KIND_OTHER]
KEY = b"k" * 32

EMAILS = [
    b"ann@example.com", b"a@b.co", b" @example.com", b"\t@example.com", b"x @example.com", b"@example.com",
    b"ann@", b"ann@example", b"ann@example.c", b"ann@example.c0m", b"ann@-example.com", b"ann@example-.com",
    b"ann@ex-ample.com", b"ann@my_host.example.com", b"ann@example..com", b"ann@.example.com",
    b"ann@example.com.", b"ann@xn--bcher-kva.example", b"ann@example.xn--p1ai", b"ann@example.xn--",
    b"ann@example.xn-p1ai", b"a@b@example.org", b"ann@" + b"a" * 63 + b".com", b"ann@" + b"a" * 64 + b".com",
    b"ann@" + b"a." * 125 + b"com", b"ann@" + b"a." * 126 + b"com", b"ann@ex" + b"a" * 70 + b".com",
    b"ann@example." + b"c" * 63, b"ann@example." + b"c" * 64, "jörg@exämple.de".encode(), "ann@пример.рф".encode(),
    b"ann@\xff.com", b"ann@EXAMPLE.COM", b"ann@1.2.3.4", b"ann@example.com\n", b"\x00@example.com",
]


def value(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.35:
        return rng.choice(EMAILS)
    if pick < 0.5:
        return "".join(rng.choice("abcé€😀 -@.0123456789") for _ in range(rng.randrange(0, 12))).encode()
    if pick < 0.6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 10)))
    if pick < 0.7:
        return struct.pack("!i", rng.randrange(-2**31, 2**31))
    if pick < 0.8:
        return str(rng.randrange(-10**6, 10**6)).encode()
    if pick < 0.9:
        return b"call +1 555 010 7788 or 4111 1111 1111 1111"
    return b'{"a": "secret"}'


def template(rng: random.Random) -> P.Template:
    nfields = rng.randrange(1, 7)
    idx = sorted(rng.sample(range(nfields), rng.randrange(1, nfields + 1)))
    cols = [P.ColumnMask(i, slot, f"c{i}", parse_method(rng.choice(METHODS)), rng.choice(KINDS), rng.choice((0, 0, 1)))
            for slot, i in enumerate(idx)]
    return P.Template(nfields, cols)


def datarow(rng: random.Random, nfields: int) -> bytes:
    count = nfields if rng.random() > 0.03 else nfields + rng.choice((-1, 1))
    parts = [struct.pack("!h", count)]
    for _ in range(max(count, 0)):
        r = rng.random()
        if r < 0.1:
            parts.append(b"\xff\xff\xff\xff")
        elif r < 0.12:
            parts.append(struct.pack("!i", -rng.randrange(2, 100)))  # a hostile negative length
        else:
            v = value(rng)
            parts.append(struct.pack("!i", len(v)) + v)
    body = b"".join(parts)
    r = rng.random()
    if r < 0.03:
        body = body[:-rng.randrange(1, 4)] if len(body) > 3 else body  # a column runs past the message
    elif r < 0.05:
        body += b"xyz"  # trailing bytes after the columns
    length = len(body) + 4
    if rng.random() < 0.02:
        length += rng.randrange(1, 9)  # claims more than there is
    return b"D" + struct.pack("!i", length) + body


def run(fn, tpl: P.Template, data: bytes, pos: int, n: int):
    plan = P.RowPlan(tpl, KEY)
    try:
        out = fn(plan, data, pos, n)
    except P.MaskingError as e:
        return ("MaskingError", str(e))
    except Exception as e:  # noqa: BLE001 - what the gateway calls a malformed DataRow
        return ("malformed", type(e).__name__ in ("error", "ValueError", "IndexError"))
    return out, plan.counts


def test_the_compiled_twin_is_built_and_used():
    # ./dev.sh setup builds it; a machine where it is missing runs the slower Python path
    assert P.compiled, "pooler/masking/_rows.pyx is not built (./dev.sh setup, or pip install -e .)"
    assert P.RowPlan.rewrite_run is P.compiled_rewrite_run


@pytest.mark.parametrize("seed", range(int(os.environ.get("MASK_TWIN_SEEDS", "40"))))
def test_hostile_runs_of_datarows_give_the_same_bytes_counts_and_errors(seed):
    rng = random.Random(seed)
    for _ in range(60):
        tpl = template(rng)
        rows = [datarow(rng, tpl.nfields) for _ in range(rng.randrange(1, 12))]
        tail = rng.choice([b"", b"C\x00\x00\x00\x0dSELECT 1\x00", b"D\x00\x00", b"D\x00\x00\x00\x02",
                           b"D\x00\x00\x10\x00\x00\x05"])
        lead = b"Z" * rng.randrange(0, 3)
        data = lead + b"".join(rows) + tail
        pos, n = len(lead), len(data) - (rng.randrange(0, 4) if rng.random() < 0.1 else 0)
        for memo_primed in (False, True):
            if memo_primed:  # a second plan on the same template: the Python methods' memo is warm
                run(P.python_rewrite_run, tpl, data, pos, n)
            want = run(P.python_rewrite_run, tpl, data, pos, n)
            got = run(P.compiled_rewrite_run, tpl, data, pos, n)
            assert got == want, (seed, [c.method.spec for c in tpl.columns], data)


def test_every_method_on_every_kind_and_format():
    values = EMAILS + [b"", b"x", b"0123456789", "ünïcödé".encode(), b"\xc3", struct.pack("!q", -5),
                       struct.pack("!i", 7), b"123", b"-9223372036854775808", b'"json"']
    for spec in METHODS:
        for kind in KINDS:
            for fmt in (0, 1):
                tpl = P.Template(2, [P.ColumnMask(1, 0, "c", parse_method(spec), kind, fmt)])
                for v in values:
                    body = struct.pack("!h", 2) + struct.pack("!i", 2) + b"id" + struct.pack("!i", len(v)) + v
                    data = b"D" + struct.pack("!i", len(body) + 4) + body
                    assert (run(P.compiled_rewrite_run, tpl, data, 0, len(data))
                            == run(P.python_rewrite_run, tpl, data, 0, len(data))), (spec, kind, fmt, v)


def test_a_run_stops_at_the_first_message_that_is_not_a_complete_row():
    tpl = P.Template(1, [P.ColumnMask(0, 0, "c", parse_method("partial"), KIND_TEXT, 0)])
    row = b"D\x00\x00\x00\x0e\x00\x01\x00\x00\x00\x045551"
    done = b"C\x00\x00\x00\x0dSELECT 2\x00"
    data = row + row + done + row
    out, pos = P.compiled_rewrite_run(P.RowPlan(tpl, KEY), data, 0, len(data))
    assert pos == 2 * len(row) and out == 2 * b"D\x00\x00\x00\x0e\x00\x01\x00\x00\x00\x04****"
    half = row + row[:7]
    assert P.compiled_rewrite_run(P.RowPlan(tpl, KEY), half, 0, len(half))[1] == len(row)
