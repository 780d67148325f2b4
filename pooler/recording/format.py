"""One record per line: an orjson object whose last key is ``h``, the hash chain link.

Rules this module keeps:
- A record is a JSON object (orjson, compact, keys in the order built) on one line. The writer
  seals it: ``h`` = hex SHA-256 (or HMAC-SHA-256 with the recording key) of the previous
  record's ``h`` (64 hex characters, ASCII) followed by the record's bytes without ``h``.
  ``h`` is always the last key, so a reader recovers the hashed bytes by cutting the fixed-size
  suffix; nothing is ever re-serialised to be checked.
- The chain runs through every file: each file's first record (``t = "file"``) carries the last
  ``h`` of the file before (``prev``); the very first file starts from 64 zeros.
- Values that JSON cannot carry are turned into text here (bytes: UTF-8 or ``{"hex": ...}``;
  Decimal and the rest: ``str``). Secrets never reach a record: statement text has its
  ``PASSWORD '...'`` literals replaced (``redact``) before it is encoded.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import orjson

FORMAT_VERSION = 1
GENESIS = b"0" * 64
SUFFIX_LEN = len(b',"h":"') + 64 + len(b'"}')  # what seal() appends in place of the closing brace


def json_default(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return {"hex": b.hex()}
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    return str(v)


def encode(record: dict) -> bytes:
    """The record's bytes without its hash (no newline)."""
    return orjson.dumps(record, default=json_default)


def link(prev: bytes, body: bytes, key: bytes | None) -> bytes:
    """The ``h`` of ``body`` (a record's bytes without ``h``) after a record whose ``h`` is ``prev``."""
    if key:
        return hmac.digest(key, prev + body, "sha256").hex().encode()
    return hashlib.sha256(prev + body).digest().hex().encode()


def seal(body: bytes, h: bytes) -> bytes:
    """The line written: ``body`` with ``"h"`` as its last key, and a newline."""
    return body[:-1] + b',"h":"' + h + b'"}\n'


def unseal(line: bytes) -> tuple[bytes, bytes] | None:
    """(body, h) of a written line (without its newline); None if the line carries no ``h``."""
    if len(line) < SUFFIX_LEN + 2 or not line.endswith(b'"}') or line[-SUFFIX_LEN:-SUFFIX_LEN + 6] != b',"h":"':
        return None
    return line[:-SUFFIX_LEN] + b"}", line[-SUFFIX_LEN + 6:-2]


def key_id(key: bytes | None) -> str:
    """Names a recording key without revealing it (verify says which key a file needs)."""
    if not key:
        return ""
    return hashlib.sha256(b"pooler-recording-key:" + key).hexdigest()[:16]


# -- secrets: what a statement's text may carry that a recording must not

_PASSWORD_LITERAL = re.compile(
    r"""(\bPASSWORD\s+)(?:E?'(?:[^']|'')*'|\$([A-Za-z_0-9]*)\$.*?\$\2\$)""", re.IGNORECASE | re.DOTALL)
_CONNINFO_PASSWORD = re.compile(r"""(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']+)""", re.IGNORECASE)


def redact(sql: str) -> tuple[str, bool]:
    """``sql`` with password literals (``PASSWORD '...'`` of CREATE/ALTER ROLE and USER MAPPING,
    ``password=...`` in connection strings of dblink/CREATE SUBSCRIPTION) replaced by
    ``'********'``; and whether anything was replaced."""
    if "password" not in sql.lower():
        return sql, False
    out = _PASSWORD_LITERAL.sub(r"\1'********'", sql)
    out = _CONNINFO_PASSWORD.sub(r"\1********", out)
    return out, out != sql
