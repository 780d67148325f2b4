"""The recorder: the gateway's events turned into session records (docs/recordings.md), handed
in chunks to the writer: a thread of the gateway (recording/writer.py, ``record_writer = thread``,
the default) or a child process (recording/process.py, ``record_writer = process``); both run the
same ``Writer``.

Rules this module keeps:
- On the event loop only: build a small dict, encode it (orjson, well under a microsecond),
  append the bytes to one buffer. Every 100 ms (or at 1,000 records) the buffer goes to the
  writer whole. Nothing here waits for a disk, nor for the writer process.
- What a record holds is what the client sent and what it was shown: rows come from the bytes
  forwarded to the client, after masking (events.row); statement text has password literals cut
  out (sql.secrets.redact); login secrets are never among the fields read.
- ``record_failure = block``: while the writer reports that it cannot write, the gateway's
  ``record_block`` holds the refusal every new statement gets (governor.py); it is updated on
  the same 100 ms tick, and logged when it starts and ends.
- Records of a session carry ``sid`` and ``i`` (0, 1, 2, ... without gaps), statement records
  ``q``. Results are matched to statements in the order they were sent (``_Sess.pending``).
- A session's last stmt or bind record stays open (``_Sess.open``, not yet encoded) until its
  result folds into it (one line per quick statement: docs/recordings.md, "Folded records"),
  the session's next record is made, or the 100 ms tick hands everything over.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import struct
import time

import orjson

from ..approvals.present import bind_parts
from ..config import fsync_interval
from ..recording.format import json_default
from ..sql.secrets import hide_in_value, may_hold_secret, redact
from ..recording.process import WriterProcess
from ..recording.writer import Writer
from .events import Observer

log = logging.getLogger("pooler.recording")

TICK = 0.1  # seconds between hand-overs to the writer
CHUNK = 1000  # ... or sooner, at this many records
_I16 = struct.Struct("!h").unpack_from
_I32 = struct.Struct("!i").unpack_from
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_now = time.time
_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE
_PLAIN_START = frozenset("SsIiUuDdWwBbVvTtMmAaRrLlFfPpNnGgOoHh")  # first letters that are neither EXECUTE nor COPY (nor a comment)
_ROUTE = re.compile(r"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*(execute|copy)\b", re.IGNORECASE | re.DOTALL)


class _Sess:
    __slots__ = ("sid", "i", "q", "pending", "names", "secret_names", "rows", "row_bytes", "rows_cut", "last_q",
                 "statements", "errors", "refused", "rows_total", "received", "started", "open")

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.i = 0
        self.q = 0
        self.pending: collections.deque = collections.deque()  # [q, simple?, answered?] of executions sent
        self.names: dict[bytes, int] = {}  # prepared statement name -> q of its Parse
        self.secret_names: set[bytes] = set()  # ... those whose text held a secret: their parameters are hidden
        self.rows: list | None = None  # rows of the result streaming now
        self.row_bytes = 0
        self.rows_cut = False
        self.last_q = 0
        self.statements = self.errors = self.refused = self.rows_total = 0
        self.received = 0
        self.started = time.monotonic()
        self.open: dict | None = None  # the last stmt or bind record, not yet encoded: its result may fold into it


def _value(v: bytes | None, binary: bool):
    if v is None:
        return None
    if not binary:
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"hex": v.hex()}


def _route(kind: str, sql: str) -> str:
    """How a statement came: ``simple``, ``extended``, ``execute`` (SQL-level EXECUTE), ``copy``,
    ``function`` (a FunctionCall message)."""
    if kind == "F":
        return "function"
    route = "simple" if kind == "Q" else "extended"
    if sql[:1] not in _PLAIN_START:  # EXECUTE or COPY (perhaps after comments or blanks)
        mt = _ROUTE.match(sql)
        if mt is not None:
            route = mt.group(1).lower()
    return route


def _text_or_hex(v: bytes):
    """A value as text if it reads as PostgreSQL's text output (UTF-8, no control characters
    but tab and newlines), else ``{"hex": ...}`` (binary-format values)."""
    try:
        s = v.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": v.hex()}
    if not s.isprintable() and _CONTROL.search(s) is not None:  # (isprintable: the quick common answer)
        return {"hex": v.hex()}
    return s


def _row_values(body: bytes) -> tuple[list, int]:
    """A DataRow body -> its values (text as str, NULL as None) and their bytes."""
    (n,) = _I16(body, 0)
    pos = 2
    out = []
    size = 0
    for _ in range(n):
        (ln,) = _I32(body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
            continue
        out.append(_text_or_hex(body[pos : pos + ln]))
        pos += ln
        size += ln
    return out, size


# the compiled twin (pooler/masking/_rows.pyx, built where a C compiler is found): the Python
# above stays the definition; tests/test_recording_rows_compiled.py demands the same values
# from both. POOLER_PURE_PYTHON=1 keeps the Python path.
python_row_values = _row_values
compiled_row_values = None
if not os.environ.get("POOLER_PURE_PYTHON"):
    try:
        from ..masking._rows import row_values as compiled_row_values, set_row_twin
    except ImportError:
        pass
    else:
        set_row_twin(python_row_values)
        _row_values = compiled_row_values


class Recorder(Observer):
    """Subscribed while ``record_dir`` is set."""

    # a bug here is logged and blocks statements (observer_failed), never breaks a session: the
    # hub guards the rarer events, the per-statement ones guard themselves (one call less each)
    self_guarded = frozenset(("decided", "bound", "row", "completed", "ready"))

    def __init__(self, gw) -> None:
        self.gw = gw
        cfg = gw.config
        self.run_id = os.urandom(4).hex()
        kind = WriterProcess if cfg.record_writer == "process" else Writer
        self.writer = kind(cfg.resolve(cfg.record_dir), gateway=self.run_id, rotate_size=cfg.record_rotate_size,
                             rotate_age=cfg.record_rotate_age, retention_days=cfg.record_retention_days,
                             retention_size=cfg.record_retention_size, compression=cfg.record_compression,
                             fsync=fsync_interval(cfg.record_fsync), key=cfg.record_key or None)
        self.buf = bytearray()  # records encoded, newline-terminated, not yet handed over
        self.nbuf = 0  # how many
        self.live: dict[object, _Sess] = {}
        self._n = 0
        self._timer: asyncio.TimerHandle | None = None
        self.stopped = False
        self.blocked_since = 0.0
        self.broken: str | None = None  # a record could not be made (a bug): as a write failure
        self._poll = None
        self._opens: list[_Sess] = []  # sessions that may have an open record (_open)

    @property
    def rows_wanted(self) -> int:  # events.row: rows of each result we want
        return self.gw.config.record_results

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer (raises OSError if record_dir cannot be used) and the tick."""
        self.writer.start()
        log.info("recording sessions to %s (file %s, chain %s)", self.writer.root, self.writer._seq + 1,
                 "hmac-sha256" if self.writer.key else "sha256")
        self._poll = getattr(self.writer, "poll", None)  # the process's: its reports, its death
        self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)

    def stop(self) -> None:
        """Sessions still open get a logout record; everything is written; the file is closed."""
        if self.stopped:
            return
        for s, st in list(self.live.items()):
            self._logout(s, st, "the gateway stopped")
        self.live.clear()
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()
        self.writer.stop()

    def _tick(self) -> None:
        try:
            self._flush()
            if self._poll is not None:
                self._poll()
        except Exception as e:  # noqa: BLE001 - a hand-over that fails is a recording failure, never silent
            log.exception("recordings: the hand-over to the writer failed")
            self.broken = f"the recorder failed handing records over ({type(e).__name__}); see the log"
        finally:
            if not self.stopped:
                self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
        self._check_failure()

    def _flush(self) -> None:
        """Everything made so far to the writer: the open records too."""
        if self._opens:
            self._flush_opens()
        self._handover()

    def _handover(self) -> None:
        if self.nbuf:
            buf, n = self.buf, self.nbuf
            self.buf, self.nbuf = bytearray(), 0
            self.writer.submit(buf, n)

    def observer_failed(self, event: str, exc: BaseException) -> None:
        """A record could not be made: with record_failure = block nothing runs from now on
        (at once, not at the next tick), as when records cannot be written."""
        self.broken = f"the recorder failed on {event} ({type(exc).__name__}); see the log"
        self._check_failure()

    def _check_failure(self) -> None:
        why = self.writer.failing or self.broken or self.writer.behind()
        gw = self.gw
        if why is not None and gw.config.record_failure == "block":
            if gw.record_block is None:
                log.error("statements are refused until recordings can be written again (record_failure = block)")
                self.blocked_since = time.time()
            gw.record_block = ("refused by the gateway: session recordings cannot be written "
                               f"(record_failure = block): {why}")
        elif gw.record_block is not None:
            gw.record_block = None
            log.warning("recordings are written again: statements are accepted (blocked %.1fs)",
                        time.time() - self.blocked_since)

    def _emit(self, rec: dict) -> None:
        if self.stopped:
            return
        # one growing buffer: appending the encoded bytes there costs a fraction of keeping one
        # bytes object per record alive (measured: 0.45 us against 2-2.8 us per record)
        self.buf += _dumps(rec, default=json_default, option=_NEWLINE)
        self.nbuf += 1
        if self.nbuf >= CHUNK:
            self._handover()

    def _open(self, st: _Sess, rec: dict) -> None:
        """``rec`` (a stmt or bind record) waits for its result to fold into it: it is encoded
        when the result comes, when the session's next record is made, or at the next tick,
        whichever is first (so a statement still running is written within 100 ms)."""
        if st.open is not None:
            self._emit(st.open)
        st.open = rec
        self._opens.append(st)

    def _close_open(self, st: _Sess) -> None:
        rec = st.open
        if rec is not None:
            st.open = None
            self._emit(rec)

    def _flush_opens(self) -> None:
        opens, self._opens = self._opens, []
        for st in opens:
            rec = st.open
            if rec is not None:
                st.open = None
                self._emit(rec)

    def _guard_failed(self, event: str, exc: Exception) -> None:
        log.exception("recordings: the recorder failed on %s", event)
        self.observer_failed(event, exc)

    def _rec(self, st: _Sess, t: str, **fields) -> None:
        """A session record of the rarer kinds (the hot ones build their dict in place)."""
        self._close_open(st)
        rec = {"t": t, "ts": _now(), "sid": st.sid, "i": st.i}
        st.i += 1
        rec.update(fields)
        self._emit(rec)

    # ------------------------------------------------------------------ events
    #
    # The per-statement events (self_guarded) are called without the hub's guard: each catches
    # its own exceptions (try/except costs nothing until it raises) and tells observer_failed,
    # as the hub does for the others.

    def login(self, s) -> None:
        if s.console:
            return
        self._n += 1
        st = self.live[s] = _Sess(f"{self.run_id}.{self._n}")
        pool = s.pool
        self._rec(st, "login", client=s.addr, tls=bool(s.tls), user=s.user, login_name=s.login_name,
                  groups=list(s.groups), auth=s.auth_method, database=s.database, app=s.app_name,
                  upstream_user=pool.server_user if pool is not None else None, mode=s.mode,
                  search_path=list(s.governor.search_path))  # (what the rules saw: a login's options may set it)

    def login_failed(self, s, reason: str) -> None:
        self._emit({"t": "login_failed", "ts": _now(), "client": s.addr,
                    "user": s.login_name or s.user, "database": s.database, "reason": reason})

    def decided(self, s, kind: str, sql: str, d) -> None:
        try:
            st = self.live.get(s)
            if st is None:
                return
            st.q = q = st.q + 1
            st.statements += 1
            route = _route(kind, sql)
            suspect = may_hold_secret(sql)  # (one look serves both: redact and the parameters)
            text, redacted = redact(sql) if suspect else (sql, False)
            i = st.i
            st.i = i + 1
            if d is None:
                rec = {"t": "stmt", "ts": _now(), "sid": st.sid, "i": i, "q": q, "kind": kind, "route": route,
                       "sql": text, "action": None, "rule": "", "reason": "", "masks": []}
            else:
                rec = {"t": "stmt", "ts": _now(), "sid": st.sid, "i": i, "q": q, "kind": kind, "route": route,
                       "sql": text, "action": d.action, "rule": d.rule, "reason": d.reason,
                       "masks": [list(x) for x in d.masks]}
            if redacted:
                rec["redacted"] = True
            self._open(st, rec)
            if kind == "Q":
                st.pending.append([q, True, False])
            else:
                name = s.governor.parse_name
                st.names[name] = q
                if suspect:
                    st.secret_names.add(name)
                else:
                    st.secret_names.discard(name)
        except Exception as e:  # noqa: BLE001
            self._guard_failed("decided", e)

    def bound(self, s, data: bytes, pos: int, end: int) -> None:
        try:
            st = self.live.get(s)
            if st is None:
                return
            try:
                portal, stmt, values, formats = bind_parts(data[pos + 5 : end])
            except (ValueError, IndexError, struct.error):
                return  # a malformed Bind: the server refuses it
            cap = self.gw.config.record_result_bytes
            params, size, cut = [], 0, False
            secret = stmt in st.secret_names  # PASSWORD $1, dblink_connect($1) after a password= ...
            for v, f in zip(values, formats):
                if v is not None:
                    size += len(v)
                    if size > cap:
                        cut = True
                        break
                p = _value(v, f == 1)
                if v is not None:
                    if secret:
                        p = "********"
                    elif type(p) is str:
                        p = hide_in_value(p)
                params.append(p)
            q = st.names.get(stmt)
            op = st.open
            if op is not None and op["t"] == "stmt" and op["q"] == q and "bind" not in op:
                # the Bind of the statement just parsed (Parse, Bind, Execute): folded into its record
                part = {"ts": _now(), "stmt": stmt.decode("utf-8", "replace"),
                        "portal": portal.decode("utf-8", "replace"), "params": params}
                if cut:
                    part["truncated"] = True
                op["bind"] = part
                st.i += 1  # (a folded part keeps the number it would have had as a record)
            else:
                rec = {"t": "bind", "ts": _now(), "sid": st.sid, "i": st.i, "q": q,
                       "stmt": stmt.decode("utf-8", "replace"), "portal": portal.decode("utf-8", "replace"),
                       "params": params}
                st.i += 1
                if cut:
                    rec["truncated"] = True
                self._open(st, rec)
            st.pending.append([q, False, False])
        except Exception as e:  # noqa: BLE001
            self._guard_failed("bound", e)

    def refused(self, s, sqlstate: str, message: str, what) -> None:
        st = self.live.get(s)
        if st is None:
            return
        self._close_open(st)  # (before the stmt record a refusal before any decision makes)
        st.refused += 1
        if what.decided:
            # a refused Query gets no result from a server: its entry must not take the result of
            # the statement after it (a refusal comes right after the decision of its message)
            pending = st.pending
            if pending and pending[-1][0] == st.q and pending[-1][1] and not pending[-1][2]:
                pending.pop()
            q = st.q or None
        else:
            # refused before the rules decided (no stmt record): recorded here as its own
            # statement, so that the refusal is not taken for the previous statement's
            st.q = q = st.q + 1
            st.statements += 1
            text, redacted = redact(what.sql)
            rec = {"t": "stmt", "ts": _now(), "sid": st.sid, "i": st.i, "q": q, "kind": what.kind,
                   "route": _route(what.kind, what.sql), "sql": text, "action": "deny", "rule": "gateway",
                   "reason": message, "masks": [], "gateway": True}
            if what.stmt is not None or what.portal is not None:  # a Bind or a Describe: what it names
                if what.stmt is not None:
                    rec["stmt"] = what.stmt.decode("utf-8", "replace")
                if what.portal is not None:
                    rec["portal"] = what.portal.decode("utf-8", "replace")
            st.i += 1
            if redacted:
                rec["redacted"] = True
            self._emit(rec)
        self._rec(st, "refused", q=q, sqlstate=sqlstate, message=message)

    def held(self, s, req) -> None:
        st = self.live.get(s)
        if st is not None:
            self._rec(st, "held", q=st.q or None, request=req.id, rule=req.rule, reason=req.reason)

    def hold_ended(self, s, req) -> None:
        st = self.live.get(s)
        if st is not None:
            by = req.decided_by or ",".join(r for r, _ in req.approvals)
            self._rec(st, "hold_ended", q=st.q or None, request=req.id, state=req.state, by=by,
                      outcome=req.outcome)

    def row(self, s, srv, body) -> None:
        try:
            st = self.live.get(s)
            if st is None:
                return
            if st.rows is None:
                st.rows, st.row_bytes, st.rows_cut = [], 0, False
            if body is None or st.rows_cut:
                st.rows_cut = True
                return
            values, size = _row_values(body)
            if st.row_bytes + size > self.gw.config.record_result_bytes:
                st.rows_cut = True
                return
            st.row_bytes += size
            st.rows.append(values)
        except Exception as e:  # noqa: BLE001
            self._guard_failed("row", e)

    def _result_q(self, st: _Sess) -> int | None:
        """The statement a result belongs to: the oldest execution sent that is not answered
        (a simple Query stays first until another follows: its string may hold more statements)."""
        pending = st.pending
        while len(pending) > 1 and pending[0][2]:
            pending.popleft()
        if not pending:
            return st.q or None
        head = pending[0]
        if head[1]:
            head[2] = True
        else:
            pending.popleft()
        return head[0]

    def _take_rows(self, st: _Sess, tag_rows: int | None) -> dict:
        """The rows kept of the result just ended (``st.rows``, not None) as a ``rows`` record's
        fields; ``tag_rows``: the rows the tag says were sent."""
        rows = st.rows
        st.rows = None
        return {"rows": rows, "truncated": st.rows_cut or (tag_rows is not None and tag_rows > len(rows)),
                "row_bytes": st.row_bytes}

    def _rows_record(self, st: _Sess, q, tag_rows: int | None) -> None:
        if st.rows is None:
            return
        self._close_open(st)
        i = st.i
        st.i = i + 1
        rec = {"t": "rows", "ts": _now(), "sid": st.sid, "i": i, "q": q}
        rec.update(self._take_rows(st, tag_rows))
        self._emit(rec)

    def completed(self, s, srv, tag: str, rows, nbytes: int, seconds: float) -> None:
        try:
            st = self.live.get(s)
            if st is None:
                return
            q = st.last_q = self._result_q(st)
            if rows is not None:
                st.rows_total += rows
            st.received += nbytes
            op = st.open
            if op is not None and op["q"] == q:
                # the result of the statement (or Bind) just recorded: one record for all of it
                st.open = None
                if st.rows is not None:
                    op["shown"] = self._take_rows(st, rows)
                    st.i += 1
                op["done"] = {"ts": _now(), "tag": tag, "rows": rows, "bytes": nbytes, "dur": seconds}
                st.i += 1
                self._emit(op)
                return
            self._close_open(st)
            self._rows_record(st, q, rows)
            i = st.i
            st.i = i + 1
            self._emit({"t": "done", "ts": _now(), "sid": st.sid, "i": i, "q": q, "tag": tag, "rows": rows,
                        "bytes": nbytes, "dur": seconds})
        except Exception as e:  # noqa: BLE001
            self._guard_failed("completed", e)

    def suspended(self, s, srv, nbytes: int, seconds: float) -> None:
        st = self.live.get(s)
        if st is None:
            return
        pending = st.pending
        while len(pending) > 1 and pending[0][2]:
            pending.popleft()
        q = st.last_q = pending[0][0] if pending else (st.q or None)
        if pending:
            pending[0][2] = True  # answered in part: the portal may run on (Execute again, no Bind)
        self._rows_record(st, q, None)
        st.rows_cut = False
        st.received += nbytes
        self._rec(st, "suspended", q=q, bytes=nbytes, dur=seconds)

    def failed(self, s, srv, sqlstate: str, message: str) -> None:
        st = self.live.get(s)
        if st is None:
            return
        q = st.last_q = self._result_q(st)
        self._rows_record(st, q, None)
        st.errors += 1
        self._rec(st, "error", q=q, sqlstate=sqlstate, message=message)

    def notice(self, s, srv, severity: str, sqlstate: str, message: str) -> None:
        st = self.live.get(s)
        if st is not None:
            self._rec(st, "notice", q=st.q or None, severity=severity, sqlstate=sqlstate, message=message)

    def masked(self, s, report) -> None:
        st = self.live.get(s)
        if st is not None:
            self._rec(st, "masked", q=st.last_q or None, columns=[list(c) for c in report])

    def canceled(self, s) -> None:
        st = self.live.get(s)
        if st is not None:
            self._rec(st, "cancel")

    def ready(self, s, srv, status: int, started: float, sent: int, received: int) -> None:
        """A round ended with nothing outstanding: executions still awaiting a result were
        skipped by the server after an error (or bound and never executed); none of them may
        take the next statement's result."""
        try:
            st = self.live.get(s)
            if st is not None and st.pending:
                st.pending.clear()
        except Exception as e:  # noqa: BLE001
            self._guard_failed("ready", e)

    def logout(self, s, reason: str) -> None:
        st = self.live.pop(s, None)
        if st is not None:
            self._logout(s, st, reason)

    def _logout(self, s, st: _Sess, reason: str) -> None:
        if st.rows:
            self._rows_record(st, st.last_q or None, None)
        self._rec(st, "logout", reason=reason, dur=time.monotonic() - st.started, statements=st.statements,
                  errors=st.errors, refused=st.refused, rows=st.rows_total, bytes_received=st.received)

    # ------------------------------------------------------------------ what the console and metrics show

    def figures(self) -> dict:
        w = self.writer
        return {"dir": str(w.root), "file": str(w.current_file or ""), "records": w.records, "bytes": w.bytes,
                "failures": w.failures, "lost": w.lost, "queued": w.queued + self.nbuf,
                "failing": w.failing or "", "blocked": self.gw.record_block is not None,
                "sessions": len(self.live)}
