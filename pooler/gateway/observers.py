"""The gateway's own observers of its events (events.py): the log lines of sessions, and the
counters behind PgBouncer's stats (the periodic ``stats:`` log line today; SHOW STATS reads the
same counters).

Both read the running config through the gateway on each event, so RELOAD changes what they do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields

from ..protocol.messages import TX_IDLE
from .events import Observer

client_log = logging.getLogger("pooler.client")
gateway_log = logging.getLogger("pooler")


class SessionLog(Observer):
    """One log line per login, refusal and disconnection (log_connections, log_disconnections)."""

    trusted = True

    def __init__(self, gw) -> None:
        self.gw = gw

    def login(self, s) -> None:
        if self.gw.config.log_connections:
            via = f" as={s.login_name}" if s.login_name != s.user else ""
            client_log.info("login: %s db=%s user=%s%s app=%s mode=%s%s%s", s.addr, s.database, s.user, via,
                            s.app_name or "-", s.mode, " tls" if s.tls else "",
                            f" token groups={','.join(s.groups) or '-'}" if s.auth_method == "jwt" else "")

    def refused(self, s, sqlstate: str, message: str, what) -> None:
        client_log.info("refused: %s db=%s user=%s: %s", s.addr, s.database, s.user, message)

    def masked(self, s, report) -> None:
        if client_log.isEnabledFor(logging.DEBUG):
            client_log.debug("masked %s: %s", s.describe(), ", ".join(f"{c}={n}" for c, _, n in report))

    def shadow_decided(self, s, kind: str, sql: str, d, enforced) -> None:
        """A shadow file's opinion other than allow is logged (never enforced); a failing shadow
        rule is a warning."""
        if d.error:
            gateway_log.warning("shadow rule failed (not enforced): %s: %s (%s db=%s user=%s)", d.rule, d.reason,
                                s.addr, s.database, s.user)
        elif d.action != "allow":
            client_log.info("shadow: %s would %s (enforced: %s): %s db=%s user=%s%s", d.rule,
                            d.action.replace("_", " "), enforced.action, s.addr, s.database, s.user,
                            f": {d.reason}" if d.reason else "")

    def logout(self, s, reason: str) -> None:
        if self.gw.config.log_disconnections:
            gateway_log.info("disconnect: %s db=%s user=%s age=%.1fs", s.addr, s.database, s.user,
                             time.monotonic() - s.connected_at)


@dataclass(slots=True)
class Counters:
    """PgBouncer's per-pool totals (times in seconds here, microseconds where shown)."""

    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    client_bytes: int = 0  # received from clients (sent on to servers)
    server_bytes: int = 0  # received from servers
    xact_time: float = 0.0
    query_time: float = 0.0
    wait_time: float = 0.0
    client_parse_count: int = 0  # Parse of a named statement from a client
    server_parse_count: int = 0  # Parse the gateway sent a server for one
    bind_count: int = 0  # Bind of a named statement
    client_login_count: int = 0

    def add(self, other: "Counters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def copy(self) -> "Counters":
        c = Counters()
        c.add(self)
        return c


class Stats(Observer):
    """Counters per pool (``pool.key``: database, upstream user), as PgBouncer counts them: a
    query is a round ending at ReadyForQuery with nothing outstanding, a transaction one ending
    at 'I'. Named-statement counts are read from the live sessions' statement books when asked
    for (no work per message). Averages are PgBouncer's: the change since the snapshot taken one
    ``stats_period`` before the last, per second (counts, bytes) or per event (times, in
    microseconds). With ``log_stats`` on, every ``stats_period`` seconds a ``stats:`` line for the
    last period, in PgBouncer 1.25's format."""

    trusted = True

    def __init__(self, gw) -> None:
        self.gw = gw
        self.pools: dict[tuple[str, str], Counters] = {}
        self._open: dict[object, float] = {}  # session -> start of its open transaction
        self._live: dict[object, tuple[str, str]] = {}  # logged-in session -> its pool's key
        now = time.monotonic()
        # PgBouncer's older/newer snapshots, taken every stats_period
        self._older: dict[tuple[str, str], Counters] = {}
        self._newer: dict[tuple[str, str], Counters] = {}
        self._old_stamp, self._new_stamp = now - 1.0, now
        self._timer: asyncio.TimerHandle | None = None

    # -- reading the counters

    def current(self) -> dict[tuple[str, str], Counters]:
        """Every pool's totals now, its live sessions' named-statement counts included."""
        out = {k: c.copy() for k, c in self.pools.items()}
        for s, key in self._live.items():
            c = out.get(key)
            if c is None:
                c = out[key] = Counters()
            _add_book(c, s.book)
        return out

    def counters(self, pool_key: tuple[str, str]) -> Counters:
        return self.current().get(pool_key) or Counters()

    def totals(self) -> Counters:
        t = Counters()
        for c in self.current().values():
            t.add(c)
        return t

    def by_database(self) -> list[tuple[str, Counters, Counters]]:
        """(database, totals, averages) per database, in name order (SHOW STATS)."""
        cur, old = _per_db(self.current()), _per_db(self._older)
        dur = time.monotonic() - self._old_stamp
        return [(db, c, averages(c, old.get(db) or Counters(), dur)) for db, c in sorted(cur.items())]

    def overall(self) -> tuple[Counters, Counters]:
        """(totals, averages) over every pool (SHOW TOTALS)."""
        cur, old = Counters(), Counters()
        for c in self.current().values():
            cur.add(c)
        for c in self._older.values():
            old.add(c)
        return cur, averages(cur, old, time.monotonic() - self._old_stamp)

    def _pool(self, key: tuple[str, str]) -> Counters:
        c = self.pools.get(key)
        if c is None:
            c = self.pools[key] = Counters()
        return c

    def console_command(self) -> None:
        """A command of the admin console: PgBouncer counts it on its pgbouncer pool."""
        c = self._pool(("pgbouncer", "pgbouncer"))
        c.query_count += 1
        c.xact_count += 1

    # -- events

    def login(self, s) -> None:
        key = ("pgbouncer", "pgbouncer") if s.pool is None else s.pool.key
        self._live[s] = key
        self._pool(key).client_login_count += 1

    def server_assigned(self, s, srv, waited: float) -> None:
        c = self.pools.get(s.pool.key) or self._pool(s.pool.key)
        c.server_assignment_count += 1
        c.wait_time += waited

    def ready(self, s, srv, status: int, started: float, sent: int, received: int) -> None:
        now = time.monotonic()
        c = self.pools.get(s.pool.key) or self._pool(s.pool.key)
        c.query_count += 1
        c.query_time += now - started
        c.client_bytes += sent
        c.server_bytes += received
        if status == TX_IDLE:
            c.xact_count += 1
            c.xact_time += now - self._open.pop(s, started)
        elif s not in self._open:
            self._open[s] = started

    def logout(self, s, reason: str) -> None:
        self._open.pop(s, None)
        key = self._live.pop(s, None)
        if key is not None:
            _add_book(self._pool(key), s.book)

    # -- the periodic snapshot and log line

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        period = self.gw.config.stats_period
        self._timer = asyncio.get_running_loop().call_later(period if period > 0 else 60.0, self._tick)

    def _tick(self) -> None:
        try:
            line = self.rotate()
            if self.gw.config.log_stats and self.gw.config.stats_period > 0:
                gateway_log.info("%s", line)
        finally:
            self._schedule()

    def rotate(self) -> str:
        """Take the period's snapshot; -> PgBouncer's ``stats:`` line for the period just ended."""
        now = time.monotonic()
        cur = self.current()
        self._older, self._newer = self._newer, cur
        self._old_stamp, self._new_stamp = self._new_stamp, now
        total, old = Counters(), Counters()
        for c in cur.values():
            total.add(c)
        for c in self._older.values():
            old.add(c)
        a = averages(total, old, now - self._old_stamp)
        return (f"stats: {int(a.xact_count)} xacts/s, {int(a.query_count)} queries/s, "
                f"{int(a.client_parse_count)} client parses/s, {int(a.server_parse_count)} server parses/s, "
                f"{int(a.bind_count)} binds/s, in {int(a.client_bytes)} B/s, out {int(a.server_bytes)} B/s, "
                f"xact {int(a.xact_time * 1e6)} us, query {int(a.query_time * 1e6)} us, "
                f"wait {int(a.wait_time * 1e6)} us")


def averages(cur: Counters, old: Counters, dur: float) -> Counters:
    """PgBouncer's calc_average: counts and bytes per second over ``dur``; times per transaction,
    query and assignment (still in seconds here)."""
    a = Counters()
    if dur <= 0:
        return a
    for name in ("server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                 "client_parse_count", "server_parse_count", "bind_count", "client_login_count"):
        setattr(a, name, int((getattr(cur, name) - getattr(old, name)) / dur))
    for t, n in (("xact_time", "xact_count"), ("query_time", "query_count"),
                 ("wait_time", "server_assignment_count")):
        count = getattr(cur, n) - getattr(old, n)
        if count > 0:
            setattr(a, t, (getattr(cur, t) - getattr(old, t)) / count)
    return a


def _per_db(per_pool: dict[tuple[str, str], Counters]) -> dict[str, Counters]:
    out: dict[str, Counters] = {}
    for (db, _), c in per_pool.items():
        t = out.get(db)
        if t is None:
            t = out[db] = Counters()
        t.add(c)
    return out


class Decisions(Observer):
    """The rules' decisions by rule and action (SHOW RULES, SHOW DECISIONS); subscribed while a
    rule set is active (the decide stage then runs anyway). The shadow files' decisions are
    counted apart (``shadow_by_rule``), a failed shadow rule under the action ``error``."""

    trusted = True

    def __init__(self) -> None:
        self.by_rule: dict[tuple[str, str], list] = {}  # (rule, action) -> [count, last wall time, last reason]
        self.shadow_by_rule: dict[tuple[str, str], list] = {}  # the same for MODE = "shadow" files

    def shadow_decided(self, s, kind: str, sql: str, d, enforced) -> None:
        key = (d.rule, "error" if d.error else d.action)
        e = self.shadow_by_rule.get(key)
        if e is None:
            e = self.shadow_by_rule[key] = [0, 0.0, ""]
        e[0] += 1
        e[1] = time.time()
        e[2] = d.reason

    def decided(self, s, kind: str, sql: str, d) -> None:
        if d is None:
            return
        e = self.by_rule.get((d.rule, d.action))
        if e is None:
            e = self.by_rule[(d.rule, d.action)] = [0, 0.0, ""]
        e[0] += 1
        e[1] = time.time()
        e[2] = d.reason


def _add_book(c: Counters, book) -> None:
    c.client_parse_count += book.parse_count
    c.server_parse_count += book.server_parse_count
    c.bind_count += book.bind_count
