"""The login stage: startup packet, TLS, authentication, the pool, the session's parameters.

Rules this module keeps:
- Login is a coroutine (not hot), fed by the session's ``data_received`` through ``feed``; it
  fills in the session's identity (user, groups, database, pool, pool mode, parameters) and
  ends by sending AuthenticationOk, the ParameterStatus view, BackendKeyData and
  ReadyForQuery. Anything the client sent after its startup is left in the buffer for the
  session to process.
- Every refusal is a ``ClientError`` (or ``ProtocolError``) with the SQLSTATE PostgreSQL would
  send; the session turns it into a FATAL ErrorResponse. Failed authentications are reported
  to the gateway, which logs them and slows repeated failures from one address.
- Secrets never leave: passwords and tokens are compared and dropped, never logged; the SCRAM
  exchange runs against a mock secret for unknown users so that it fails alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import struct
import time
from typing import Any, Protocol

from ..auth.passwords import (ScramError, ScramSecret, ScramServer, is_md5, is_scram, md5_secret,
                              verify_md5)
from ..protocol import messages as m
from ..protocol.frontend import T_PASSWORD
from ..protocol.startup_options import OptionsError, parse_startup_options
from .admin import ADMIN_DATABASES, WELCOME
from .governor import WAIT_APPROVAL, WAIT_CATALOG
from .server import ReplicationRelay, ServerLoginError
from .params import BUILTIN_PARAMS, TRACKED_LOWER, TRACKED_PARAMS, param_key_of, set_sql

MAX_STARTUP_PACKET = 10000  # PostgreSQL's limit; the startup packet itself may be up to max_packet_size, as in PgBouncer
MAX_LOGIN_BUFFER = 1 << 20  # what a client may send ahead during login (besides one startup packet)


class ClientError(Exception):
    """A refusal of the client's login or request, with its SQLSTATE."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class LoggingIn(Protocol):
    """What login fills in and reads of its session (session.ClientSession)."""

    gw: Any  # interfaces.SessionHost
    transport: Any
    unix: bool
    tls: bool
    closed: bool
    addr: str
    user: str
    login_name: str
    database: str
    app_name: str
    groups: tuple[str, ...]
    mode: str
    rewrite: bool
    pool: Any
    params: dict[str, str]
    param_key: tuple
    pid: int
    key: int
    auth_method: str
    governor: Any
    token_expiry: Any

    def token_expired(self) -> None: ...


class Login:
    def __init__(self, session: LoggingIn) -> None:
        self.session = session
        self.buf = bytearray()  # what the client sent and login has not read yet
        self.startup_limit = max(MAX_STARTUP_PACKET, session.gw.config.max_packet_size)
        self.buf_limit = MAX_LOGIN_BUFFER + self.startup_limit
        self.waiter: asyncio.Future | None = None
        self.eof = False
        self.fetched: str | None = None  # the secret auth_query found for this user
        self.scram_keys: tuple[bytes, bytes] | None = None  # (ClientKey, ServerKey) proved against it

    # ------------------------------------------------------------------ input (from the session's transport callbacks)

    def feed(self, data: bytes) -> bool:
        """Bytes from the client; False when it sent more than any login needs (close it)."""
        self.buf += data
        if len(self.buf) > self.buf_limit:
            return False
        self._wake()
        return True

    def end_of_input(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof or self.session.closed:
                raise ConnectionResetError
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_startup(self) -> bytes:
        (length,) = struct.unpack("!i", await self._read(4))
        if length < 8 or length > self.startup_limit:
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

    # ------------------------------------------------------------------ the steps

    async def run(self) -> None:
        s = self.session
        cfg = s.gw.config
        while True:
            body = await self._read_startup()
            pkt = m.parse_startup_packet(body)
            if pkt.kind in ("ssl", "gssenc"):
                if self.buf:
                    # bytes sent before our answer cannot be trusted (CVE-2021-23222 class)
                    raise m.ProtocolError("unexpected data after encryption request")
                if s.tls:
                    raise m.ProtocolError("encryption request on an already encrypted connection")
                ctx = cfg.client_ssl
                if pkt.kind == "gssenc" or ctx is None or s.unix:
                    s.transport.write(m.SSL_REFUSED)
                    continue
                s.transport.write(m.SSL_ACCEPTED)
                await self._start_tls(ctx)
                continue
            if pkt.kind == "cancel":
                s.gw.cancel_request(pkt.pid, pkt.key)
                raise asyncio.CancelledError  # the session closes, answering nothing
            break
        cfg = s.gw.config  # a SIGHUP may have come while we waited for the startup packet
        params = pkt.params
        unrecognized = [k for k in params if k.startswith("_pq_.")]
        minor = pkt.version & 0xFFFF
        if minor > 0 or unrecognized:
            s.transport.write(m.negotiate_protocol_version(0, unrecognized))
        user = params.get("user")
        if not user:
            raise ClientError("28000", "no PostgreSQL user name specified in startup packet")
        if not s.tls and not s.unix and cfg.client_tls_sslmode in ("require", "verify-ca", "verify-full"):
            raise ClientError("28000", "SSL required: connect with sslmode=require")
        s.user = s.login_name = user
        s.database = params.get("database") or user
        s.app_name = params.get("application_name", "")
        replication = _replication_mode(params.get("replication"))
        tracked = _tracked_params(params, cfg.ignore_startup_parameters, replication is not None)
        if s.database in ADMIN_DATABASES:
            if replication is not None:
                raise ClientError("08P01", "replication connections to the admin console are not possible")
            await self._console_login(user)
            return
        db = cfg.database(s.database)
        if db is None:
            raise ClientError("3D000", f'no such database: {s.database}')
        if db.name in s.gw.disabled_dbs:
            raise ClientError("08P01", f'database "{db.name}" is disabled')
        ucfg = cfg.users.get(user)
        auth_type = cfg.auth_type_for(db, user)
        s.auth_method = auth_type
        if auth_type == "jwt":
            await self._authenticate_jwt(db)
            user = s.user  # the token's identity
        else:
            await self._authenticate(auth_type, db)
            s.groups = tuple(ucfg.groups) if ucfg else ()
        if s.gw.stopping is not None:  # SHUTDOWN WAIT_FOR_*: only the console still takes logins
            raise ClientError("08P01", "pooler is shutting down")
        self._check_client_limits(db, user)
        s.mode = cfg.pool_mode_for(db, user)
        s.rewrite = s.mode != "session" and cfg.max_prepared_statements > 0
        s.pool = s.gw.get_pool(db, user)
        if s.pool.server_password is None and s.pool.server_user == user:
            # no password for the upstream login of this very user: the keys its SCRAM login
            # just proved against a SCRAM secret (of the auth_file or of auth_query: PgBouncer's
            # SCRAM pass-through), or the md5 secret auth_query found
            if self.scram_keys is not None:
                s.pool.scram_keys = self.scram_keys
            elif self.fetched is not None and is_md5(self.fetched):
                s.pool.server_password = self.fetched
                s.pool.secret_fetched = True
        if replication is not None:
            await self._replication(params, tracked)
            return
        welcome = await s.pool.get_welcome()
        if s.closed:
            raise asyncio.CancelledError
        # the client's view of the session parameters
        view = dict(welcome)
        for canon, v in (("client_encoding", db.client_encoding), ("DateStyle", db.datestyle),
                         ("TimeZone", db.timezone)):
            if v:
                view[canon] = v
        view.update(tracked)
        if cfg.application_name_add_host:
            view["application_name"] = f"{view.get('application_name', '')} - {s.addr}"
        # built-in parameters always have a value (the server reports them); extra ones only
        # when the client or the server gave one
        s.params = {p: view.get(p, "") for p in TRACKED_PARAMS if p in view or p in BUILTIN_PARAMS}
        s.param_key = param_key_of(s.params)
        s.governor.reading_changed(s.params)
        if s.governor.lexing is not None and s.gw.policy is not None and s.gw.policy.enforcing:
            raise ClientError("0A000", s.governor.lexing)
        await self._judge_extra_params(tracked)
        s.pid, s.key = s.gw.register_cancel_key(s)
        out = [m.authentication_ok()]
        for k, v in view.items():
            out.append(m.parameter_status(k, v))
        out.append(m.backend_key_data(s.pid, s.key))
        out.append(m.ready_for_query(m.TX_IDLE))
        s.transport.write(b"".join(out))

    async def _replication(self, params: dict[str, str], tracked: dict[str, str]) -> None:
        """replication=database|true: only identities with allow_replication; a server
        connection of its own (never pooled) is logged in with the client's replication and
        options parameters as sent (PgBouncer 1.23+), then bytes pass through unread: neither
        rules nor masking see a replication stream (docs/operations.md)."""
        s = self.session
        cfg = s.gw.config
        ucfg = cfg.users.get(s.user)
        if ucfg is None or not ucfg.allow_replication:
            await self._refuse(f"{s.user!r} may not open replication connections", ClientError(
                "42501", f'replication connections are not allowed for user "{s.user}" (allow_replication in [users])'))
        extra = {"replication": params["replication"]}
        if "options" in params:
            extra["options"] = params["options"]
        extra.update(tracked)
        pool = s.pool
        if not s.gw.may_open_server(pool):  # (it closes an idle server of the database to make room if it can)
            raise ClientError("53300", f'no more connections allowed to database "{pool.db.name}" or by user '
                                       f'"{pool.server_user}" (max_db_connections / max_user_connections)')
        pool.relays.add(s)  # counted from now: a burst of replication logins cannot pass the limits
        srv = await pool.open_connection(True, extra)  # (never pooled; counted in pool.relays)
        if s.closed:
            srv.close("client left")
            raise asyncio.CancelledError
        relay = ReplicationRelay(s, srv.transport, "logical" if params["replication"].strip().lower() == "database"
                                 else "physical")
        srv.transport.set_protocol(relay)
        s.relay = relay
        s.mode = "session"
        s.params = dict(srv.params)
        s.pid, s.key = s.gw.register_cancel_key(s)
        out = [m.authentication_ok()]
        out += [m.parameter_status(k, v) for k, v in srv.params.items()]
        out.append(m.backend_key_data(s.pid, s.key))
        out.append(m.ready_for_query(m.TX_IDLE))
        s.transport.write(b"".join(out))

    def _check_client_limits(self, db, user: str) -> None:
        """max_db_client_connections (the database's, else the global) and
        max_user_client_connections (the user's, else the global): clients of the database /
        of the identity that passed this check and have not left, this one included."""
        s = self.session
        cfg = s.gw.config
        limit = db.max_db_client_connections if db.max_db_client_connections is not None else cfg.max_db_client_connections
        ucfg = cfg.users.get(user)
        ulimit = (ucfg.max_user_client_connections if ucfg and ucfg.max_user_client_connections
                  else cfg.max_user_client_connections)
        # counted even with no limit set: a RELOAD that sets one then finds the clients already in
        over = s.gw.admit(s, db.name, user, limit or 0, ulimit or 0)
        if over is not None:
            raise ClientError("53300", f"client connections exceeded ({over})")

    async def _judge_extra_params(self, tracked: dict[str, str]) -> None:
        """Parameters of track_extra_parameters given at login reach servers as ``SET name =
        'value'``: the rules judge that statement before the session starts, as if sent."""
        s = self.session
        gov = s.governor
        for name, value in tracked.items():
            if name in BUILTIN_PARAMS:
                continue
            sql = set_sql(name, value)
            while True:
                verdict = gov.judge_setting(name, value, sql)
                if verdict is not WAIT_CATALOG:
                    break
                fut = asyncio.get_running_loop().create_future()
                gov.wait_for_catalog(lambda: fut.done() or fut.set_result(None))
                await fut
                if s.closed:
                    raise asyncio.CancelledError
            if verdict is WAIT_APPROVAL:
                gov.need = None
                raise ClientError("42501", f"refused by the gateway: the rules hold {sql} for approval; a "
                                           "parameter given at login cannot wait for one (SET it after login)")
            if verdict is not None:
                raise ClientError(verdict[0], f"{verdict[1]} (startup parameter {name})")

    async def _console_login(self, user: str) -> None:
        """The admin console's virtual database: admin_users and stats_users, authenticated as
        everyone is (the user's auth_type, or the global one), then PgBouncer's welcome."""
        s = self.session
        cfg = s.gw.config
        ucfg = cfg.users.get(user)
        auth_type = (ucfg.auth_type if ucfg else None) or cfg.auth_type
        s.auth_method = auth_type
        if auth_type == "jwt":
            await self._authenticate_jwt(None)
            user = s.user
        else:
            await self._authenticate(auth_type)
            s.groups = tuple(ucfg.groups) if ucfg else ()
        if user not in cfg.admin_users and user not in cfg.stats_users:
            await self._refuse(f"{user!r} is in neither admin_users nor stats_users",
                               ClientError("08P01", "not allowed"))
        s.console = True
        s.admin_user = user in cfg.admin_users
        s.params = dict(WELCOME)
        s.pid, s.key = s.gw.register_cancel_key(s)
        out = [m.authentication_ok()]
        out += [m.parameter_status(k, v) for k, v in WELCOME]
        out.append(m.backend_key_data(s.pid, s.key))
        out.append(m.ready_for_query(m.TX_IDLE))
        s.transport.write(b"".join(out))

    async def _start_tls(self, ctx) -> None:
        """Upgrade the connection after answering 'S' to an SSLRequest."""
        s = self.session
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(s.transport, s, ctx, server_side=True,
                                       ssl_handshake_timeout=s.gw.config.client_login_timeout or 60)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise TlsFailed(str(e)) from None
        if new is None:
            raise ConnectionResetError
        s.transport = new
        s.tls = True

    async def _refuse(self, reason_for_log: str, err: ClientError) -> None:
        """A failed login: report why, slow down repeated failures from this address, refuse."""
        delay = self.session.gw.auth_failed(self.session, reason_for_log)
        if delay > 0:
            await asyncio.sleep(delay)
        raise err

    async def _authenticate_jwt(self, db) -> None:
        """auth_type = jwt: the password is an OIDC/JWT token (asked for in cleartext, so only
        over TLS or the Unix socket)."""
        from ..auth.jwt import TokenError

        s = self.session
        cfg = s.gw.config
        jwt_auth = s.gw.jwt
        startup_user = s.login_name
        if not (s.tls or s.unix or cfg.jwt_allow_plaintext):
            raise ClientError("28000", "token login requires an encrypted connection: connect with sslmode=require")
        if jwt_auth is None:  # auth_type = jwt arrived by a reload whose key set failed to load
            raise ClientError("28000", "token login is not configured (the gateway has no key set)")
        if db is not None and not db.user:
            raise ClientError("28000", f"database {db.name} names no upstream user for token logins")
        s.transport.write(m.authentication_cleartext())
        limit = jwt_auth.settings.max_token_size + 5
        hdr = await self._read(5)
        (length,) = struct.unpack_from("!i", hdr, 1)
        if hdr[0] != T_PASSWORD:
            raise m.ProtocolError(f"expected message type 'p', got {chr(hdr[0])!r}")
        if length < 4:
            raise m.ProtocolError("invalid message length")
        if length > limit:
            await self._refuse("token too large", ClientError(
                "28P01", f'token authentication failed for user "{startup_user}": token is too large '
                         f"(at most {jwt_auth.settings.max_token_size} bytes)"))
        raw = (await self._read(length - 4)).rstrip(b"\x00")
        try:
            try:
                token = raw.decode("ascii")
            except UnicodeDecodeError:
                raise TokenError("password is not a JWT (expected header.payload.signature)") from None
            ident = await jwt_auth.authenticate(token.strip())
        except TokenError as e:
            await self._refuse(str(e), ClientError(e.sqlstate, f'token authentication failed for user "{startup_user}": {e}'))
        if ident.user != startup_user:
            ucfg = cfg.users.get(ident.user)
            if ucfg is None or startup_user not in ucfg.alias:
                await self._refuse(f"token identity {ident.user!r} may not log in as {startup_user!r}", ClientError(
                    "28000", f'token authentication failed for user "{startup_user}": the token is not for this '
                             "user name (it must match the token's user claim or be one of its configured aliases)"))
        s.user = ident.user
        ucfg = cfg.users.get(ident.user)
        if ucfg is not None and ucfg.auth_type not in (None, "jwt"):
            ucfg = None  # a [users] entry of a password login: its groups are not the token's
        groups = list(ident.groups)
        for g in (ucfg.groups if ucfg else ()):
            if g not in groups:
                groups.append(g)
        s.groups = tuple(groups)
        if ident.expires is not None and cfg.jwt_expiry_action == "close":
            loop = asyncio.get_running_loop()
            s.token_expiry = loop.call_at(loop.time() + max(0.0, ident.expires - time.time()), s.token_expired)

    async def _authenticate(self, auth_type: str, db=None) -> None:
        s = self.session
        cfg = s.gw.config
        user = s.user
        if auth_type in ("trust", "any"):
            return
        secret = cfg.auth_users.get(user)
        if secret is None and db is not None and s.gw.auth_query_user(db):
            try:
                secret = self.fetched = await s.gw.auth_query_secret(db, user)
            except ServerLoginError as e:
                raise ClientError("08P01", f"authentication failed: {e}") from None
        failed = ClientError("28P01", f'password authentication failed for user "{user}"')
        if auth_type == "plain":
            s.transport.write(m.authentication_cleartext())
            pw = (await self._read_message(T_PASSWORD)).rstrip(b"\x00").decode("utf-8", "replace")
            if secret is None or not _check_plain(user, secret, pw):
                await self._refuse("wrong password" if secret else "unknown user", failed)
            return
        use_scram = auth_type == "scram-sha-256" or (secret is not None and is_scram(secret))
        if not use_scram:
            salt = os.urandom(4)
            s.transport.write(m.authentication_md5(salt))
            resp = (await self._read_message(T_PASSWORD)).rstrip(b"\x00")
            if secret is None or not verify_md5(user, secret, salt, resp):
                await self._refuse("wrong password" if secret else "unknown user", failed)
            return
        # SCRAM-SHA-256
        if secret is None or is_md5(secret):
            # unknown user, or a secret SCRAM cannot use: run a mock exchange that always fails
            scram_secret = ScramSecret.from_password(secrets.token_hex(16), salt=hashlib.sha256(user.encode()).digest()[:16])
            reason = "unknown user" if secret is None else "md5 secret cannot be used for SCRAM"
            mock = True
        else:
            scram_secret = s.gw.scram_secret(user, secret)
            mock = False
            reason = "wrong password"
        s.transport.write(m.authentication_sasl(["SCRAM-SHA-256"]))
        mech, first = m.parse_sasl_initial_response(await self._read_message(T_PASSWORD))
        if mech != "SCRAM-SHA-256":
            raise ClientError("28000", "client selected an invalid SASL authentication mechanism")
        server = ScramServer(scram_secret)
        try:
            s.transport.write(m.authentication_sasl_continue(server.client_first(first)))
            final = await self._read_message(T_PASSWORD)
            verifier = server.client_final(final)
        except ScramError as e:
            await self._refuse(reason if mock else str(e), failed)
        if mock:
            await self._refuse(reason, failed)
        if is_scram(secret):  # a SCRAM secret, not a password: its keys are all an upstream login can use
            self.scram_keys = (server.client_key, scram_secret.server_key)
        s.transport.write(m.authentication_sasl_final(verifier))


def _replication_mode(value: str | None) -> str | None:
    """The replication startup parameter: None (a normal session), "database" (logical) or
    "physical", as PostgreSQL reads it."""
    if value is None:
        return None
    v = value.strip().lower()
    if v == "database":
        return "database"
    if v in ("1", "true", "on", "yes"):
        return "physical"
    if v in ("0", "false", "off", "no"):
        return None
    raise ClientError("08P01", f'invalid value for parameter "replication": "{value}"')


def _tracked_params(params: dict[str, str], ignore: tuple[str, ...], replication: bool = False) -> dict[str, str]:
    """The startup packet's session parameters, those inside ``options`` included, as PgBouncer
    takes them: tracked ones kept (canonical names), ignore_startup_parameters skipped (``options``
    in it skips every unknown parameter inside options), anything else refused. A replication
    connection's options are passed to its server as sent (not read here)."""
    ignored = {i.lower() for i in ignore}
    tracked: dict[str, str] = {}
    for k, v in params.items():
        if k in ("user", "database", "replication") or k.startswith("_pq_."):
            continue
        if k == "options" and replication:
            continue
        if k == "options":
            try:
                pairs = parse_startup_options(v)
            except OptionsError as e:
                raise ClientError("08P01", str(e)) from None
            for ok, ov in pairs:
                canon = TRACKED_LOWER.get(ok.lower())
                if canon is not None:
                    tracked[canon] = ov
                elif ok.lower() not in ignored and "options" not in ignored:
                    raise ClientError("08P01", f"unsupported startup parameter in options: {ok} (the gateway "
                                               "passes only parameters it tracks: add it to track_extra_parameters, "
                                               "or to ignore_startup_parameters to drop it)")
            continue
        canon = TRACKED_LOWER.get(k.lower())
        if canon is not None:
            tracked[canon] = v
        elif k.lower() in ignored:
            continue
        else:
            raise ClientError("08P01", f"unsupported startup parameter: {k}")
    return tracked


class TlsFailed(Exception):
    """The TLS handshake after 'S' failed (the session closes without an answer)."""


def _check_plain(user: str, secret: str, pw: str) -> bool:
    if is_md5(secret):
        return hmac.compare_digest(md5_secret(user, pw), secret)
    if is_scram(secret):
        sc = ScramSecret.parse(secret)
        cand = ScramSecret.from_password(pw, sc.iterations, sc.salt)
        return hmac.compare_digest(cand.stored_key, sc.stored_key)
    return hmac.compare_digest(secret.encode(), pw.encode())
