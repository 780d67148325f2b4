"""Value masking methods for PostgreSQL result values -- sans-I/O.

Rules of this module:

* Pure functions only: no I/O, no logging, no global mutable state apart from the
  ``parse_method`` cache.  Everything works on the raw bytes of one non-NULL ``DataRow``
  column plus its type *kind* (see :func:`kind_of`) and wire format (0 = text, 1 = binary).
* Fail closed: a value that cannot be masked validly for its type and format becomes SQL NULL
  (``None``).  Text kinds whose bytes are not valid UTF-8 get a fixed placeholder instead
  (``***`` or ``[redacted]``).
* A masked column never gets its raw value back: every method except ``detect`` always returns
  a replacement (or NULL).  ``detect`` returns the value unchanged only when it found nothing,
  and only for valid UTF-8 text.
* Method specs (``"partial:0:4"``, ``"redact:n/a"`` ...) come from security engineers' rules;
  :func:`parse_method` validates them and raises :class:`MethodError` with a message saying
  what is wrong.

Methods:

``redact`` / ``redact:TEXT``
    Replace by fixed text (default ``***``).  Text kinds: the UTF-8 text; json/jsonb: a JSON
    string literal (jsonb binary format: version byte ``\\x01`` + JSON text); other kinds: NULL.
``null``
    Always NULL.
``partial`` / ``partial:LAST`` / ``partial:FIRST:LAST``
    Keep the first FIRST (default 0) and last LAST (default 4) characters, replace each other
    character by ``*``.  If FIRST+LAST >= the length, every character is replaced.  Text only.
``email``
    ``alice@example.com`` -> ``***@example.com``; no valid-looking ``@domain`` -> ``***``.
``hash``
    Keyed deterministic pseudonym, HMAC-SHA256(key, value).  Text: ``h_`` + 16 hex digits;
    int2/int4/int8: a non-negative integer of the same type (binary values are hashed in their
    canonical decimal text form, so text and binary clients see the same pseudonym).
``detect``
    Replace payment cards (Luhn), IBANs (mod 97), US SSNs, e-mail addresses and phone numbers
    inside free text by ``[card]``, ``[iban]``, ``[ssn]``, ``[email]``, ``[phone]``.
    Non-text kinds pass unchanged.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = [
    "KIND_TEXT", "KIND_INT2", "KIND_INT4", "KIND_INT8", "KIND_JSON", "KIND_JSONB", "KIND_OTHER",
    "TEXT_TYPE_OIDS", "METHOD_NAMES", "MethodError", "Method", "kind_of", "parse_method",
    "detect_text",
]

KIND_TEXT, KIND_INT2, KIND_INT4, KIND_INT8, KIND_JSON, KIND_JSONB, KIND_OTHER = range(7)

#: text, varchar, bpchar, name, unknown
TEXT_TYPE_OIDS = frozenset({25, 1043, 1042, 19, 705})

_FIXED_KINDS = {21: KIND_INT2, 23: KIND_INT4, 20: KIND_INT8, 114: KIND_JSON, 3802: KIND_JSONB}

METHOD_NAMES = ("redact", "null", "partial", "email", "hash", "detect")


def kind_of(type_oid: int, text_oids: frozenset[int] = TEXT_TYPE_OIDS) -> int:
    """The masking kind of a column of type ``type_oid``.

    ``text_oids`` may be a larger set (e.g. citext or text domains found in pg_type)."""
    kind = _FIXED_KINDS.get(type_oid)
    if kind is not None:
        return kind
    return KIND_TEXT if type_oid in text_oids else KIND_OTHER


class MethodError(ValueError):
    """A masking method spec is invalid; the message says what is wrong."""


# --------------------------------------------------------------------------- implementations

_STARS = b"***"
_REDACTED = b"[redacted]"


def _apply_redact(m: Method, value: bytes, kind: int, fmt: int, key: bytes):
    if kind == KIND_TEXT:
        return m._text_bytes, 1
    if kind == KIND_JSON or (kind == KIND_JSONB and fmt == 0):
        return m._json_bytes, 1
    if kind == KIND_JSONB and fmt == 1:
        return b"\x01" + m._json_bytes, 1
    return None, 1


def _apply_null(m: Method, value: bytes, kind: int, fmt: int, key: bytes):
    return None, 1


def _apply_partial(m: Method, value: bytes, kind: int, fmt: int, key: bytes):
    if kind != KIND_TEXT:
        return None, 1
    if value.isascii():  # the common case: bytes are characters
        n = len(value)
        first, last = m.first, m.last
        if first + last >= n:
            return b"*" * n, 1
        return value[:first] + b"*" * (n - first - last) + (value[n - last:] if last else b""), 1
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError:
        return _STARS, 1
    n = len(s)
    first, last = m.first, m.last
    if first + last >= n:
        return b"*" * n, 1
    out = s[:first] + "*" * (n - first - last) + (s[n - last:] if last else "")
    return out.encode("utf-8"), 1


# label: starts and ends with a letter/digit (Unicode allowed), at most 63 characters;
# the last label (TLD) is letters only, or an IDNA "xn--" label.
_LABEL = r"[^\W_](?:[\w-]{0,61}[^\W_])?"
_DOMAIN = rf"(?:{_LABEL}\.)+(?:[^\W\d_]{{2,63}}|xn--[a-zA-Z0-9-]{{1,59}})"
_DOMAIN_RE = re.compile(_DOMAIN)


_ASCII_DOMAIN_RE = re.compile(rb"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?:[A-Za-z]{2,63}|xn--[a-zA-Z0-9-]{1,59})")


def _apply_email(m: Method, value: bytes, kind: int, fmt: int, key: bytes):
    if kind != KIND_TEXT:
        return None, 1
    if value.isascii():  # the common case, without decoding
        local, at, domain = value.rpartition(b"@")
        if at and local.strip() and len(domain) <= 253 and _ASCII_DOMAIN_RE.fullmatch(domain):
            return b"***@" + domain, 1
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError:
        return _STARS, 1
    local, at, domain = s.rpartition("@")
    if not at or not local.strip() or len(domain) > 253 or not _DOMAIN_RE.fullmatch(domain):
        return _STARS, 1
    return b"***@" + domain.encode("utf-8"), 1


_INT_SIZES = {KIND_INT2: 2, KIND_INT4: 4, KIND_INT8: 8}


def _apply_hash(m: Method, value: bytes, kind: int, fmt: int, key: bytes):
    if kind == KIND_TEXT:
        return b"h_" + hmac.digest(key, value, "sha256").hex()[:16].encode("ascii"), 1
    size = _INT_SIZES.get(kind)
    if size is None:
        return None, 1
    # canonical form: the decimal text of the number, whatever the wire format
    if fmt == 1:
        if len(value) != size:
            return None, 1
        number = int.from_bytes(value, "big", signed=True)
    else:
        if len(value) > 24:  # longer than any int8 in text form -> not a valid value
            return None, 1
        try:
            number = int(value)
        except ValueError:
            return None, 1
    digest = hmac.digest(key, str(number).encode("ascii"), "sha256")
    pseudonym = int.from_bytes(digest[:8], "big") & ((1 << (size * 8 - 1)) - 1)
    if fmt == 1:
        return pseudonym.to_bytes(size, "big", signed=True), 1
    return str(pseudonym).encode("ascii"), 1


_DIGIT_BYTES = b"0123456789"
_DEL_DIGITS = str.maketrans("", "", "0123456789")


def _apply_detect(m: Method, value: bytes, kind: int, fmt: int, key: bytes):
    if kind != KIND_TEXT:
        return value, 0
    if value.isascii():
        if b"@" not in value and len(value) - len(value.translate(None, _DIGIT_BYTES)) < 9:
            return value, 0
        s = value.decode("ascii")
    else:
        try:
            s = value.decode("utf-8")
        except UnicodeDecodeError:
            return _REDACTED, 1
        if b"@" not in value and len(value) - len(value.translate(None, _DIGIT_BYTES)) < 9:
            return value, 0
    out, n = _detect(s)
    if not n:
        return value, 0
    return out.encode("utf-8"), n


_IMPLS: dict[str, Callable] = {
    "redact": _apply_redact,
    "null": _apply_null,
    "partial": _apply_partial,
    "email": _apply_email,
    "hash": _apply_hash,
    "detect": _apply_detect,
}


# --------------------------------------------------------------------------- the method


@dataclass(frozen=True, slots=True)
class Method:
    """One parsed masking method; build it with :func:`parse_method`."""

    name: str  # "redact" | "null" | "partial" | "email" | "hash" | "detect"
    spec: str  # the original spec string
    text: str = "***"  # redact: the replacement text
    first: int = 0  # partial: characters kept at the start
    last: int = 4  # partial: characters kept at the end
    _text_bytes: bytes = field(init=False, repr=False, compare=False)
    _json_bytes: bytes = field(init=False, repr=False, compare=False)
    _impl: Callable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        impl = _IMPLS.get(self.name)
        if impl is None:
            raise MethodError(_unknown(self.name))
        object.__setattr__(self, "_impl", impl)
        object.__setattr__(self, "_text_bytes", self.text.encode("utf-8"))
        object.__setattr__(
            self, "_json_bytes", json.dumps(self.text, ensure_ascii=False).encode("utf-8"))

    def apply(self, value: bytes, kind: int, fmt: int, key: bytes) -> tuple[bytes | None, int]:
        """Mask one non-NULL column value.

        Returns ``(new value or None for SQL NULL, number of masked items)``: 1 when the value
        was replaced or nulled; for ``detect`` the number of matches replaced (0 = unchanged,
        and then the very same ``value`` object is returned)."""
        return self._impl(self, value, kind, fmt, key)


def _unknown(name: str) -> str:
    return (f"unknown masking method {name!r} "
            "(expected redact, null, partial, email, hash or detect)")


_UINT_RE = re.compile(r"[0-9]{1,9}")


def _count(spec: str, what: str, raw: str) -> int:
    if not _UINT_RE.fullmatch(raw):
        raise MethodError(
            f"masking method {spec!r}: {what} must be a non-negative integer "
            f"(at most 9 digits), got {raw!r}")
    return int(raw)


def parse_method(spec: str) -> Method:
    """Parse a masking method spec such as ``"partial:0:4"``; raises :class:`MethodError`."""
    if not isinstance(spec, str):
        raise MethodError(f"masking method must be a string, got {type(spec).__name__}")
    return _parse_cached(spec)


@functools.lru_cache(maxsize=1024)
def _parse_cached(spec: str) -> Method:
    if not spec.strip():
        raise MethodError("empty masking method (expected redact, null, partial, email, "
                          "hash or detect)")
    name, colon, rest = spec.partition(":")
    if name not in _IMPLS:
        raise MethodError(_unknown(name))
    if name == "redact":
        if not colon:
            return Method("redact", spec)
        if not rest:
            raise MethodError(f"masking method {spec!r}: the redact text after ':' is empty "
                              "(write 'redact' for the default '***')")
        if "\x00" in rest:
            raise MethodError(f"masking method {spec!r}: the redact text contains a NUL "
                              "character")
        return Method("redact", spec, text=rest)
    if name == "partial":
        if not colon:
            return Method("partial", spec)
        parts = rest.split(":")
        if len(parts) == 1:
            return Method("partial", spec, last=_count(spec, "LAST", parts[0]))
        if len(parts) == 2:
            return Method("partial", spec, first=_count(spec, "FIRST", parts[0]),
                          last=_count(spec, "LAST", parts[1]))
        raise MethodError(f"masking method {spec!r}: too many parameters "
                          "(expected partial, partial:LAST or partial:FIRST:LAST)")
    if colon:
        raise MethodError(f"masking method {spec!r}: {name} takes no parameters "
                          f"(write just {name!r})")
    return Method(name, spec)


# --------------------------------------------------------------------------- detect

# IBAN: country, check digits, then 11-30 alphanumerics, either contiguous or grouped in 4s
_IBAN_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}"
    r"(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)"
    r"(?![A-Za-z0-9])")
# card: 13-19 digits, optionally separated by single spaces or dashes
_CARD_RE = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_SSN_RE = re.compile(
    r"(?<![0-9])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9])")
_EMAIL_RE = re.compile(
    r"[\w.!#$%&'*+/=?^`{|}~-]{1,64}@" + _DOMAIN + r"(?![\w-])")
_PHONE_RE = re.compile(
    r"(?<![0-9+])(?:"
    # international: +CC then groups (optionally one in parentheses)
    r"\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,5}\)?)?(?:[ .-]?[0-9]{1,6}){1,5}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567
    r"|(?:1[ .-])?(?:\([0-9]{3}\) ?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}"
    # national with trunk prefix: 020 7946 0958, (030) 1234567, 06 12 34 56 78
    r"|(?:\(0[1-9][0-9]{0,3}\) ?|0[1-9][0-9]{0,3}[ -])[0-9]{2,8}(?:[ -][0-9]{2,8}){0,4}"
    r")(?![0-9])")

_IBAN_LETTERS = {chr(c): str(c - 55) for c in range(ord("A"), ord("Z") + 1)}


def _iban_ok(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(_IBAN_LETTERS.get(c, c) for c in moved)) % 97 == 1


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(c for c in s if "0" <= c <= "9")


def _detect(s: str) -> tuple[str, int]:
    count = 0

    def iban(m: re.Match) -> str:
        nonlocal count
        text = m.group()
        # try the whole match, then drop trailing space-separated groups (the last group may
        # be a word that merely follows the IBAN)
        end = len(text)
        while True:
            cand = text[:end]
            if _iban_ok(cand.replace(" ", "")):
                count += 1
                return "[iban]" + text[end:]
            end = cand.rfind(" ")
            if end <= 4:
                return text

    def card(m: re.Match) -> str:
        nonlocal count
        if _luhn_ok(_digits(m.group())):
            count += 1
            return "[card]"
        return m.group()

    def ssn(m: re.Match) -> str:
        nonlocal count
        count += 1
        return "[ssn]"

    def email(m: re.Match) -> str:
        nonlocal count
        count += 1
        return "[email]"

    def phone(m: re.Match) -> str:
        nonlocal count
        if 9 <= len(_digits(m.group())) <= 15:
            count += 1
            return "[phone]"
        return m.group()

    has_at = "@" in s
    s = _IBAN_RE.sub(iban, s)
    s = _CARD_RE.sub(card, s)
    s = _SSN_RE.sub(ssn, s)
    if has_at:
        s = _EMAIL_RE.sub(email, s)
    s = _PHONE_RE.sub(phone, s)
    return s, count


def detect_text(s: str) -> tuple[str, int]:
    """Replace personal data inside ``s`` (see ``detect``); returns (text, matches replaced).

    When nothing matched the very same string object is returned with 0."""
    if "@" not in s and len(s) - len(s.translate(_DEL_DIGITS)) < 9:
        return s, 0
    out, n = _detect(s)
    return (out, n) if n else (s, 0)
