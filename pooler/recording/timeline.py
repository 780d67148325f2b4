"""A recorded session as a timeline of statements, and the filters of ``pooler replay``.

Pure (records in, plain dicts out); the records are those of docs/recordings.md as
``reader.iter_sessions`` returns them.

Rules this module keeps:
- A statement is its ``stmt`` record and every record that names its ``q``: the Binds with their
  parameters, the gateway's refusal, approvals, and each result (``done``/``error``/
  ``suspended``) with the rows shown to the client before it and the masks applied to it. A
  multi-statement simple Query has one statement and several results.
- Nothing is invented: a field the recording does not hold is ``None`` (or empty), never a guess.
- The decision filter reads what the rules decided (``action``); ``refused`` and ``error`` read
  what happened (the gateway refused it / the server answered with an error).
- Times are epoch seconds (UTC); ``parse_when`` reads what people type (ISO-8601, ``today``,
  ``yesterday``, ``last tuesday``, ``3h ago``).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone

from .reader import to_epoch

DECISIONS = ("allow", "deny", "mask", "require_approval", "refused", "error", "none")
_RESULTS = ("done", "error", "suspended")


def statement_text(rec: dict) -> str:
    """What a ``stmt`` record (or a statement of ``statements``) shows as its text: the SQL, or
    for a Bind or Describe the gateway refused (no text of its own) the names it gave."""
    sql = rec.get("sql") or ""
    if sql or rec.get("kind") not in ("B", "D"):
        return sql
    names = [f'{k} "{rec[k]}"' for k in ("stmt", "portal") if rec.get(k) is not None]
    return f"({'Bind' if rec.get('kind') == 'B' else 'Describe'}{': ' if names else ''}{', '.join(names)})"


def statements(session: dict) -> list[dict]:
    """The session's statements in the order sent, each a dict: ``sid``, ``q``, ``ts``, ``kind``,
    ``route``, ``sql``, ``redacted``, ``action``, ``rule``, ``reason``, ``masks``, ``gateway`` (refused
    by the gateway before the rules decided: ``action`` deny, ``rule`` gateway; for a Bind or
    Describe also ``stmt`` and ``portal``, the names it gave, else None), ``binds`` (lists
    of parameters), ``refused`` (``{sqlstate, message}`` or None), ``holds``, ``results`` (each
    ``{"t", "ts", "tag", "rows", "bytes", "dur", "sqlstate", "message", "shown", "truncated",
    "masked"}``), ``notices`` (``{severity, sqlstate, message}`` the server sent while answering),
    ``canceled`` (a cancel request arrived while it was the last statement)."""
    out: list[dict] = []
    by_q: dict[int, dict] = {}
    pending_rows: dict = {}
    last: dict | None = None
    sid = session.get("sid")
    for ev in session.get("events", ()):
        t = ev.get("t")
        q = ev.get("q")
        if t == "stmt":
            st = {"sid": sid, "q": q, "ts": ev.get("ts"), "kind": ev.get("kind"), "route": ev.get("route"),
                  "sql": ev.get("sql", ""), "redacted": bool(ev.get("redacted")), "action": ev.get("action"),
                  "rule": ev.get("rule") or "", "reason": ev.get("reason") or "",
                  "masks": [list(m) for m in ev.get("masks") or ()], "gateway": bool(ev.get("gateway")),
                  "stmt": ev.get("stmt"), "portal": ev.get("portal"), "binds": [], "refused": None, "holds": [],
                  "results": [], "notices": [], "canceled": False}
            out.append(st)
            if q is not None:
                by_q[q] = st
            last = st
            continue
        st = by_q.get(q) if q is not None else None
        if t == "bind":
            if st is not None:
                st["binds"].append(ev.get("params") or [])
        elif t == "refused":
            if st is not None and st["refused"] is None:
                st["refused"] = {"sqlstate": ev.get("sqlstate"), "message": ev.get("message"), "ts": ev.get("ts")}
        elif t == "held":
            if st is not None:
                st["holds"].append({"request": ev.get("request"), "rule": ev.get("rule"), "reason": ev.get("reason"),
                                    "state": None, "by": None, "outcome": None, "ts": ev.get("ts")})
        elif t == "hold_ended":
            if st is not None:
                h = next((h for h in st["holds"] if h["request"] == ev.get("request")), None)
                if h is None:
                    h = {"request": ev.get("request"), "rule": None, "reason": None, "ts": ev.get("ts")}
                    st["holds"].append(h)
                h.update(state=ev.get("state"), by=ev.get("by"), outcome=ev.get("outcome"))
        elif t == "rows":
            pending_rows[q] = ev
        elif t in _RESULTS:
            shown = pending_rows.pop(q, None)
            res = {"t": t, "ts": ev.get("ts"), "tag": ev.get("tag"), "rows": ev.get("rows"), "bytes": ev.get("bytes"),
                   "dur": ev.get("dur"), "sqlstate": ev.get("sqlstate"), "message": ev.get("message"),
                   "shown": shown.get("rows") if shown else None,
                   "truncated": bool(shown.get("truncated")) if shown else False, "masked": None}
            if st is not None:
                st["results"].append(res)
        elif t == "masked":
            if st is not None and st["results"]:
                st["results"][-1]["masked"] = [list(c) for c in ev.get("columns") or ()]
        elif t == "notice":
            if st is not None:
                st["notices"].append({"severity": ev.get("severity"), "sqlstate": ev.get("sqlstate"),
                                      "message": ev.get("message"), "ts": ev.get("ts")})
        elif t == "cancel":
            if last is not None:
                last["canceled"] = True
    return out


def summary(session: dict) -> dict:
    """One line of ``pooler replay list``: who, where, when, and what happened in figures."""
    login = session.get("login") or {}
    logout = session.get("logout") or {}
    stmts = statements(session)
    return {
        "sid": session.get("sid"), "start": session.get("start"), "end": session.get("end"),
        "live": session.get("logout") is None, "user": login.get("user"), "groups": login.get("groups") or [],
        "database": login.get("database"), "app": login.get("app"), "client": login.get("client"),
        "auth": login.get("auth"), "tls": login.get("tls"), "mode": login.get("mode"),
        "statements": len(stmts),
        "denied": sum(1 for s in stmts if s["action"] == "deny"),
        "masked": sum(1 for s in stmts if s["action"] == "mask"),
        "held": sum(1 for s in stmts if s["holds"]),
        "refused": sum(1 for s in stmts if s["refused"] is not None),
        "errors": sum(1 for s in stmts for r in s["results"] if r["t"] == "error"),
        "missing": missing_records(session),
        "reason": logout.get("reason"),
    }


def missing_records(session: dict) -> int:
    """Records of the session that are not there: its records count from 0 without gaps (``i``)."""
    seen = [e.get("i") for e in session.get("events", ()) if isinstance(e.get("i"), int)]
    if not seen:
        return 0
    return max(seen) + 1 - len(set(seen))


# ---------------------------------------------------------------------------- filters


def tables_of(sql: str, cache: dict | None = None) -> tuple[str, ...] | None:
    """The relations a statement reads or writes (qualified, as the rules see them), or None if
    the text cannot be analyzed."""
    if cache is not None and sql in cache:
        return cache[sql]
    from ..sql.analyzer import analyze

    try:
        found: dict[str, None] = {}
        for f in analyze(sql, ("public",)):
            g = f
            while g is not None:
                found.update(dict.fromkeys(g.tables))
                found.update(dict.fromkeys(g.tables_written))
                g = g.inner
        got: tuple[str, ...] | None = tuple(found)
    except Exception:  # noqa: BLE001 - AnalysisError or an analyzer bug: the caller searches the text
        got = None
    if cache is not None:
        cache[sql] = got
    return got


def _table_matches(wanted: str, sql: str, cache: dict) -> bool:
    wanted = wanted.lower()
    tables = tables_of(sql, cache)
    if tables is None:  # text PostgreSQL's grammar does not read: look for the name itself
        name = re.escape(wanted.rpartition(".")[2])
        return re.search(rf"(?<![\w$]){name}(?![\w$])", sql, re.IGNORECASE) is not None
    for t in tables:
        t = t.lower()
        if t == wanted or t.rpartition(".")[2] == wanted:
            return True
    return False


def decision_of(st: dict) -> set[str]:
    """The names ``--decision`` matches for one statement."""
    got = {st["action"] or "none"}
    if st["refused"] is not None:
        got.add("refused")
    if any(r["t"] == "error" for r in st["results"]):
        got.add("error")
    return got


class Filter:
    """What ``pooler replay list`` and ``statements`` select; every given criterion must hold."""

    def __init__(self, *, identity=None, group=None, database=None, since=None, until=None, decision=None,
                 rule=None, text=None, table=None) -> None:
        self.identity, self.group, self.database = identity, group, database
        self.since, self.until = to_epoch(since), to_epoch(until)
        self.decision = decision
        self.rule = rule
        self.text = text.lower() if text else None
        self.table = table
        self._tables: dict = {}

    @property
    def per_statement(self) -> bool:
        return any(x is not None for x in (self.decision, self.rule, self.text, self.table))

    def reader_args(self) -> dict:
        return {"since": self.since, "until": self.until, "identity": self.identity, "database": self.database,
                "group": self.group}

    def statement(self, st: dict) -> bool:
        ts = st["ts"] or 0.0
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts >= self.until:
            return False
        if self.decision is not None and self.decision not in decision_of(st):
            return False
        if self.rule is not None and self.rule not in st["rule"]:
            return False
        if self.text is not None:
            hay = [st["sql"], st["reason"]]
            if st["refused"]:
                hay.append(st["refused"]["message"] or "")
            hay += [r["message"] or "" for r in st["results"]]
            if not any(self.text in h.lower() for h in hay):
                return False
        if self.table is not None and not _table_matches(self.table, st["sql"], self._tables):
            return False
        return True

    def session(self, session: dict) -> bool:
        """A session is listed when it matches and, with statement criteria, has a matching statement."""
        if not self.per_statement:
            return True
        return any(self.statement(st) for st in statements(session))


# ---------------------------------------------------------------------------- times people type

_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)\s+ago$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def day_start(text: str, now: float | None = None) -> float | None:
    """The UTC midnight that begins the day ``text`` names (``today``, ``yesterday``,
    ``tuesday``/``last tuesday``: the most recent one before today; ``2026-12-01``), or None."""
    now = time.time() if now is None else now
    today = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    s = " ".join(text.lower().split())
    if s == "today":
        return today.timestamp()
    if s == "yesterday":
        return (today - timedelta(days=1)).timestamp()
    name = s.removeprefix("last ")
    if name in _WEEKDAYS:
        back = (today.weekday() - _WEEKDAYS.index(name)) % 7 or 7
        return (today - timedelta(days=back)).timestamp()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
        return datetime.strptime(s, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
    return None


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds of ``text``: a day (see ``day_start``: its midnight, UTC), ``N{s,m,h,d,w} ago``,
    epoch seconds, or ISO-8601 (naive = UTC). Raises ValueError naming what it could not read."""
    now = time.time() if now is None else now
    s = " ".join(text.lower().split())
    d = day_start(s, now)
    if d is not None:
        return d
    mt = _AGO.match(s)
    if mt is not None:
        return now - float(mt.group(1)) * _UNIT[mt.group(2)[0]]
    try:
        return float(s)
    except ValueError:
        pass
    try:
        return to_epoch(text)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time (ISO-8601, a day such as 'yesterday' or "
                         "'last tuesday', or 'N hours ago')") from None
