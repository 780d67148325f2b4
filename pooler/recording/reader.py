"""Recordings read back as plain dicts (the records of docs/recordings.md, as stored).

The API other tools build on (``pooler replay``, ``pooler rules test --against``); it stays as
it is, and a change is announced in docs/recordings.md:

- ``iter_events(root, since=None, until=None)``: every session record in the order written
  (file by file, line by line), ``since <= ts < until`` when given. Housekeeping records
  (``file``, ``close``, ``gap``, ``retention``) only with ``housekeeping=True``.
- ``iter_sessions(root, since=None, until=None, identity=None, database=None, group=None)``:
  one dict per session (``sid``, ``start``, ``end``, ``login``, ``logout``, ``events``), ordered
  by start, for sessions that overlap ``[since, until)`` and match the filters; each whole
  (its records before ``since`` and after ``until`` too).

With ``since``/``until`` only the files that may hold records of the range are read (their
names say when each was opened), and for sessions found there, the files before and after
them as far as those sessions go.
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
from .format import unfold

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


# records reach a file at most this long after they were made (the loop hands them over every
# 100 ms; a slow disk can queue them longer): a file opened this long after ``until`` holds none
# of the range. (Every record of a file was made before the next file was opened.)
SLACK = 300.0


def _window(files: list, lo: float | None, hi: float | None) -> tuple[int, int]:
    """Indexes ``[a, b)`` of the files (in sequence order) that may hold records with
    ``lo <= ts < hi``, from their names alone (the time each was opened, in whole seconds)."""
    a, b = 0, len(files)
    if lo is not None:
        while a + 1 < b and _opened(files[a + 1].opened) + 1 < lo:
            a += 1  # every record of this file was made before the next file was opened
    if hi is not None:
        b = a
        while b < len(files) and _opened(files[b].opened) < hi + SLACK:
            b += 1
    return a, b


def _records(f, housekeeping: bool = True) -> Iterator[dict]:
    """The records of one file, as stored (a line that does not read is skipped)."""
    try:
        lines, _ = read_lines(f.path)
    except FileNotFoundError:
        return  # removed by retention while being read
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if type(rec) is not dict:
            continue
        if not housekeeping and rec.get("t") in HOUSEKEEPING:
            continue
        yield from unfold(rec)


def iter_events(root: str | os.PathLike, since=None, until=None, *, housekeeping: bool = False) -> Iterator[dict]:
    lo, hi = to_epoch(since), to_epoch(until)
    files = list_files(root)
    a, b = _window(files, lo, hi)
    for f in files[a:b]:
        for rec in _records(f, housekeeping):
            ts = rec.get("ts")
            if lo is not None and (ts is None or ts < lo):
                continue
            if hi is not None and (ts is None or ts >= hi):
                continue
            yield rec


def _run_of(sid: str) -> str:
    return sid.rsplit(".", 1)[0]  # session ids are <gateway run>.<n>


def _add(sessions: dict[str, dict], rec: dict) -> None:
    sid = rec.get("sid")
    if sid is None:
        return
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


def _sessions(root, since=None, until=None) -> dict[str, dict]:
    """Every session with a record in the files that may hold ``[since, until)``, whole (those
    that may overlap the range): the files before them are read back (newest first) until each
    one's login is found, the files after them until each one's logout; a file of another gateway run ends the search for the
    sessions of the run it is not (a run's sessions are in its own files only)."""
    files = list_files(root)
    lo, hi = to_epoch(since), to_epoch(until)
    a, b = _window(files, lo, hi)
    sessions: dict[str, dict] = {}
    for f in files[a:b]:
        for rec in _records(f, housekeeping=False):
            _add(sessions, rec)
    # (not for a session that ended before the range, nor one that began after it: not asked for)
    need = {sid for sid, s in sessions.items()
            if s["login"] is None and not (lo is not None and s["end"] is not None and s["end"] < lo)}
    for f in reversed(files[:a]):  # their beginnings
        if not need:
            break
        earlier: dict[str, dict] = {}
        for rec in _records(f):
            if rec.get("t") == "file" and rec.get("gateway"):
                need = {sid for sid in need if _run_of(sid) == rec["gateway"]}
            elif rec.get("sid") in need:
                _add(earlier, rec)
        for sid, e in earlier.items():
            s = sessions[sid]
            s["events"][:0] = e["events"]
            s["start"] = e["start"]
            if e["login"] is not None:
                s["login"] = e["login"]
                need.discard(sid)
    open_ = {sid for sid, s in sessions.items()
             if s["logout"] is None and not (hi is not None and (s["start"] or 0.0) >= hi)}
    for f in files[b:]:  # their ends
        if not open_:
            break
        ended = set()
        for rec in _records(f):
            sid = rec.get("sid")
            if rec.get("t") == "file" and rec.get("gateway"):
                open_ = {x for x in open_ if _run_of(x) == rec["gateway"]}
            elif sid in open_:
                _add(sessions, rec)
                if rec.get("t") == "logout":
                    ended.add(sid)
        open_ -= ended
    return sessions


def iter_sessions(root: str | os.PathLike, since=None, until=None, *, identity: str | None = None,
                  database: str | None = None, group: str | None = None) -> Iterator[dict]:
    lo, hi = to_epoch(since), to_epoch(until)
    found = _sessions(root, lo, hi)
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
