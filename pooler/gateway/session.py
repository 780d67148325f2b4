"""One client session: login, then each request's way through the stages to a server and back.

A request's stages (docs/architecture.md), each found here by its name:

    frame    ``_pump``'s scan of the client's bytes in place (protocol.frontend.frame_error)
    decide   ``Governor.decide`` (governor.py): the rules judge it; a refusal is answered by
             ``_refuse`` as PostgreSQL answers a failing request, no server touched
    hold     ``_hold``: a request that cannot go on yet waits here without taking a server: for
             masking's catalog of the database, or for a human's approval (holds.py)
    acquire  ``_acquire``: a server from the pool (or the wait for one), linked by ``_attach``
             (identity reset and the client's parameters applied first)
    forward  ``_forward``: the request rewritten where the client's view differs (statements.py)
             and sent, with its entry in the server's outstanding-request queue
    replies  ServerConn.data_received (server.py): forwarded, rows masked where a plan says so
    release  ``server_ready``: at ReadyForQuery 'I' with nothing outstanding the server goes back
             to its pool (transaction and statement pooling)

The fast lanes (``_lone_query``, ``_unnamed_batch`` -> ``_fast_unit`` -> ``_send_unit``) are a
shortcut through the same stages for the commonest requests arriving whole with nothing
outstanding: the same decide and acquire, one write; anything unusual goes to ``_pump`` before
any effect.

Rules this module keeps:
- Errors the gateway makes up reach the client in protocol order, as PostgreSQL would send them:
  with a server linked the server raises them for us (``_refuse_in_order``).
- A server is given back only clean (ServerConn.clean); a client that vanishes mid-transaction
  takes its transaction with it (``_detach_server``).
- What happened is reported to the gateway's observers (events.py), at no cost when nobody
  listens.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time

from ..protocol import messages as m
from ..sql.lexing import SETTINGS as LEXING_SETTINGS
from ..protocol.frontend import (BODYLESS, GOVERNED, MIN_LENGTH, NEEDS_SYNC, T_BIND, T_CLOSE, T_COPY_DATA,
                                 T_COPY_DONE, T_COPY_FAIL, T_DESCRIBE, T_EXECUTE, T_FLUSH, T_FUNCTION,
                                 T_PARSE, T_QUERY, T_SYNC, T_TERMINATE, frame_error)
from ..policy.rules import Decision
from .events import Refused
from .governor import MESSAGE_KIND, WAIT_APPROVAL, WAIT_CATALOG, Governor
from .holds import refusal_of
from .interfaces import (FAKE_FIRST, FAKE_LAST, R_BIND, R_BIND_SKIP, R_CLOSE, R_DESCRIBE, R_DESCRIBE_MASK,
                         R_EXECUTE, R_EXECUTE_REFUSAL, R_FAKE_CLOSE, R_PARSE, R_PARSE_SKIP, R_QUERY,
                         R_QUERY_REFUSAL, R_QUERY_SKIP, R_SYNC, SessionHost, next_socket_id)
from .login import ClientError, Login, TlsFailed
from .netopts import tune_socket
from .params import TRACKED_PARAMS, canonical, param_key_of, quote_literal, sync_sql
from .server import S_CLOSED, ServerConn, ServerLoginError, fd_row, socket_row
from .statements import StatementBook

log = logging.getLogger("pooler.client")

_unpack_len = struct.Struct("!i").unpack_from

# states
C_LOGIN, C_READY, C_CLOSED, C_CONSOLE, C_RELAY = range(5)  # C_RELAY: a replication connection

# message types the gateway may answer itself while no server is linked
_LOCAL_CANDIDATES = frozenset(b"SHCdcfQ")
# the queue entries of a fast-lane unit, made once (entries are tuples, never changed in place)
_E_PARSE, _E_BIND, _E_DESCRIBE, _E_EXECUTE, _E_SYNC, _E_QUERY = (
    (k, None) for k in (R_PARSE, R_BIND, R_DESCRIBE, R_EXECUTE, R_SYNC, R_QUERY))

# what a server passing to another identity runs first (then the database's connect_query):
# everything of the previous session goes, prepared statements (and their texts) included
IDENTITY_RESET = "DISCARD ALL"


class ClientSession(asyncio.Protocol):

    # every attribute is declared: slot access is what the hot path reads most
    __slots__ = (
        "_identity", "_left", "addr", "app_name", "auth_method", "book", "closed", "connected_at",
        "cskip", "database", "end_reason", "events", "first_refusal", "governor", "groups", "gw",
        "key", "last_active", "xact_start", "login", "login_name", "login_task", "max_packet", "mode",
        "param_key", "params", "pending_param_sync", "pid", "pool", "rbuf", "reading_paused",
        "ready_query", "ready_unit", "rewrite", "server", "skip_until_sync", "state", "tls",
        "token_expiry", "transport", "tx_status", "unix", "user", "wait_started", "waiting",
        "writing_paused", "id", "connected_wall", "console", "admin_user", "console_waiting",
        "held", "held_ticket", "relay", "admitted",
    )

    def __init__(self, gw: SessionHost, unix: bool = False) -> None:
        self.gw = gw
        self.events = gw.events
        self.id = next_socket_id()
        self.connected_wall = time.time()
        self.console = False  # a session of the admin console (admin.py), not of a database
        self.admitted: tuple[str, str] | None = None  # (database, user) it counts against (Gateway.admit)
        self.admin_user = False  # ... of an admin_users user (else stats_users: SHOW only)
        self.console_waiting = False  # its command waits (PAUSE, SUSPEND, WAIT_CLOSE)
        self.unix = unix
        self.transport: asyncio.Transport | None = None
        self.state = C_LOGIN
        self.closed = False
        self.addr = ""
        self.login: Login | None = Login(self)  # the login stage (None once logged in)
        self.login_task: asyncio.Task | None = None
        # identity (login fills it in)
        self.user = ""
        self.login_name = ""  # the startup user name (an alias of self.user for token logins)
        self.database = ""
        self.groups: tuple[str, ...] = ()
        self.app_name = ""
        self.tls = False
        self.auth_method = ""
        self.token_expiry: asyncio.TimerHandle | None = None
        self.pool = None  # pool.Pool of (database, upstream user)
        self.mode = "session"
        self.rewrite = False  # the client's named statements are rewritten (statements.py)
        self.pid = 0
        self.key = 0
        self.params: dict[str, str] = {}
        self.param_key: tuple = ()
        self.pending_param_sync = False
        self.connected_at = time.monotonic()
        self.last_active = self.connected_at
        self.xact_start = 0.0
        self.end_reason = ""  # why the session ended (events.logout)
        self._left = False
        self._identity: tuple | None = None  # (user, groups), once logged in
        # the client -> server stream
        self.server: ServerConn | None = None
        self.rbuf = b""
        self.cskip = 0  # bytes of a streaming CopyData still to pass through
        self.waiting = False  # held or waiting for a server: rbuf is processed when that ends
        self.ready_query = 0  # length of the governed message at rbuf[0] that waits for a server
        self.ready_unit: tuple | None = None  # (length, queue kinds) of a fast-lane unit waiting
        self.first_refusal: tuple[str, str] | None = None  # the fast lane's verdict on rbuf[0]
        self.wait_started = 0.0
        self.skip_until_sync = False
        self.reading_paused = False
        self.writing_paused = False
        self.max_packet = gw.config.max_packet_size
        self.tx_status = m.TX_IDLE
        self.held = None  # approvals.book.Request of the statement waiting for approval
        self.relay = None  # ReplicationRelay of a replication connection (replication=database|true)
        self.held_ticket = b""  # the message that runs once it is approved
        # the stages' own state
        self.book = StatementBook(gw)
        self.governor = Governor(self)

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if self.unix or not peer:
            self.addr = "unix"
        else:
            self.addr = f"{peer[0]}:{peer[1]}"
        if not self.unix:
            tune_socket(transport.get_extra_info("socket"), self.gw.config)
        if not self.gw.client_arrived(self):
            transport.write(m.error_response("53300", "no more connections allowed (max_client_conn)", "FATAL"))
            transport.close()
            self.closed = True
            self.state = C_CLOSED
            return
        self.login_task = asyncio.get_running_loop().create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self.state == C_READY:
            self._client_data(data)
        elif self.state == C_RELAY:
            self.relay.transport.write(data)
        elif self.state == C_LOGIN:
            if not self.login.feed(data):
                self._close_now("too much data during login")
        elif self.state == C_CONSOLE:
            self._console_data(data)

    def eof_received(self) -> bool:
        if self.login is not None:
            self.login.end_of_input()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        was_ready = self.state == C_READY or self.state == C_CONSOLE or self.state == C_RELAY
        self.state = C_CLOSED
        self.closed = True
        if self.relay is not None:
            self.relay.transport.close()
        self._let_go("client disconnected")
        if self.login is not None:
            self.login.end_of_input()
        if self.login_task is not None and not self.login_task.done():
            self.login_task.cancel()
        self._leave(was_ready)

    def _leave(self, was_ready: bool) -> None:
        """Tell the gateway this client is gone, exactly once. Normally from connection_lost; a
        TLS handshake the peer breaks off never reaches our connection_lost (the SSL protocol
        owns the transport then), so a failed login calls this too."""
        if self._left:
            return
        self._left = True
        if self.held is not None:
            self.gw.approvals.withdraw(self.held, "the client disconnected")
        if was_ready:
            ev = self.events.logout
            if ev is not None:
                ev(self, self.end_reason or "client disconnected")
        self.gw.client_left(self, was_ready)

    def relay_lost(self) -> None:
        """The server of a replication connection closed: so does the client's."""
        self._close_now("server closed the replication connection")

    def pause_writing(self) -> None:
        # the client reads slowly: stop reading from its server until it catches up
        self.writing_paused = True
        if self.relay is not None:
            self.relay.transport.pause_reading()
        srv = self.server
        if srv is not None:
            srv.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.relay is not None:
            self.relay.transport.resume_reading()
        srv = self.server
        if srv is not None:
            srv.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def describe(self) -> str:
        return f"{self.user or '?'}@{self.database or '?'} {self.addr}"

    # ------------------------------------------------------------------ closing

    def fatal(self, sqlstate: str, message: str) -> None:
        """Send a FATAL error and close the session."""
        if self.closed:
            return
        if self.gw.config.log_pooler_errors:
            log.info("closing client %s: %s", self.describe(), message)
        try:
            self.transport.write(m.error_response(sqlstate, message, "FATAL"))
        except Exception:  # pragma: no cover
            pass
        self._close_now(message)

    def _close_now(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self._let_go(reason)
        t = self.transport
        if t is not None:
            t.close()

    def _let_go(self, reason: str) -> None:
        """The session is over: its timer, its place in a pool's queue, its server."""
        if reason and not self.end_reason:
            self.end_reason = reason
        if self.token_expiry is not None:
            self.token_expiry.cancel()
            self.token_expiry = None
        if self.waiting and self.pool is not None:
            self.pool.cancel_wait(self)
            self.waiting = False
        srv = self.server
        self.server = None
        if srv is not None:
            self._detach_server(srv)

    def _detach_server(self, srv: ServerConn) -> None:
        """The client is gone: give the server back only if nothing of the client is left on it."""
        srv.client = None
        self._released(srv)
        if srv.state == S_CLOSED:
            return
        if not srv.clean() or self.cskip:
            if srv.queue:
                self.gw.send_cancel(srv)  # stop the running query so its locks go at once
            srv.close("client disconnected mid-transaction" if srv.tx_status != m.TX_IDLE else
                      "client disconnected before Sync" if srv.pending_sync or srv.awaiting_sync else
                      "client disconnected mid-message" if self.cskip else
                      "not reusable" if srv.dirty else
                      "client disconnected while a query was running")
            self.pool.active.discard(srv)
            return
        srv.resume_reading()
        cfg = self.gw.config
        if (self.mode == "session" or cfg.server_reset_query_always) and cfg.server_reset_query:
            srv.resetting = True
            srv.queue.clear()
            srv.send(m.query(cfg.server_reset_query))
        else:
            self.pool.release(srv)

    def token_expired(self) -> None:
        self.token_expiry = None
        if not self.closed:
            log.info("client %s: login token expired, closing the session", self.describe())
            self.fatal("28000", "the login token has expired: log in again with a fresh token")

    # ------------------------------------------------------------------ login

    async def _login(self) -> None:
        try:
            await self._login_guarded()
        finally:
            if self.closed:
                self._leave(False)

    async def _login_guarded(self) -> None:
        cfg = self.gw.config
        try:
            async with asyncio.timeout(cfg.client_login_timeout or None):
                await self.login.run()
        except asyncio.CancelledError:
            self._close_now()
            return
        except TimeoutError:
            self.fatal("08P01", "client_login_timeout: login took too long")
            return
        except m.ProtocolError as e:
            log.info("client %s: bad startup: %s", self.addr, e)
            self.fatal(e.sqlstate, str(e))
            return
        except ClientError as e:
            self.fatal(e.sqlstate, str(e))
            return
        except ServerLoginError as e:
            self.fatal(e.sqlstate if e.sqlstate.startswith(("08", "3D", "57", "53")) else "08006",
                       f"could not log in to the server: {e}")
            return
        except TlsFailed as e:
            log.info("client %s: TLS handshake failed: %s", self.addr, e)
            self._close_now()
            return
        except (ConnectionResetError, OSError):
            self._close_now()
            return
        except Exception:
            log.exception("client %s: login failed unexpectedly", self.addr)
            self.fatal("XX000", "internal error during login")
            return
        # logged in: anything the client already sent is processed now
        login, self.login = self.login, None
        self.state = C_CONSOLE if self.console else C_RELAY if self.relay is not None else C_READY
        ev = self.events.login
        if ev is not None:
            ev(self)
        if login.buf:
            self.data_received(bytes(login.buf))
        elif login.eof:
            self._close_now("client disconnected")

    # ------------------------------------------------------------------ the admin console

    def _console_data(self, data: bytes) -> None:
        """A console session's messages: simple queries only, one command each (admin.py)."""
        buf = self.rbuf + data if self.rbuf else data
        pos, n = 0, len(buf)
        while n - pos >= 5 and not self.console_waiting and not self.closed:
            t = buf[pos]
            (length,) = _unpack_len(buf, pos + 1)
            end = pos + 1 + length
            if length < 4 or length > self.max_packet:
                self.fatal("08P01", f"invalid message length {length}")
                return
            if end > n:
                break
            if t == T_QUERY:
                sql = bytes(buf[pos + 5 : end]).rstrip(b"\x00").decode("utf-8", "replace")
                reply = self.gw.console.execute(self, sql)
                if reply is None:
                    self.console_waiting = True  # answered by console_reply
                else:
                    self.write(reply)
            elif t == T_TERMINATE:
                self._close_now("client terminated the session")
                return
            elif t in (T_PARSE, T_BIND, T_EXECUTE):
                self.fatal("08P01", "extended query protocol not supported by admin console")
                return
            else:
                self.fatal("08P01", f"unsupported packet type for admin console: {chr(t)!r}")
                return
            pos = end
        self.rbuf = buf[pos:]

    def console_reply(self, reply: bytes) -> None:
        """The answer of a console command that waited."""
        self.console_waiting = False
        if not self.closed:
            self.write(reply)
            if self.rbuf:
                rest, self.rbuf = self.rbuf, b""
                self._console_data(rest)

    # ------------------------------------------------------------------ what the console shows of a session

    def state_name(self) -> str:
        if self.state == C_LOGIN:
            return "login"
        if self.waiting:
            return "waiting"
        return "active" if self.server is not None or self.relay is not None else "idle"

    def socket_row(self, debug: bool) -> tuple:
        now = time.monotonic()
        wait = now - self.wait_started if self.waiting else 0.0
        return socket_row("C", self.user or self.login_name, self.database, self.state_name(), self.transport,
                          self.connected_wall, time.time() - (now - self.last_active), wait, False, self,
                          self.server, 0, self.params.get("application_name", self.app_name),
                          len(self.book.stmts), self.id, debug, len(self.rbuf),
                          self.relay.mode if self.relay is not None else "none")

    def fd_row(self) -> tuple | None:
        if self.state == C_LOGIN or self.closed:
            return None
        return fd_row(self.transport, "client", self.user, self.database,
                      (self.pid << 32) | (self.key & 0xFFFFFFFF), self.server, self.params)

    def has_buffered(self) -> bool:
        if self.rbuf or self.cskip:
            return True
        try:
            return bool(self.transport is not None and self.transport.get_write_buffer_size())
        except Exception:  # noqa: BLE001 - a closing transport
            return False

    # ------------------------------------------------------------------ the client -> server loop

    def _client_data(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        t = data[0]
        if (t == T_QUERY or t == T_PARSE) and not (self.rbuf or self.cskip or self.waiting or self.skip_until_sync):
            srv = self.server
            if srv is None or not (srv.queue or srv.awaiting_sync):
                if self._lone_query(data) if t == T_QUERY else self._unnamed_batch(data):
                    return
        skip = self.cskip
        if skip:
            srv = self.server
            n = len(data)
            chunk = data if skip >= n else data[:skip]
            if srv is not None:
                srv.send(chunk)
            if skip >= n:
                self.cskip = skip - n
                return
            self.cskip = 0
            data = data[skip:]
        if self.rbuf:
            data = self.rbuf + data
        self.rbuf = data
        if not self.waiting:
            self._pump()

    # -- the fast lanes: the commonest requests, whole in one read with nothing outstanding, are
    # framed by a shortcut, decided and acquired as _pump would, and sent as one unit; anything
    # else returns False and _pump does the work

    def _lone_query(self, data: bytes) -> bool:
        """One simple Query, alone in ``data``."""
        n = len(data)
        if n < 6:
            return False
        (length,) = _unpack_len(data, 1)
        if length + 1 != n or length > self.max_packet or (self.rewrite and data[5] in b"dD \t\r\n"):
            return False  # more than one message, a bad length, or a DEALLOCATE/DISCARD to follow
        return self._fast_unit(data, n, None)

    def _unnamed_batch(self, data: bytes) -> bool:
        """Parse of the unnamed statement, then Binds, Describes and Executes of the unnamed
        statement and portal, then Sync, alone in ``data`` (what pgbench -M extended and many
        drivers send for a one-off statement). Without the Sync at its end a batch leaves the
        server waiting for one (an implicit transaction): _pump follows that (pending_sync)."""
        n = len(data)
        if n < 9 or self.book.mask_portals:
            return False
        max_packet = self.max_packet
        (length,) = _unpack_len(data, 1)  # the caller saw 'P'
        if length < 8 or length > max_packet or data[5]:
            return False  # a named statement, or something _pump reports
        first = pos = length + 1
        kinds = [_E_PARSE]
        # the shortest lengths here are protocol.frontend.MIN_LENGTH's (a lookup per message
        # costs more than these literals; test_fast_lanes_unit pins them against the table)
        while n - pos >= 5:
            t = data[pos]
            (length,) = _unpack_len(data, pos + 1)
            end = pos + 1 + length
            if end > n or length > max_packet:
                return False
            if t == T_BIND:
                if length < 12 or data[pos + 5] or data[pos + 6]:
                    return False
                kinds.append(_E_BIND)
            elif t == T_EXECUTE:
                if length < 9 or data[pos + 5]:
                    return False
                kinds.append(_E_EXECUTE)
            elif t == T_DESCRIBE:
                if length < 6 or data[pos + 6]:
                    return False
                kinds.append(_E_DESCRIBE)
            elif t == T_SYNC and end == n and length == 4:
                kinds.append(_E_SYNC)
            else:
                return False  # anything else (and a short or bodied message) goes to _pump
            pos = end
        if pos != n or kinds[-1] is not _E_SYNC:
            return False
        return self._fast_unit(data, first, kinds)

    def _fast_unit(self, data: bytes, first: int, kinds: list | None) -> bool:
        """Decide the unit's first message (``first`` bytes), acquire a server, send the unit;
        ``kinds`` are its queue entries (None: a lone Query)."""
        if self.gw.policy is None and self.events.decided is None:
            # no rules: only the unnamed statement is followed (a Query destroys it, Parse makes it)
            self.book.unnamed_ok = kinds is not None
            refusal = None
        else:
            try:
                refusal = self.governor.decide(data[0], data, 0, first)
            except (m.ProtocolError, ClientError) as e:  # as _pump answers a malformed message
                self.fatal(e.sqlstate, str(e))
                return True
        if refusal is not None or (kinds is not None and (self.book.mask_stmts or self.book.mask_portals
                                                          or self.book.gated)):
            # a refusal, a hold, or masks to follow: _pump takes it from here
            self.rbuf = data
            if refusal is None:
                self.ready_query = first
            else:
                self.first_refusal = refusal
            self._pump()
            return True
        if kinds is not None and self.events.bound is not None:
            self._report_binds(data, first)
        srv = self.server
        out: list[bytes] = []
        if srv is None:
            srv = self.pool.acquire(self)
            if srv is None:
                self.rbuf = data
                self.ready_query = first
                self.ready_unit = (len(data), kinds)
                self.waiting = True
                return True
            self._attach(srv, out, 0.0)
        self._send_unit(srv, data, kinds, out)
        return True

    def _report_binds(self, data: bytes, pos: int) -> None:
        """events.bound for the Binds of a fast-lane unit (framed already: lengths are sound)."""
        ev = self.events.bound
        n = len(data)
        while n - pos >= 5:
            (length,) = _unpack_len(data, pos + 1)
            end = pos + 1 + length
            if data[pos] == T_BIND:
                ev(self, data, pos, end)
            pos = end

    def _send_unit(self, srv: ServerConn, data: bytes, kinds: list | None, out: list) -> None:
        """Forward a decided fast-lane unit after ``out`` (what _attach put first)."""
        if kinds is not None:
            srv.queue.extend(kinds)
        elif self.governor.query_mask is None:
            srv.queue.append(_E_QUERY)
        else:
            self._queue_query(srv)
        srv.pending_sync = False  # the unit ends with Sync, or is a Query (see _forward)
        srv.query_start = self.last_active
        if out:
            out.append(data)
            data = b"".join(out)
        n = len(data)
        srv.sent += n
        srv.transport.write(data)
        ev = self.events.forwarded
        if ev is not None:
            ev(self, srv, n)

    def _queue_query(self, srv: ServerConn) -> None:
        """The queue entry of a Query (or FunctionCall) being sent, with its masks if any."""
        qm = self.governor.query_mask
        if qm is None:
            srv.queue.append(_E_QUERY)
        else:
            srv.queue.append((R_QUERY, qm))
            srv.masking = True
            self.governor.query_mask = None

    def _pump(self) -> None:
        """The general loop: every message of ``rbuf`` through the stages, in order."""
        data = self.rbuf
        n = len(data)
        pos = 0
        out: list[bytes] = []
        srv = self.server
        ready = self.ready_query  # the first message was decided before it waited for a server
        first_refusal = self.first_refusal
        # the Binds before ``told`` were reported (events.bound) before the wait: not again
        told = ready if self.ready_unit is None else self.ready_unit[0]
        if ready or first_refusal or self.ready_unit:
            self.ready_query = 0
            self.first_refusal = self.ready_unit = None
        max_packet = self.max_packet
        try:
            while n - pos >= 5:
                # -- frame
                t = data[pos]
                (length,) = _unpack_len(data, pos + 1)
                end = pos + 1 + length
                shortest = MIN_LENGTH.get(t)
                if shortest is None or length < shortest or length > max_packet or (length != 4 and t in BODYLESS):
                    raise m.ProtocolError(frame_error(t, length, max_packet))
                if end > n:
                    if t == T_COPY_DATA and srv is not None and not self.skip_until_sync:
                        out.append(data[pos:])  # stream large COPY data through
                        self.cskip = end - n
                        pos = n
                    break
                if self.skip_until_sync or (srv is not None and srv.awaiting_sync):
                    # after an error (one the gateway made up, or one the server sent in the
                    # extended protocol) PostgreSQL ignores all up to Sync: so does the gateway,
                    # what it would answer itself (Close, Parse, DEALLOCATE) included
                    if t == T_SYNC:
                        self.skip_until_sync = False
                        if srv is not None:
                            # the Sync the server skips to is queued now (_forward, below):
                            # what follows it is answered again, so it is no longer skipped
                            srv.awaiting_sync = False
                        else:
                            self.write(m.ready_for_query(m.TX_IDLE))
                            pos = end
                            continue
                    elif t != T_TERMINATE:
                        pos = end
                        continue
                # -- decide
                if t in GOVERNED:
                    if pos == 0 and (ready or first_refusal):
                        refusal = first_refusal  # decided before (None: accepted)
                    elif self.book.unnamed_ok and (t == T_BIND or t == T_DESCRIBE) and not self.book.gated:
                        refusal = None  # Bind and Describe are checked for a missing unnamed statement only
                    else:
                        refusal = self.governor.decide(t, data, pos, end)
                    if refusal is not None:
                        # -- hold
                        if refusal is WAIT_CATALOG:
                            self._hold(n - pos)
                            break
                        if refusal is WAIT_APPROVAL:
                            self._hold_for_approval(n - pos)
                            break
                        self._refuse(srv, t, refusal, out)
                        pos = end
                        continue
                    if t == T_BIND and pos >= told:
                        ev = self.events.bound
                        if ev is not None:
                            ev(self, data, pos, end)
                # -- acquire
                if srv is None:
                    if t == T_TERMINATE:
                        self._close_now("client terminated the session")
                        return
                    if t in _LOCAL_CANDIDATES:
                        local = self._answer_without_server(t, data, pos, end)
                        if local is not None:
                            if local:
                                self.write(local)
                            pos = end
                            continue
                    srv = self._acquire(out)
                    if srv is None:
                        self.ready_query = end - pos  # decided: not again when a server comes
                        if n - pos > 65536:
                            self.pause_reading()
                        break
                # -- forward
                if t == T_TERMINATE:
                    if out:
                        srv.send(b"".join(out))
                        out = []
                    self._close_now("client terminated the session")
                    return
                self._forward(srv, t, data, pos, end, out)
                pos = end
        except m.ProtocolError as e:
            if out and srv is not None and srv is self.server:
                srv.send(b"".join(out))
            self.fatal(e.sqlstate, str(e))
            return
        except ClientError as e:  # pragma: no cover - defensive
            self.fatal(e.sqlstate, str(e))
            return
        self.rbuf = data[pos:] if pos < n else b""
        if out and srv is not None and not srv.state == S_CLOSED:
            srv.query_start = self.last_active
            payload = b"".join(out) if len(out) > 1 else out[0]
            srv.send(payload)
            ev = self.events.forwarded
            if ev is not None:
                ev(self, srv, len(payload))
        if srv is not None and srv.queue:
            q0 = srv.queue[0][0]
            if FAKE_FIRST <= q0 <= FAKE_LAST:
                pieces: list[bytes] = []
                srv._emit_fakes(pieces)
                self.write(b"".join(pieces))
                if not srv.queue and srv.client is self and srv.tx_status == m.TX_IDLE:
                    # everything was answered locally: the server is free again
                    self.server_ready(srv, srv.tx_status)

    # -- hold

    def _hold(self, pending: int) -> None:
        """The request at the head of rbuf waits without a server; it is decided again when the
        wait ends (``_hold_ended``). Today the only wait is for masking's catalog of the
        database, which plans masked statements."""
        self.waiting = True
        if pending > 65536:
            self.pause_reading()
        self.governor.wait_for_catalog(self._hold_ended)

    def _hold_ended(self) -> None:
        self.waiting = False
        if not self.closed and self.state == C_READY:
            self.resume_reading()
            self._pump()

    def _hold_for_approval(self, pending: int) -> None:
        """The message at the head of rbuf waits for reviewers (holds.ApprovalDesk); a server
        linked already (a transaction) stays linked, none is taken."""
        self.waiting = True
        if pending > 65536:
            self.pause_reading()
        need = self.governor.need
        self.governor.need = None
        self.governor.ticket = None
        self.held = self.gw.approvals.hold(self, need)
        self.held_ticket = need.ticket

    def approval_decided(self, req) -> None:
        """The desk's word on the held statement: approved, it runs exactly as sent (decided again,
        with the approval as its ticket); otherwise it is refused as PostgreSQL refuses a failing
        statement."""
        if self.held is not req:
            return
        self.held = None
        ticket = self.held_ticket
        self.held_ticket = b""
        if self.closed:
            return
        self.waiting = False
        if req.state == "approved":
            self.governor.ticket = ticket
        else:
            self.first_refusal = refusal = refusal_of(req)
            # the statement events.decided told when it was held (audited and recorded as such)
            self.governor.refusing = (refusal, Refused("Q" if req.route == "simple" else "P", req.sql,
                                                       Decision("require_approval", req.reason, req.rule), True))
        self.resume_reading()
        self._pump()

    # -- refusals

    def _refuse(self, srv: ServerConn | None, t: int, refusal: tuple[str, str], out: list) -> None:
        """Answer a refused message as PostgreSQL would answer a failing one. With a server
        linked the server raises the error, so it arrives in order and fails an open
        transaction; otherwise the gateway answers by itself."""
        sqlstate, message = refusal[0], refusal[1]
        detail, hint = (refusal[2], refusal[3]) if len(refusal) > 2 else ("", "")
        ev = self.events.refused
        if ev is not None:
            kept = self.governor.refusing
            self.governor.refusing = None
            if kept is not None and kept[0] is refusal:
                what = kept[1]
            else:  # (every refusal decide makes is kept; this one was made elsewhere)
                what = Refused(MESSAGE_KIND.get(t, chr(t)), "")
            ev(self, sqlstate, message, what)
        if srv is None:
            if t == T_QUERY or t == T_FUNCTION:
                self.write(m.error_response(sqlstate, message, detail=detail, hint=hint) + m.ready_for_query(m.TX_IDLE))
            else:
                self.write(m.error_response(sqlstate, message, detail=detail, hint=hint))
                self.skip_until_sync = True
            return
        if t == T_QUERY or t == T_FUNCTION:
            out.append(m.query(refusal_sql(sqlstate, message, detail, hint)))
            srv.queue.append((R_QUERY_REFUSAL, None))
        else:
            self._refuse_in_order(srv, sqlstate, message, out, detail, hint)

    def _refuse_in_order(self, srv: ServerConn, sqlstate: str, message: str, out: list, detail: str = "",
                         hint: str = "") -> None:
        """An error the gateway makes up while a server is linked: the server raises it for us,
        so it arrives in protocol order and fails an open transaction exactly as PostgreSQL
        would. Everything the client sends up to Sync is then ignored."""
        body = b"\x00" + refusal_sql(sqlstate, message, detail, hint).encode() + b"\x00\x00\x00"
        out.append(m.message(b"P", body))
        out.append(m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00"))
        out.append(m.message(b"E", b"\x00\x00\x00\x00\x00"))
        srv.queue.append((R_PARSE_SKIP, None))
        srv.queue.append((R_BIND_SKIP, None))
        srv.queue.append((R_EXECUTE_REFUSAL, None))
        srv.pending_sync = True
        self.skip_until_sync = True

    def _answer_without_server(self, t: int, data: bytes, pos: int, end: int) -> bytes | None:
        """Requests the gateway answers itself while no server is linked (nothing outstanding).
        Returns the reply bytes (b"" for none), or None when a server is needed."""
        if t == T_SYNC:
            return m.ready_for_query(m.TX_IDLE)
        if t == T_FLUSH:
            return b""
        if t == T_CLOSE and self.rewrite and data[pos + 5] == 83 and data[pos + 6] != 0:
            self.book.forget(data[pos + 6 : end - 1])
            return m.CLOSE_COMPLETE
        if t == T_QUERY and self.rewrite and data[pos + 5] in b"dD \t\r\n":
            name = self.book.deallocate_target(data[pos + 5 : end - 1], self.governor.codec)
            if name is not None:
                self.book.forget(name)
                return m.command_complete("DEALLOCATE") + m.ready_for_query(m.TX_IDLE)
            return None
        if t in (T_COPY_DATA, T_COPY_DONE, T_COPY_FAIL):
            return b""  # COPY data with no COPY in progress is ignored, as PostgreSQL does
        return None

    # -- forward

    def _forward(self, srv: ServerConn, t: int, data: bytes, pos: int, end: int, out: list) -> None:
        """Append the message ``data[pos:end]`` (decided, not a Terminate) to ``out`` for
        ``srv`` as the server must see it, with its queue entry."""
        if t in NEEDS_SYNC:
            srv.pending_sync = True
        elif t == T_SYNC or t == T_QUERY:
            srv.pending_sync = False  # a Query the server runs commits; one it skips leaves awaiting_sync
        book = self.book
        if t == T_QUERY or t == T_FUNCTION:
            if self.rewrite and t == T_QUERY and data[pos + 5] in b"dD \t\r\n":
                if book.sql_deallocate(srv, data[pos + 5 : end - 1], self.governor.codec, out):
                    return
            out.append(data[pos:end])
            self._queue_query(srv)
        elif t == T_BIND:
            if book.mask_stmts or book.mask_portals:
                book.bind_masks(data[pos + 5 : end])
            if self.rewrite and (data[pos + 5] != 0 or data[pos + 6] != 0):
                refusal = book.bind(srv, data[pos + 5 : end], out)
                if refusal is not None:
                    self._refuse_in_order(srv, *refusal, out)
            else:
                out.append(data[pos:end])
                srv.queue.append((R_BIND, None))
        elif t == T_EXECUTE:
            ctx = book.mask_portals.get(data[pos + 5 : end - 5]) if book.mask_portals else None
            if ctx is None:
                out.append(data[pos:end])
                srv.queue.append((R_EXECUTE, None))
            else:
                # learn the portal's columns and formats before its rows arrive
                out.append(m.describe_portal(data[pos + 5 : end - 5]))
                srv.queue.append((R_DESCRIBE_MASK, ctx))
                out.append(data[pos:end])
                srv.queue.append((R_EXECUTE, ctx))
                srv.masking = True
        elif t == T_SYNC:
            out.append(data[pos:end])
            srv.queue.append((R_SYNC, None))
        elif t == T_PARSE:
            if self.rewrite and data[pos + 5] != 0:
                refusal = book.parse(srv, data[pos + 5 : end], out)
                if refusal is not None:
                    self._refuse_in_order(srv, *refusal, out)
            else:
                out.append(data[pos:end])
                srv.queue.append((R_PARSE, None))
        elif t == T_DESCRIBE:
            if self.rewrite and data[pos + 5] == 83 and data[pos + 6] != 0:  # 'S' + name
                refusal = book.describe_statement(srv, data[pos + 6 : end - 1], out)
                if refusal is not None:
                    self._refuse_in_order(srv, *refusal, out)
            else:
                out.append(data[pos:end])
                srv.queue.append((R_DESCRIBE, None))
        elif t == T_CLOSE:
            if self.rewrite and data[pos + 5] == 83 and data[pos + 6] != 0:
                # the gateway forgets the name now: a Bind of it is refused from here on
                srv.queue.append((R_FAKE_CLOSE, book.forget_until_done(data[pos + 6 : end - 1])))
            else:
                out.append(data[pos:end])
                if book.mask_stmts or book.mask_portals:
                    srv.queue.append((R_CLOSE, (data[pos + 5], data[pos + 6 : end - 1])))
                else:
                    srv.queue.append((R_CLOSE, None))
        else:  # Flush, CopyData, CopyDone, CopyFail
            out.append(data[pos:end])

    # ------------------------------------------------------------------ acquire: linking to servers

    def _acquire(self, out: list) -> ServerConn | None:
        """A server for this session, linked (``out`` gets what must run on it first); None
        when the session waits for one (server_assigned is called then)."""
        srv = self.pool.acquire(self)
        if srv is None:
            self.waiting = True
            return None
        self._attach(srv, out, 0.0)
        return srv

    def _attach(self, srv: ServerConn, out: list, waited: float) -> None:
        self.server = srv
        srv.client = self
        if self.writing_paused:
            srv.pause_reading()
        identity = self._identity
        if identity is None:
            identity = self._identity = canonical((self.user, self.groups))
        # a server that served another identity is reset first (in transaction and statement
        # pooling a server is handed over without DISCARD ALL), so settings, temp tables, held
        # cursors, LISTENs, advisory locks and prepared statement texts one identity left on it
        # (a pii-reader's set_config of a value, say) never reach another (an agent)
        owner = srv.owner
        reset = owner is not None and owner is not identity and owner != identity
        srv.owner = identity
        if reset or (srv.param_key is not self.param_key and srv.param_key != self.param_key):
            base = (self.pool.welcome or srv.params) if reset else srv.params
            parts = []
            if reset:
                # DISCARD ALL cannot share a Query (an implicit transaction) with anything else
                out.append(m.query(IDENTITY_RESET))
                srv.queue.append((R_QUERY_SKIP, "reset"))
                srv.prepared.clear()  # re-prepared on demand (the reset runs before anything else)
                if self.pool.db.connect_query:
                    parts.append(self.pool.db.connect_query)  # what the welcome parameters include
            parts += sync_sql(self.params, base)
            if parts:
                self.pending_param_sync = True
                out.append(m.query(";".join(parts)))
                srv.queue.append((R_QUERY_SKIP, None))
        ev = self.events.server_assigned
        if ev is not None:
            ev(self, srv, waited)

    def server_assigned(self, srv: ServerConn) -> None:
        """Called by the pool when a waiting client gets a server."""
        self.waiting = False
        if self.closed:
            self.pool.release(srv)
            return
        out: list[bytes] = []
        self._attach(srv, out, time.monotonic() - self.wait_started if self.events.server_assigned else 0.0)
        unit = self.ready_unit
        if unit is not None and len(self.rbuf) == unit[0]:
            # a fast-lane unit, decided before it waited, and nothing came after it
            self.ready_unit = None
            self.ready_query = 0
            data = self.rbuf
            self.rbuf = b""
            self._send_unit(srv, data, unit[1], out)
            return
        if out:
            srv.send(b"".join(out))
        self.resume_reading()
        self._pump()

    def server_unavailable(self, sqlstate: str, message: str) -> None:
        """The pool could not get a server for this waiting client: fail the request, keep the
        session (the next request tries again)."""
        self.waiting = False
        self.ready_query = 0
        self.ready_unit = self.first_refusal = None
        if self.closed:
            return
        data = self.rbuf
        if len(data) >= 5 and data[0] == T_QUERY:
            (length,) = _unpack_len(data, 1)
            self.rbuf = data[1 + length :]
            self.write(m.error_response(sqlstate, message) + m.ready_for_query(m.TX_IDLE))
        else:
            self.write(m.error_response(sqlstate, message))
            self.skip_until_sync = True
        self.resume_reading()
        self._pump()

    # ------------------------------------------------------------------ session parameters (from replies)

    def param_sync_done(self, srv: ServerConn) -> None:
        self.pending_param_sync = False
        reported = self.pool.welcome or srv.params  # what the server reports (ParameterStatus)
        for k in TRACKED_PARAMS:
            if k in reported:
                if k in srv.params:
                    self.params[k] = srv.params[k]  # the server's canonical form
            elif k in self.params:
                # track_extra_parameters of a parameter the server never reports (search_path
                # before PostgreSQL 18): the sync set it, so the server has it now
                srv.params[k] = self.params[k]
            else:
                srv.params.pop(k, None)  # the sync RESET it
        self.param_key = srv.param_key = param_key_of(srv.params)
        self.governor.reading_changed(self.params)

    def param_changed(self, name: str, value: str) -> None:
        self.params[name] = value
        self.param_key = param_key_of(self.params)
        if name in LEXING_SETTINGS:
            self.governor.reading_changed(self.params)
        if name == "application_name":
            self.governor.session_changed()

    # ------------------------------------------------------------------ release

    def server_ready(self, srv: ServerConn, status: int, reply: bytes = b"") -> None:
        """ReadyForQuery arrived and nothing is outstanding; ``reply`` is what the server said
        up to and including it. At 'I' in transaction and statement pooling the server goes back
        to its pool (and to the next waiting client) before the reply is written, so the server
        is busy again while this client wakes up."""
        if status != m.TX_IDLE and self.tx_status == m.TX_IDLE:
            self.xact_start = self.gw.clock  # transaction_timeout counts from here
        self.tx_status = status
        ev = self.events.ready
        if ev is not None:
            ev(self, srv, status, srv.query_start, srv.sent, srv.received)
            srv.sent = srv.received = 0
        if status != m.TX_IDLE or self.mode == "session" or srv.client is not self or srv.pending_sync or self.cskip:
            # kept: a transaction, session pooling, extended-protocol requests not yet ended by
            # Sync (an implicit transaction, or an error that skips to Sync), or a message the
            # client is still sending
            if reply:
                self.write(reply)
            if self.mode == "statement" and srv.client is self and status != m.TX_IDLE:
                self.server = None
                srv.client = None
                self._released(srv)
                srv.close("transaction in statement pooling mode")
                self.fatal("25000", "transaction blocks not allowed in statement pooling mode")
            return
        self.server = None
        srv.client = None
        book = self.book  # what lived only on that server goes (StatementBook.server_gone, inline)
        book.unnamed_ok = False
        if book.sql_prepared:
            book.sql_prepared.clear()
        if self.writing_paused:
            srv.resume_reading()
        self.pool.release(srv)
        ev = self.events.server_released
        if ev is not None:
            ev(self, srv)
        if reply and not self.closed:
            self.transport.write(reply)
        if self.rbuf and not self.waiting:
            self._pump()

    def _released(self, srv: ServerConn) -> None:
        ev = self.events.server_released
        if ev is not None:
            ev(self, srv)

    def server_lost(self, srv: ServerConn, reason: str) -> None:
        """The linked server connection died."""
        if self.server is not srv:
            return
        self.server = None
        self._released(srv)
        self.book.server_gone()  # what lived on that server is gone with it
        if self.closed:
            return
        if self.mode == "session" or srv.tx_status != m.TX_IDLE:
            self.fatal("08006", f"server connection lost: {reason}")
            return
        # transaction/statement mode outside a transaction block: fail what is outstanding and
        # keep the session, as after any error
        out = [m.error_response("08006", f"server connection lost: {reason}")]
        syncs = sum(1 for kind, _ in srv.queue if kind in (R_SYNC, R_QUERY))
        last_is_sync = bool(srv.queue) and srv.queue[-1][0] in (R_SYNC, R_QUERY)
        out.extend(m.ready_for_query(m.TX_IDLE) for _ in range(syncs))
        srv.queue.clear()
        if not last_is_sync:
            self.skip_until_sync = True
        self.write(b"".join(out))
        if self.rbuf:
            self._pump()

    def server_failed(self, srv: ServerConn, sqlstate: str, message: str) -> None:
        """The reply side (or the pool) gave up on ``srv``, which is closed: end the session."""
        if self.server is srv:
            self.server = None
            self._released(srv)
        self.fatal(sqlstate, message)


def refusal_sql(sqlstate: str, message: str, detail: str = "", hint: str = "") -> str:
    """A statement that makes the server raise exactly this error."""
    tag = "pooler_refusal"
    more = "".join(f", {key} = {quote_literal(text.replace(f'${tag}$', ''))}"
                   for key, text in (("DETAIL", detail), ("HINT", hint)) if text)
    msg = message.replace(f"${tag}$", "")
    return (f"DO ${tag}$ BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', "
            f"MESSAGE = {quote_literal(msg)}{more}; END ${tag}$")
