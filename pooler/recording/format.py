"""One record per line: an orjson object whose last key is ``h``, the hash chain link.
A statement's Bind and result may be folded into its record (``unfold``: readers see them apart).

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
  ``PASSWORD '...'`` literals replaced (``sql.secrets.redact``) before it is encoded.
"""

from __future__ import annotations

import hashlib
import hmac

import orjson

FORMAT_VERSION = 2  # 2: a stmt or bind record may carry its bind, rows and done folded in (unfold)
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
    return hashlib.sha256(prev + body).hexdigest().encode()


def seal(body: bytes, h: bytes) -> bytes:
    """The line written: ``body`` with ``"h"`` as its last key, and a newline."""
    return body[:-1] + b',"h":"' + h + b'"}\n'


def unseal(line: bytes) -> tuple[bytes, bytes] | None:
    """(body, h) of a written line (without its newline); None if the line carries no ``h``."""
    if len(line) < SUFFIX_LEN + 2 or not line.endswith(b'"}') or line[-SUFFIX_LEN:-SUFFIX_LEN + 6] != b',"h":"':
        return None
    return line[:-SUFFIX_LEN] + b"}", line[-SUFFIX_LEN + 6:-2]


# parts a stmt or bind record may carry, each standing for a record of its own kind (same
# sid, i and q): the statement's Bind, the rows the client was shown, its completion
FOLDED = (("bind", "bind"), ("shown", "rows"), ("done", "done"))


def unfold(rec: dict) -> list[dict]:
    """The records a stored record stands for. The recorder folds a statement's Bind and
    result into its ``stmt`` (or a Bind's result into its ``bind``) when they come before any
    other record of the session (docs/recordings.md); readers see the separate ``stmt``,
    ``bind``, ``rows`` and ``done`` records they stand for, numbered on from the record's
    ``i`` as the recorder numbered them."""
    if "done" not in rec and "bind" not in rec and "shown" not in rec:
        return [rec]
    t = rec.get("t")
    if t != "stmt" and t != "bind":
        return [rec]
    done = rec.get("done")
    end_ts = done.get("ts") if type(done) is dict else None
    i = rec.get("i")
    out = [rec]
    for key, kind in FOLDED:
        part = rec.pop(key, None)
        if type(part) is dict:
            # (the rows part has no time of its own: the client had them by the completion)
            sub = {"t": kind, "ts": part.get("ts", end_ts), "sid": rec.get("sid"),
                   "i": i + len(out) if type(i) is int else i, "q": rec.get("q")}
            sub.update(part)
            out.append(sub)
    return out


def key_id(key: bytes | None) -> str:
    """Names a recording key without revealing it (verify says which key a file needs)."""
    if not key:
        return ""
    return hashlib.sha256(b"pooler-recording-key:" + key).hexdigest()[:16]
