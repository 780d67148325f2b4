"""Recordings read back as plain dicts (the records of docs/recordings.md, as stored).

The API other tools build on (``pooler replay``, ``pooler rules test --against``); it stays as
it is, and a change is announced in docs/recordings.md:

- ``iter_events(root, since=None, until=None)``: every session record in the order written
  (file by file, line by line), ``since <= ts < until`` when given. Housekeeping records
  (``file``, ``close``, ``gap``, ``retention``) only with ``housekeeping=True``.
- ``iter_sessions(root, since=None, until=None, identity=None, database=None, group=None)``:
  one dict per session (``sid``, ``start``, ``end``, ``login``, ``logout``, ``events``), ordered
  by start, for sessions that overlap ``[since, until)`` and match the filters.
- ``read_session(root, sid)``: one session's dict, or None.

``since``/``until`` take epoch seconds (int/float), an aware or naive-UTC ``datetime``, or an
ISO-8601 string. Reading never checks the hash chain (``verify`` does): a damaged line is
skipped, and a file cut off at its end yields the records before the cut.
"""

from __future__ import annotations

import calendar
import os
import time
from datetime import datetime, timezone
from typing import Iterator

import orjson

from .files import list_files, read_lines

HOUSEKEEPING = frozenset(("file", "close", "gap", "retention"))


def to_epoch(t) -> float | None:
    """Epoch seconds of ``t`` (number, datetime, ISO-8601 text; naive means UTC); None stays None."""
    if t is None:
        return None
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, str):
        t = datetime.fromisoformat(t.strip().replace("Z", "+00:00"))
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.timestamp()
    raise TypeError(f"not a time: {t!r}")


def _opened(name_time: str) -> float:
    return float(calendar.timegm(time.strptime(name_time, "%Y%m%dT%H%M%SZ")))


def iter_events(root: str | os.PathLike, since=None, until=None, *, housekeeping: bool = False) -> Iterator[dict]:
    lo, hi = to_epoch(since), to_epoch(until)
    files = list_files(root)
    for i, f in enumerate(files):
        if hi is not None and _opened(f.opened) >= hi + 1:
            break
        if lo is not None and i + 1 < len(files) and _opened(files[i + 1].opened) + 1 < lo:
            continue  # every record of this file is older than the next file's opening
        try:
            lines, _ = read_lines(f.path)
        except FileNotFoundError:
            continue  # removed by retention while being read
        for line in lines:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if type(rec) is not dict:
                continue
            if not housekeeping and rec.get("t") in HOUSEKEEPING:
                continue
            ts = rec.get("ts")
            if lo is not None and (ts is None or ts < lo):
                continue
            if hi is not None and (ts is None or ts >= hi):
                continue
            yield rec


def _sessions(root, since=None, until=None) -> dict[str, dict]:
    sessions: dict[str, dict] = {}
    for rec in iter_events(root):
        sid = rec.get("sid")
        if sid is None:
            continue
        s = sessions.get(sid)
        if s is None:
            s = sessions[sid] = {"sid": sid, "start": rec.get("ts"), "end": None, "login": None,
                                 "logout": None, "events": []}
        s["events"].append(rec)
        t = rec.get("t")
        if t == "login":
            s["login"] = rec
            s["start"] = rec.get("ts")
        elif t == "logout":
            s["logout"] = rec
            s["end"] = rec.get("ts")
    return sessions


def iter_sessions(root: str | os.PathLike, since=None, until=None, *, identity: str | None = None,
                  database: str | None = None, group: str | None = None) -> Iterator[dict]:
    lo, hi = to_epoch(since), to_epoch(until)
    found = _sessions(root)
    for s in sorted(found.values(), key=lambda s: (s["start"] or 0.0, s["sid"])):
        last = s["end"] if s["end"] is not None else (s["events"][-1].get("ts") or s["start"])
        if lo is not None and (last or 0.0) < lo:
            continue
        if hi is not None and (s["start"] or 0.0) >= hi:
            continue
        login = s["login"] or {}
        if identity is not None and login.get("user") != identity:
            continue
        if database is not None and login.get("database") != database:
            continue
        if group is not None and group not in (login.get("groups") or ()):
            continue
        yield s


def read_session(root: str | os.PathLike, sid: str) -> dict | None:
    return _sessions(root).get(sid)
