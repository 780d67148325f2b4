"""PgBouncer's admin console, on the virtual databases ``pgbouncer`` and ``pooler``.

Rules this module keeps:
- Commands, their grammar and their result columns are PgBouncer 1.25's: the same column names,
  order and types (text, int4, int8, numeric as PgBouncer sends them), so that scripts,
  dashboards and exporters written for PgBouncer read the gateway unchanged. Where a row or a
  figure has no meaning here (no DNS cache, no peers, no slab allocator) the columns are there
  with honest values: empty results, zeros only where zero is true.
- Simple query protocol only, one command per Query. ``admin_users`` may run everything;
  ``stats_users`` only SHOW (not SHOW FDS).
- The console never blocks the event loop; commands that wait (PAUSE, SUSPEND, WAIT_CLOSE)
  answer when the gateway reaches the state (Gateway.admin_progress).
- Errors are sent as PgBouncer sends them (ERROR, SQLSTATE 08P01 unless said otherwise) and
  logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from .. import __version__
from ..approvals.book import ApprovalError, parse_interval
from ..config import SECRET_KEYS
from ..protocol import messages as m

log = logging.getLogger("pooler.admin")

ADMIN_DATABASES = ("pgbouncer", "pooler")
COMPATIBLE_WITH = "1.25.2"  # the PgBouncer whose console this one answers like
VERSION = f"PgBouncer {COMPATIBLE_WITH} (pooler {__version__})"

# PgBouncer's console grammar (admin.c): CMD [arg]; SET key = word; SET key = 'string'
_WORD = r'("(?:[^"]|"")*"|[0-9a-z_]+)'
_CMD = re.compile(rf"^\s*{_WORD}(?:\s+{_WORD})?\s*(?:;\s*)?$", re.I | re.S)
_SET_WORD = re.compile(rf"^\s*set\s+{_WORD}\s*(?:=|to)\s*{_WORD}\s*(?:;\s*)?$", re.I | re.S)
_SET_STR = re.compile(rf"^\s*set\s+{_WORD}\s*(?:=|to)\s*('(?:[^']|'')*')\s*(?:;\s*)?$", re.I | re.S)
# the gateway's approval commands: APPROVE id [FOR interval]; DENY id 'reason'
_APPROVE = re.compile(r"^\s*approve\s+([0-9a-z_]+)(?:\s+for\s+(?:'([^']*)'|([0-9a-z_. ]+?)))?\s*(?:;\s*)?$", re.I | re.S)
_DENY = re.compile(r"^\s*deny\s+([0-9a-z_]+)(?:\s+'((?:[^']|'')*)')?\s*(?:;\s*)?$", re.I | re.S)

# "some silly clients start actively messing with server parameters": PgBouncer fakes these
FAKE_PARAMS = {"client_encoding": "UTF-8", "default_transaction_isolation": "read committed",
               "standard_conforming_strings": "on", "datestyle": "ISO", "timezone": "GMT"}

# what a console session is told at login (PgBouncer's admin welcome)
WELCOME = (("server_version", f"{COMPATIBLE_WITH}/pooler"), ("client_encoding", "UTF8"),
           ("server_encoding", "UTF8"), ("DateStyle", "ISO"), ("TimeZone", "GMT"),
           ("standard_conforming_strings", "on"), ("is_superuser", "on"))

HELP = ("\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n"
        "\tSHOW PEERS|PEER_POOLS\n"
        "\tSHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE\n"
        "\tSHOW DNS_HOSTS|DNS_ZONES\n"
        "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n"
        "\tSHOW RULES|DECISIONS|APPROVALS|GRANTS|RECORDINGS\n"
        "\tAPPROVE <id> [FOR <interval>]\n"
        "\tDENY <id> '<reason>'\n"
        "\tREVOKE <grant_id>\n"
        "\tSET key = arg\n"
        "\tRELOAD\n"
        "\tPAUSE [<db>]\n"
        "\tRESUME [<db>]\n"
        "\tDISABLE <db>\n"
        "\tENABLE <db>\n"
        "\tRECONNECT [<db>]\n"
        "\tKILL [<db>]\n"
        "\tKILL_CLIENT <client_id>\n"
        "\tSUSPEND\n"
        "\tSHUTDOWN\n"
        "\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n"
        "\tWAIT_CLOSE [<db>]")

# result columns, PgBouncer 1.25's (admin.c, stats.c); type letters as protocol.messages uses them
_SOCKET_COLUMNS = [("type", "s"), ("user", "s"), ("database", "s"), ("replication", "s"), ("state", "s"),
                   ("addr", "s"), ("port", "i"), ("local_addr", "s"), ("local_port", "i"),
                   ("connect_time", "T"), ("request_time", "T"), ("wait", "i"), ("wait_us", "i"),
                   ("close_needed", "i"), ("ptr", "s"), ("link", "s"), ("remote_pid", "i"), ("tls", "s"),
                   ("application_name", "s"), ("prepared_statements", "i"), ("id", "i")]
_SOCKET_DEBUG = [("recv_pos", "i"), ("pkt_pos", "i"), ("pkt_remain", "i"), ("send_pos", "i"),
                 ("send_remain", "i"), ("pkt_avail", "i"), ("send_avail", "i")]
COLUMNS = {
    "databases": [("name", "s"), ("host", "s"), ("port", "i"), ("database", "s"), ("force_user", "s"),
                  ("pool_size", "i"), ("min_pool_size", "i"), ("reserve_pool_size", "i"),
                  ("server_lifetime", "i"), ("pool_mode", "s"), ("load_balance_hosts", "s"),
                  ("max_connections", "i"), ("current_connections", "i"), ("max_client_connections", "i"),
                  ("current_client_connections", "i"), ("paused", "i"), ("disabled", "i")],
    "pools": [("database", "s"), ("user", "s"), ("cl_active", "i"), ("cl_waiting", "i"),
              ("cl_active_cancel_req", "i"), ("cl_waiting_cancel_req", "i"), ("sv_active", "i"),
              ("sv_active_cancel", "i"), ("sv_being_canceled", "i"), ("sv_idle", "i"), ("sv_used", "i"),
              ("sv_tested", "i"), ("sv_login", "i"), ("maxwait", "i"), ("maxwait_us", "i"),
              ("pool_mode", "s"), ("load_balance_hosts", "s")],
    "clients": _SOCKET_COLUMNS,
    "servers": _SOCKET_COLUMNS,
    "sockets": _SOCKET_COLUMNS + _SOCKET_DEBUG,
    "active_sockets": _SOCKET_COLUMNS + _SOCKET_DEBUG,
    "users": [("name", "s"), ("pool_size", "s"), ("reserve_pool_size", "s"), ("pool_mode", "s"),
              ("max_user_connections", "i"), ("current_connections", "i"),
              ("max_user_client_connections", "i"), ("current_client_connections", "i")],
    "lists": [("list", "s"), ("items", "i")],
    "mem": [("name", "s"), ("size", "i"), ("used", "i"), ("free", "i"), ("memtotal", "i")],
    "state": [("key", "s"), ("value", "s")],
    "config": [("key", "s"), ("value", "s"), ("default", "s"), ("changeable", "s")],
    "version": [("version", "s")],
    "peers": [("peer_id", "i"), ("host", "s"), ("port", "i"), ("pool_size", "i")],
    "peer_pools": [("peer_id", "i"), ("cl_active_cancel_req", "i"), ("cl_waiting_cancel_req", "i"),
                   ("sv_active_cancel", "i"), ("sv_login", "i")],
    "dns_hosts": [("hostname", "s"), ("ttl", "q"), ("addrs", "s")],
    "dns_zones": [("zonename", "s"), ("serial", "q"), ("count", "i")],
    "fds": [("fd", "i"), ("task", "s"), ("user", "s"), ("database", "s"), ("addr", "s"), ("port", "i"),
            ("cancel", "q"), ("link", "i"), ("client_encoding", "s"), ("std_strings", "s"),
            ("datestyle", "s"), ("timezone", "s"), ("password", "s"), ("scram_client_key", "b"),
            ("scram_server_key", "b")],
    "stats": [("database", "s")] + [(n, "N") for n in (
        "total_server_assignment_count", "total_xact_count", "total_query_count", "total_received",
        "total_sent", "total_xact_time", "total_query_time", "total_wait_time", "total_client_parse_count",
        "total_server_parse_count", "total_bind_count", "avg_server_assignment_count", "avg_xact_count",
        "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time",
        "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count")],
    "stats_totals": [("database", "s")] + [(n, "N") for n in (
        "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count")],
    "stats_averages": [("database", "s")] + [(n, "N") for n in (
        "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time", "avg_client_parse_count", "avg_server_parse_count",
        "avg_bind_count")],
    "totals": [("name", "s"), ("value", "N")],
    # the gateway's own, in the same style
    "rules": [("file", "s"), ("version", "s"), ("loaded", "T"), ("decisions", "q"), ("allow", "q"),
              ("deny", "q"), ("mask", "q"), ("require_approval", "q"), ("mode", "s"), ("errors", "q")],
    "decisions": [("rule", "s"), ("action", "s"), ("count", "q"), ("last", "T"), ("last_reason", "s"),
                  ("mode", "s")],
    "recordings": [("dir", "s"), ("file", "s"), ("records", "q"), ("bytes", "q"), ("write_failures", "q"),
                   ("lost", "q"), ("queued", "q"), ("sessions", "q"), ("failing", "s"), ("blocked", "s")],
    "approvals": [("id", "s"), ("state", "s"), ("user", "s"), ("groups", "s"), ("database", "s"),
                  ("client_addr", "s"), ("application_name", "s"), ("rule", "s"), ("reason", "s"),
                  ("statement", "s"), ("params", "s"), ("tables_read", "s"), ("tables_written", "s"),
                  ("justification", "s"), ("created", "T"), ("waited", "q"), ("approvals", "s"),
                  ("decided_by", "s"), ("outcome", "s"), ("grant", "s"), ("preview", "s")],
    "grants": [("id", "s"), ("user", "s"), ("database", "s"), ("statement", "s"), ("granted_by", "s"),
               ("created", "T"), ("until", "T"), ("uses", "q"), ("active", "s"), ("revoked_by", "s")],
}
# the counters of a SHOW STATS row, in its column order (observers.Counters attribute, scale)
STAT_FIELDS = (("server_assignment_count", 1), ("xact_count", 1), ("query_count", 1), ("client_bytes", 1),
               ("server_bytes", 1), ("xact_time", 1e6), ("query_time", 1e6), ("wait_time", 1e6),
               ("client_parse_count", 1), ("server_parse_count", 1), ("bind_count", 1))
# PgBouncer's SHOW TOTALS names for them
_TOTAL_NAMES = ("server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
                "ps_bind_count")


class AdminError(Exception):
    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def timestamp(wall: float) -> str:
    """PgBouncer's format_time_s: local time, with its zone's abbreviation."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(wall))


# admin_legacy_columns: names PgBouncer dropped or renamed that old tools still read (Debian's
# prometheus-pgbouncer-exporter 1.7 reads total_requests, gone since PgBouncer 1.8, and
# reserve_pool, renamed reserve_pool_size in 1.24), appended after the current columns
LEGACY = {"stats": [("total_requests", "N")], "databases": [("reserve_pool", "i")]}


def result(name: str, rows, tag: str = "SHOW", columns=None) -> bytes:
    return (m.row_description(columns or COLUMNS[name]) + b"".join(m.data_row(r) for r in rows)
            + m.command_complete(tag) + m.ready_for_query())


def ready(tag: str) -> bytes:
    return m.command_complete(tag) + m.ready_for_query()


def preview_text(p: dict | None) -> str:
    """A dry run's result in one line of SHOW APPROVALS."""
    if not p:
        return ""
    if p["state"] == "done":
        sample = "; ".join("(" + ", ".join("NULL" if v is None else v for v in row) + ")" for row in p["sample"])
        return f"{p['rows']} row(s) would change: ({', '.join(p['columns'])}) {sample}"
    if p["state"] == "skipped":
        return f"not dry-run: {p['why']}"
    if p["state"] == "failed":
        return f"dry run failed: {p['error']}"
    return "dry run in progress"


def _unquote(word: str | None, q: str = '"') -> str:
    if not word:
        return ""
    if word[0] == q and word[-1] == q and len(word) >= 2:
        return word[1:-1].replace(q + q, q)
    return word


class Console:
    """One per gateway; ``execute`` runs a command of a console session."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.commands = {
            "show": self.show, "select": self.show, "reload": self.reload, "pause": self.pause,
            "resume": self.resume, "suspend": self.suspend, "disable": self.disable, "enable": self.enable,
            "reconnect": self.reconnect, "kill": self.kill, "kill_client": self.kill_client,
            "shutdown": self.shutdown, "wait_close": self.wait_close, "revoke": self.revoke,
        }
        self.shows = {
            "help": self.show_help, "version": self.show_version, "config": self.show_config,
            "databases": self.show_databases, "pools": self.show_pools, "clients": self.show_clients,
            "servers": self.show_servers, "sockets": self.show_sockets, "active_sockets": self.show_active_sockets,
            "users": self.show_users, "lists": self.show_lists, "mem": self.show_mem, "state": self.show_state,
            "fds": self.show_fds, "peers": self.show_empty, "peer_pools": self.show_empty,
            "dns_hosts": self.show_empty, "dns_zones": self.show_empty, "stats": self.show_stats,
            "stats_totals": self.show_stats_totals, "stats_averages": self.show_stats_averages,
            "totals": self.show_totals, "rules": self.show_rules, "decisions": self.show_decisions,
            "approvals": self.show_approvals, "grants": self.show_grants, "recordings": self.show_recordings,
        }

    # ------------------------------------------------------------------ dispatch

    def execute(self, s, sql: str) -> bytes | None:
        """The reply to one Query of console session ``s``; None when it comes later (a
        command that waits: the gateway writes it then)."""
        self._query = sql
        self._told = ("", "")  # (command, argument) for events.admin_command; "" for SHOW and syntax errors
        try:
            reply = self._dispatch(s, sql)
        except AdminError as e:
            log.error("%s", e)
            self._tell(s, False, str(e))
            return m.error_response(e.sqlstate, str(e)) + m.ready_for_query()
        self._tell(s, True, "")
        stats = self.gw.stats
        stats.console_command()
        return reply

    def _tell(self, s, ok: bool, message: str) -> None:
        ev = self.gw.events.admin_command
        command, detail = self._told
        if ev is not None and command:
            ev(s, command, detail, ok, message)

    def _dispatch(self, s, sql: str) -> bytes | None:
        mt = _APPROVE.match(sql)
        if mt:
            self._told = ("APPROVE", mt.group(1) + (f" FOR {mt.group(2) or mt.group(3)}" if mt.group(2) or mt.group(3) else ""))
            return self.approve(s, mt.group(1), mt.group(2) or mt.group(3))
        mt = _DENY.match(sql)
        if mt:
            self._told = ("DENY", mt.group(1))
            return self.deny(s, mt.group(1), _unquote(f"'{mt.group(2)}'", "'") if mt.group(2) is not None else "")
        mt = _CMD.match(sql)
        if mt:
            cmd, arg = _unquote(mt.group(1)), _unquote(mt.group(2))
            if len(cmd) >= 16 or len(arg) >= 64:
                raise AdminError("bad arguments")
            fn = self.commands.get(cmd.lower())
            if fn is None:
                raise self._syntax()
            if fn != self.show:
                self._told = (cmd.upper(), arg)
            return fn(s, arg)
        for rx, q in ((_SET_STR, "'"), (_SET_WORD, '"')):
            mt = rx.match(sql)
            if mt:
                key, value = _unquote(mt.group(1)), _unquote(mt.group(2), q)
                if not key or len(key) >= 64 or len(value) >= 256:
                    raise AdminError("bad arguments")
                self._told = ("SET", f"{key} = {'********' if _secret_setting(key) else value}")
                return self.set(s, key, value)
        raise self._syntax()

    def _syntax(self) -> AdminError:
        return AdminError(f"invalid command '{self._query}', use SHOW HELP;")

    @staticmethod
    def _need_admin(s) -> None:
        if not s.admin_user:
            raise AdminError("admin access needed")

    # ------------------------------------------------------------------ SHOW

    def show(self, s, arg: str) -> bytes:
        key = arg.lower()
        if key in FAKE_PARAMS:
            return m.row_description([(key, "s")]) + m.data_row([FAKE_PARAMS[key]]) + ready("SHOW")
        fn = self.shows.get(key)
        if fn is not None:
            return fn(s)
        setting = self.gw.config_rows(key)
        if setting:
            return m.row_description([(key, "s")]) + m.data_row([setting[0][1]]) + ready("SHOW")
        raise self._syntax()

    def show_help(self, s) -> bytes:
        notice = m.message(b"N", b"SNOTICE\x00C00000\x00MConsole usage\x00D" + HELP.encode() + b"\x00\x00")
        return notice + ready("SHOW")

    def show_version(self, s) -> bytes:
        return result("version", [(VERSION,)])

    def show_empty(self, s) -> bytes:
        return result(self._shown(), [])

    def _shown(self) -> str:
        return _CMD.match(self._query).group(2).strip('"').lower()

    def show_config(self, s) -> bytes:
        return result("config", self.gw.config_rows())

    def show_state(self, s) -> bytes:
        mode = self.gw.pause_mode
        return result("state", [("active", "yes" if mode == "none" else "no"),
                                ("paused", "yes" if mode == "pause" else "no"),
                                ("suspended", "yes" if mode == "suspend" else "no")])

    def show_databases(self, s) -> bytes:
        gw, cfg = self.gw, self.gw.config
        rows = []
        for name in gw.database_names():
            db = cfg.database(name) if name not in ADMIN_DATABASES else None
            if db is None:  # the console's own database, as PgBouncer lists it
                rows.append((name, None, cfg.listen_port, name, "pgbouncer", 2, 0, 0, int(cfg.server_lifetime),
                             "statement", None, 0, 0, 0, gw.console_sessions(), 0, 0))
                continue
            pools = [p for p in gw.pools.values() if p.db.name == name]
            limit = db.max_db_connections if db.max_db_connections is not None else cfg.max_db_connections
            climit = db.max_db_client_connections if db.max_db_client_connections is not None \
                else cfg.max_db_client_connections
            rows.append((name, db.host, db.port, db.dbname or name, db.user,
                         db.pool_size if db.pool_size is not None else cfg.default_pool_size,
                         db.min_pool_size if db.min_pool_size is not None else cfg.min_pool_size,
                         db.reserve_pool_size if db.reserve_pool_size is not None else cfg.reserve_pool_size,
                         int(db.server_lifetime if db.server_lifetime is not None else cfg.server_lifetime),
                         db.pool_mode, db.load_balance_hosts if "," in db.host else None, limit or 0,
                         sum(p.total() for p in pools), climit or 0,
                         sum(1 for c in gw.clients if c.pool is not None and c.pool.db.name == name),
                         int(gw.pool_paused(name)), int(name in gw.disabled_dbs)))
        if cfg.admin_legacy_columns:
            return result("databases", [r + (r[7],) for r in rows], columns=COLUMNS["databases"] + LEGACY["databases"])
        return result("databases", rows)

    def show_pools(self, s) -> bytes:
        gw, cfg = self.gw, self.gw.config
        now = time.monotonic()
        active: dict[int, int] = {}
        for c in gw.clients:
            if c.pool is not None and not c.waiting and not c.closed and c.state_name() != "login":
                active[id(c.pool)] = active.get(id(c.pool), 0) + 1
        rows = []
        for p in gw.pools.values():
            wait = now - p.waiters[0].wait_started if p.waiters else 0.0
            linked = sum(1 for srv in p.active if srv.client is not None)
            canceled = sum(1 for srv in p.active if srv.client is None and srv.parked)
            rows.append((p.db.name, p.server_user, active.get(id(p), 0), len(p.waiters), 0, 0, linked,
                         sum(1 for srv in p.active if srv.cancels_in_flight), canceled, len(p.idle),
                         len(p.active) - linked - canceled - len(p.checking), len(p.checking), p.connecting,
                         int(wait), int((wait % 1) * 1e6),
                         p.db.pool_mode or cfg.pool_mode, p.db.load_balance_hosts if "," in p.db.host else None))
        rows.append(("pgbouncer", "pgbouncer", gw.console_sessions(), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                     "statement", None))
        return result("pools", rows)

    def _client_rows(self, debug: bool, only_active: bool = False) -> list:
        return [c.socket_row(debug) for c in self.gw.clients if c.state_name() != "login"
                and (not only_active or c.has_buffered())]

    def _server_rows(self, debug: bool, only_active: bool = False) -> list:
        """Every server connection, in PgBouncer's order of lists: active (linked), used and
        being_canceled, idle, then new (still logging in)."""
        rows = []
        for p in self.gw.pools.values():
            for srv in sorted(p.active, key=lambda x: x.client is None) + list(p.idle) + list(p.logging_in):
                if not only_active or srv.has_buffered():
                    rows.append(srv.socket_row(debug))
        return rows

    def show_clients(self, s) -> bytes:
        return result("clients", self._client_rows(False))

    def show_servers(self, s) -> bytes:
        return result("servers", self._server_rows(False))

    def show_sockets(self, s) -> bytes:
        logins = [c.socket_row(True) for c in self.gw.clients if c.state_name() == "login"]
        return result("sockets", self._client_rows(True) + self._server_rows(True) + logins)

    def show_active_sockets(self, s) -> bytes:
        return result("active_sockets", self._client_rows(True, True) + self._server_rows(True, True))

    def show_users(self, s) -> bytes:
        gw, cfg = self.gw, self.gw.config
        names = dict.fromkeys(list(cfg.auth_users) + list(cfg.users) + [p.server_user for p in gw.pools.values()])
        rows = []
        for name in sorted(names):
            u = cfg.users.get(name)
            limit = u.max_user_connections if u and u.max_user_connections else cfg.max_user_connections
            climit = u.max_user_client_connections if u and u.max_user_client_connections \
                else cfg.max_user_client_connections
            rows.append((name, "" if u is None or u.pool_size is None else str(u.pool_size),
                         "" if u is None or u.reserve_pool_size is None else str(u.reserve_pool_size),
                         u.pool_mode if u else None, limit,
                         sum(p.total() for p in gw.pools.values() if p.server_user == name), climit,
                         sum(1 for c in gw.clients if c.user == name and c.state_name() != "login")))
        return result("users", rows)

    def show_lists(self, s) -> bytes:
        gw = self.gw
        clients = [c for c in gw.clients if not c.closed]
        logins = sum(1 for c in clients if c.state_name() == "login")
        servers = sum(len(p.active) + len(p.idle) for p in gw.pools.values())
        users = set(gw.config.auth_users) | set(gw.config.users)
        # the gateway allocates no object caches: nothing is ever "free" in them
        return result("lists", [("databases", len(gw.database_names())), ("users", len(users)), ("peers", 0),
                                ("pools", len(gw.pools) + 1), ("peer_pools", 0), ("free_clients", 0),
                                ("used_clients", len(clients)), ("login_clients", logins), ("free_servers", 0),
                                ("used_servers", servers), ("dns_names", 0), ("dns_zones", 0),
                                ("dns_queries", 0), ("dns_pending", 0)])

    def show_mem(self, s) -> bytes:
        # PgBouncer lists its slab caches; the gateway has none (Python allocates): no rows
        return result("mem", [])

    def show_fds(self, s) -> bytes:
        self._need_admin(s)
        rows = []
        for lsock in self.gw.listening_sockets():
            addr = lsock.getsockname()
            host, port = (addr[0], addr[1]) if isinstance(addr, tuple) else ("unix", self.gw.config.listen_port)
            rows.append((lsock.fileno(), "pooler", None, None, host, port, 0, 0, None, None, None, None, None,
                         None, None))
        for c in self.gw.clients:
            row = c.fd_row()
            if row is not None:
                rows.append(row)
        for p in self.gw.pools.values():
            for srv in list(p.active) + list(p.idle):
                row = srv.fd_row()
                if row is not None:
                    rows.append(row)
        return result("fds", rows)

    def show_stats(self, s) -> bytes:
        rows = []
        for db, cur, avg in self.gw.stats.by_database():
            rows.append((db, *_stat_values(cur), *_stat_values(avg)))
        if self.gw.config.admin_legacy_columns:
            return result("stats", [r + (r[3],) for r in rows], columns=COLUMNS["stats"] + LEGACY["stats"])
        return result("stats", rows)

    def show_stats_totals(self, s) -> bytes:
        return result("stats_totals", [(db, *_stat_values(cur)) for db, cur, _ in self.gw.stats.by_database()])

    def show_stats_averages(self, s) -> bytes:
        return result("stats_averages", [(db, *_stat_values(avg)) for db, _, avg in self.gw.stats.by_database()])

    def show_totals(self, s) -> bytes:
        cur, avg = self.gw.stats.overall()
        rows = [(f"total_{n}", v) for n, v in zip(_TOTAL_NAMES, _stat_values(cur))]
        rows += [(f"avg_{n}", v) for n, v in zip(_TOTAL_NAMES, _stat_values(avg))]
        return result("totals", rows)

    def show_rules(self, s) -> bytes:
        return result("rules", self.gw.rule_rows())

    def show_decisions(self, s) -> bytes:
        return result("decisions", self.gw.decision_rows())

    def show_approvals(self, s) -> bytes:
        now = time.time()
        rows = []
        for r in self.gw.approvals.book.listing():
            params = ", ".join(f"${i + 1} = " + ("NULL" if v is None else "'" + v.replace("'", "''") + "'")
                               for i, v in enumerate(r.params))
            rows.append((r.id, r.state, r.user, ",".join(r.groups), r.database, r.client_addr, r.application_name,
                         r.rule, r.reason, r.pretty_sql, params, ",".join(r.tables_read), ",".join(r.tables_written),
                         r.justification, timestamp(r.created), int((r.decided_at or now) - r.created),
                         f"{len(r.approvals)}/{r.required}", r.decided_by, r.outcome, r.grant_id,
                         preview_text(r.preview)))
        return result("approvals", rows)

    def show_recordings(self, s) -> bytes:
        """The session recorder (docs/recordings.md): one row, none while record_dir is unset."""
        rec = self.gw.recorder
        if rec is None:
            return result("recordings", [])
        f = rec.figures()
        return result("recordings", [(f["dir"], f["file"], f["records"], f["bytes"], f["failures"], f["lost"],
                                      f["queued"], f["sessions"], f["failing"], "yes" if f["blocked"] else "no")])

    def show_grants(self, s) -> bytes:
        now = time.time()
        rows = [(g.id, g.user, g.database, g.sql, g.granted_by, timestamp(g.created), timestamp(g.until), g.uses,
                 "yes" if g.active(now) else "no", g.revoked_by) for g in self.gw.approvals.book.grant_listing()]
        return result("grants", rows)

    # ------------------------------------------------------------------ approvals

    def approve(self, s, rid: str, interval: str | None) -> bytes | None:
        self._need_admin(s)
        try:
            seconds = parse_interval(interval) if interval else None
        except ApprovalError as e:
            raise AdminError(f"APPROVE failed: {e}", "42501") from None
        desk = self.gw.approvals

        def done(r):
            log.info("APPROVE %s by %s%s", rid, s.user, f" for {interval}" if interval else "")
            if r.state != "approved":
                return m.notice_response("00000", f"request {rid} has {len(r.approvals)} of {r.required} approvals")
            return b""
        return self._decide(s, "APPROVE", desk.approve(rid, desk.console_reviewer(s), seconds), done)

    def deny(self, s, rid: str, reason: str) -> bytes | None:
        self._need_admin(s)
        desk = self.gw.approvals

        def done(r):
            log.info("DENY %s by %s: %s", rid, s.user, reason)
            return b""
        return self._decide(s, "DENY", desk.deny(rid, desk.console_reviewer(s), reason), done)

    def revoke(self, s, gid: str) -> bytes | None:
        self._need_admin(s)
        desk = self.gw.approvals

        def done(g):
            log.info("REVOKE %s by %s", gid, s.user)
            return b""
        return self._decide(s, "REVOKE", desk.revoke(gid, desk.console_reviewer(s)), done)

    def _decide(self, s, command: str, decision, done) -> None:
        """A decision goes to the approvals desk (and, with a shared store, to PostgreSQL): the
        console answers when it is made."""
        told, self._told = self._told, ("", "")  # audited when decided (admin_command), with its outcome

        async def run() -> None:
            ok, message = False, ""
            try:
                r = await decision
                reply = done(r) + ready(command)
                ok = True
            except ApprovalError as e:
                log.error("%s failed: %s", command, e)
                message = f"{command} failed: {e}"
                reply = m.error_response("42501", message) + m.ready_for_query()
            except Exception as e:  # noqa: BLE001 - the console session always gets an answer
                log.exception("%s failed", command)
                message = f"{command} failed: {e}"
                reply = m.error_response("XX000", message) + m.ready_for_query()
            self._told = told
            self._tell(s, ok, message)
            s.console_reply(reply)
        asyncio.get_running_loop().create_task(run())
        return None

    # ------------------------------------------------------------------ commands

    def reload(self, s, arg: str) -> bytes:
        if arg:
            raise self._syntax()
        self._need_admin(s)
        log.info("RELOAD command issued")
        if not self.gw.reload():
            raise AdminError("RELOAD failed, see logs for additional details", "F0000")
        return ready("RELOAD")

    def set(self, s, key: str, value: str) -> bytes:
        if key.lower() in FAKE_PARAMS:
            return m.notice_response("00000", "SET ignored") + ready("SET")
        self._need_admin(s)
        why = self.gw.set_setting(key, value)
        if why is not None:
            raise AdminError(f"SET failed: {why}")
        return ready(f"SET {key}={value}")

    def pause(self, s, arg: str) -> bytes | None:
        self._need_admin(s)
        gw = self.gw
        if gw.pause_mode != "none":
            raise AdminError("already suspended/paused")
        if not arg:
            log.info("PAUSE command issued")
            gw.pause(None)
            return gw.admin_wait(s, "PAUSE", None)
        log.info("PAUSE '%s' command issued", arg)
        self._database(arg, "cannot pause admin db")
        gw.pause(arg)
        return gw.admin_wait(s, "PAUSE", arg)

    def resume(self, s, arg: str) -> bytes:
        self._need_admin(s)
        gw = self.gw
        if not arg:
            log.info("RESUME command issued")
            if gw.stopping is not None:
                raise AdminError("pooler is shutting down")
            if gw.pause_mode == "none":
                raise AdminError("pooler is not paused/suspended")
            gw.resume(None)
        else:
            log.info("RESUME '%s' command issued", arg)
            if gw.config.database(arg) is None and arg not in gw.database_names():
                raise AdminError(f"no such database: {arg}")
            if arg not in gw.paused_dbs:
                raise AdminError(f"database {arg} is not paused")
            gw.resume(arg)
        return ready("RESUME")

    def suspend(self, s, arg: str) -> bytes | None:
        if arg:
            raise self._syntax()
        self._need_admin(s)
        gw = self.gw
        if gw.pause_mode != "none":
            raise AdminError("already suspended/paused")
        if gw.paused_dbs:
            raise AdminError("cannot suspend with paused databases")
        log.info("SUSPEND command issued")
        gw.suspend()
        return gw.admin_wait(s, "SUSPEND", None)

    def disable(self, s, arg: str) -> bytes:
        self._need_admin(s)
        if not arg:
            raise AdminError("a database is required")
        log.info("DISABLE '%s' command issued", arg)
        self._database(arg, "cannot disable admin db")
        self.gw.disabled_dbs.add(arg)
        return ready("DISABLE")

    def enable(self, s, arg: str) -> bytes:
        self._need_admin(s)
        if not arg:
            raise AdminError("a database is required")
        log.info("ENABLE '%s' command issued", arg)
        self._database(arg, "cannot disable admin db")
        self.gw.disabled_dbs.discard(arg)
        return ready("ENABLE")

    def reconnect(self, s, arg: str) -> bytes:
        self._need_admin(s)
        if arg:
            log.info("RECONNECT '%s' command issued", arg)
            self._database(arg, "cannot reconnect admin db")
        else:
            log.info("RECONNECT command issued")
        self.gw.reconnect(arg or None)
        return ready("RECONNECT")

    def kill(self, s, arg: str) -> bytes:
        self._need_admin(s)
        gw = self.gw
        if gw.pause_mode != "none":
            raise AdminError("already suspended/paused")
        if arg:
            log.info("KILL '%s' command issued", arg)
            self._database(arg, "cannot kill admin db")
        else:
            log.info("KILL command issued")
        gw.kill(arg or None)
        return ready("KILL")

    def kill_client(self, s, arg: str) -> bytes:
        self._need_admin(s)
        if not arg.isdigit():
            raise AdminError("invalid client pointer supplied")
        if not self.gw.kill_client(int(arg)):
            raise AdminError("client not found")
        return ready("KILL_CLIENT")

    def shutdown(self, s, arg: str) -> bytes | None:
        mode = arg.upper()
        if mode not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
            raise self._syntax()
        self._need_admin(s)
        if not mode:
            log.info("SHUTDOWN command issued")
            self.gw.shutdown_now()
            return None  # the connection closes with the process, unanswered (as PgBouncer)
        log.info("SHUTDOWN %s command issued", mode)
        self.gw.shutdown("SIGINT" if mode == "WAIT_FOR_SERVERS" else "SIGTERM", count=False)
        return ready("SHUTDOWN")

    def wait_close(self, s, arg: str) -> bytes | None:
        self._need_admin(s)
        if arg:
            log.info("WAIT_CLOSE '%s' command issued", arg)
            self._database(arg, "cannot wait in admin db")
        else:
            log.info("WAIT_CLOSE command issued")
        return self.gw.admin_wait(s, "WAIT_CLOSE", arg or None)

    def _database(self, name: str, admin_refusal: str) -> None:
        if name.lower() in ADMIN_DATABASES:
            raise AdminError(f"{admin_refusal}: {name}")
        if self.gw.config.database(name) is None:
            raise AdminError(f"no such database: {name}")


def _secret_setting(key: str) -> bool:
    """A setting whose value the audit stream never shows: a secret one, or any name that looks
    like it holds one (a mistyped key is refused, but its value was still typed)."""
    k = key.lower()
    return k in SECRET_KEYS or re.search(r"pass|secret|token|key|dsn|store", k) is not None


def _stat_values(c) -> list[int]:
    return [int(getattr(c, attr) * scale) for attr, scale in STAT_FIELDS]

