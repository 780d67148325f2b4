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
  ``PASSWORD '...'`` literals replaced (``redact``) before it is encoded.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from pglast.parser import scan

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


# -- secrets: what a statement's text may carry that a recording must not

# what may put a secret in a statement: a PASSWORD clause, a password option or connection
# string (CREATE USER MAPPING ... OPTIONS (password '...'), dblink, CREATE SUBSCRIPTION ...
# CONNECTION), a URI with user:password@
# (casefold and ``in``: a tenth of the cost of one case-insensitive regex search, which
# PostgreSQL's ASCII-only keyword folding does not need to be wider than)
def _suspect(sql: str) -> bool:
    low = sql.casefold()
    return "password" in low or "connection" in low or "://" in low


# ... and in one value (a string constant, a Bind parameter)
SECRET_VALUE = re.compile(r"password|://[^/@\s]*:[^/@\s]*@", re.IGNORECASE).search
_STRINGS = frozenset({"SCONST", "USCONST"})


_CONNINFO_PASSWORD = re.compile(r"""(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']+)""", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/@\s]*@")


def hide_in_value(text: str) -> str:
    """A value (a string constant, a parameter) with the password of a connection string
    (``password=...``) or of a URI (``user:...@``) replaced by ``********``."""
    if SECRET_VALUE(text) is None:
        return text
    return _URI_PASSWORD.sub(r"\1********@", _CONNINFO_PASSWORD.sub(r"\1********", text))


def may_hold_secret(sql: str) -> bool:
    """Whether a statement's parameters may be secrets (ALTER ROLE a PASSWORD $1, a connection)."""
    return _suspect(sql)

_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_HIDDEN = b"'********'"
UNREADABLE = "[not recorded: the statement mentions a password and could not be read]"


def redact(sql: str) -> tuple[str, bool]:
    """``sql`` with its secrets replaced by ``'********'``: the string after PASSWORD, after a
    ``password`` option name or CONNECTION, and any string that holds ``password`` or a URI's
    user:password@ (a comment that holds one is replaced too); and whether anything was
    replaced. Read with pglast's scanner, so quoting (E'', U&'', $tag$) and comments cannot
    hide a secret; a suspect statement the scanner cannot read is not kept at all."""
    if not _suspect(sql):
        return sql, False
    try:
        toks = scan(sql)
    except Exception:  # noqa: BLE001 - fail closed: a secret may be in what cannot be read
        return UNREADABLE, True
    b = sql.encode("utf-8")
    out, at, prev = [], 0, None
    for t in toks:
        name = t.name
        if name in _COMMENTS:
            if SECRET_VALUE(b[t.start:t.end + 1].decode("utf-8", "replace")):
                out += [b[at:t.start], b"/* ******** */"]
                at = t.end + 1
            continue
        if name in _STRINGS:
            word = b[prev.start:prev.end + 1].lower() if prev is not None else b""
            if word in (b"password", b'"password"', b"connection"):
                out += [b[at:t.start], _HIDDEN]
                at = t.end + 1
            else:
                text = b[t.start:t.end + 1].decode("utf-8", "replace")
                hidden = hide_in_value(text)
                if hidden != text:
                    out += [b[at:t.start], hidden.encode("utf-8")]
                    at = t.end + 1
        prev = t
    if not out:
        return sql, False
    out.append(b[at:])
    return b"".join(out).decode("utf-8"), True
