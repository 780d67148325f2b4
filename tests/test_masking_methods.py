"""Masking methods without a database: what each method turns a column value into, for each
type kind and wire format, and how bad method specs are reported."""

from __future__ import annotations

import json

import pytest

from pooler.masking.methods import (
    KIND_INT2, KIND_INT4, KIND_INT8, KIND_JSON, KIND_JSONB, KIND_OTHER, KIND_TEXT,
    METHOD_NAMES, TEXT_TYPE_OIDS, Method, MethodError, detect_text, kind_of, parse_method,
)

KEY = b"test-key"


def apply(spec: str, value: bytes, kind: int = KIND_TEXT, fmt: int = 0, key: bytes = KEY):
    return parse_method(spec).apply(value, kind, fmt, key)


# --------------------------------------------------------------------------- kinds


def test_kind_of():
    assert kind_of(25) == KIND_TEXT
    assert kind_of(1043) == KIND_TEXT
    assert kind_of(21) == KIND_INT2
    assert kind_of(23) == KIND_INT4
    assert kind_of(20) == KIND_INT8
    assert kind_of(114) == KIND_JSON
    assert kind_of(3802) == KIND_JSONB
    assert kind_of(1082) == KIND_OTHER  # date
    citext = 16385
    assert kind_of(citext) == KIND_OTHER
    assert kind_of(citext, TEXT_TYPE_OIDS | {citext}) == KIND_TEXT


# --------------------------------------------------------------------------- parsing


def test_parse_method_fields_and_cache():
    m = parse_method("partial:2:3")
    assert (m.name, m.spec, m.first, m.last) == ("partial", "partial:2:3", 2, 3)
    assert parse_method("partial:2:3") is m
    assert (parse_method("partial").first, parse_method("partial").last) == (0, 4)
    assert parse_method("partial:6").last == 6
    assert parse_method("redact:n/a: hidden").text == "n/a: hidden"
    for name in METHOD_NAMES:
        assert isinstance(parse_method(name), Method)


@pytest.mark.parametrize("spec, words", [
    ("foo", ["unknown masking method 'foo'", "redact", "detect"]),
    ("", ["empty"]),
    ("Partial", ["unknown masking method 'Partial'"]),
    ("partial:-1", ["non-negative integer", "'-1'"]),
    ("partial:a", ["non-negative integer", "'a'"]),
    ("partial:1:", ["non-negative integer", "''"]),
    ("partial:1:2:3", ["too many parameters"]),
    ("null:1", ["takes no parameters"]),
    ("hash:sha1", ["takes no parameters"]),
    ("redact:", ["empty"]),
])
def test_parse_method_errors(spec, words):
    with pytest.raises(MethodError) as exc:
        parse_method(spec)
    for word in words:
        assert word in str(exc.value)


def test_method_error_is_value_error():
    with pytest.raises(ValueError):
        parse_method("nope")
    with pytest.raises(MethodError):
        parse_method(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- redact / null


def test_redact_text_default_and_custom():
    assert apply("redact", b"secret") == (b"***", 1)
    assert apply("redact", b"secret", fmt=1) == (b"***", 1)
    assert apply("redact:gelöscht", b"secret") == ("gelöscht".encode(), 1)


def test_redact_json_is_valid_json():
    m = parse_method('redact:say "hi"\\n\tnow')
    for kind in (KIND_JSON, KIND_JSONB):
        out, n = m.apply(b'{"a": 1}', kind, 0, KEY)
        assert n == 1
        assert json.loads(out) == 'say "hi"\\n\tnow'
    out, _ = m.apply(b'{"a": 1}', KIND_JSON, 1, KEY)
    assert json.loads(out) == 'say "hi"\\n\tnow'
    assert apply("redact", b'{"a":1}', KIND_JSON) == (b'"***"', 1)


def test_redact_jsonb_binary_has_version_byte():
    out, n = apply("redact", b"\x01{}", KIND_JSONB, fmt=1)
    assert out == b'\x01"***"'
    assert json.loads(out[1:]) == "***"


@pytest.mark.parametrize("kind", [KIND_INT2, KIND_INT4, KIND_INT8, KIND_OTHER])
@pytest.mark.parametrize("spec", ["redact", "partial", "email", "null"])
def test_non_text_kinds_become_null(spec, kind):
    assert apply(spec, b"12", kind) == (None, 1)
    assert apply(spec, b"\x00\x0c", kind, fmt=1) == (None, 1)


@pytest.mark.parametrize("spec", ["partial", "email"])
def test_partial_email_json_become_null(spec):
    assert apply(spec, b'"alice@example.com"', KIND_JSON) == (None, 1)
    assert apply(spec, b'\x01"x"', KIND_JSONB, fmt=1) == (None, 1)


def test_null_text():
    assert apply("null", b"anything") == (None, 1)


# --------------------------------------------------------------------------- partial


def test_partial_keeps_last_four_of_phone():
    assert apply("partial", b"+1 415 555 2671") == (b"***********2671", 1)
    assert apply("partial:0:4", b"555-123-4567") == (b"********4567", 1)


def test_partial_first_and_last():
    assert apply("partial:2:2", b"abcdefgh") == (b"ab****gh", 1)
    assert apply("partial:3", b"abcdefgh") == (b"*****fgh", 1)
    assert apply("partial:1:0", b"abcdefgh") == (b"a*******", 1)


def test_partial_never_reveals_short_value():
    assert apply("partial", b"1234") == (b"****", 1)
    assert apply("partial", b"12") == (b"**", 1)
    assert apply("partial:2:2", b"abcd") == (b"****", 1)
    out, _ = apply("partial:3:3", b"abc")
    assert out == b"***"


def test_partial_counts_characters_not_bytes():
    out, _ = apply("partial:1:2", "Zoë Müller".encode())
    assert out.decode() == "Z*******er"
    assert len(out.decode()) == len("Zoë Müller")
    out, _ = apply("partial:0:1", "日本語テキスト".encode())
    assert out.decode() == "******ト"


def test_partial_invalid_utf8_not_returned_raw():
    raw = b"\xff\xfesecret-1234"
    out, n = apply("partial", raw)
    assert out == b"***" and n == 1


# --------------------------------------------------------------------------- email


def test_email_keeps_domain():
    assert apply("email", b"alice@example.com") == (b"***@example.com", 1)
    assert apply("email", b'"a@b"@mail.example.org') == (b"***@mail.example.org", 1)
    assert apply("email", "jörg@müller.de".encode()) == ("***@müller.de".encode(), 1)


@pytest.mark.parametrize("value", [b"alice", b"alice@", b"@example.com", b"alice@localhost",
                                   b"a@b c.com", b"", b"\xffalice@example.com\xfe"])
def test_email_without_valid_domain_is_fully_masked(value):
    assert apply("email", value) == (b"***", 1)


# --------------------------------------------------------------------------- hash


def test_hash_text_deterministic_and_key_dependent():
    a1, n = apply("hash", b"alice@example.com")
    a2, _ = apply("hash", b"alice@example.com")
    b, _ = apply("hash", b"bob@example.com")
    other_key, _ = apply("hash", b"alice@example.com", key=b"other")
    assert n == 1
    assert a1 == a2
    assert a1.startswith(b"h_") and len(a1) == 18
    int(a1[2:], 16)
    assert a1 != b
    assert a1 != other_key
    assert b"alice" not in a1
    empty_key = apply("hash", b"x", key=b"")
    assert empty_key == apply("hash", b"x", key=b"")


@pytest.mark.parametrize("kind, size", [(KIND_INT2, 2), (KIND_INT4, 4), (KIND_INT8, 8)])
def test_hash_int_fits_type_and_text_binary_agree(kind, size):
    limit = 2 ** (size * 8 - 1)
    for number in (0, 1, -1, 42, 12345, -(limit // 2), limit - 1):
        text_out, n = apply("hash", str(number).encode(), kind, fmt=0)
        bin_out, _ = apply("hash", number.to_bytes(size, "big", signed=True), kind, fmt=1)
        assert n == 1
        value = int(text_out)
        assert 0 <= value < limit
        assert len(bin_out) == size
        assert int.from_bytes(bin_out, "big", signed=True) == value
    seen = {apply("hash", str(i).encode(), kind)[0] for i in range(50)}
    assert len(seen) > 40  # a pseudonym, not a constant


def test_hash_int_key_dependent_and_bad_values_null():
    assert apply("hash", b"42", KIND_INT4) != apply("hash", b"42", KIND_INT4, key=b"k2")
    assert apply("hash", b"abc", KIND_INT4) == (None, 1)
    assert apply("hash", b"\x00\x01\x02", KIND_INT4, fmt=1) == (None, 1)  # wrong length
    assert apply("hash", b"2024-01-01", KIND_OTHER) == (None, 1)
    assert apply("hash", b'"x"', KIND_JSON) == (None, 1)


# --------------------------------------------------------------------------- detect


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111",
                                  "4111111111111111", "5500 0000 0000 0004"])
def test_detect_card(card):
    out, n = apply("detect", f"paid with {card} yesterday".encode())
    assert (out, n) == (b"paid with [card] yesterday", 1)


def test_detect_ignores_luhn_invalid_number():
    value = b"ref 4111 1111 1111 1112 ok"
    out, n = apply("detect", value)
    assert n == 0 and out is value


@pytest.mark.parametrize("text, expected", [
    ("mail alice.b+x@example.co.uk please", "mail [email] please"),
    ("call +14155552671 now", "call [phone] now"),
    ("call (555) 123-4567 now", "call [phone] now"),
    ("call 555-123-4567 now", "call [phone] now"),
    ("call +44 20 7946 0958 now", "call [phone] now"),
    ("iban GB82 WEST 1234 5698 7654 32 thanks", "iban [iban] thanks"),
    ("iban GB82WEST12345698765432.", "iban [iban]."),
    ("ssn 123-45-6789.", "ssn [ssn]."),
])
def test_detect_finds(text, expected):
    out, n = apply("detect", text.encode())
    assert out.decode() == expected
    assert n == 1


def test_detect_several_and_count():
    out, n = apply("detect", b"a@b.io, 4111111111111111, 123-45-6789, +442079460958")
    assert out == b"[email], [card], [ssn], [phone]"
    assert n == 4


@pytest.mark.parametrize("text", [
    "iban GB83 WEST 1234 5698 7654 32",  # bad checksum
    "iban GB83WEST12345698765432",
    "ssn 000-12-3456",
    "ssn 666-12-3456",
    "ssn 123-00-4567",
    "order 12345678 shipped 2024-01-15 10:30",
    "pi is 3.14159265358979",
])
def test_detect_leaves_non_pii(text):
    value = text.encode()
    out, n = apply("detect", value)
    assert n == 0
    assert out is value


def test_detect_unchanged_returns_same_bytes():
    value = b"nothing personal in this forty chars..."
    out, n = apply("detect", value)
    assert out is value and n == 0
    value = "ümlaut text without anything".encode()
    out, n = apply("detect", value)
    assert out is value and n == 0


def test_detect_non_text_kinds_pass():
    value = b'{"email": "alice@example.com"}'
    assert apply("detect", value, KIND_JSON) == (value, 0)
    assert apply("detect", b"\x00\x00\x00\x2a", KIND_INT4, fmt=1) == (b"\x00\x00\x00\x2a", 0)


def test_detect_invalid_utf8_fails_closed():
    for raw in (b"\xff\xfe plain", b"card 4111111111111111 \xc3"):
        out, n = apply("detect", raw)
        assert out == b"[redacted]" and n == 1


def test_detect_non_ascii_text():
    out, n = apply("detect", "Grüße an jörg@example.de".encode())
    assert out.decode() == "Grüße an [email]" and n == 1


def test_detect_text_for_messages():
    msg = 'duplicate key value (email)=(alice@example.com) already exists'
    assert detect_text(msg) == ("duplicate key value (email)=([email]) already exists", 1)
    plain = "relation does not exist"
    out, n = detect_text(plain)
    assert out is plain and n == 0


def test_no_method_returns_raw_value():
    raw = b"alice@example.com 4111111111111111"
    for name in ("redact", "null", "partial", "email", "hash", "detect"):
        out, n = apply(name, raw)
        assert out != raw and n >= 1
