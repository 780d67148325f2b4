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

    def refused(self, s, sqlstate: str, message: str) -> None:
        client_log.info("refused: %s db=%s user=%s: %s", s.addr, s.database, s.user, message)

    def masked(self, s, report) -> None:
        if client_log.isEnabledFor(logging.DEBUG):
            client_log.debug("masked %s: %s", s.describe(), ", ".join(f"{c}={n}" for c, n in report))

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
    """Counters per pool (``pool.name``, i.e. database/user), as PgBouncer counts them: a query
    is a round ending at ReadyForQuery with nothing outstanding, a transaction one ending at 'I'.
    Named-statement counts are read from the live sessions' statement books when asked for (no
    work per message). With ``log_stats`` on, every ``stats_period`` seconds a ``stats:`` line
    with the averages over the period, in PgBouncer's format."""

    trusted = True

    def __init__(self, gw) -> None:
        self.gw = gw
        self.pools: dict[str, Counters] = {}
        self._open: dict[object, float] = {}  # session -> start of its open transaction
        self._live: dict[object, str] = {}  # logged-in session -> its pool's name
        self._old = Counters()
        self._old_at = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def counters(self, pool_name: str) -> Counters:
        """The totals of one pool, with its live sessions' named-statement counts."""
        c = self._pool(pool_name).copy()
        for s, name in self._live.items():
            if name == pool_name:
                _add_book(c, s.book)
        return c

    def totals(self) -> Counters:
        t = Counters()
        for c in self.pools.values():
            t.add(c)
        for s in self._live:
            _add_book(t, s.book)
        return t

    def _pool(self, name: str) -> Counters:
        c = self.pools.get(name)
        if c is None:
            c = self.pools[name] = Counters()
        return c

    # -- events

    def login(self, s) -> None:
        self._live[s] = s.pool.name
        self._pool(s.pool.name).client_login_count += 1

    def server_assigned(self, s, srv, waited: float) -> None:
        c = self.pools.get(s.pool.name) or self._pool(s.pool.name)
        c.server_assignment_count += 1
        c.wait_time += waited

    def ready(self, s, srv, status: int, started: float, sent: int, received: int) -> None:
        now = time.monotonic()
        c = self.pools.get(s.pool.name) or self._pool(s.pool.name)
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
        name = self._live.pop(s, None)
        if name is not None:
            _add_book(self._pool(name), s.book)

    # -- the periodic log line

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
            if self.gw.config.log_stats and self.gw.config.stats_period > 0:
                gateway_log.info("%s", self.averages_line())
        finally:
            self._schedule()

    def averages_line(self) -> str:
        """PgBouncer's ``stats:`` line for the time since the last one (and start the next)."""
        now = time.monotonic()
        cur, old = self.totals(), self._old
        dur = now - self._old_at
        self._old, self._old_at = cur.copy(), now

        def rate(name: str) -> int:
            return int((getattr(cur, name) - getattr(old, name)) / dur) if dur > 0 else 0

        def per(time_name: str, count_name: str) -> int:
            n = getattr(cur, count_name) - getattr(old, count_name)
            return int((getattr(cur, time_name) - getattr(old, time_name)) * 1e6 / n) if n > 0 else 0

        return (f"stats: {rate('xact_count')} xacts/s, {rate('query_count')} queries/s, "
                f"{rate('client_parse_count')} client parses/s, {rate('server_parse_count')} server parses/s, "
                f"{rate('bind_count')} binds/s, {rate('client_login_count')} client logins/s, "
                f"in {rate('client_bytes')} B/s, out {rate('server_bytes')} B/s, "
                f"xact {per('xact_time', 'xact_count')} us, query {per('query_time', 'query_count')} us, "
                f"wait {per('wait_time', 'server_assignment_count')} us")


def _add_book(c: Counters, book) -> None:
    c.client_parse_count += book.parse_count
    c.server_parse_count += book.server_parse_count
    c.bind_count += book.bind_count
