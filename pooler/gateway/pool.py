"""Pools of server connections, one per (database, upstream user).

A server is handed out by ``acquire`` (synchronously when one is idle, otherwise the client
waits in FIFO order) and comes back through ``release``, which passes it straight to the next
waiting client. Only clean servers are reused (ReadyForQuery 'I', nothing outstanding, not in
COPY); anything else is closed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time

from ..config import DatabaseConfig
from ..protocol import messages as m
from .interfaces import PoolHost, Waiter
from .server import S_ACTIVE, S_CLOSED, S_IDLE, ServerConn, ServerLoginError

log = logging.getLogger("pooler.pool")


class Pool:
    __slots__ = (
        "gw", "events", "db", "name", "key", "paused", "server_user", "server_password", "server_dbname", "catalog_key", "idle",
        "active", "connecting", "waiters", "welcome", "welcome_waiters", "last_connect_error", "clients",
        "obsolete", "welcome_since", "checking", "reserve_in_use", "rrcounter", "scram_keys", "logging_in",
        "relays", "secret_fetched",
    )

    def __init__(self, gw: PoolHost, db: DatabaseConfig, server_user: str, password: str | None):
        self.gw = gw
        self.events = gw.events
        self.db = db
        self.name = f"{db.name}/{server_user}"
        self.key = (db.name, server_user)  # as the gateway's pools dict and the counters key it
        self.paused = gw.pool_paused(db.name)  # PAUSE/KILL from the console: no server handed out
        self.server_user = server_user
        self.server_password = password
        self.server_dbname = db.dbname or db.name
        self.catalog_key = (db.host, db.port, self.server_dbname)
        self.idle: collections.deque[ServerConn] = collections.deque()
        self.active: set[ServerConn] = set()
        self.connecting = 0
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.welcome: dict[str, str] | None = None
        self.welcome_waiters: list[asyncio.Future] = []  # logins waiting for the first server's parameters
        self.welcome_since = 0.0  # when the first of them started waiting
        self.last_connect_error: tuple[float, str, str] | None = None
        self.clients = 0
        self.obsolete = False  # replaced by a reload (or a KILL): servers close when they come back
        self.logging_in: set[ServerConn] = set()  # connected, login not done yet (SHOW SERVERS' "new")
        # sessions of replication connections (a server connection each, never pooled): they count
        # against max_db_connections / max_user_connections and close at RECONNECT or a RELOAD
        # that changes the database, as PgBouncer closes close_needed replication servers at once
        self.relays: set = set()
        self.secret_fetched = False  # server_password is the md5 secret a login's auth_query found
        self.checking: set[ServerConn] = set()  # running server_check_query before a hand-out
        self.reserve_in_use = False  # reserve_pool_timeout passed: the pool may grow into its reserve
        self.rrcounter = 0  # which host of a host list the next connection goes to
        self.scram_keys: tuple[bytes, bytes] | None = None  # SCRAM pass-through (auth_query): ClientKey, ServerKey

    # -- settings that follow reloads
    @property
    def size(self) -> int:
        """Servers the pool may have now: its pool_size (the user's, the database's or the
        default), plus its reserve_pool_size while a client has waited reserve_pool_timeout."""
        cfg = self.gw.config
        size = cfg.pool_size_for(self.db, self.server_user)
        if self.reserve_in_use:
            size += cfg.reserve_pool_size_for(self.db, self.server_user)
        return size

    @property
    def lifetime(self) -> float:
        lt = self.db.server_lifetime
        return self.gw.config.server_lifetime if lt is None else lt

    @property
    def idle_timeout(self) -> float:
        it = self.db.server_idle_timeout
        return self.gw.config.server_idle_timeout if it is None else it

    @property
    def min_size(self) -> int:
        cfg = self.gw.config
        return self.db.min_pool_size if self.db.min_pool_size is not None else cfg.min_pool_size

    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def close_relays(self, reason: str) -> None:
        for c in list(self.relays):
            c.fatal("08006", reason)

    def wanting(self) -> bool:
        """Clients wait for a server of this pool: for a request, or for their login (the
        pool's first server, whose parameters greet them)."""
        return bool(self.waiters) or (self.welcome is None and bool(self.welcome_waiters))

    # ------------------------------------------------------------------ what its servers ask (interfaces.ServerHome)

    def startup_params(self) -> dict[str, str]:
        params = {"user": self.server_user, "database": self.server_dbname}
        if self.db.application_name:
            params["application_name"] = self.db.application_name
        return params

    def mask_key(self) -> bytes:
        return self.gw.config.mask_key

    def tcp_settings(self):
        return self.gw.config

    def has_scram_secret(self) -> bool:
        """The auth_file holds a SCRAM secret (not a password) for the upstream user."""
        from ..auth.passwords import is_scram

        secret = self.gw.config.auth_users.get(self.server_user)
        return secret is not None and is_scram(secret)

    def catalog_changed(self) -> None:
        self.gw.catalog_changed(self.catalog_key)

    # ------------------------------------------------------------------ handing out

    def acquire(self, client: Waiter) -> ServerConn | None:
        idle = self.idle
        cfg = self.gw.config
        while idle and not self.paused:
            # LIFO: the warmest connection; server_round_robin: the one idle longest
            srv = idle.popleft() if cfg.server_round_robin else idle.pop()
            if srv.state == S_IDLE:
                srv.state = S_ACTIVE
                self.active.add(srv)
                if cfg.server_check_query and self.gw.clock - srv.last_used >= cfg.server_check_delay:
                    self._check(srv, cfg.server_check_query)  # handed out once it answers
                    break  # this client waits for it (one check per client, not one per idle server)
                return srv
        client.wait_started = time.monotonic()
        self.waiters.append(client)
        if self.paused and self.gw.stopping == "SIGINT":
            # SHUTDOWN WAIT_FOR_SERVERS: no server will come (PgBouncer's pause_client); the
            # session is ended once the caller has seen it wait
            asyncio.get_running_loop().call_soon(client.fatal, "08P01", "server shutting down")
            return None
        if len(self.waiters) > self.connecting + len(self.checking) and len(self.active) + self.connecting < self.size \
                and not self.paused:
            self._grow()
        return None

    def _check(self, srv: ServerConn, query: str) -> None:
        """server_check_query on a server idle for server_check_delay: it goes to the next
        waiting client when its ReadyForQuery arrives (release); an error or a lost connection
        closes it instead (and another is opened for the waiting clients)."""
        self.checking.add(srv)
        srv.resetting = True
        srv.queue.clear()
        srv.send(m.query("" if query == "<empty>" else query))

    def cancel_wait(self, client: Waiter) -> None:
        try:
            self.waiters.remove(client)
        except ValueError:
            pass

    def release(self, srv: ServerConn) -> None:
        srv.client = None
        if self.checking:
            self.checking.discard(srv)
        if srv.cancels_in_flight:
            srv.parked = True  # never reuse a server a cancel may still hit
            return
        srv.parked = False
        if srv.state == S_CLOSED:
            self.active.discard(srv)
            return
        if not srv.clean() or self.paused:
            self.active.discard(srv)
            srv.close("pause mode" if self.paused else "reconnect" if srv.close_needed else "not clean at release")
            if self.paused:
                self.gw.admin_progress()
            return
        lifetime = self.lifetime
        # the janitor's clock (a second's resolution, like PgBouncer's cached time): no clock
        # read per release for limits counted in minutes; server_lifetime = 0: used once (by a client)
        if self.obsolete or self.gw.stopping == "SIGINT" or (
                srv.owner is not None if lifetime == 0 else self.gw.clock - srv.created_at > lifetime):
            self.active.discard(srv)
            srv.close("closing" if self.obsolete or self.gw.stopping else "server_lifetime")
            self._grow()
            return
        if srv.reading_paused:
            srv.resume_reading()
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()
            if client.closed:
                continue
            try:
                client.server_assigned(srv)
            except Exception:  # noqa: BLE001 - a bug in one session must not reach the caller's (another session's server)
                log.exception("client %s: internal error while taking a server; closing it", client.describe())
                srv.client = None
                srv.close("internal error in a client session")
                client.server_failed(srv, "XX000", "internal error in the gateway")
            return
        srv.state = S_IDLE
        self.active.discard(srv)
        srv.last_used = self.gw.clock
        self.idle.append(srv)
        if self.gw.limits_in_use:
            self.gw.pool_has_idle(self)

    def server_gone(self, srv: ServerConn) -> None:
        self.active.discard(srv)
        self.checking.discard(srv)
        try:
            self.idle.remove(srv)
        except ValueError:
            pass
        self.gw.server_closed(self)
        if self.wanting():
            self._grow()
        self.gw.admin_progress()

    # ------------------------------------------------------------------ connecting

    def _grow(self) -> None:
        """Open connections for waiting clients, within the pool and database limits."""
        greeting = self.welcome is None and bool(self.welcome_waiters)
        if self.gw.stopping == "SIGINT" or (self.paused and not greeting):
            # no new servers while waiting for transactions to finish, or paused; but a login
            # gets the first server's parameters even while paused (the server then closes)
            return
        want = 0 if self.paused else len(self.waiters) - self.connecting
        size = self.size
        if greeting:
            want = max(want, 1 - self.connecting)  # logins wait for a first server
            size = max(size, 1)
        while want > 0 and self.total() < size:
            if not self.gw.may_open_server(self):
                break
            self.connecting += 1
            want -= 1
            asyncio.get_running_loop().create_task(self._connect())

    def ensure_min(self) -> None:
        while self.total() < self.min_size and not self.paused and self.gw.may_open_server(self):
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect())

    async def open_connection(self, side: bool = False, startup_extra: dict[str, str] | None = None) -> ServerConn:
        """Connect and log in one server connection (and run connect_query, unless it is a
        replication connection: ``startup_extra``). ``side`` connections are the gateway's own
        (catalog reads, auth_query) or a replication client's: never pooled. With a host
        list, a host that cannot be reached is skipped for the next one (each entry tried
        once) before the attempt counts as failed."""
        tries = self.db.host.count(",") + 1
        for attempt in range(tries):
            host = self._next_host(failed=attempt > 0)
            try:
                return await self._open_on(host, side, startup_extra)
            except ServerLoginError as e:
                if attempt + 1 >= tries or not e.unreachable:
                    raise
                log.warning("pool %s: %s: %s; trying the next host of the list", self.name, host, e)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open_on(self, host: str, side: bool, startup_extra: dict | None = None) -> ServerConn:
        loop = asyncio.get_running_loop()
        srv: ServerConn | None = None
        cfg = self.gw.config
        try:
            if host.startswith("/"):
                path = f"{host}/.s.PGSQL.{self.db.port}"
                coro = loop.create_unix_connection(lambda: ServerConn(self, side, startup_extra), path)
            elif cfg.server_ssl is not None:
                coro = self._connect_tls(host, cfg, side, startup_extra)
            else:
                coro = loop.create_connection(lambda: ServerConn(self, side, startup_extra), host, self.db.port)
            timeout = cfg.server_connect_timeout or None
            async with asyncio.timeout(timeout):
                _, srv = await coro
                srv.peer = f"{host}:{self.db.port}"  # (cancel requests go there too)
                if not side:
                    self.logging_in.add(srv)
                await srv.login()
            if self.db.connect_query and not startup_extra:
                await self._run_connect_query(srv)
            self.logging_in.discard(srv)
            return srv
        except (OSError, TimeoutError, ServerLoginError) as e:
            if srv is not None:
                self.logging_in.discard(srv)
                srv.close(str(e))
                if srv.login_waiter is not None:
                    srv.login_waiter.cancel()  # nobody awaits it any more
            unreachable = srv is None and not isinstance(e, ServerLoginError)
            if isinstance(e, ServerLoginError):
                msg, state = str(e), e.sqlstate
            elif isinstance(e, TimeoutError):
                msg, state = "server_connect_timeout: could not connect to server in time", "08001"
            else:
                msg, state = f"could not connect to server: {e.strerror or e}", "08001"
            err = ServerLoginError(msg, state)
            err.unreachable = unreachable
            raise err from None
        except BaseException:
            if srv is not None:
                self.logging_in.discard(srv)
                srv.close("connect cancelled")
                if srv.login_waiter is not None:
                    srv.login_waiter.cancel()
            raise

    def _next_host(self, failed: bool = False) -> str:
        """The host of a new connection. A host list is used as PgBouncer uses it: round-robin
        takes the next entry for every connection; disable stays on one entry until a
        connection to it fails, then moves to the next."""
        host = self.db.host
        if "," not in host:
            return host
        hosts = host.split(",")
        if self.db.load_balance_hosts == "disable" and (failed or self.last_connect_error is not None):
            self.rrcounter += 1
        chosen = hosts[self.rrcounter % len(hosts)]
        if self.db.load_balance_hosts == "round-robin":
            self.rrcounter += 1
        return chosen

    async def _connect(self) -> None:
        try:
            srv = await self.open_connection()
        except ServerLoginError as e:
            self.connecting -= 1
            self.gw.server_closed(self)
            self.last_connect_error = (time.monotonic(), str(e), e.sqlstate)
            log.warning("pool %s: %s", self.name, e)
            self._connect_failed(str(e), e.sqlstate)
            return
        except BaseException:
            self.connecting -= 1
            self.gw.server_closed(self)
            raise
        self.connecting -= 1
        self.last_connect_error = None
        if self.gw.config.verbose:
            log.info("pool %s: new server connection pid=%s", self.name, srv.pid)
        if self.welcome is None:
            self.welcome = dict(srv.params)
            for f in self.welcome_waiters:
                if not f.done():
                    f.set_result(None)
            self.welcome_waiters.clear()
        srv.state = S_ACTIVE
        self.active.add(srv)
        self.release(srv)

    async def _connect_tls(self, host: str, cfg, side: bool = False, startup_extra: dict | None = None):
        """server_tls_sslmode: send SSLRequest; on 'S' wrap the socket in TLS, on 'N' go on in
        plaintext unless the mode requires TLS."""
        loop = asyncio.get_running_loop()
        port = self.db.port
        sock = None
        last: OSError | None = None
        for family, type_, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            s = socket.socket(family, type_, proto)
            s.setblocking(False)
            try:
                await loop.sock_connect(s, addr)
            except OSError as e:
                s.close()
                last = e
                continue
            sock = s
            break
        if sock is None:
            raise last or OSError(f"cannot resolve {host}")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_sendall(sock, m.ssl_request())
            answer = await loop.sock_recv(sock, 1)
            if answer == b"S":
                return await loop.create_connection(lambda: ServerConn(self, side, startup_extra), sock=sock, ssl=cfg.server_ssl,
                                                    server_hostname=host)
            if answer == b"N":
                if cfg.server_tls_sslmode in ("require", "verify-ca", "verify-full"):
                    raise ServerLoginError(f"server does not accept TLS (server_tls_sslmode = {cfg.server_tls_sslmode})", "08001")
                return await loop.create_connection(lambda: ServerConn(self, side, startup_extra), sock=sock)
            raise ServerLoginError("unexpected answer from server to SSLRequest", "08P01")
        except BaseException:
            sock.close()
            raise

    async def _run_connect_query(self, srv: ServerConn) -> None:
        fut = asyncio.get_running_loop().create_future()
        srv.resetting = True
        srv.reset_waiter = fut
        srv.send(m.query(self.db.connect_query))
        await fut
        if srv.dirty:
            raise ServerLoginError("connect_query failed")

    def _connect_failed(self, msg: str, sqlstate: str) -> None:
        """Nothing can serve the waiting clients now: tell them instead of leaving them hanging."""
        for f in self.welcome_waiters:
            if not f.done():
                f.set_exception(ServerLoginError(msg, sqlstate))
        self.welcome_waiters.clear()
        if self.idle or self.active or self.connecting:
            return
        waiters = list(self.waiters)
        self.waiters.clear()
        for client in waiters:
            client.server_unavailable(sqlstate, msg)

    async def get_welcome(self) -> dict[str, str]:
        """Server parameters to greet a new client with (a server must have logged in once)."""
        if self.welcome is not None:
            return self.welcome
        fut = asyncio.get_running_loop().create_future()
        if not self.welcome_waiters:
            self.welcome_since = time.monotonic()
        self.welcome_waiters.append(fut)
        if not self.connecting:
            # at max_db_connections / max_user_connections the login queues: a server that
            # frees elsewhere in the database (or of the user) makes room (Gateway.pool_has_idle)
            self._grow()
        try:
            await fut
        finally:
            if fut in self.welcome_waiters:
                self.welcome_waiters.remove(fut)  # the client left while waiting
        return self.welcome  # type: ignore[return-value]

    # ------------------------------------------------------------------ maintenance

    def janitor(self, now: float) -> None:
        cfg = self.gw.config
        # query_wait_timeout
        if cfg.query_wait_timeout and self.waiters:
            while self.waiters and now - self.waiters[0].wait_started > cfg.query_wait_timeout:
                c = self.waiters.popleft()
                c.fatal("08P01", "query_wait_timeout: no server connection became free in time")
        if cfg.query_wait_timeout and self.welcome is None and self.welcome_waiters and not self.connecting \
                and now - self.welcome_since > cfg.query_wait_timeout:
            waiting, self.welcome_waiters = self.welcome_waiters, []
            for f in waiting:
                if not f.done():
                    f.set_exception(ServerLoginError("query_wait_timeout: no server connection became free in time", "08P01"))
        # reserve_pool_timeout: the first waiting client waited that long, the pool may grow
        # into its reserve (until nobody waits)
        if self.waiters:
            if not self.reserve_in_use and cfg.reserve_pool_timeout and \
                    cfg.reserve_pool_size_for(self.db, self.server_user) and \
                    now - self.waiters[0].wait_started >= cfg.reserve_pool_timeout:
                self.reserve_in_use = True
                log.warning("pool %s: taking connection from reserve_pool", self.name)
        else:
            self.reserve_in_use = False
        # idle servers
        keep = self.min_size
        lifetime, idle_timeout = self.lifetime, self.idle_timeout
        for srv in list(self.idle):
            too_old = srv.owner is not None if lifetime == 0 else now - srv.created_at > lifetime
            too_idle = idle_timeout and now - srv.last_used > idle_timeout
            if (too_old or too_idle) and self.total() > keep:
                self.idle.remove(srv)
                srv.close("server_lifetime" if too_old else "server_idle_timeout")
        self.ensure_min()
        if self.wanting():
            self._grow()

    def close_all(self, reason: str) -> None:
        for srv in list(self.idle):
            srv.close(reason)
        self.idle.clear()

    def servers(self) -> list[ServerConn]:
        """Every open server connection of the pool (linked ones first)."""
        return list(self.active) + list(self.idle)
