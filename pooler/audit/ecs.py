"""Audit documents with Elastic Common Schema field names, so that a SIEM maps them without glue.

Rules this module keeps:
- The field names are a contract (docs/audit.md lists every one): ECS where ECS has a field
  (``@timestamp``, ``event.*``, ``user.name``, ``user.roles``, ``source.*``, ``client.*``,
  ``rule.*``, ``error.*``, ``tls.*``, ``observer.*``, ``message``), OpenTelemetry's ``db.*`` for
  the database, ``pooler.*`` for what neither names. Empty values are left out.
- No secret ever enters a document: statement text is normalized (every constant replaced by a
  ``$n`` placeholder, so ``ALTER ROLE ... PASSWORD '...'`` and the values in WHERE clauses never
  leave), passwords and tokens are never handed to this module, values of secret settings are
  replaced by ``********`` before they get here.
- Pure: no I/O; one ``orjson.dumps`` per document.
"""

from __future__ import annotations

import os
import re
import socket
import time

import orjson
from pglast.parser import ParseError, fingerprint, normalize, scan

from .. import __version__

ECS_VERSION = "8.11.0"
DATASET = "pooler.audit"
HOSTNAME = socket.gethostname()
PID = os.getpid()

# syslog severities (RFC 5424): what a SIEM sorts alerts by
NOTICE, WARNING, INFO = 5, 4, 6

_OBSERVER = {"type": "proxy", "product": "pooler", "vendor": "pooler", "version": __version__, "hostname": HOSTNAME}
_NORMALIZED: dict[str, tuple[str | None, str | None]] = {}


_second: list = [None, ""]  # the last whole second formatted, and its text (strftime costs ~5-10 us)


def timestamp(wall: float) -> str:
    """RFC 3339 / ISO 8601 in UTC with milliseconds, as ECS and RFC 5424 both take it."""
    sec = int(wall)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int(wall * 1000) % 1000:03d}Z"


STATEMENT_MAX = 4096  # characters of statement text in a document (a syslog datagram holds ~64 KB)


def statement(sql: str) -> tuple[str | None, str | None]:
    """(normalized text, fingerprint) of a statement; (None, None) when it cannot be parsed (the
    raw text is never used instead: it could hold a secret). Text past STATEMENT_MAX characters
    is cut and ends with `` …[N more characters]``."""
    got = _NORMALIZED.get(sql)
    if got is None:
        try:
            text = _no_constants(normalize(sql))
            if len(text) > STATEMENT_MAX:
                text = f"{text[:STATEMENT_MAX]} …[{len(text) - STATEMENT_MAX} more characters]"
            got = (text, fingerprint(sql))
        except (ParseError, ValueError, TypeError):
            got = (None, None)
        if len(sql) <= 20_000:  # a huge statement is not kept (the cache holds 2,000 texts)
            if len(_NORMALIZED) >= 2000:
                _NORMALIZED.clear()
            _NORMALIZED[sql] = got
    return got


# tokens that may carry a value or a secret: pglast's normalize leaves the constants of utility
# statements (CREATE SERVER ... OPTIONS (password '...'), ALTER ROLE ... SET, COPY ... PROGRAM,
# PREPARE, COMMENT ... IS) and every comment in place
_CONSTANT_TOKENS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_PARAM = re.compile(r"\$(\d+)")


def _no_constants(text: str) -> str:
    """``text`` with every constant left by normalize replaced by a ``$n`` of its own and every
    comment dropped (ValueError when it cannot be scanned: then nothing is shown)."""
    toks = [t for t in scan(text) if t.name in _CONSTANT_TOKENS or t.name in _COMMENT_TOKENS]
    if not toks:
        return text
    b = text.encode("utf-8")
    n = max((int(x) for x in _PARAM.findall(text)), default=0)
    out, at = [], 0
    for t in toks:  # scan's offsets are bytes, end inclusive
        out.append(b[at:t.start])
        if t.name in _CONSTANT_TOKENS:
            n += 1
            out.append(f"${n}".encode())
        at = t.end + 1
    out.append(b[at:])
    return b"".join(out).decode("utf-8").strip()


def endpoint(addr: str) -> dict:
    """``source``/``client`` of a session address ("ip:port", "[v6]:port" or "unix")."""
    if not addr:
        return {}
    if addr == "unix":
        return {"address": "unix"}
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    out: dict = {"address": host, "ip": host}
    if port.isdigit():
        out["port"] = int(port)
    return out


def document(action: str, category: list[str], types: list[str], outcome: str, message: str, *,
             severity: int = INFO, reason: str = "", when: float | None = None, **fields) -> dict:
    """One audit document. ``fields`` are top-level objects (user=..., source=..., db=...); None
    and empty values are dropped."""
    doc: dict = {
        "@timestamp": timestamp(time.time() if when is None else when),
        "ecs": {"version": ECS_VERSION},
        "event": {"kind": "event", "category": category, "type": types, "action": action, "outcome": outcome,
                  "dataset": DATASET, "module": "pooler", "severity": severity},
        "message": message,
        "observer": _OBSERVER,
    }
    if reason:
        doc["event"]["reason"] = reason
    for key, value in fields.items():
        if type(value) is dict:
            value = _pruned(value)
        elif _empty(value):
            continue
        if value is not None:
            doc[key] = value
    return doc


_EMPTY_TYPES = (str, list, tuple)


def _empty(x) -> bool:
    return x is None or (not x and type(x) in _EMPTY_TYPES)


def _pruned(d: dict) -> dict | None:
    out = {}
    for k, x in d.items():
        if type(x) is dict:
            x = _pruned(x)
            if x is None:
                continue
        elif x is None or (not x and type(x) in _EMPTY_TYPES):
            continue
        out[k] = x
    return out or None


def dumps(doc: dict) -> bytes:
    return orjson.dumps(doc)
