"""One client session: startup, authentication, then the client -> server loop.

Rules this module keeps:
- Login is a coroutine (not hot); after it, everything runs in ``data_received`` callbacks.
- A server is taken from the pool when the first message that needs one arrives, and is given
  back (transaction/statement mode) by ``server_ready`` when ReadyForQuery 'I' arrives with
  nothing outstanding.
- In transaction and statement mode named prepared statements are the client's view: the
  gateway keeps the client's names, prepares each statement on whichever server the client is
  given under a content-derived name, and rewrites Parse/Bind/Describe/Close accordingly.
- Errors the gateway makes up reach the client in protocol order, as PostgreSQL would send them.
- The commonest requests (a lone simple Query; an unnamed Parse/Bind/Describe/Execute/Sync
  batch) take a fast lane when they arrive whole with nothing outstanding: governed once, then
  sent as one unit, or queued for a server with their verdict kept (not governed again when the
  server comes). Anything unusual returns to ``_pump``, the general loop, before any effect.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import struct
import time
from typing import TYPE_CHECKING

from ..policy.lineage import UNKNOWN, StatementLineage
from ..masking.plan import MaskCtx, QueryMask, compile_masks, method_for
from ..auth.passwords import ScramError, ScramSecret, ScramServer, is_md5, is_scram, verify_md5
from ..policy.engine import SessionInfo
from ..policy.lexing import SETTINGS as LEXING_SETTINGS, codec as reading_codec, unsafe_session, unsafe_value
from ..protocol import messages as m
from .pool import TRACKED_LOWER, Pool, canonical
from .server import (
    R_BIND, R_CLOSE, R_CLOSE_SKIP, R_DESCRIBE, R_EXECUTE, R_FAKE_CLOSE, R_FAKE_PARSE, R_PARSE,
    R_PARSE_SKIP, R_QUERY, R_QUERY_SKIP, R_SYNC, R_BIND_SKIP, R_EXECUTE_REFUSAL, R_FAKE_DONE,
    R_QUERY_REFUSAL, R_DESCRIBE_MASK,
    FAKE_FIRST, FAKE_LAST, ServerConn, ServerLoginError, S_CLOSED,
)

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("pooler.client")

_unpack_len = struct.Struct("!i").unpack_from

MAX_STARTUP_PACKET = 10000

T_QUERY = ord("Q")
T_PARSE = ord("P")
T_BIND = ord("B")
T_DESCRIBE = ord("D")
T_EXECUTE = ord("E")
T_SYNC = ord("S")
T_FLUSH = ord("H")
T_CLOSE = ord("C")
T_TERMINATE = ord("X")
T_COPY_DATA = ord("d")
T_COPY_DONE = ord("c")
T_COPY_FAIL = ord("f")
T_FUNCTION = ord("F")
T_PASSWORD = ord("p")

_DEALLOCATE_RE = re.compile(
    r'\s*deallocate\s+(?:prepare\s+)?(?:"((?:[^"]|"")+)"|([A-Za-z_\x80-\uffff][\w$\x80-\uffff]*))\s*;?\s*\Z',
    re.IGNORECASE,
)

# states
C_LOGIN, C_READY, C_CLOSED = range(3)

# message types the gateway may answer itself while no server is linked
_LOCAL_CANDIDATES = frozenset(b"SHCdcfQ")
# message types that carry SQL (or refer to it) and pass the policy gate
_GOVERNED = frozenset(b"QPFBD")

_SEARCH_PATH_ITEM = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^,\s]+))\s*(?:,|$)')


_NO_LINEAGE = StatementLineage(None, frozenset((UNKNOWN,)))

# what a server passing to another identity runs first (then the database's connect_query):
# everything of the previous session goes, prepared statements (and their texts) included
IDENTITY_RESET = "DISCARD ALL"
# every message type a client may send once logged in -> its shortest well-formed length (the
# length field included)
_MIN_LENGTH = {ord("P"): 8, ord("B"): 12, ord("D"): 6, ord("E"): 9, ord("Q"): 5, ord("C"): 6, ord("F"): 14,
               ord("f"): 5, ord("H"): 4, ord("S"): 4, ord("X"): 4, ord("c"): 4, ord("d"): 4}
# extended-protocol requests: the server's state is settled again only by the next Sync (or a
# simple Query that the server runs: it commits what they did)
_NEEDS_SYNC = frozenset(b"PBDEC")
# messages without a body: PostgreSQL fails one that has one (and then skips to Sync)
_BODYLESS = frozenset(b"HSXc")
# the queue entries of a fast-lane unit, made once (entries are tuples, never changed in place)
_E_PARSE, _E_BIND, _E_DESCRIBE, _E_EXECUTE, _E_SYNC, _E_QUERY = (
    (k, None) for k in (R_PARSE, R_BIND, R_DESCRIBE, R_EXECUTE, R_SYNC, R_QUERY))
_WAIT_CATALOG = ("", "")  # _govern: the catalog must be loaded before this message is judged


class ClientError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def statement_server_name(query_and_types: bytes) -> bytes:
    """Name of a prepared statement on the servers: derived from its text and parameter types,
    so every client preparing the same statement shares one server-side copy."""
    return b"pooler_" + hashlib.blake2b(query_and_types, digest_size=10).hexdigest().encode()


class ClientConn(asyncio.Protocol):
    def __init__(self, gw: "Gateway", unix: bool = False) -> None:
        self.gw = gw
        self.unix = unix
        self.transport: asyncio.Transport | None = None
        self.state = C_LOGIN
        self.closed = False
        self.addr = ""
        # login
        self.lbuf = bytearray()
        self.lwaiter: asyncio.Future | None = None
        self.login_task: asyncio.Task | None = None
        self.eof = False
        # session
        self.user = ""
        self.database = ""
        self.pool: Pool | None = None
        self.mode = "session"
        self.rewrite = False
        self.server: ServerConn | None = None
        self.pid = 0
        self.key = 0
        self.params: dict[str, str] = {}
        self.lexing: str | None = None  # why the gateway cannot read this session's SQL (policy.lexing)
        self.codec = "utf-8"  # how it reads the SQL text: as the server converts it from client_encoding
        self.param_key: tuple = ()
        self.pending_param_sync = False
        self.startup_params: dict[str, str] = {}
        self.app_name = ""
        self.connected_at = time.monotonic()
        self.last_active = self.connected_at
        # client -> server stream
        self.rbuf = b""
        self.cskip = 0  # bytes of a streaming CopyData still to pass through
        self.waiting = False
        self.ready_query = 0  # length of the governed message at rbuf[0] that waits for a server
        self.ready_unit: tuple | None = None  # (length, queue kinds) of a fast-lane unit waiting
        self.first_refusal: tuple[str, str] | None = None  # the fast lane's verdict on rbuf[0]
        self.wait_started = 0.0
        self.skip_until_sync = False
        self.reading_paused = False
        self.writing_paused = False
        self.stmts: dict[bytes, tuple[bytes, bytes]] = {}  # client name -> (server name, body)
        self.max_packet = gw.config.max_packet_size
        self.tx_status = m.TX_IDLE
        # policy
        self.groups: tuple[str, ...] = ()
        self.login_name = ""  # the startup user name (an alias of self.user for token logins)
        self.tls = False
        self.token_expiry: asyncio.TimerHandle | None = None
        self._left = False
        self.search_path: tuple[str, ...] = ("public",)
        self.sql_prepared: dict[str, str] = {}  # SQL-level PREPARE name -> statement text (confirmed)
        self._prep_new: list[tuple[str, str]] | tuple = ()  # PREPAREs of the message being governed
        self.unnamed_ok = False  # this client parsed the unnamed statement on its server
        self._sinfo: list = [None, None]
        self._skey: list = [None, None]
        # masking
        self.mask_stmts: dict[bytes, MaskCtx] = {}  # client statement name -> masks of its results
        self.mask_portals: dict[bytes, MaskCtx] = {}  # portal name -> masks of its results
        self.cur_mask: QueryMask | None = None  # masks of the simple Query being forwarded
        self.masked_counts: dict[str, int] = {}  # column -> values masked in this session
        self._holder = None  # the CatalogHolder of this session's database (rules that mask)
        self._identity: tuple | None = None  # (user, groups), once logged in

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if self.unix or not peer:
            self.addr = "unix"
        else:
            self.addr = f"{peer[0]}:{peer[1]}"
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
        elif self.state == C_LOGIN:
            self.lbuf += data
            if len(self.lbuf) > 1 << 20:
                self._close_now()
                return
            w = self.lwaiter
            if w is not None and not w.done():
                w.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        w = self.lwaiter
        if w is not None and not w.done():
            w.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        was_ready = self.state == C_READY
        self.state = C_CLOSED
        self.closed = True
        if self.token_expiry is not None:
            self.token_expiry.cancel()
            self.token_expiry = None
        w = self.lwaiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.login_task is not None and not self.login_task.done():
            self.login_task.cancel()
        if self.waiting and self.pool is not None:
            self.pool.cancel_wait(self)
            self.waiting = False
        srv = self.server
        self.server = None
        if srv is not None:
            self._detach_server(srv)
        self._leave(was_ready)

    def _leave(self, was_ready: bool) -> None:
        """Tell the gateway this client is gone, exactly once. Normally from connection_lost; a
        TLS handshake the peer breaks off never reaches our connection_lost (the SSL protocol
        owns the transport then), so a failed login calls this too."""
        if self._left:
            return
        self._left = True
        self.gw.client_left(self, was_ready)

    def pause_writing(self) -> None:
        # the client reads slowly: stop reading from its server until it catches up
        self.writing_paused = True
        srv = self.server
        if srv is not None:
            srv.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
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
        self._close_now()

    def _close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
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
        t = self.transport
        if t is not None:
            t.close()

    def _detach_server(self, srv: ServerConn) -> None:
        """The client is gone: give the server back only if nothing of the client is left on it."""
        srv.client = None
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

    # ------------------------------------------------------------------ login

    async def _read(self, n: int) -> bytes:
        while len(self.lbuf) < n:
            if self.eof or self.closed:
                raise ConnectionResetError
            self.lwaiter = asyncio.get_running_loop().create_future()
            await self.lwaiter
            self.lwaiter = None
        data = bytes(self.lbuf[:n])
        del self.lbuf[:n]
        return data

    async def _read_startup(self) -> bytes:
        (length,) = struct.unpack("!i", await self._read(4))
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise m.ProtocolError("invalid length of startup packet")
        return await self._read(length - 4)

    async def _read_message(self, expect: int, limit: int = MAX_STARTUP_PACKET) -> bytes:
        hdr = await self._read(5)
        t = hdr[0]
        (length,) = struct.unpack_from("!i", hdr, 1)
        if t != expect:
            raise m.ProtocolError(f"expected message type {chr(expect)!r}, got {chr(t)!r}")
        if length < 4 or length > limit:
            raise m.ProtocolError("invalid message length")
        return await self._read(length - 4)

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
                await self._login_steps()
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
        except (ConnectionResetError, OSError):
            self._close_now()
            return
        except Exception:
            log.exception("client %s: login failed unexpectedly", self.addr)
            self.fatal("XX000", "internal error during login")
            return
        # logged in: anything the client already sent is processed now
        self.state = C_READY
        if self.lbuf:
            data = bytes(self.lbuf)
            self.lbuf.clear()
            self._client_data(data)
        elif self.eof:
            self._close_now()

    async def _login_steps(self) -> None:
        cfg = self.gw.config
        while True:
            body = await self._read_startup()
            pkt = m.parse_startup_packet(body)
            if pkt.kind in ("ssl", "gssenc"):
                if self.lbuf:
                    # bytes sent before our answer cannot be trusted (CVE-2021-23222 class)
                    raise m.ProtocolError("unexpected data after encryption request")
                if self.tls:
                    raise m.ProtocolError("encryption request on an already encrypted connection")
                ctx = cfg.client_ssl
                if pkt.kind == "gssenc" or ctx is None or self.unix:
                    self.transport.write(m.SSL_REFUSED)
                    continue
                self.transport.write(m.SSL_ACCEPTED)
                await self._start_tls(ctx)
                continue
            if pkt.kind == "cancel":
                self.gw.cancel_request(pkt.pid, pkt.key)
                self._close_now()
                raise asyncio.CancelledError
            break
        cfg = self.gw.config  # a SIGHUP may have come while we waited for the startup packet
        params = pkt.params
        unrecognized = [k for k in params if k.startswith("_pq_.")]
        minor = pkt.version & 0xFFFF
        if minor > 0 or unrecognized:
            self.transport.write(m.negotiate_protocol_version(0, unrecognized))
        user = params.get("user")
        if not user:
            raise ClientError("28000", "no PostgreSQL user name specified in startup packet")
        if not self.tls and not self.unix and cfg.client_tls_sslmode in ("require", "verify-ca", "verify-full"):
            raise ClientError("28000", "SSL required: connect with sslmode=require")
        self.user = self.login_name = user
        self.database = params.get("database") or user
        self.app_name = params.get("application_name", "")
        tracked = {}
        for k, v in params.items():
            if k in ("user", "database") or k.startswith("_pq_."):
                continue
            canon = TRACKED_LOWER.get(k.lower())
            if canon is not None:
                tracked[canon] = v
            elif k == "replication":
                raise ClientError("08P01", "replication connections are not supported")
            elif k in cfg.ignore_startup_parameters or k.lower() in cfg.ignore_startup_parameters:
                continue
            else:
                raise ClientError("08P01", f"unsupported startup parameter: {k}")
        db = cfg.database(self.database)
        if db is None:
            raise ClientError("3D000", f'no such database: {self.database}')
        ucfg = cfg.users.get(user)
        auth_type = cfg.auth_type_for(db, user)
        if auth_type == "jwt":
            await self._authenticate_jwt(db)
            user = self.user  # the token's identity
        else:
            await self._authenticate(auth_type)
            self.groups = tuple(ucfg.groups) if ucfg else ()
        self.mode = cfg.pool_mode_for(db, user)
        self.rewrite = self.mode != "session" and cfg.max_prepared_statements > 0
        self.pool = self.gw.get_pool(db, user)
        welcome = await self.pool.get_welcome()
        if self.closed:
            raise asyncio.CancelledError
        # the client's view of the session parameters
        view = dict(welcome)
        for canon, v in (("client_encoding", db.client_encoding), ("DateStyle", db.datestyle),
                         ("TimeZone", db.timezone)):
            if v:
                view[canon] = v
        view.update(tracked)
        if cfg.application_name_add_host:
            view["application_name"] = f"{view.get('application_name', '')} - {self.addr}"
        self.params = {p: view.get(p, "") for p in Pool.tracked_params}
        self.param_key = Pool.param_key_of(self.params)
        self._reading_changed()
        if self.lexing is not None and self.gw.policy is not None:
            raise ClientError("0A000", self.lexing)
        self.pid, self.key = self.gw.register_cancel_key(self)
        out = [m.authentication_ok()]
        for k, v in view.items():
            out.append(m.parameter_status(k, v))
        out.append(m.backend_key_data(self.pid, self.key))
        out.append(m.ready_for_query(m.TX_IDLE))
        self.transport.write(b"".join(out))
        if cfg.log_connections:
            via = f" as={self.login_name}" if self.login_name != user else ""
            log.info("login: %s db=%s user=%s%s app=%s mode=%s%s%s", self.addr, self.database, user, via,
                     self.app_name or "-", self.mode, " tls" if self.tls else "",
                     f" token groups={','.join(self.groups) or '-'}" if auth_type == "jwt" else "")

    async def _start_tls(self, ctx) -> None:
        """Upgrade the connection after answering 'S' to an SSLRequest."""
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=self.gw.config.client_login_timeout or 60)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.info("client %s: TLS handshake failed: %s", self.addr, e)
            self._close_now()
            raise asyncio.CancelledError from None
        if new is None:
            raise ConnectionResetError
        self.transport = new
        self.tls = True

    async def _refuse_login(self, reason_for_log: str, err: ClientError) -> None:
        """A failed login: log why, slow down repeated failures from this address, refuse."""
        delay = self.gw.auth_failed(self, reason_for_log)
        if delay > 0:
            await asyncio.sleep(delay)
        raise err

    async def _authenticate_jwt(self, db) -> None:
        """auth_type = jwt: the password is an OIDC/JWT token (asked for in cleartext, so only
        over TLS or the Unix socket)."""
        cfg = self.gw.config
        jwt_auth = self.gw.jwt
        startup_user = self.login_name
        if not (self.tls or self.unix or cfg.jwt_allow_plaintext):
            raise ClientError("28000", "token login requires an encrypted connection: connect with sslmode=require")
        if jwt_auth is None:  # auth_type = jwt arrived by a reload whose key set failed to load
            raise ClientError("28000", "token login is not configured (the gateway has no key set)")
        if not db.user:
            raise ClientError("28000", f"database {db.name} names no upstream user for token logins")
        self.transport.write(m.authentication_cleartext())
        limit = jwt_auth.settings.max_token_size + 5
        hdr = await self._read(5)
        (length,) = struct.unpack_from("!i", hdr, 1)
        if hdr[0] != T_PASSWORD:
            raise m.ProtocolError(f"expected message type 'p', got {chr(hdr[0])!r}")
        if length < 4:
            raise m.ProtocolError("invalid message length")
        if length > limit:
            await self._refuse_login("token too large", ClientError(
                "28P01", f'token authentication failed for user "{startup_user}": token is too large '
                         f"(at most {jwt_auth.settings.max_token_size} bytes)"))
        raw = (await self._read(length - 4)).rstrip(b"\x00")
        from ..auth.jwt import TokenError

        try:
            try:
                token = raw.decode("ascii")
            except UnicodeDecodeError:
                raise TokenError("password is not a JWT (expected header.payload.signature)") from None
            ident = await jwt_auth.authenticate(token.strip())
        except TokenError as e:
            await self._refuse_login(str(e), ClientError(e.sqlstate, f'token authentication failed for user "{startup_user}": {e}'))
        if ident.user != startup_user:
            ucfg = cfg.users.get(ident.user)
            if ucfg is None or startup_user not in ucfg.alias:
                await self._refuse_login(f"token identity {ident.user!r} may not log in as {startup_user!r}", ClientError(
                    "28000", f'token authentication failed for user "{startup_user}": the token is not for this '
                             "user name (it must match the token's user claim or be one of its configured aliases)"))
        self.user = ident.user
        ucfg = cfg.users.get(ident.user)
        if ucfg is not None and ucfg.auth_type not in (None, "jwt"):
            ucfg = None  # a [users] entry of a password login: its groups are not the token's
        groups = list(ident.groups)
        for g in (ucfg.groups if ucfg else ()):
            if g not in groups:
                groups.append(g)
        self.groups = tuple(groups)
        if ident.expires is not None and cfg.jwt_expiry_action == "close":
            loop = asyncio.get_running_loop()
            self.token_expiry = loop.call_at(loop.time() + max(0.0, ident.expires - time.time()), self._token_expired)

    def _token_expired(self) -> None:
        self.token_expiry = None
        if not self.closed:
            log.info("client %s: login token expired, closing the session", self.describe())
            self.fatal("28000", "the login token has expired: log in again with a fresh token")

    async def _authenticate(self, auth_type: str) -> None:
        cfg = self.gw.config
        user = self.user
        if auth_type in ("trust", "any"):
            return
        secret = cfg.auth_users.get(user)
        failed = ClientError("28P01", f'password authentication failed for user "{user}"')
        if auth_type == "plain":
            self.transport.write(m.authentication_cleartext())
            pw = (await self._read_message(T_PASSWORD)).rstrip(b"\x00").decode("utf-8", "replace")
            if secret is None or not self._check_plain(user, secret, pw):
                await self._refuse_login("wrong password" if secret else "unknown user", failed)
            return
        use_scram = auth_type == "scram-sha-256" or (secret is not None and is_scram(secret))
        if not use_scram:
            salt = os.urandom(4)
            self.transport.write(m.authentication_md5(salt))
            resp = (await self._read_message(T_PASSWORD)).rstrip(b"\x00")
            if secret is None or not verify_md5(user, secret, salt, resp):
                await self._refuse_login("wrong password" if secret else "unknown user", failed)
            return
        # SCRAM-SHA-256
        if secret is None or is_md5(secret):
            # unknown user, or a secret SCRAM cannot use: run a mock exchange that always fails
            scram_secret = ScramSecret.from_password(secrets.token_hex(16), salt=hashlib.sha256(user.encode()).digest()[:16])
            reason = "unknown user" if secret is None else "md5 secret cannot be used for SCRAM"
            mock = True
        else:
            scram_secret = self.gw.scram_secret(user, secret)
            mock = False
            reason = "wrong password"
        self.transport.write(m.authentication_sasl(["SCRAM-SHA-256"]))
        mech, first = m.parse_sasl_initial_response(await self._read_message(T_PASSWORD))
        if mech != "SCRAM-SHA-256":
            raise ClientError("28000", "client selected an invalid SASL authentication mechanism")
        server = ScramServer(scram_secret)
        try:
            self.transport.write(m.authentication_sasl_continue(server.client_first(first)))
            final = await self._read_message(T_PASSWORD)
            verifier = server.client_final(final)
        except ScramError as e:
            await self._refuse_login(reason if mock else str(e), failed)
        if mock:
            await self._refuse_login(reason, failed)
        self.transport.write(m.authentication_sasl_final(verifier))

    def _check_plain(self, user: str, secret: str, pw: str) -> bool:
        import hmac as _hmac
        from ..auth.passwords import md5_secret

        if is_md5(secret):
            return _hmac.compare_digest(md5_secret(user, pw), secret)
        if is_scram(secret):
            s = ScramSecret.parse(secret)
            cand = ScramSecret.from_password(pw, s.iterations, s.salt)
            return _hmac.compare_digest(cand.stored_key, s.stored_key)
        return _hmac.compare_digest(secret.encode(), pw.encode())

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
    # governed and sent (or queued for a server) as one unit, exactly as _pump would; anything
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
        if n < 9 or self.mask_portals:
            return False
        max_packet = self.max_packet
        (length,) = _unpack_len(data, 1)  # the caller saw 'P'
        if length < 8 or length > max_packet or data[5]:
            return False  # a named statement, or something _pump reports
        first = pos = length + 1
        kinds = [_E_PARSE]
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
        """Govern the unit's first message (``first`` bytes), then send the unit; ``kinds`` are
        its queue entries (None: a lone Query)."""
        if self.gw.policy is None:
            # no rules: only the unnamed statement is followed (a Query destroys it, Parse makes it)
            self.unnamed_ok = kinds is not None
            refusal = None
        else:
            try:
                refusal = self._govern(data[0], data, 0, first)
            except (m.ProtocolError, ClientError) as e:  # as _pump answers a malformed message
                self.fatal(e.sqlstate, str(e))
                return True
        if refusal is not None or (kinds is not None and (self.mask_stmts or self.mask_portals)):
            # a refusal, a catalog to wait for, or masks to follow: _pump takes it from here
            self.rbuf = data
            if refusal is None:
                self.ready_query = first
            else:
                self.first_refusal = refusal
            self._pump()
            return True
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
            self._link(srv, out)
        self._send_unit(srv, data, kinds, out)
        return True

    def _send_unit(self, srv: ServerConn, data: bytes, kinds: list | None, out: list) -> None:
        """Send a governed fast-lane unit after ``out`` (what _link put first)."""
        if kinds is not None:
            srv.queue.extend(kinds)
        elif self.cur_mask is None:
            srv.queue.append(_E_QUERY)
        else:
            self._queue_query(srv)
        srv.pending_sync = False  # the unit ends with Sync, or is a Query (see _pump)
        srv.query_start = self.last_active
        if out:
            out.append(data)
            data = b"".join(out)
        srv.transport.write(data)

    def _queue_query(self, srv: ServerConn) -> None:
        """The queue entry of a Query (or FunctionCall) being sent, with its masks if any."""
        if self.cur_mask is None:
            srv.queue.append((R_QUERY, None))
        else:
            srv.queue.append((R_QUERY, self.cur_mask))
            srv.masking = True
            self.cur_mask = None

    def _pump(self) -> None:
        data = self.rbuf
        n = len(data)
        pos = 0
        out: list[bytes] = []
        srv = self.server
        ready = self.ready_query  # the first message was governed before it waited for a server
        first_refusal = self.first_refusal
        if ready or first_refusal or self.ready_unit:
            self.ready_query = 0
            self.first_refusal = self.ready_unit = None
        try:
            while n - pos >= 5:
                t = data[pos]
                (length,) = _unpack_len(data, pos + 1)
                end = pos + 1 + length
                shortest = _MIN_LENGTH.get(t)
                if shortest is None:
                    raise m.ProtocolError(f"invalid frontend message type {t}")
                if length < shortest or length > self.max_packet or (length != 4 and t in _BODYLESS):
                    raise m.ProtocolError(
                        f"invalid message length {length} (max_packet_size is {self.max_packet})"
                        if length > self.max_packet else f"invalid message length {length} for message type {chr(t)}")
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
                        if srv is None:
                            self.write(m.ready_for_query(m.TX_IDLE))
                            pos = end
                            continue
                    elif t == T_TERMINATE:
                        pass
                    else:
                        pos = end
                        continue
                if t in _GOVERNED:
                    if pos == 0 and (ready or first_refusal):
                        refusal = first_refusal  # judged before (None: accepted)
                    elif self.unnamed_ok and (t == T_BIND or t == T_DESCRIBE):
                        refusal = None  # Bind and Describe are checked for a missing unnamed statement only
                    else:
                        refusal = self._govern(t, data, pos, end)
                    if refusal is not None:
                        if refusal is _WAIT_CATALOG:
                            # masked statements are planned with the database's catalog: load it
                            # first (this message is governed again when it is there)
                            self.waiting = True
                            if n - pos > 65536:
                                self.pause_reading()
                            self._holder.wait(self._catalog_ready)
                            break
                        self._refuse(srv, t, refusal, out)
                        pos = end
                        continue
                if srv is None:
                    if t == T_TERMINATE:
                        self._close_now()
                        return
                    if t in _LOCAL_CANDIDATES:
                        local = self._answer_without_server(t, data, pos, end)
                        if local is not None:
                            if local:
                                self.write(local)
                            pos = end
                            continue
                    srv = self.pool.acquire(self)
                    if srv is None:
                        self.waiting = True
                        self.ready_query = end - pos  # governed: not again when a server comes
                        if n - pos > 65536:
                            self.pause_reading()
                        break
                    self._link(srv, out)
                if t in _NEEDS_SYNC:
                    srv.pending_sync = True
                elif t == T_SYNC or t == T_QUERY:
                    srv.pending_sync = False  # a Query the server runs commits; one it skips leaves awaiting_sync
                if t == T_QUERY or t == T_FUNCTION:
                    if self.rewrite and t == T_QUERY and data[pos + 5] in b"dD \t\r\n":
                        if self._sql_deallocate(srv, data[pos + 5 : end - 1], out):
                            pos = end
                            continue
                    out.append(data[pos:end])
                    self._queue_query(srv)
                elif t == T_BIND:
                    if self.mask_stmts or self.mask_portals:
                        self._bind_masks(data[pos + 5 : end])
                    if self.rewrite and (data[pos + 5] != 0 or data[pos + 6] != 0):
                        self._bind(srv, data[pos + 5 : end], out)
                    else:
                        out.append(data[pos:end])
                        srv.queue.append((R_BIND, None))
                elif t == T_EXECUTE:
                    ctx = self.mask_portals.get(data[pos + 5 : end - 5]) if self.mask_portals else None
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
                        self._parse(srv, data[pos + 5 : end], out)
                    else:
                        out.append(data[pos:end])
                        srv.queue.append((R_PARSE, None))
                elif t == T_DESCRIBE:
                    if self.rewrite and data[pos + 5] == 83 and data[pos + 6] != 0:  # 'S' + name
                        self._describe_statement(srv, data[pos + 6 : end - 1], out)
                    else:
                        out.append(data[pos:end])
                        srv.queue.append((R_DESCRIBE, None))
                elif t == T_CLOSE:
                    if self.rewrite and data[pos + 5] == 83 and data[pos + 6] != 0:
                        # the gateway forgets the name now: a Bind of it is refused from here on
                        srv.queue.append((R_FAKE_CLOSE, self._forget_until_done(data[pos + 6 : end - 1])))
                    else:
                        out.append(data[pos:end])
                        if self.mask_stmts or self.mask_portals:
                            srv.queue.append((R_CLOSE, (data[pos + 5], data[pos + 6 : end - 1])))
                        else:
                            srv.queue.append((R_CLOSE, None))
                elif t == T_FLUSH or t == T_COPY_DATA or t == T_COPY_DONE or t == T_COPY_FAIL:
                    out.append(data[pos:end])
                elif t == T_TERMINATE:
                    if out:
                        srv.send(b"".join(out))
                        out = []
                    self._close_now()
                    return
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
            srv.send(b"".join(out) if len(out) > 1 else out[0])
        if srv is not None and srv.queue:
            q0 = srv.queue[0][0]
            if FAKE_FIRST <= q0 <= FAKE_LAST:
                pieces: list[bytes] = []
                srv._emit_fakes(pieces)
                self.write(b"".join(pieces))
                if not srv.queue and srv.client is self and srv.tx_status == m.TX_IDLE:
                    # everything was answered locally: the server is free again
                    self.server_ready(srv, srv.tx_status)

    # -- the policy gate

    def session_info(self) -> SessionInfo:
        in_tx = self.tx_status != m.TX_IDLE
        si = self._sinfo[in_tx]
        if si is None:
            si = SessionInfo(self.user, self.database, self.groups, self.params.get("application_name", ""),
                             self.addr.rsplit(":", 1)[0], in_tx, self.search_path)
            self._sinfo[in_tx] = si
            self._skey[in_tx] = si.key()
        return si

    def _session_changed(self) -> None:
        self._sinfo = [None, None]
        self._skey = [None, None]

    def _govern(self, t: int, data: bytes, pos: int, end: int) -> tuple[str, str] | None:
        """None if the message may pass; else (sqlstate, message) of the refusal."""
        policy = self.gw.policy
        if t == T_BIND or t == T_DESCRIBE:
            # the unnamed statement must be one this client parsed on this server
            if t == T_BIND:
                if data[pos + 5] == 0 and data[pos + 6] == 0 and not self.unnamed_ok:
                    return ("26000", "unnamed prepared statement does not exist")
            elif data[pos + 5] == 83 and data[pos + 6] == 0 and not self.unnamed_ok:
                return ("26000", "unnamed prepared statement does not exist")
            return None
        if t == T_FUNCTION:
            if policy is None:
                return None
            return ("42501", "refused by the gateway: the FunctionCall protocol message is not allowed; use a SQL statement")
        if t == T_QUERY:
            self.unnamed_ok = False  # a simple Query destroys the unnamed statement
            if policy is None:
                return None
            if self.lexing is not None:
                return ("0A000", f"refused by the gateway: {self.lexing}")
            raw = data[pos + 5 : end - 1]
        else:  # Parse
            if policy is None and data[pos + 5] == 0:
                self.unnamed_ok = True  # the server checks the rest of the message
                return None
            body = data[pos + 5 : end]
            name_end = body.find(b"\x00")
            q_end = body.find(b"\x00", name_end + 1)
            if name_end < 0 or q_end < 0:
                raise m.ProtocolError("invalid Parse message")
            if name_end == 0:
                self.unnamed_ok = False
            if policy is None:
                if name_end == 0:
                    self.unnamed_ok = True
                return None
            if self.lexing is not None:
                return ("0A000", f"refused by the gateway: {self.lexing}")
            raw = body[name_end + 1 : q_end]
        try:
            sql = raw.decode(self.codec)
        except UnicodeDecodeError:
            return ("42501", f"refused by the gateway: statement text is not valid {self.params.get('client_encoding') or 'UTF8'}")
        si = self.session_info()
        catalog = None
        if policy.rules.may_mask:
            holder = self._holder
            if holder is None or holder.pool.obsolete:
                holder = self._holder = self.gw.catalog_for(self.pool)
            if holder.stale:
                return _WAIT_CATALOG
            catalog = holder.catalog
        self._prep_new = ()  # _session_work fills it; committed only if this message is accepted
        verdict = policy.decide(sql, si, self._skey[si.in_transaction], catalog)
        d = verdict.decision
        if verdict.unknown_tables and catalog is not None:
            holder.saw_unknown()
        if not d.refused and verdict.session_work:  # Query and Parse alike: EXECUTE can come either way
            d = self._session_work(policy, verdict, si, catalog)
            if isinstance(d, tuple):
                return d
        if d.refused:
            return self._refusal_text(d, sql)
        if self.mask_portals:
            for f in verdict.facts:
                if f.command in ("FETCH", "MOVE") and f.prepared_name is not None:
                    if f.prepared_name.encode(self.codec) in self.mask_portals:  # names as the client sent them
                        return ("42501", f'refused by the gateway: portal "{f.prepared_name}" reads masked columns; '
                                         "FETCH of it could not be masked (use Execute with a row limit)")
        ctx = None
        if d.action == "mask":
            ctx = self._mask_ctx(d, verdict, sql, si)
            if isinstance(ctx, tuple):
                return ctx
        if t == T_PARSE:
            if self._prep_new:
                return ("42501", "refused by the gateway: send SQL-level PREPARE as a simple query (the "
                                 "gateway follows what it prepares only there); drivers' protocol-level "
                                 "prepared statements need no PREPARE")
            if name_end == 0:
                self.unnamed_ok = True
                if ctx is not None:
                    self.mask_stmts[b""] = ctx
                elif self.mask_stmts:
                    self.mask_stmts.pop(b"", None)
            else:
                name = data[pos + 5 : pos + 5 + name_end]
                old = self.mask_stmts.get(name)
                if self.rewrite and name in self.stmts:
                    pass  # the gateway refuses this Parse (42P05): the old statement stays as it is
                elif old is not None and (ctx is None or old.key != ctx.key):
                    # the name exists (a Parse reusing it fails on the server) or existed: which
                    # text runs cannot be told here, so mask what either would, by column origin
                    self.mask_stmts[name] = _either(old, ctx)
                elif ctx is not None:
                    self.mask_stmts[name] = ctx
        elif ctx is not None or self._prep_new:
            # the Query's PREPAREs are recorded as the server confirms each one (CommandComplete
            # PREPARE, in order); a PREPARE that fails never makes EXECUTE judged as its text
            self.cur_mask = QueryMask(ctx, prepares=list(self._prep_new) if self._prep_new else None)
        else:
            self.cur_mask = None
        return None

    # -- masking

    def _mask_ctx(self, d, verdict, sql: str, si) -> "MaskCtx | tuple[str, str]":
        """What the server side needs to mask this statement's results; or a refusal for the
        statements whose masked values would leave by another way (COPY, cursors, writes)."""
        holder = self._holder or self.gw.catalog_for(self.pool)
        cat = holder.catalog
        where = d.rule or "the rules"
        lineages = self._lineage(holder, sql, si.search_path)
        inners = []  # the statements EXECUTE runs: part of the plan cache key
        if lineages is not None:
            lineages = list(lineages)
            prepared_here = dict(self._prep_new)  # PREPAREd earlier in this same message
            for i, f in enumerate(verdict.facts):
                if f.command == "EXECUTE" and i < len(lineages):
                    name = f.prepared_name or ""
                    inner = prepared_here.get(name) or self.sql_prepared.get(name)
                    inners.append(inner)
                    got = self._lineage(holder, inner, si.search_path) if inner is not None else None
                    lineages[i] = got[0] if got else _NO_LINEAGE
        patterns = compile_masks(d.masks)
        for i, f in enumerate(verdict.facts):
            cmd = f.command
            if cmd == "COPY" or (cmd == "EXPLAIN" and f.inner is not None and f.inner.command == "COPY"):
                return ("42501", f"refused by the gateway: COPY would include columns that {where} masks; "
                                 "use SELECT, whose results are masked")
            if cmd == "DECLARE CURSOR":
                return ("42501", f"refused by the gateway: a cursor over columns that {where} masks cannot be "
                                 "masked; use SELECT (or the extended protocol's row limit) instead")
            # (for EXECUTE, lineages[i] is the prepared statement's: what it writes counts)
            lin = lineages[i] if lineages is not None and i < len(lineages) else None
            if not f.read_only:
                ws = lin.write_sources if lin is not None else None
                if ws is None or any(s == UNKNOWN or method_for(s, patterns) for s in ws):
                    return ("42501", f"refused by the gateway: this {cmd} would copy values of columns that "
                                     f"{where} masks into data that is not masked")
        key = (sql, si.search_path, tuple(inners), lineages is None)
        ctx = MaskCtx(d.masks, lineages, cat, where, key, holder.plan_cache, holder)
        if self.gw.config.verbose:
            log.info("masking %s for %s: %s", where, self.describe(), ", ".join(f"{c}={mt}" for c, mt in d.masks))
        return ctx

    def _lineage(self, holder, sql: str, search_path):
        key = (sql, search_path)
        cache = holder.lineage_cache
        got = cache.get(key)
        if got is None:
            try:
                got = holder.catalog.lineage(sql, search_path)  # loaded: _govern waited for it
            except Exception as e:  # noqa: BLE001 - no lineage: every computed column is masked
                log.debug("lineage of a masked statement failed: %s", e)
                got = ()
            if len(sql) <= 20_000:  # a giant statement is analyzed again rather than kept
                if len(cache) > 5_000:
                    cache.clear()
                cache[key] = got
        return got or None

    def _catalog_ready(self) -> None:
        self.waiting = False
        if not self.closed and self.state == C_READY:
            self.resume_reading()
            self._pump()

    def _bind_masks(self, body: bytes) -> None:
        portal, stmt, _, _ = m.parse_bind_statement(body)
        if portal and portal in self.mask_portals:
            return  # a named portal that is open: this Bind fails on the server, its masks stay
        ctx = self.mask_stmts.get(stmt)
        if ctx is not None:
            self.mask_portals[portal] = ctx
        else:
            self.mask_portals.pop(portal, None)

    def masked(self, report: list[tuple[str, int]]) -> None:
        """A masked result ended: count what was masked (debug log, session totals)."""
        counts = self.masked_counts
        for col, n in report:
            if col not in counts and len(counts) >= 1000:
                col = "(other columns)"  # output names are the client's: bounded
            counts[col] = counts.get(col, 0) + n
        if log.isEnabledFor(logging.DEBUG):
            log.debug("masked %s: %s", self.describe(), ", ".join(f"{c}={n}" for c, n in report))

    def _session_work(self, policy, verdict, si, catalog=None):
        """SQL-level PREPARE/EXECUTE/DEALLOCATE and search_path: EXECUTE is judged as the
        statement it runs. Returns a Decision, or (sqlstate, message) of a refusal.

        Fail closed: a name already prepared is refused as PostgreSQL refuses it (otherwise a
        failing re-PREPARE would let EXECUTE be judged as text the server does not run), and the
        search_path the rules see only grows: a SET that is rolled back, a SET LOCAL, or a
        server given to another transaction can then never hide a schema from the rules."""
        d = verdict.decision
        self._prep_new = []
        local: dict[str, str] = {}  # prepared earlier in this same message
        for f in verdict.facts:
            cmd = f.command
            if cmd == "EXECUTE":
                name = f.prepared_name or ""
                inner_sql = local.get(name) or self.sql_prepared.get(name)
                if inner_sql is None:
                    return ("26000", f'prepared statement "{f.prepared_name}" does not exist')
                inner = policy.decide(inner_sql, si, None, catalog).decision
                if inner.refused:
                    return inner
                if inner.action == "mask":
                    d = _merge_masks(d, inner)
            elif cmd == "PREPARE" and f.prepared_name and f.inner is not None:
                name = f.prepared_name
                if name in self.sql_prepared or name in local:
                    return ("42P05", f'prepared statement "{name}" already exists')
                if name.startswith("pooler_"):
                    return ("42501", "refused by the gateway: prepared statement names starting with "
                                     "pooler_ are reserved for the gateway")
                local[name] = f.inner.sql
                # recorded when the server confirms it (CommandComplete PREPARE): a PREPARE that
                # fails there must never make the rules judge EXECUTE as text the server does not run
                self._prep_new.append((name, f.inner.sql))
            elif cmd == "DEALLOCATE":
                self.sql_prepared.pop(f.prepared_name or "", None)
            elif cmd in ("DEALLOCATE ALL", "DISCARD ALL"):
                if cmd == "DISCARD ALL" and (why := unsafe_session(self.pool.welcome or {})) is not None:
                    return ("0A000", f"refused by the gateway: {why}")  # it resets to the server's defaults
                self.sql_prepared.clear()
            elif cmd in ("SET", "RESET") and (f.set_name in LEXING_SETTINGS or f.set_name == "all"):
                # the server would read the following statements otherwise than the gateway does
                if f.set_name in LEXING_SETTINGS and f.set_value is not None:
                    why = unsafe_value(f.set_name, f.set_value)
                else:  # RESET, SET ... TO DEFAULT, RESET ALL: the server's default
                    why = unsafe_session(self.pool.welcome or {})
                if why is not None:
                    return ("0A000", f"refused by the gateway: {why}")
            elif cmd == "SET" and f.set_name == "search_path" and f.set_value is not None:
                path = tuple(a or b for a, b in _SEARCH_PATH_ITEM.findall(f.set_value) if (a or b))
                path = tuple(dict.fromkeys(p for p in path + self.search_path if p != "$user"))
                if path != self.search_path:
                    self.search_path = path
                    self._session_changed()
            elif cmd not in ("SET", "RESET") and ("search_path" in f.guc_writes or "?" in f.guc_writes):
                return ("42501", "refused by the gateway: set_config() of search_path (or of a computed "
                                 "setting name) cannot be followed by the rules; use SET search_path")
            elif cmd not in ("SET", "RESET") and not LEXING_SETTINGS.isdisjoint(f.guc_writes):
                return ("0A000", "refused by the gateway: set_config() of standard_conforming_strings or "
                                 "client_encoding is not supported through this gateway; use SET")
        return d

    def _refusal_text(self, d, sql: str) -> tuple[str, str]:
        where = d.rule or "default_action"
        if d.action == "deny":
            msg = f"refused by {where}: {d.reason}"
        elif d.action == "require_approval":
            msg = (f"approval required by {where}: {d.reason} "
                   "(this gateway cannot hold statements for approval yet, so it is refused)")
        else:
            cols = ", ".join(f"{c} ({meth})" for c, meth in d.masks)
            msg = (f"masking required by {where} for {cols}"
                   + (f": {d.reason}" if d.reason else "")
                   + " (this gateway cannot mask results yet, so the statement is refused)")
        log.info("refused: %s db=%s user=%s: %s", self.addr, self.database, self.user, msg)
        return ("42501", msg)

    def _refuse(self, srv: ServerConn | None, t: int, refusal: tuple[str, str], out: list) -> None:
        """Answer a refused message as PostgreSQL would answer a failing one. With a server
        linked the server raises the error, so it arrives in order and fails an open
        transaction; otherwise the gateway answers by itself."""
        sqlstate, message = refusal
        if srv is None:
            if t == T_QUERY or t == T_FUNCTION:
                self.write(m.error_response(sqlstate, message) + m.ready_for_query(m.TX_IDLE))
            else:
                self.write(m.error_response(sqlstate, message))
                self.skip_until_sync = True
            return
        if t == T_QUERY or t == T_FUNCTION:
            out.append(m.query(refusal_sql(sqlstate, message)))
            srv.queue.append((R_QUERY_REFUSAL, None))
        else:
            self._refuse_in_order(srv, sqlstate, message, out)

    def _answer_without_server(self, t: int, data: bytes, pos: int, end: int) -> bytes | None:
        """Requests the gateway answers itself while no server is linked (nothing outstanding).
        Returns the reply bytes (b"" for none), or None when a server is needed."""
        if t == T_SYNC:
            return m.ready_for_query(m.TX_IDLE)
        if t == T_FLUSH:
            return b""
        if t == T_CLOSE and self.rewrite and data[pos + 5] == 83 and data[pos + 6] != 0:
            self._forget_statement(data[pos + 6 : end - 1])
            return m.CLOSE_COMPLETE
        if t == T_QUERY and self.rewrite and data[pos + 5] in b"dD \t\r\n":
            name = self._deallocate_target(data[pos + 5 : end - 1])
            if name is not None:
                self._forget_statement(name)
                return m.command_complete("DEALLOCATE") + m.ready_for_query(m.TX_IDLE)
            return None
        if t in (T_COPY_DATA, T_COPY_DONE, T_COPY_FAIL):
            return b""  # COPY data with no COPY in progress is ignored, as PostgreSQL does
        return None

    # -- named prepared statements (transaction and statement mode)

    def _ensure_prepared(self, srv: ServerConn, sname: bytes, body: bytes, out: list) -> None:
        prepared = srv.prepared
        if sname in prepared:
            prepared.move_to_end(sname)
            return
        self._make_room(srv, out)
        out.append(m.parse(sname, body))
        prepared[sname] = None
        srv.queue.append((R_PARSE_SKIP, sname))

    def _make_room(self, srv: ServerConn, out: list) -> None:
        prepared = srv.prepared
        limit = self.gw.config.max_prepared_statements
        while len(prepared) >= limit:
            old, _ = prepared.popitem(last=False)
            out.append(m.close_statement(old))
            srv.queue.append((R_CLOSE_SKIP, old))

    def _parse(self, srv: ServerConn, body: bytes, out: list) -> None:
        name, p = m.read_cstr(body, 0)
        if name in self.stmts:
            self._refuse_in_order(srv, "42P05", f'prepared statement "{name.decode("utf-8", "replace")}" already exists', out)
            return
        rest = body[p:]
        sname = statement_server_name(rest)
        self.stmts[name] = (sname, rest)
        if sname in srv.prepared:
            srv.prepared.move_to_end(sname)
            srv.queue.append((R_FAKE_PARSE, (sname, name)))
            return
        self._make_room(srv, out)
        out.append(m.parse(sname, rest))
        srv.prepared[sname] = None
        srv.queue.append((R_PARSE, (sname, name)))

    def _bind(self, srv: ServerConn, body: bytes, out: list) -> None:
        portal, stmt, start, after = m.parse_bind_statement(body)
        if not stmt:
            out.append(m.message(b"B", body))
            srv.queue.append((R_BIND, None))
            return
        entry = self.stmts.get(stmt)
        if entry is None:
            self._refuse_in_order(srv, "26000", f'prepared statement "{stmt.decode("utf-8", "replace")}" does not exist', out)
            return
        sname, pbody = entry
        self._ensure_prepared(srv, sname, pbody, out)
        out.append(m.message(b"B", body[:start] + sname + body[after - 1 :]))
        srv.queue.append((R_BIND, None))

    def _describe_statement(self, srv: ServerConn, name: bytes, out: list) -> None:
        entry = self.stmts.get(name)
        if entry is None:
            self._refuse_in_order(srv, "26000", f'prepared statement "{name.decode("utf-8", "replace")}" does not exist', out)
            return
        sname, pbody = entry
        self._ensure_prepared(srv, sname, pbody, out)
        out.append(m.describe_statement(sname))
        srv.queue.append((R_DESCRIBE, None))

    def _deallocate_target(self, sql: bytes) -> bytes | None:
        """The client's protocol-level statement that ``DEALLOCATE name`` names, if any.
        PostgreSQL keeps SQL-level and protocol-level statements in one namespace."""
        try:
            text = sql.decode(self.codec)
        except UnicodeDecodeError:
            return None
        mt = _DEALLOCATE_RE.match(text)
        if not mt:
            return None
        if mt.group(1) is not None:
            name = mt.group(1).replace('""', '"').encode(self.codec)
        else:
            name = mt.group(2).lower().encode(self.codec)
            if name == b"all":
                return None  # forwarded; its CommandComplete clears our state
        return name if name in self.stmts else None

    def _sql_deallocate(self, srv: ServerConn, sql: bytes, out: list) -> bool:
        name = self._deallocate_target(sql)
        if name is None:
            return False
        sname = self.stmts[name][0]
        undo = self._forget_until_done(name)
        if sname in srv.prepared:
            del srv.prepared[sname]
            out.append(m.query(f'DEALLOCATE "{sname.decode()}"'))
            srv.queue.append((R_QUERY, None))
        else:
            srv.queue.append((R_FAKE_DONE, undo))
        return True

    def _refuse_in_order(self, srv: ServerConn, sqlstate: str, message: str, out: list) -> None:
        """An error the gateway makes up while a server is linked: the server raises it for us,
        so it arrives in protocol order and fails an open transaction exactly as PostgreSQL
        would. Everything the client sends up to Sync is then ignored."""
        body = b"\x00" + refusal_sql(sqlstate, message).encode() + b"\x00\x00\x00"
        out.append(m.message(b"P", body))
        out.append(m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00"))
        out.append(m.message(b"E", b"\x00\x00\x00\x00\x00"))
        srv.queue.append((R_PARSE_SKIP, None))
        srv.queue.append((R_BIND_SKIP, None))
        srv.queue.append((R_EXECUTE_REFUSAL, None))
        srv.pending_sync = True
        self.skip_until_sync = True

    def undo_statement(self, cname: bytes, sname: bytes) -> None:
        entry = self.stmts.get(cname)
        if entry is not None and entry[0] == sname:
            self._forget_statement(cname)

    def sql_prepare_confirmed(self, name: str, text: str) -> None:
        """The server ran this PREPARE (its CommandComplete arrived for the Query carrying it)."""
        self.sql_prepared[name] = text

    def mask_close_confirmed(self, info: tuple[int, bytes]) -> None:
        """CloseComplete of a statement or portal: its masks go (not before: a Close skipped
        after an error leaves the statement or portal in place)."""
        kind, name = info
        (self.mask_stmts if kind == 83 else self.mask_portals).pop(name, None)

    def _forget_statement(self, name: bytes) -> None:
        """The client's statement ``name`` is gone (Close, DEALLOCATE, a failed Parse)."""
        self.stmts.pop(name, None)
        self.mask_stmts.pop(name, None)

    def _forget_until_done(self, name: bytes) -> tuple:
        """Forget the client's statement ``name`` now (a Close or DEALLOCATE the gateway answers
        itself); what restore_statement needs should the server skip that request (an error
        earlier in the same batch makes PostgreSQL ignore everything up to Sync)."""
        undo = (name, self.stmts.get(name), self.mask_stmts.get(name))
        self._forget_statement(name)
        return undo

    def restore_statement(self, name: bytes, stmt, mask) -> None:
        """A Close or DEALLOCATE of ``name`` that PostgreSQL skipped: the statement stays."""
        if stmt is not None and name not in self.stmts:
            self.stmts[name] = stmt
            if mask is not None:
                self.mask_stmts[name] = mask

    def forget_all_statements(self) -> None:
        self.stmts.clear()
        self.mask_stmts.clear()

    # ------------------------------------------------------------------ linking to servers

    def _link(self, srv: ServerConn, out: list) -> None:
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
            for k in Pool.tracked_params:
                v = self.params.get(k)
                if v is not None and base.get(k) != v:
                    parts.append(f"SET {k} = {quote_literal(v)}")
            if parts:
                self.pending_param_sync = True
                out.append(m.query(";".join(parts)))
                srv.queue.append((R_QUERY_SKIP, None))

    def param_sync_done(self, srv: ServerConn) -> None:
        self.pending_param_sync = False
        for k in Pool.tracked_params:
            if k in srv.params:
                self.params[k] = srv.params[k]
        self.param_key = srv.param_key = Pool.param_key_of(srv.params)
        self._reading_changed()

    def _reading_changed(self) -> None:
        self.lexing = unsafe_session(self.params)
        self.codec = reading_codec(self.params.get("client_encoding"))

    def param_changed(self, name: str, value: str) -> None:
        self.params[name] = value
        self.param_key = Pool.param_key_of(self.params)
        if name in LEXING_SETTINGS:
            self._reading_changed()
        if name == "application_name":
            self._session_changed()

    def server_assigned(self, srv: ServerConn) -> None:
        """Called by the pool when a waiting client gets a server."""
        self.waiting = False
        if self.closed:
            self.pool.release(srv)
            return
        out: list[bytes] = []
        self._link(srv, out)
        unit = self.ready_unit
        if unit is not None and len(self.rbuf) == unit[0]:
            # a fast-lane unit, governed before it waited, and nothing came after it
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

    def server_ready(self, srv: ServerConn, status: int, reply: bytes = b"") -> None:
        """ReadyForQuery arrived and nothing is outstanding; ``reply`` is what the server said
        up to and including it. At 'I' in transaction and statement pooling the server goes back
        to its pool (and to the next waiting client) before the reply is written, so the server
        is busy again while this client wakes up."""
        self.tx_status = status
        if status != m.TX_IDLE or self.mode == "session" or srv.client is not self or srv.pending_sync or self.cskip:
            # kept: a transaction, session pooling, extended-protocol requests not yet ended by
            # Sync (an implicit transaction, or an error that skips to Sync), or a message the
            # client is still sending
            if reply:
                self.write(reply)
            if self.mode == "statement" and srv.client is self and status != m.TX_IDLE:
                self.server = None
                srv.client = None
                srv.close("transaction in statement pooling mode")
                self.fatal("25000", "transaction blocks not allowed in statement pooling mode")
            return
        self.server = None
        srv.client = None
        self.unnamed_ok = False
        if self.sql_prepared:
            # SQL-level prepared statements live on that server; the next transaction may get
            # another one (as with PgBouncer): EXECUTE must not be judged by a stale text
            self.sql_prepared.clear()
        if self.writing_paused:
            srv.resume_reading()
        self.pool.release(srv)
        if reply and not self.closed:
            self.transport.write(reply)
        if self.rbuf and not self.waiting:
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

    def server_lost(self, srv: ServerConn, reason: str) -> None:
        """The linked server connection died."""
        if self.server is not srv:
            return
        self.server = None
        self.sql_prepared.clear()  # they lived on that server
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


def _either(old, new):
    """Masks for a statement name whose text is one of two: the union of their masks, planned
    by column origin alone (no positions from either text)."""
    masks = dict(old.masks)
    if new is not None:
        masks.update(new.masks)
    merged = tuple(sorted(masks.items()))
    # a flat key: re-Parsing a name again and again never nests it (hashing stays cheap)
    return MaskCtx(merged, None, old.catalog, old.rule, ("either", merged), old.cache, old.holder)


def _merge_masks(d, other):
    """``d`` with the masks of ``other`` added (EXECUTE runs its prepared statement's masks)."""
    from ..policy.rules import Decision

    if d.action != "mask":
        return other
    merged = dict(other.masks)
    merged.update(d.masks)
    rule = ", ".join(sorted({r for r in (d.rule, other.rule) if r}))
    return Decision("mask", "; ".join(r for r in (d.reason, other.reason) if r), rule, tuple(sorted(merged.items())))


def quote_literal(v: str) -> str:
    return "'" + v.replace("'", "''") + "'" if "\\" not in v else "E'" + v.replace("\\", "\\\\").replace("'", "''") + "'"


def refusal_sql(sqlstate: str, message: str) -> str:
    """A statement that makes the server raise exactly this error."""
    tag = "pooler_refusal"
    msg = message.replace(f"${tag}$", "")
    return (f"DO ${tag}$ BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', "
            f"MESSAGE = {quote_literal(msg)}; END ${tag}$")
