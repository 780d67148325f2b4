"""One connection to PostgreSQL: login, then the server -> client forwarding loop.

Rules this module keeps:
- Server bytes are *scanned*, not split: message headers are read in place and whole chunks
  are forwarded in one write. Only the few messages the gateway must act on are looked at.
- Every request forwarded to the server has an entry in ``self.queue`` describing the reply it
  expects (PgBouncer's outstanding-request queue). The server goes back to its pool only at
  ReadyForQuery 'I' with the queue empty.
- Fake replies (for requests answered by the gateway itself, such as a Parse of a statement this
  server already has) sit in the same queue so they reach the client in protocol order.
- A small reply made only of messages that need forwarding (``_PLAIN_REPLIES``) and ending with
  the ReadyForQuery the queue waits for takes a fast lane: one header scan, then the server goes
  back to its pool before the reply is written. Anything else takes the general loop, from the
  start of the chunk (the fast lane changes nothing until it has seen the whole reply).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import time

import scramp

from ..masking.plan import MaskCtx, MaskingError, QueryMask, plan_for, scrub_message
from ..protocol import messages as m
from .interfaces import (
    FAKE_FIRST, FAKE_LAST, R_BIND, R_BIND_SKIP, R_CLOSE, R_CLOSE_SKIP, R_DESCRIBE, R_DESCRIBE_MASK,
    R_EXECUTE, R_EXECUTE_REFUSAL, R_FAKE_CLOSE, R_FAKE_DONE, R_FAKE_PARSE, R_PARSE, R_PARSE_SKIP,
    R_QUERY, R_QUERY_REFUSAL, R_QUERY_SKIP, R_SYNC, ClientSide, ServerHome, next_socket_id,
)
from .netopts import tune_socket
from .params import TRACKED, param_key_of

log = logging.getLogger("pooler.server")

_unpack_len = struct.Struct("!i").unpack_from

# first bytes of the CommandComplete tags _check_tag looks at: DEALLOCATE/DISCARD/DROP,
# CREATE/COMMENT, ALTER, PREPARE
_TAG_FIRST = frozenset(b"DCAP")

# The fast lane (ServerConn.data_received): a small reply made only of these messages, ending
# with the one ReadyForQuery the queue waits for, needs nothing but forwarding: ParseComplete,
# BindComplete, RowDescription, DataRow, NoData, ParameterDescription, PortalSuspended,
# EmptyQueryResponse (CommandComplete too, unless _check_tag must see its tag).
_PLAIN_REPLIES = frozenset(b"12TDnts" b"I")
_PLAIN_REQUESTS = frozenset((R_PARSE, R_BIND, R_DESCRIBE, R_EXECUTE))  # answered by plain replies
_RESULT_PARTS = frozenset(b"DCIs")  # DataRow, CommandComplete, EmptyQueryResponse, PortalSuspended: for events.watching
FAST_REPLY_MAX = 16384  # larger chunks (streamed results) take the general loop only

_READY_ENDS = (R_SYNC, R_QUERY, R_QUERY_REFUSAL, R_QUERY_SKIP)
_READY_HEADS = frozenset((0,) + _READY_ENDS)  # what a ReadyForQuery may answer (0: nothing queued)


def _only_plain(queue) -> bool:
    """Is every entry but the last one a request that plain replies answer?"""
    left = len(queue) - 1
    for kind, _ in queue:
        if not left:
            return True
        if kind not in _PLAIN_REQUESTS:
            return False
        left -= 1
    return True


def _masked_info(info) -> bool:
    """Is this queue entry's info the masks of a statement (its errors and notices scrubbed)?"""
    return (type(info) is QueryMask and info.ctx is not None) or type(info) is MaskCtx

T_DATAROW = ord("D")
T_COPYDATA = ord("d")
T_READY = ord("Z")
T_COMPLETE = ord("C")
T_ERROR = ord("E")
T_PARAM = ord("S")
T_NOTICE = ord("N")
T_NOTIFY = ord("A")
T_PARSE_COMPLETE = ord("1")
T_BIND_COMPLETE = ord("2")
T_CLOSE_COMPLETE = ord("3")
T_ROWDESC = ord("T")
T_NODATA = ord("n")
T_EMPTY = ord("I")
T_SUSPENDED = ord("s")
T_COPY_IN = ord("G")
T_COPY_OUT = ord("H")
T_COPY_BOTH = ord("W")

# State
S_CONNECTING, S_LOGIN, S_IDLE, S_ACTIVE, S_CLOSED = range(5)


def _addr(info) -> tuple[str | None, int]:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return ("unix", 0) if info is not None else (None, 0)


def _write_buffered(transport) -> bool:
    try:
        return bool(transport is not None and transport.get_write_buffer_size())
    except Exception:  # noqa: BLE001 - a closing transport
        return False


def _fd_of(transport) -> int | None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    try:
        return sock.fileno() if sock is not None else None
    except Exception:  # noqa: BLE001
        return None


def tls_info(transport) -> str:
    """PgBouncer's tls column: protocol/cipher (empty without TLS)."""
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_obj is None:
        return ""
    cipher = ssl_obj.cipher()
    return f"{ssl_obj.version()}/{cipher[0] if cipher else ''}"


def socket_row(kind: str, user: str, database: str, state: str, transport, connect_wall: float,
               request_wall: float, wait: float, close_needed: bool, me, link, remote_pid: int,
               app_name: str, prepared: int, ident: int, debug: bool, pending: int,
               replication: str = "none") -> tuple:
    """A row of SHOW CLIENTS/SERVERS/SOCKETS (admin.COLUMNS["clients"] and, with ``debug``, the
    buffer columns)."""
    from time import localtime, strftime

    def ts(t: float) -> str:
        return strftime("%Y-%m-%d %H:%M:%S %Z", localtime(t))

    addr, port = _addr(transport.get_extra_info("peername") if transport is not None else None)
    laddr, lport = _addr(transport.get_extra_info("sockname") if transport is not None else None)
    row = (kind, user or "(nouser)", database or "(nodb)", replication, state, addr, port, laddr, lport,
           ts(connect_wall), ts(request_wall), int(wait), int((wait % 1) * 1e6), int(close_needed),
           f"0x{id(me):x}", f"0x{id(link):x}" if link is not None else "", remote_pid, tls_info(transport),
           app_name, prepared, ident)
    if debug:
        out = 0
        try:
            out = transport.get_write_buffer_size() if transport is not None else 0
        except Exception:  # noqa: BLE001
            pass
        row += (pending, 0, 0, 0, 0, pending, out)
    return row


def fd_row(transport, task: str, user: str, database: str, cancel: int, link, params: dict) -> tuple | None:
    fd = _fd_of(transport)
    if fd is None or transport.get_extra_info("ssl_object") is not None:
        return None
    addr, port = _addr(transport.get_extra_info("peername"))
    link_fd = _fd_of(getattr(link, "transport", None)) if link is not None else 0
    return (fd, task, user, database, addr, port, cancel, link_fd or 0, params.get("client_encoding"),
            params.get("standard_conforming_strings"), params.get("DateStyle"), params.get("TimeZone"),
            None, None, None)


class ServerLoginError(Exception):
    def __init__(self, message: str, sqlstate: str = "08006") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.unreachable = False  # the host could not be reached at all (a host list tries the next)


class ReplicationRelay(asyncio.Protocol):
    """The server side of a replication connection once logged in (it takes over the server's
    transport): bytes pass both ways unread, with backpressure both ways. Never pooled."""

    def __init__(self, client, transport, mode: str) -> None:
        self.client = client  # the session (ClientSide-like: write, pause_reading, resume_reading, relay_lost)
        self.transport = transport
        self.mode = mode  # "logical" (replication=database) or "physical", as SHOW CLIENTS says

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.client.relay_lost()

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()


class ServerConn(asyncio.Protocol):

    # every attribute is declared: slot access is what the hot path reads most
    __slots__ = (
        "awaiting_sync", "cancels_in_flight", "client", "close_reason", "collect_error",
        "collect_waiter", "collected", "collected_names", "created_at", "ddl_pending", "dirty", "events", "in_copy",
        "key", "last_used", "login_waiter", "masking", "owner", "param_key", "params", "parked",
        "peer", "pending_sync", "pid", "pool", "prepared", "query_start", "queue", "rbuf",
        "reading_paused", "received", "reset_waiter", "resetting", "rneed", "rowplan", "scram", "startup_extra",
        "sent", "side", "skip", "state", "transport", "tx_status", "w_bytes", "w_rows", "w_start",
        "writing_paused", "id", "connected_wall", "close_needed",
    )

    def __init__(self, pool: ServerHome, side: bool = False, startup_extra: dict | None = None) -> None:
        self.pool = pool
        self.startup_extra = startup_extra  # more StartupMessage parameters (replication connections)
        self.events = pool.events
        self.id = next_socket_id()
        self.connected_wall = time.time()
        self.close_needed = False  # RECONNECT: closed when it comes back (dirty is set too)
        self.side = side  # the gateway's own connection (catalog reads): not pooled
        self.collected: list | None = None  # side connections: result sets of run_query
        self.collect_waiter: asyncio.Future | None = None
        self.rowplan = None  # masking.plan.RowPlan rewriting the DataRows of the current result
        self.ddl_pending = False  # DDL ran in the open transaction: invalidate the catalog at commit
        self.masking = False  # a masked request is queued (until ReadyForQuery with nothing queued)
        self.owner: tuple | None = None  # (user, groups) of the last client linked (transaction pooling)
        self.rneed = 0  # length of the partial masked DataRow held in rbuf (a bytearray then)
        self.transport: asyncio.Transport | None = None
        self.state = S_CONNECTING
        self.rbuf = b""
        self.skip = 0  # bytes of a passed-through message still to come
        self.client: ClientSide | None = None
        self.queue: collections.deque = collections.deque()
        self.params: dict[str, str] = {}
        self.param_key: tuple = ()
        self.pid = 0
        self.key = 0
        self.tx_status = m.TX_IDLE
        self.prepared: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.login_waiter: asyncio.Future | None = None
        self.scram: scramp.ScramClient | None = None
        self.cancels_in_flight = 0
        self.close_reason = ""
        self.reading_paused = False
        self.writing_paused = False
        self.in_copy = False
        self.dirty = False  # must not be reused (reset failed, protocol confusion)
        self.resetting = False  # server_reset_query in flight, nobody linked
        self.reset_waiter: asyncio.Future | None = None  # connect_query in flight
        self.parked = False  # released while a cancel request was in flight
        self.pending_sync = False  # extended-protocol requests sent since the last Sync
        self.awaiting_sync = False  # an extended-protocol error: the server skips every request up to a Sync not yet queued
        self.query_start = 0.0  # when the client's requests now outstanding were sent
        self.peer = ""
        # this round's bytes (the session reads and resets them at ReadyForQuery: events.ready)
        self.sent = 0
        self.received = 0
        # events.completed/failed (events.watching): server bytes and start of the statement
        # whose result is streaming
        self.w_bytes = 0
        self.w_start = 0.0
        self.w_rows = 0  # rows of this statement's result reported (events.row, up to rows_wanted)

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state = S_LOGIN
        # made here, not in login(): over a Unix socket a trust login can be over (or refused)
        # before the opener's task resumes to await it
        self.login_waiter = asyncio.get_running_loop().create_future()
        tune_socket(transport.get_extra_info("socket"), self.pool.tcp_settings())
        params = self.pool.startup_params()
        if self.startup_extra:
            params.update(self.startup_extra)
        transport.write(m.startup_message(params))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        prev = self.state
        self.state = S_CLOSED
        if self.login_waiter is not None and not self.login_waiter.done():
            self.login_waiter.set_exception(
                ServerLoginError(self.close_reason or "server closed the connection during login")
            )
        client = self.client
        self.client = None
        if self.side:
            w = self.collect_waiter
            if w is not None and not w.done():
                w.set_exception(ConnectionResetError(self.close_reason or "server closed the connection"))
            return
        self.pool.server_gone(self)
        if client is not None:
            client.server_lost(self, self.close_reason or "server closed the connection unexpectedly")
        elif prev in (S_IDLE, S_ACTIVE) and not self.close_reason:
            log.info("server connection %s closed by server", self.describe())

    def pause_writing(self) -> None:
        self.writing_paused = True
        c = self.client
        if c is not None:
            c.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        c = self.client
        if c is not None:
            c.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def describe(self) -> str:
        return f"{self.pool.name} pid={self.pid}"

    # ------------------------------------------------------------------ what the console shows

    def state_name(self) -> str:
        """PgBouncer's name for the list this server would be on (SHOW SERVERS' state): new
        (logging in), active (linked), being_canceled (released while a cancel request for it
        is in flight), used (linked to nobody but not back in the pool: resetting), idle."""
        st = self.state
        if st == S_IDLE:
            return "idle"
        if st == S_ACTIVE:
            return "active" if self.client is not None else "being_canceled" if self.parked else "used"
        return "new" if st in (S_CONNECTING, S_LOGIN) else "closed"

    def socket_row(self, debug: bool) -> tuple:
        """This server as a row of SHOW SERVERS/SOCKETS."""
        c = self.client
        state = self.state_name()
        wall_used = time.time() - (time.monotonic() - self.last_used) if self.last_used else self.connected_wall
        return socket_row("S", self.pool.server_user, self.pool.db.name, state, self.transport,
                          self.connected_wall, wall_used, 0.0, self.close_needed, self, c,
                          self.pid, self.params.get("application_name", ""), len(self.prepared), self.id,
                          debug, len(self.rbuf))

    def fd_row(self) -> tuple | None:
        """This server as a row of SHOW FDS (None: no socket, or TLS, which PgBouncer skips too)."""
        return fd_row(self.transport, "server", self.pool.server_user, self.pool.db.name,
                      (self.pid << 32) | (self.key & 0xFFFFFFFF), self.client, self.params)

    def has_buffered(self) -> bool:
        return bool(self.rbuf) or _write_buffered(self.transport)

    def close(self, reason: str = "", terminate: bool = True) -> None:
        if self.state == S_CLOSED:
            return
        self.close_reason = reason or self.close_reason or "closed by gateway"
        t = self.transport
        if t is not None and not t.is_closing():
            if terminate:
                try:
                    t.write(m.TERMINATE)
                except Exception:  # pragma: no cover - transport already broken
                    pass
            t.close()
        elif t is None:
            self.state = S_CLOSED

    # ------------------------------------------------------------------ login

    async def login(self) -> None:
        w = self.login_waiter
        assert w is not None  # connection_made made it
        await w

    def _login_data(self, data: bytes) -> None:
        buf = self.rbuf + data if self.rbuf else data
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            t = buf[pos]
            (length,) = _unpack_len(buf, pos + 1)
            if length < 4 or length > 1 << 24:
                self._login_failed("invalid message from server during login", "08P01")
                return
            end = pos + 1 + length
            if end > n:
                break
            body = buf[pos + 5 : end]
            pos = end
            try:
                if not self._login_message(t, body):
                    return
            except ServerLoginError as e:
                self._login_failed(str(e), e.sqlstate)
                return
            except Exception as e:  # malformed auth exchange
                self._login_failed(f"server login failed: {e}", "08P01")
                return
            if self.state != S_LOGIN:
                rest = buf[pos:]
                self.rbuf = b""
                if rest:
                    self._login_failed("unexpected data from server after login", "08P01")
                return
        self.rbuf = buf[pos:]

    def _login_message(self, t: int, body: bytes) -> bool:
        if t == ord("R"):
            code, data = m.parse_authentication(body)
            pw = self.pool.server_password
            if code == 0:
                return True
            if code == 3:
                if pw is None:
                    raise ServerLoginError(f"server asked for a password for user {self.pool.server_user!r} but none is configured", "28P01")
                self.transport.write(m.password_message(pw.encode() + b"\x00"))
            elif code == 5:
                if pw is None:
                    raise ServerLoginError(f"server asked for a password for user {self.pool.server_user!r} but none is configured", "28P01")
                from ..auth.passwords import is_md5, md5_response, md5_secret
                secret = pw if is_md5(pw) else md5_secret(self.pool.server_user, pw)
                self.transport.write(m.password_message(md5_response(secret, data).encode() + b"\x00"))
            elif code == 10 and pw is None and self.pool.scram_keys is not None:
                # SCRAM pass-through: the keys a client proved against the secret auth_query fetched
                from ..auth.passwords import ScramKeysClient
                mechs = m.parse_sasl_mechanisms(data)
                if "SCRAM-SHA-256" not in mechs:
                    raise ServerLoginError(f"server offers no supported SASL mechanism ({mechs})")
                self.scram = ScramKeysClient(*self.pool.scram_keys)
                first = self.scram.get_client_first().encode()
                self.transport.write(m.message(b"p", m.cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first))
            elif code == 10:
                from ..auth.passwords import is_md5
                if pw is None and self.pool.has_scram_secret():
                    raise ServerLoginError(
                        f"server login failed: wrong password type: the server asks for SCRAM-SHA-256 and the auth_file "
                        f"holds only a SCRAM secret for user {self.pool.server_user!r}, from which a SCRAM login can be "
                        "made only with the keys of a client that logged in as that user with SCRAM (give the password "
                        "itself in [databases] password=, password_file or password_env)", "28P01")
                if pw is None:
                    raise ServerLoginError(f"server asked for a password for user {self.pool.server_user!r} but none is configured", "28P01")
                if is_md5(pw):
                    raise ServerLoginError(
                        f"server login failed: wrong password type: the server asks for SCRAM-SHA-256 and the password "
                        f"for user {self.pool.server_user!r} is an md5 secret, with which no SCRAM login can be made", "28P01")
                mechs = m.parse_sasl_mechanisms(data)
                if "SCRAM-SHA-256" not in mechs:
                    raise ServerLoginError(f"server offers no supported SASL mechanism ({mechs})")
                self.scram = scramp.ScramClient(["SCRAM-SHA-256"], self.pool.server_user, pw)
                first = self.scram.get_client_first().encode()
                body = m.cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first
                self.transport.write(m.message(b"p", body))
            elif code == 11:
                self.scram.set_server_first(data.decode())
                self.transport.write(m.message(b"p", self.scram.get_client_final().encode()))
            elif code == 12:
                self.scram.set_server_final(data.decode())
            else:
                raise ServerLoginError(f"unsupported authentication method {code} requested by server")
        elif t == T_PARAM:
            k, v = m.parse_parameter_status(body)
            self.params[k] = v
        elif t == ord("K"):
            if len(body) >= 8:
                self.pid, self.key = struct.unpack_from("!ii", body, 0)
        elif t == T_READY:
            self.state = S_IDLE
            self.tx_status = body[0] if body else m.TX_IDLE
            self.param_key = param_key_of(self.params)
            w = self.login_waiter
            if w is not None and not w.done():
                w.set_result(None)
        elif t == T_ERROR:
            f = m.parse_error_fields(body)
            raise ServerLoginError(f.get("M", "server login failed"), f.get("C", "08006"))
        elif t == T_NOTICE or t == ord("v"):
            pass
        else:
            raise ServerLoginError(f"unexpected message {chr(t)!r} from server during login", "08P01")
        return True

    def _login_failed(self, msg: str, sqlstate: str) -> None:
        self.close_reason = msg
        w = self.login_waiter
        if w is not None and not w.done():
            w.set_exception(ServerLoginError(msg, sqlstate))
        self.close(msg)

    # ------------------------------------------------------------------ forwarding

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or self.state != S_ACTIVE:
            if self.state == S_LOGIN:
                self._login_data(data)
            elif self.side and self.collected is not None:
                self._side_data(data)
            elif self.state != S_CLOSED:
                self._idle_data(data)
            return
        n = len(data)
        self.received += n
        queue = self.queue
        watching = self.events.watching
        if (queue and n <= FAST_REPLY_MAX
                and not (self.skip or self.rbuf or self.masking or self.ddl_pending or self.in_copy or self.awaiting_sync)
                and not client.book.mask_portals):
            # the fast lane: a whole small reply that needs only forwarding (see _PLAIN_REPLIES);
            # anything else, or a reply cut short, goes to the general loop below from the start.
            # Observers of results (watching) get them from the positions noted on the way.
            marks = [] if watching else None
            pos = 0
            while n - pos >= 5:
                t = data[pos]
                (length,) = _unpack_len(data, pos + 1)
                end = pos + 1 + length
                if end > n or length < 4:
                    break
                if t in _PLAIN_REPLIES or (t == T_COMPLETE and length > 4 and data[pos + 5] not in _TAG_FIRST):
                    if marks is not None and t in _RESULT_PARTS:
                        marks.append(pos)
                    pos = end
                    continue
                if t == T_READY and end == n and length == 5:
                    last = queue[-1][0]
                    if (last == R_SYNC or last == R_QUERY) and (len(queue) == 1 or _only_plain(queue)):
                        queue.clear()
                        self.tx_status = status = data[pos + 5]
                        if watching:
                            self._watch_lane(client, data, marks)
                        client.server_ready(self, status, data)
                        return
                break
        skip = self.skip
        if skip:
            if watching:
                self.w_bytes += min(skip, n)
            if skip >= n:
                self.skip = skip - n
                client.write(data)
                return
            client.write(data[:skip])
            data = data[skip:]
            self.skip = 0
        if self.rbuf:
            if self.rneed:
                # a large masked row arrives in pieces: collect it without re-copying (linear)
                if len(self.rbuf) + len(data) < self.rneed:
                    self.rbuf += data
                    return
                data = bytes(self.rbuf) + data
                self.rneed = 0
            else:
                data = self.rbuf + data
            self.rbuf = b""
        n = len(data)
        pos = 0
        fwd = 0  # start of the bytes not yet forwarded
        out = None  # pieces, once a message is swallowed, replaced or a fake reply inserted
        plan = self.rowplan
        masking = self.masking
        wfrom = 0  # watching: where the bytes of the statement being answered begin in data
        keep = self.events.rows_wanted if watching else 0  # rows of each result to report (events.row)
        while n - pos >= 5:
            t = data[pos]
            (length,) = _unpack_len(data, pos + 1)
            end = pos + 1 + length
            if t == T_DATAROW or t == T_COPYDATA:
                if plan is not None and t == T_DATAROW:
                    # a masked result: rewrite whole rows, every complete one that follows in one
                    # call (RowPlan.rewrite_run, compiled where built)
                    if end > n or length < 4:
                        if length < 4:
                            self._protocol_violation("invalid message length from server")
                            return
                        if end - pos > 65536:
                            self.rneed = end - pos  # collected in a bytearray until complete
                        break
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    try:
                        rows, pos = plan.rewrite_run(data, pos, n)
                    except Exception as e:  # noqa: BLE001 - MaskingError, or a malformed row
                        self._masking_failed(client, str(e) if isinstance(e, MaskingError) else "malformed DataRow")
                        return
                    out.append(rows)
                    fwd = pos
                    if keep and self.w_rows < keep:
                        self._watch_rows(client, rows, keep)  # as the client gets them: masked
                    continue
                if end > n:
                    if length < 4:
                        self._protocol_violation("invalid message length from server")
                        return
                    if keep and t == T_DATAROW and self.w_rows < keep:
                        self.w_rows += 1
                        self.events.row(client, self, None)  # streamed in pieces: not kept
                    self.skip = end - n  # stream the partial row; the rest follows
                    pos = n
                    break
                if keep and t == T_DATAROW and self.w_rows < keep:
                    self.w_rows += 1
                    self.events.row(client, self, data[pos + 5 : end])
                pos = end
                continue
            if end > n or length < 4:
                if length < 4:
                    self._protocol_violation("invalid message length from server")
                    return
                break
            if not queue:
                head = 0
            else:
                head = queue[0][0]
                if FAKE_FIRST <= head <= FAKE_LAST and t != T_NOTICE and t != T_PARAM and t != T_NOTIFY:
                    # replies the gateway answered itself go first, in request order
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    fwd = pos
                    self._emit_fakes(out)
                    head = queue[0][0] if queue else 0
            if t == T_READY:
                self.tx_status = data[pos + 5]
                if self.awaiting_sync:
                    # the Sync ending the skip: whatever was sent before it (a Query too) was
                    # skipped unanswered, so this ReadyForQuery is the Sync's
                    self.awaiting_sync = False
                    self._error_skips_to_sync((R_SYNC,))
                    head = queue[0][0] if queue else 0
                if head not in _READY_HEADS:
                    # requests sent after an error but before its Sync reached the server while it
                    # was skipping to Sync: they were never answered, so they are dropped here
                    # (a Query or FunctionCall sent meanwhile was skipped too: stop at the Sync)
                    self._error_skips_to_sync((R_SYNC,) if any(k == R_SYNC for k, _ in queue) else _READY_ENDS)
                    head = queue[0][0] if queue else 0
                if masking:
                    if plan is not None:
                        self._plan_done(client)
                        plan = None
                    if len(queue) <= 1:
                        self.masking = masking = False
                if self.ddl_pending and self.tx_status == m.TX_IDLE:
                    self._ddl_committed()
                if client.book.mask_portals and self.tx_status == m.TX_IDLE and len(queue) <= 1:
                    # every portal ends with its transaction (not those bound after this Sync)
                    client.book.mask_portals.clear()
                if head == R_QUERY_SKIP:
                    reset = queue.popleft()[1]  # "reset": an identity reset, the SETs follow
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    pos = fwd = end
                    if client.pending_param_sync and reset is None:
                        client.param_sync_done(self)
                    continue
                if head == R_SYNC or head == R_QUERY or head == R_QUERY_REFUSAL:
                    queue.popleft()
                self.in_copy = False
                pos = end
                if watching:
                    self.w_bytes = 0  # a round ended: the next statement's bytes start here
                    self.w_rows = 0
                    wfrom = end
                if not queue:
                    # nothing outstanding: forward, then the server may go back to its pool
                    if out is None:
                        reply = data[fwd:end] if fwd or end < n else data
                    else:
                        out.append(data[fwd:end])
                        reply = b"".join(out)
                    if end < n:
                        self.rbuf = data[end:]  # asynchronous messages behind ReadyForQuery
                    client.server_ready(self, self.tx_status, reply)
                    if self.rbuf:
                        rest = self.rbuf
                        self.rbuf = b""
                        self.received -= len(rest)  # counted again as the next round's
                        self.data_received(rest)
                    return
                continue
            if head == R_QUERY_SKIP:
                if t == T_ERROR:
                    f = m.parse_error_fields(data[pos + 5 : end])
                    log.warning("internal query on %s failed: %s", self.describe(), f.get("M"))
                    self.dirty = True
                    if client.pending_param_sync:
                        # the client's own parameters could not be applied: report and close it
                        self._give_up(client, "could not apply the client's session parameters",
                                      f.get("C", "08P01"), f.get("M", "could not apply session parameters"))
                        return
                elif t == T_PARAM:
                    self._param(data[pos + 5 : end], client, forward=False)
                elif t == T_COMPLETE:
                    if data[pos + 5 : end - 1] != b"DISCARD ALL":  # an identity reset: _link cleared prepared
                        self._check_tag(data, pos, end, client)
                elif t == T_COPY_IN or t == T_COPY_OUT or t == T_COPY_BOTH:
                    self._protocol_violation("internal query entered COPY")
                    return
                if out is None:
                    out = []
                out.append(data[fwd:pos])
                pos = fwd = end
                continue
            if t == T_COMPLETE:
                if data[pos + 5] in _TAG_FIRST:  # statements that forget or change things
                    self._check_tag(data, pos, end, client)
                if watching:
                    self._watch_completed(client, data[pos + 5 : end - 1], self.w_bytes + end - wfrom)
                    self.w_bytes, wfrom = 0, end
                if head == R_EXECUTE:
                    queue.popleft()
                if masking:
                    if plan is not None:
                        self._plan_done(client)
                        plan = None
                    if head == R_QUERY and queue[0][1] is not None:
                        queue[0][1].index += 1
            elif t == T_ROWDESC or t == T_NODATA:
                if head == R_DESCRIBE:
                    queue.popleft()
                elif not masking:
                    pass
                elif head == R_DESCRIBE_MASK:
                    # our own Describe of a masked portal: plan its rows, tell the client nothing
                    ctx = queue.popleft()[1]
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    fwd = end
                    if t == T_ROWDESC:
                        plan = self._make_plan(client, ctx, 0, data[pos + 5 : end])
                        if plan is False:
                            return
                elif t == T_ROWDESC and head == R_QUERY and queue[0][1] is not None and queue[0][1].ctx is not None:
                    qm = queue[0][1]
                    plan = self._make_plan(client, qm.ctx, qm.index, data[pos + 5 : end])
                    if plan is False:
                        return
            elif t == T_PARSE_COMPLETE or t == T_BIND_COMPLETE or t == T_CLOSE_COMPLETE:
                if head == R_PARSE or head == R_BIND:
                    queue.popleft()
                elif head == R_CLOSE:
                    info = queue.popleft()[1]
                    if info is not None:
                        client.book.close_confirmed(info)
                elif head == R_PARSE_SKIP or head == R_CLOSE_SKIP or head == R_BIND_SKIP:
                    queue.popleft()
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    fwd = end
            elif t == T_PARAM:
                self._param(data[pos + 5 : end], client, forward=True)
            elif t == T_ERROR:
                if plan is not None:
                    self._plan_done(client)
                    plan = None
                scrubbed = None
                if masking and queue and _masked_info(queue[0][1]):
                    # an error of a masked statement may quote a row value
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    out.append(scrubbed := scrub_message(b"E", data[pos + 5 : end]))
                    fwd = end
                if head == R_EXECUTE_REFUSAL or head == R_QUERY_REFUSAL or head == R_PARSE_SKIP:
                    # an error the gateway asked for: drop PL/pgSQL's CONTEXT and position
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    fields = m.parse_error_fields(data[pos + 5 : end])
                    fields.pop("W", None)
                    fields.pop("P", None)
                    out.append(m.build_error_from_fields(fields))
                    fwd = end
                if watching and head != R_EXECUTE_REFUSAL and head != R_QUERY_REFUSAL:
                    # (the gateway's own refusals are reported as events.refused)
                    self._watch_failed(client, scrubbed[5:] if scrubbed is not None else data[pos + 5 : end])
                    self.w_bytes, wfrom = 0, end
                if head and head != R_QUERY and head != R_SYNC and head != R_QUERY_REFUSAL:
                    self._error_skips_to_sync()
                    if not queue:
                        self.awaiting_sync = True  # requests sent from now on are skipped too
            elif t == T_EMPTY or t == T_SUSPENDED:
                if plan is not None:
                    self._plan_done(client)
                    plan = None
                if head == R_EXECUTE:
                    queue.popleft()
                elif masking and head == R_QUERY and t == T_EMPTY and queue[0][1] is not None:
                    queue[0][1].index += 1
                if watching:
                    if t == T_EMPTY:
                        self._watch_completed(client, b"", self.w_bytes + end - wfrom)
                    else:
                        self._watch_suspended(client, self.w_bytes + end - wfrom)
                    self.w_bytes, wfrom = 0, end
            elif t == T_NOTICE:
                notice = None
                if masking and queue and _masked_info(queue[0][1]):
                    if out is None:
                        out = []
                    out.append(data[fwd:pos])
                    out.append(notice := scrub_message(b"N", data[pos + 5 : end]))
                    fwd = end
                if watching and self.events.notice is not None:  # as the client gets it (scrubbed)
                    f = m.parse_error_fields(notice[5:] if notice is not None else data[pos + 5 : end])
                    self.events.notice(client, self, f.get("V") or f.get("S", ""), f.get("C", ""), f.get("M", ""))
            elif t == T_COPY_IN or t == T_COPY_OUT or t == T_COPY_BOTH:
                if masking and queue and _masked_info(queue[0][1]):
                    # COPY of a masked statement is refused before it runs; never stream one
                    self._masking_failed(client, "COPY of a statement with masked columns")
                    return
                self.in_copy = True
            # 't' ParameterDescription, 'c' CopyDone, 'V' FunctionCallResponse, 'N', 'A': as is
            pos = end
        if watching:
            self.w_bytes += pos - wfrom
        # forward everything scanned so far; keep an incomplete message for later
        if out is None:
            if pos == n and fwd == 0:
                client.write(data)
            elif pos > fwd:
                client.write(data[fwd:pos])
        else:
            out.append(data[fwd:pos])
            client.write(b"".join(out))
        if pos < n:
            self.rbuf = bytearray(data[pos:]) if self.rneed else data[pos:]
        if queue and FAKE_FIRST <= queue[0][0] <= FAKE_LAST:
            pieces: list = []
            self._emit_fakes(pieces)
            client.write(b"".join(pieces))

    # -- events.completed / events.failed (only while someone listens: events.watching)

    def _watch_rows(self, client: ClientSide, rows: bytes, keep: int) -> None:
        """events.row for the first rows of masked DataRows rewritten in one run."""
        p, n, row = 0, len(rows), self.events.row
        while p < n and self.w_rows < keep:
            (length,) = _unpack_len(rows, p + 1)
            e = p + 1 + length
            self.w_rows += 1
            row(client, self, rows[p + 5 : e])
            p = e

    def _watch_lane(self, client: ClientSide, data: bytes, marks: list) -> None:
        """The events of a reply the fast lane forwards whole: what the general loop reports for
        the same messages (``marks``: where its DataRows and statement ends are)."""
        keep = self.events.rows_wanted
        wfrom = 0
        for p in marks:
            t = data[p]
            (length,) = _unpack_len(data, p + 1)
            e = p + 1 + length
            if t == T_DATAROW:
                if keep and self.w_rows < keep:
                    self.w_rows += 1
                    self.events.row(client, self, data[p + 5 : e])
                continue
            if t == T_COMPLETE:
                self._watch_completed(client, data[p + 5 : e - 1], self.w_bytes + e - wfrom)
            elif t == T_EMPTY:
                self._watch_completed(client, b"", self.w_bytes + e - wfrom)
            else:
                self._watch_suspended(client, self.w_bytes + e - wfrom)
            self.w_bytes, wfrom = 0, e
        self.w_bytes = 0
        self.w_rows = 0

    def _watch_completed(self, client: ClientSide, tag: bytes, nbytes: int) -> None:
        self.w_rows = 0
        now = time.monotonic()
        start = self.w_start if self.w_start > self.query_start else self.query_start
        self.w_start = now
        text = tag.decode("utf-8", "replace")
        head, _, last = text.rpartition(" ")
        rows = int(last) if head and last.isdigit() else None
        ev = self.events.completed
        if ev is not None:
            ev(client, self, text, rows, nbytes, now - start)

    def _watch_suspended(self, client: ClientSide, nbytes: int) -> None:
        self.w_rows = 0
        now = time.monotonic()
        start = self.w_start if self.w_start > self.query_start else self.query_start
        self.w_start = now
        ev = self.events.suspended
        if ev is not None:
            ev(client, self, nbytes, now - start)

    def _watch_failed(self, client: ClientSide, body: bytes) -> None:
        self.w_rows = 0
        self.w_start = time.monotonic()
        ev = self.events.failed
        if ev is not None:
            f = m.parse_error_fields(body)
            ev(client, self, f.get("C", ""), f.get("M", ""))

    def _check_tag(self, data: bytes, pos: int, end: int, client: ClientSide) -> None:
        tag = data[pos + 5 : end - 1]
        if tag == b"DEALLOCATE ALL" or tag == b"DISCARD ALL":
            self.prepared.clear()
            client.book.all_discarded()
        elif tag == b"PREPARE":
            info = self.queue[0][1] if self.queue and self.queue[0][0] == R_QUERY else None
            if type(info) is QueryMask and info.prepares:
                client.book.sql_prepare_confirmed(*info.prepares.pop(0))
        elif tag.startswith((b"CREATE", b"ALTER", b"DROP", b"COMMENT")):
            # the catalog the masking plans rely on changed (visible to others at commit)
            self.ddl_pending = True
            self._ddl_committed()

    def _ddl_committed(self) -> None:
        if self.tx_status == m.TX_IDLE:
            self.ddl_pending = False
        self.pool.catalog_changed()

    # -- masking

    def _make_plan(self, client: ClientSide, ctx, index: int, body: bytes):
        """The RowPlan for a result of a masked statement; False when the session was ended."""
        try:
            plan = plan_for(ctx, index, body, self.pool.mask_key())
        except Exception as e:  # noqa: BLE001 - a result that cannot be planned is never forwarded
            log.exception("masking plan failed")
            self._masking_failed(client, f"cannot plan the masking of this result ({type(e).__name__})")
            return False
        self.rowplan = plan
        return plan

    def _plan_done(self, client: ClientSide) -> None:
        plan = self.rowplan
        self.rowplan = None
        if plan is not None:
            ev = self.events.masked
            if ev is not None:
                ev(client, plan.report())

    def _masking_failed(self, client: ClientSide, why: str) -> None:
        """Fail closed: nothing more of this result reaches the client; both sessions end."""
        log.error("server %s: masking failed, closing the session: %s", self.describe(), why)
        self.rowplan = None
        self._give_up(client, f"masking failed: {why}", "XX000",
                      f"the gateway could not mask this result ({why}); the session is closed")

    def _give_up(self, client: ClientSide, reason: str, sqlstate: str, message: str) -> None:
        """The reply side cannot go on safely: close this server, end the client's session."""
        self.dirty = True
        self.client = None
        self.close(reason)
        client.server_failed(self, sqlstate, message)

    def _emit_fakes(self, out: list) -> None:
        q = self.queue
        while q and FAKE_FIRST <= q[0][0] <= FAKE_LAST:
            kind, info = q.popleft()
            if kind == R_FAKE_PARSE:
                out.append(m.PARSE_COMPLETE)
            elif kind == R_FAKE_CLOSE:
                out.append(m.CLOSE_COMPLETE)
            else:
                out.append(m.command_complete("DEALLOCATE"))
                out.append(m.ready_for_query(self.tx_status))

    def _error_skips_to_sync(self, stops=(R_SYNC,)) -> None:
        """After an ErrorResponse in the extended protocol the server skips every request up to
        the next Sync: drop their queue entries and undo what they would have created."""
        q = self.queue
        client = self.client
        while q:
            kind, info = q[0]
            if kind in stops:
                break
            q.popleft()
            if kind == R_PARSE and info is not None:
                sname, cname = info
                self.prepared.pop(sname, None)
                if client is not None and cname is not None:
                    client.book.parse_skipped(cname, sname)
            elif kind == R_PARSE_SKIP:
                self.prepared.pop(info, None)
            elif kind == R_CLOSE_SKIP and info is not None and info not in self.prepared:
                # an eviction the server skipped: it still has the statement (evicted next)
                self.prepared[info] = None
                self.prepared.move_to_end(info, last=False)
            elif kind == R_FAKE_PARSE and client is not None and info is not None:
                client.book.parse_skipped(info[1], info[0])
            elif (kind == R_FAKE_CLOSE or kind == R_FAKE_DONE) and client is not None and info is not None:
                client.book.close_skipped(info)
            elif kind == R_QUERY:
                # a Query pipelined behind the error, skipped: the gateway may have acted on it
                # already (a DEALLOCATE of a statement this server has): never reuse the server
                self.dirty = True

    def _param(self, body: bytes, client: ClientSide, forward: bool) -> None:
        k, v = m.parse_parameter_status(body)
        self.params[k] = v
        if k in TRACKED:
            self.param_key = param_key_of(self.params)
            if forward:
                client.param_changed(k, v)

    def _idle_data(self, data: bytes) -> None:
        """Data from a server nobody is linked to: only asynchronous messages are legal, and
        the replies to a session reset (server_reset_query) in progress."""
        buf = self.rbuf + data if self.rbuf else data
        pos, n = 0, len(buf)
        resetting = self.resetting
        while n - pos >= 5:
            t = buf[pos]
            (length,) = _unpack_len(buf, pos + 1)
            end = pos + 1 + length
            if length < 4:
                self._protocol_violation("invalid message length from idle server")
                return
            if end > n:
                break
            body = buf[pos + 5 : end]
            if t == T_PARAM:
                k, v = m.parse_parameter_status(body)
                self.params[k] = v
                self.param_key = param_key_of(self.params)
            elif resetting and t == T_READY:
                self.resetting = False
                self.tx_status = body[0]
                self.queue.clear()
                self.rbuf = buf[end:]
                w = self.reset_waiter
                if w is not None:
                    self.reset_waiter = None
                    if not w.done():
                        w.set_result(None)
                else:
                    self.pool.release(self)
                return
            elif resetting and t == T_COMPLETE:
                tag = bytes(body[:-1])
                if tag == b"DISCARD ALL" or tag == b"DEALLOCATE ALL":
                    self.prepared.clear()
            elif resetting and t == T_ERROR:
                f = m.parse_error_fields(body)
                log.warning("server_reset_query failed on %s: %s", self.describe(), f.get("M"))
                self.dirty = True
            elif t == T_ERROR:
                f = m.parse_error_fields(body)
                self.close_reason = f"server error while idle: {f.get('M')}"
                log.info("server %s: %s", self.describe(), self.close_reason)
                self.close(self.close_reason, terminate=False)
                return
            elif t not in (T_NOTICE, T_NOTIFY) and not resetting:
                self._protocol_violation(f"unexpected message {chr(t)!r} from idle server")
                return
            pos = end
        self.rbuf = buf[pos:]

    # ------------------------------------------------------------------ side connections

    async def run_query(self, sql: str) -> list[list[list[bytes | None]]]:
        """Run a simple Query on a side connection; returns the rows of each result set (text
        values as bytes). An ErrorResponse raises."""
        return await self.run_messages(m.query(sql))

    async def run_messages(self, payload: bytes) -> list[list[list[bytes | None]]]:
        """Send ``payload`` (a Query, or extended-protocol messages ending with Sync) on a side
        connection and wait for its ReadyForQuery; the rows of each result set (the column names
        of each are in ``collected_names``). An ErrorResponse raises."""
        self.collected = []
        self.collected_names: list[list[str]] = []
        self.collect_error: str | None = None
        self.collect_waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        await self.collect_waiter
        if self.collect_error:
            raise RuntimeError(self.collect_error)
        return self.collected

    def _side_data(self, data: bytes) -> None:
        buf = self.rbuf + data if self.rbuf else data
        pos, n = 0, len(buf)
        while n - pos >= 5:
            t = buf[pos]
            (length,) = _unpack_len(buf, pos + 1)
            end = pos + 1 + length
            if length < 4:
                self._protocol_violation("invalid message length on a side connection")
                return
            if end > n:
                break
            if self.collected is not None:
                if t == T_ROWDESC:
                    self.collected.append([])
                    fields = m.parse_row_description(buf[pos + 5 : end])
                    self.collected_names.append([f.name.decode("utf-8", "replace") for f in fields])
                elif t == T_DATAROW and self.collected:
                    self.collected[-1].append(m.parse_data_row(buf[pos + 5 : end]))
                elif t == T_ERROR and not self.collect_error:
                    self.collect_error = m.parse_error_fields(buf[pos + 5 : end]).get("M", "error")
                elif t == T_READY:
                    w = self.collect_waiter
                    if w is not None and not w.done():
                        w.set_result(None)
            pos = end
        self.rbuf = buf[pos:]

    def _protocol_violation(self, msg: str) -> None:
        log.warning("server %s: %s; closing it", self.describe(), msg)
        self.close(msg)

    # ------------------------------------------------------------------ requests

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.transport.write(data)

    def clean(self) -> bool:
        """May this server serve another client (or another transaction) as it is?"""
        return (
            self.state != S_CLOSED
            and not self.queue
            and self.tx_status == m.TX_IDLE
            and not self.in_copy
            and not self.dirty
            and not self.skip
            and not self.rbuf
            and not self.pending_sync
            and not self.awaiting_sync
        )
