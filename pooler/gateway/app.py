"""The gateway process: listeners, pools, cancel routing, timers, signals and reload."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import resource
import secrets
import signal
import socket
import time

from .. import config as config_mod
from ..auth.jwt import JwtAuthenticator
from ..auth.passwords import ScramSecret, is_scram
from ..config import RESTART_KEYS, SETTINGS, Config, DatabaseConfig
from ..policy.bundle import load_rules
from ..policy.engine import Policy
from ..policy.rules import RuleLoadError
from ..protocol import messages as m
from .admin import Console, ready, timestamp
from .audit import Audit, AuditDecisions, sinks_of
from .holds import ApprovalDesk
from .catalogs import CatalogHolder
from .events import Events
from .metrics import Metrics
from .observers import Decisions, SessionLog, Stats
from .params import set_extra_params
from .recorder import Recorder
from .pool import Pool
from .server import ServerConn, ServerLoginError
from .session import C_READY, ClientSession

log = logging.getLogger("pooler")



# auth_query lookups run at once, at most (they come before the client proved anything: a flood
# of logins with unknown names queues here instead of opening a server connection each)
AUTH_QUERY_CONNECTIONS = 4


class Gateway:
    """The process: listeners, pools, the policy, observers, cancel routing, timers, signals.
    It is each session's SessionHost and each pool's PoolHost (interfaces.py)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._auth_query_slots: asyncio.Semaphore | None = None  # made on the loop, at the first lookup
        set_extra_params(config.track_extra_parameters)  # read once: a restart applies a change
        self.events = Events()  # observers of what happens (events.py)
        self.session_log = SessionLog(self)
        self.stats = Stats(self)
        self.events.subscribe(self.session_log)
        self.events.subscribe(self.stats)
        self.decisions = Decisions()  # subscribed while a rule set is active (_policy_loaded)
        self.console = Console(self)  # the admin console (admin.py)
        self.approvals = ApprovalDesk(self)  # statements held for approval (holds.py)
        # approvals_listen: the reviewers' HTTP API and page (approvals_http.py)
        self.approvals_http = None
        if config.approvals_listen:
            from .approvals_http import ApprovalsHttp  # aiohttp: ~10 MB, loaded only when used
            self.approvals_http = ApprovalsHttp(self)
        self.metrics: Metrics | None = None  # metrics_listen: Prometheus, /healthz, /readyz (metrics.py)
        if config.metrics_listen:
            self.metrics = Metrics(self)
            self.events.subscribe(self.metrics)
        # audit_file, audit_syslog, audit_http_url: the audit stream for a SIEM (audit.py)
        sinks = sinks_of(config)
        self.audit: Audit | None = Audit(self, sinks) if sinks else None
        if self.audit is not None:
            self.events.subscribe(self.audit)
        self.audit_decisions = AuditDecisions(self.audit) if self.audit is not None else None
        self.record_block: str | None = None  # why statements are refused (recordings cannot be written)
        self.recorder: Recorder | None = None  # record_dir: session recordings (recorder.py)
        if config.record_dir:
            self.recorder = Recorder(self)
            self.events.subscribe(self.recorder)
        self.pause_mode = "none"  # "none" | "pause" | "suspend": SHOW STATE, PAUSE, SUSPEND
        self.paused_dbs: set[str] = set()  # PAUSE db, KILL db
        self.disabled_dbs: set[str] = set()  # DISABLE db: new logins refused
        self._admin_waits: list[tuple] = []  # (console session, command, database): PAUSE, SUSPEND, WAIT_CLOSE
        self.pools: dict[tuple, Pool] = {}
        # pools a RELOAD replaced while sessions still held their servers (server_fast_close
        # looks there too); dropped once their last server is gone
        self.retired_pools: set[Pool] = set()
        self.admitted_db: dict[str, int] = {}  # clients counted against the client limits (admit)
        self.admitted_user: dict[str, int] = {}
        self.clients: set[ClientSession] = set()
        self.cancel_keys: dict[tuple[int, int], ClientSession] = {}
        self.listeners: list[asyncio.base_events.Server] = []
        self._scram_cache: dict[tuple[str, str], ScramSecret] = {}
        self._janitor: asyncio.Task | None = None
        self.stopping: str | None = None
        self.clock = time.monotonic()  # advanced every second by the janitor (interfaces.PoolHost)
        self.stopped = asyncio.Event()
        self._signals_seen = 0
        self._refused_because = ""  # why the last reload was refused (events.config_reloaded)
        self.rules_failed = False  # the last reload's rules did not load (RELOAD answers F0000)
        self.unix_path: str | None = None
        self.limits_in_use = self._limits_in_use(config)
        self.timeouts_in_use = self._timeouts_in_use(config)
        self.policy: Policy | None = load_policy(config)
        self.policy_loaded_at = time.time()
        self._policy_loaded()
        self.jwt: JwtAuthenticator | None = make_jwt(config)
        self._jwks_task: asyncio.Task | None = None
        self.auth_failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self.catalogs: dict[tuple, CatalogHolder] = {}  # per upstream database: masking's catalog

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._raise_fd_limit()
        if self.recorder is not None:
            try:
                self.recorder.start()  # before any client: nothing runs unrecorded
            except OSError as e:
                raise RuntimeError(f"record_dir {cfg.record_dir}: {e.strerror or e}") from None
        if cfg.listen_addr:
            for addr in [a.strip() for a in cfg.listen_addr.split(",") if a.strip()]:
                host = None if addr == "*" else addr
                srv = await loop.create_server(lambda: ClientSession(self), host, cfg.listen_port,
                                               reuse_address=True, reuse_port=cfg.so_reuseport or None, backlog=512)
                self.listeners.append(srv)
        if cfg.unix_socket_dir:
            path = os.path.join(cfg.unix_socket_dir, f".s.PGSQL.{cfg.listen_port}")
            if os.path.exists(path):
                os.unlink(path)
            srv = await loop.create_unix_server(lambda: ClientSession(self, unix=True), path, backlog=512)
            os.chmod(path, cfg.unix_socket_mode)
            self.unix_path = path
            self.listeners.append(srv)
        for s in self.listeners:
            for sock in s.sockets or ():
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cfg.pidfile:
            with open(cfg.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        self._janitor = loop.create_task(self._janitor_loop())
        self.stats.start()
        if self.audit is not None:
            self.audit.start()
        if self.metrics is not None:
            self.metrics.start(cfg.metrics_listen)
        await self.approvals.start()
        if self.approvals_http is not None:
            try:
                await self.approvals_http.start(cfg.approvals_listen)
            except OSError as e:
                raise RuntimeError(f"approvals_listen {cfg.approvals_listen}: {e.strerror or e}") from None
        where = [f"{cfg.listen_addr}:{cfg.listen_port}"] if cfg.listen_addr else []
        if self.unix_path:
            where.append(self.unix_path)
        log.info("listening on %s (pool_mode=%s, auth_type=%s)", ", ".join(where), cfg.pool_mode,
                 cfg.auth_type)

    def _raise_fd_limit(self) -> None:
        """Every client and server is a file descriptor: raise the soft RLIMIT_NOFILE towards
        what max_client_conn and the pools may use (up to the hard limit), and log the figures
        as PgBouncer does (a limit too low shows as refused accepts, not as an error)."""
        cfg = self.config
        users = len(set(cfg.auth_users) | set(cfg.users)) or 1
        need = cfg.max_client_conn + 64 + sum(
            (d.pool_size if d.pool_size is not None else cfg.default_pool_size) * (1 if d.user else users)
            for d in cfg.databases.values())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError) as e:
                log.warning("could not raise the file descriptor limit to %d: %s", new, e)
        log.info("kernel file descriptor limit: %d (hard: %d); max_client_conn: %d, max expected fd use: %d",
                 soft, hard, cfg.max_client_conn, need)
        if soft != resource.RLIM_INFINITY and soft < need:
            log.warning("the file descriptor limit (%d) is below what max_client_conn and the pools may use (%d): "
                        "raise the hard limit (ulimit -Hn, LimitNOFILE=)", soft, need)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGINT, lambda: self.shutdown("SIGINT"))
        loop.add_signal_handler(signal.SIGTERM, lambda: self.shutdown("SIGTERM"))
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("state:\n%s", dump_state(self)))

    def shutdown(self, how: str, count: bool = True) -> None:
        """SIGINT (SHUTDOWN WAIT_FOR_SERVERS): stop after servers finish their transactions.
        SIGTERM (SHUTDOWN WAIT_FOR_CLIENTS): stop after clients leave. A second signal stops at
        once (``count``: signals count, console commands do not)."""
        if count:
            self._signals_seen += 1
        if self.stopping is not None or self._signals_seen > 1:
            log.info("%s again: shutting down immediately", how)
            self._finish()
            return
        if self.pause_mode == "suspend":
            # every socket is paused: nothing would ever finish (PgBouncer dies here too)
            log.info("%s received: suspend was in progress, going down immediately", how)
            self.stopping = how
            self._finish()
            return
        self.stopping = how
        log.info("%s received: %s", how,
                 "waiting for servers to finish their transactions" if how == "SIGINT"
                 else "waiting for clients to disconnect")
        # as PgBouncer: TCP listeners close (new connections are refused); the Unix socket
        # stays, so an operator can still reach the console, and a client that is not the
        # console's is told "pooler is shutting down" (login.py)
        for srv in self.listeners:
            if any(sock.family in (socket.AF_INET, socket.AF_INET6) for sock in srv.sockets or ()):
                srv.close()
        if how == "SIGINT":
            # WAIT_FOR_SERVERS is PgBouncer's PAUSE: idle servers close, servers close when
            # their transactions end, and a client that needs a server (a new transaction, or
            # waiting for one already) is disconnected with "server shutting down"
            self.pause_mode = "pause"
            for p in self.pools.values():
                p.paused = True
                p.close_all("server shutting down")
                for c in list(p.waiters):
                    c.fatal("08P01", "server shutting down")
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self.stopping is None:
            return
        if self.stopping == "SIGINT":
            busy = any(p.active or p.connecting for p in self.pools.values())
        else:
            busy = any(not c.console for c in self.clients)  # console sessions do not hold it up
        if not busy:
            log.info("%s connections dropped, exiting", "server" if self.stopping == "SIGINT" else "client")
            self._finish()

    def _finish(self) -> None:
        for c in list(self.clients):
            if not c.closed:
                c.fatal("57P01", "the gateway is shutting down")
        for p in self.pools.values():
            p.close_all("shutdown")
            for srv in list(p.active):
                srv.close("shutdown")
        for s in self.listeners:
            s.close()
        if self.unix_path and os.path.exists(self.unix_path):
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        if self.config.pidfile:
            try:
                os.unlink(self.config.pidfile)
            except OSError:
                pass
        if self._janitor:
            self._janitor.cancel()
        self.stats.stop()
        if self.recorder is not None:
            self.recorder.stop()
        self.approvals.stop()
        if self.approvals_http is not None:
            asyncio.get_running_loop().create_task(self.approvals_http.stop())
        if self.metrics is not None:
            self.metrics.stop()
        if self.audit is not None:
            self.audit.stop()  # what is queued is delivered (a moment at most)
        self.stopped.set()

    def catalog_for(self, pool: Pool) -> CatalogHolder:
        holder = self.catalogs.get(pool.catalog_key)
        if holder is None or (holder.pool.obsolete and not pool.obsolete):
            # a live pool replaces a holder whose pool a reload made obsolete; sessions still on
            # an obsolete pool keep the existing holder (never a fresh, unloaded one each time)
            holder = self.catalogs[pool.catalog_key] = CatalogHolder(pool)
        return holder

    def catalog_changed(self, catalog_key: tuple) -> None:
        holder = self.catalogs.get(catalog_key)
        if holder is not None:
            holder.invalidate()

    def reload(self) -> bool:
        """SIGHUP, RELOAD: load the config again; pools adjust, sessions survive. A broken file
        is refused with a log line and the running config keeps serving (-> False)."""
        ev = self.events.config_reloaded
        try:
            new = config_mod.load(self.config.path)
        except config_mod.ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            if ev is not None:
                ev(False, str(self.config.path), str(e))
            return False
        self.rules_failed = False
        # rules that do not load fail the RELOAD too (as PgBouncer's RELOAD fails when its TLS
        # files do, the settings applied): the console must not say RELOAD over a rule set
        # that did not change
        applied = self._apply(new, reload_rules=True)
        if ev is not None:  # (the configuration itself; rules_reloaded tells about the rules)
            ev(applied, str(self.config.path), "" if applied else self._refused_because)
        return applied and not self.rules_failed

    def set_setting(self, key: str, value: str) -> str | None:
        """The console's SET: the running config with one setting changed, applied as a reload
        applies a file (until the next RELOAD re-reads the file). -> why it was refused, or None."""
        try:
            new = config_mod.with_setting(self.config, key, value)
        except config_mod.ConfigError as e:
            return str(e)
        if not self._apply(new, reload_rules=key.lower() in ("rules_dir", "default_action", "rule_timeout")):
            return "the new value could not be applied (see the log)"
        return None

    def _apply(self, new: Config, reload_rules: bool) -> bool:
        new_jwt = self.jwt
        if config_mod.jwt_in_use(new):
            if self.jwt is None or self.jwt.settings != config_mod.jwt_settings(new):
                try:
                    new_jwt = make_jwt(new)
                except config_mod.ConfigError as e:
                    # never keep trusting the old issuer/keys under a config that changed them
                    log.error("reload failed, keeping the running configuration: %s", e)
                    self._refused_because = str(e)
                    return False
        else:
            new_jwt = None
        for w in new.warnings:
            log.warning("%s", w)
        old = self.config
        if reload_rules:
            try:
                policy = load_policy(new)
            except RuleLoadError as e:
                log.error("rules not reloaded, the running rule set keeps serving: %s", e)
                self.rules_failed = True
                policy = self.policy
                if self.metrics is not None:
                    self.metrics.rule_reloads.labels("failed").inc()
                ev = self.events.rules_reloaded
                if ev is not None:
                    ev(False, policy.rules.version if policy is not None else "", _file_names(policy), str(e))
            else:
                if self.metrics is not None:
                    self.metrics.rule_reloads.labels("ok").inc()
                if policy is not None:
                    shadow = sum(1 for rf in policy.rules.files if rf.mode == "shadow")
                    log.info("rules loaded: %d file(s)%s, version %s", len(policy.rules.files),
                             f" ({shadow} in shadow mode)" if shadow else "", policy.rules.version)
                self.policy_loaded_at = time.time()
                ev = self.events.rules_reloaded
                if ev is not None:
                    ev(True, policy.rules.version if policy is not None else "", _file_names(policy), "")
            self.policy = policy
            self._policy_loaded()
        for holder in self.catalogs.values():
            holder.invalidate()  # RELOAD re-reads the catalog before the next masked statement
        if new_jwt is not None and new_jwt is self.jwt:
            # same settings: read the key set again anyway (a key may have been withdrawn)
            self._jwks_task = asyncio.get_running_loop().create_task(new_jwt.source.refresh())
        self.jwt = new_jwt
        for key, pool in list(self.pools.items()):
            db = new.database(pool.db.name)
            user = key[1]
            if db is None or _conn_changed(pool.db, db):
                pool.obsolete = True
                del self.pools[key]
                pool.close_all("configuration changed")
                pool.close_relays("database configuration changed")
                if pool.active:
                    self.retired_pools.add(pool)
            else:
                pool.db = db
                pw = self._server_password(new, db, user)
                if pw is None and pool.secret_fetched:
                    pass  # a secret a login fetched with auth_query: the config never held it
                elif pw != pool.server_password:
                    # a rotated upstream secret: new connections use it; open sessions stay
                    pool.server_password = pw
                    pool.secret_fetched = False
                    log.info("pool %s: upstream credentials changed; new server connections use them", pool.name)
        # settings read once, at start (config.RESTART_KEYS, which SET refuses and SHOW CONFIG marks
        # not changeable): a reload keeps their running values, with a warning naming them
        kept = []
        for k in sorted(RESTART_KEYS):
            attr = SETTINGS[k][0]
            if getattr(new, attr) != getattr(old, attr):
                kept.append(k)
                setattr(new, attr, getattr(old, attr))
        # (secrets read at load from a *_file / *_env setting)
        for attr, name in (("record_key", "record_hmac_key"), ("audit_http_token", "audit_http_token")):
            if getattr(new, attr) != getattr(old, attr):
                kept.append(name)
                setattr(new, attr, getattr(old, attr))
        if kept:
            log.warning("%s: changes need a restart; the running values stay", ", ".join(kept))
        self._scram_cache.clear()
        self.config = new
        self.events.refresh()  # record_results may have changed (events.row)
        self.limits_in_use = self._limits_in_use(new)
        self.timeouts_in_use = self._timeouts_in_use(new)
        log.info("configuration reloaded from %s", new.path)
        return True

    def _policy_loaded(self) -> None:
        for o in (self.decisions, self.audit_decisions):  # (they listen to decisions of rules only)
            if o is None:
                continue
            if self.policy is not None:
                self.events.subscribe(o)
            else:
                self.events.unsubscribe(o)

    # ------------------------------------------------------------------ clients

    def client_arrived(self, c: ClientSession) -> bool:
        if self.config.max_client_conn and len(self.clients) >= self.config.max_client_conn:
            log.warning("max_client_conn (%d) reached, refusing %s", self.config.max_client_conn, c.addr)
            return False
        self.clients.add(c)
        return True

    def auth_query_user(self, db: DatabaseConfig) -> str | None:
        return db.auth_user or self.config.auth_user

    async def auth_query_secret(self, db: DatabaseConfig, user: str) -> str | None:
        """auth_query run upstream as auth_user (on auth_dbname, else the client's database) for
        a user the auth_file does not list: the user's secret (md5 or SCRAM), or None when it
        has none (no such user, no password, expired). Raises ServerLoginError."""
        cfg = self.config
        auth_user = self.auth_query_user(db)
        query = db.auth_query or cfg.auth_query
        target = DatabaseConfig(**{f: getattr(db, f) for f in db.__slots__})
        target.dbname = db.auth_dbname or cfg.auth_dbname or db.dbname or db.name
        pw = db.password if db.password is not None and db.user == auth_user else cfg.auth_users.get(auth_user)
        pool = Pool(self, target, auth_user, pw if pw is None or not is_scram(pw) else None)
        limit = cfg.server_connect_timeout or 15
        if self._auth_query_slots is None:
            self._auth_query_slots = asyncio.Semaphore(AUTH_QUERY_CONNECTIONS)
        try:
            async with asyncio.timeout(2 * limit), self._auth_query_slots:
                srv = await pool.open_connection(side=True)
                try:
                    results = await srv.run_messages(
                        m.parse(b"", m.cstr(query) + b"\x00\x00") + m.bind(b"", b"", [user.encode()], [0])
                        + m.describe_portal(b"") + m.execute() + m.message(b"S"))
                finally:
                    srv.close("auth_query done")
        except TimeoutError:
            raise ServerLoginError("auth_query: no answer in time", "08006") from None
        except RuntimeError as e:  # the server's ErrorResponse
            raise ServerLoginError(f"auth_query failed: {e}", "08006") from None
        rows = results[-1] if results else []
        if len(rows) > 1:
            raise ServerLoginError("auth_query returned more than one row", "08006")
        if not rows or len(rows[0]) < 2 or rows[0][1] is None:
            return None
        return rows[0][1].decode("utf-8", "replace")

    def admit(self, c: ClientSession, database: str, user: str, db_limit: int, user_limit: int) -> str | None:
        """max_db_client_connections / max_user_client_connections: a client is counted from the
        moment it passes this check (after authentication) until it leaves, so logins that are
        still finishing count too and a burst cannot get past a limit."""
        dbs, users = self.admitted_db, self.admitted_user
        if db_limit and dbs.get(database, 0) >= db_limit:
            return "max_db_client_connections"
        if user_limit and users.get(user, 0) >= user_limit:
            return "max_user_client_connections"
        dbs[database] = dbs.get(database, 0) + 1
        users[user] = users.get(user, 0) + 1
        c.admitted = (database, user)
        return None

    def client_left(self, c: ClientSession, logged_in: bool) -> None:
        self.clients.discard(c)
        if c.pool is not None and c.pool.relays:
            c.pool.relays.discard(c)
        if c.admitted is not None:
            database, user = c.admitted
            c.admitted = None
            for counts, k in ((self.admitted_db, database), (self.admitted_user, user)):
                n = counts[k] - 1
                if n:
                    counts[k] = n
                else:
                    del counts[k]
        if c.pid:
            self.cancel_keys.pop((c.pid, c.key), None)
        if c.console:
            self._admin_waits = [w for w in self._admin_waits if w[0] is not c]
            if self.pause_mode == "suspend" and not self.console_sessions():
                log.info("admin disappeared when suspended, doing RESUME")
                self.resume(None)
        if self.stopping:
            self._check_stopped()

    def register_cancel_key(self, c: ClientSession) -> tuple[int, int]:
        while True:
            pid = secrets.randbelow(2**31 - 2) + 1
            key = secrets.randbits(32) - 2**31
            if (pid, key) not in self.cancel_keys:
                self.cancel_keys[(pid, key)] = c
                return pid, key

    def auth_failed(self, c: ClientSession, reason: str) -> float:
        """Log a failed login; -> seconds to wait before refusing it. After
        ``auth_fail_delay_after`` failures from one address within a minute, each further one waits
        twice as long as the last (up to ``auth_fail_max_delay``)."""
        cfg = self.config
        host = c.addr.rsplit(":", 1)[0] if c.addr != "unix" else "unix"
        now = time.monotonic()
        count, last = self.auth_failures.pop(host, (0, now))
        if now - last > 60:
            count = 0
        count += 1
        self.auth_failures[host] = (count, now)
        while len(self.auth_failures) > 10000:
            self.auth_failures.popitem(last=False)
        delay = 0.0
        if cfg.auth_fail_delay_after and count > cfg.auth_fail_delay_after:
            delay = min(cfg.auth_fail_max_delay, 0.1 * 2 ** (count - cfg.auth_fail_delay_after - 1))
        log.warning("authentication failed: %s user=%s db=%s (%s)%s", c.addr, c.login_name or c.user, c.database,
                    reason, f"; failure {count} from {host} in a row, answering in {delay:.2f}s" if delay else "")
        ev = self.events.login_failed
        if ev is not None:
            ev(c, reason)
        return delay

    def scram_secret(self, user: str, secret: str) -> ScramSecret:
        k = (user, secret)
        s = self._scram_cache.get(k)
        if s is None:
            s = ScramSecret.parse(secret) if is_scram(secret) else ScramSecret.from_password(secret)
            self._scram_cache[k] = s
        return s

    # ------------------------------------------------------------------ pools

    @staticmethod
    def _server_password(cfg: Config, db: DatabaseConfig, user: str) -> str | None:
        if db.password is not None:
            return db.password
        secret = cfg.auth_users.get(user)
        if secret is not None and not is_scram(secret):
            return secret
        return None

    def get_pool(self, db: DatabaseConfig, client_user: str) -> Pool:
        server_user = db.user or client_user
        key = (db.name, server_user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(self, db, server_user, self._server_password(self.config, db, server_user))
            self.pools[key] = pool
        return pool

    def _db_servers(self, dbname: str) -> int:
        return sum(p.total() + len(p.relays) for p in self.pools.values() if p.db.name == dbname)

    def may_open_server(self, pool: Pool) -> bool:
        cfg = self.config
        limit = pool.db.max_db_connections if pool.db.max_db_connections is not None else cfg.max_db_connections
        if limit and self._db_servers(pool.db.name) >= limit:
            return self._free_idle_slot(lambda p: p.db.name == pool.db.name and p is not pool)
        ulimit = cfg.users.get(pool.server_user)
        ulimit = ulimit.max_user_connections if ulimit and ulimit.max_user_connections else cfg.max_user_connections
        if ulimit and sum(p.total() + len(p.relays) for p in self.pools.values()
                          if p.server_user == pool.server_user) >= ulimit:
            return self._free_idle_slot(lambda p: p.server_user == pool.server_user and p is not pool)
        return True

    def _free_idle_slot(self, match) -> bool:
        """At a database/user limit: close the most idle server of the sibling pools to make
        room, as PgBouncer's evict_connection does."""
        oldest = None
        for p in self.pools.values():
            if match(p) and p.idle:
                srv = p.idle[0]  # each pool's least recently used
                if oldest is None or srv.last_used < oldest[1].last_used:
                    oldest = (p, srv)
        if oldest is None:
            return False
        p, srv = oldest
        p.idle.remove(srv)
        srv.close("evicted")
        return True

    def server_closed(self, pool: Pool) -> None:
        for p in self.pools.values():
            if p is not pool and p.wanting() and (p.db.name == pool.db.name or p.server_user == pool.server_user):
                p._grow()
        if self.stopping:
            self._check_stopped()

    @classmethod
    def _timeouts_in_use(cls, cfg: Config) -> bool:
        return any(getattr(cfg, k) for k in cls.TIMEOUTS) or any(
            getattr(u, k) for u in cfg.users.values() for k in cls.TIMEOUTS)

    @staticmethod
    def _limits_in_use(cfg: Config) -> bool:
        return bool(cfg.max_db_connections or cfg.max_user_connections
                    or any(d.max_db_connections for d in cfg.databases.values())
                    or any(u.max_user_connections for u in cfg.users.values()))

    def pool_has_idle(self, pool: Pool) -> None:
        # a sibling blocked on max_db_connections can use this slot
        for p in self.pools.values():
            if p is not pool and p.wanting() and not p.connecting and (
                    p.db.name == pool.db.name or p.server_user == pool.server_user):
                if not self.may_open_server(p):
                    continue
                p._grow()
                break

    # ------------------------------------------------------------------ the admin console's view and commands

    def console_sessions(self) -> int:
        return sum(1 for c in self.clients if c.console and not c.closed)

    def listening_sockets(self) -> list:
        return [sock for s in self.listeners for sock in (s.sockets or ())]

    def database_names(self) -> list[str]:
        """Configured databases, those made from the "*" entry since, and the console's."""
        names = {n for n in self.config.databases if n != "*"}
        names |= {p.db.name for p in self.pools.values()}
        names.add("pgbouncer")
        return sorted(names)

    def config_rows(self, key: str | None = None) -> list[tuple]:
        rows = config_mod.describe(self.config)
        return rows if key is None else [r for r in rows if r[0] == key]

    def pool_paused(self, dbname: str) -> bool:
        return self.pause_mode != "none" or dbname in self.paused_dbs

    def _pools_of(self, dbname: str | None) -> list[Pool]:
        return [p for p in self.pools.values() if dbname is None or p.db.name == dbname]

    def pause(self, dbname: str | None) -> None:
        """PAUSE [db]: no server is handed out; idle servers close, linked ones close when their
        clients are done with them; waiting clients wait (RESUME hands them servers)."""
        if dbname is None:
            self.pause_mode = "pause"
        else:
            self.paused_dbs.add(dbname)
        for p in self._pools_of(dbname):
            p.paused = True
            p.close_all("pause mode")

    def resume(self, dbname: str | None) -> None:
        if dbname is None:
            was = self.pause_mode
            self.pause_mode = "none"
            if was == "suspend":
                for c in self.clients:
                    if not c.console:
                        c.resume_reading()
                for p in self.pools.values():
                    for srv in p.servers():
                        srv.resume_reading()
        else:
            self.paused_dbs.discard(dbname)
        for p in self.pools.values():
            if p.paused and not self.pool_paused(p.db.name):
                p.paused = False
                p._grow()  # the clients that waited meanwhile get servers

    def suspend(self) -> None:
        """SUSPEND: stop reading from every client and server socket; answered once what was
        in flight is written out. RESUME (or the console session leaving) undoes it."""
        self.pause_mode = "suspend"
        for c in self.clients:
            if not c.console:
                c.pause_reading()
        for p in self.pools.values():
            for srv in p.servers():
                srv.pause_reading()

    def reconnect(self, dbname: str | None) -> None:
        """RECONNECT [db]: every server of the database(s) is replaced: idle ones close now,
        linked ones when their clients release them."""
        for p in self._pools_of(dbname):
            p.close_all("reconnect")
            for srv in p.servers():
                srv.close_needed = srv.dirty = True
            p.close_relays("database configuration changed")  # a stream never comes back to be closed

    def kill(self, dbname: str | None) -> None:
        """KILL [db]: the database(s) paused, every client and server of them closed now."""
        for name in ({dbname} if dbname else {p.db.name for p in self.pools.values()}):
            self.paused_dbs.add(name)
        for key, p in list(self.pools.items()):
            if dbname is not None and p.db.name != dbname:
                continue
            p.paused = True
            for c in list(self.clients):
                if c.pool is p and not c.closed:  # active, waiting and logging-in clients alike
                    c.fatal("08P01", "database removed")
            p.close_all("database removed")
            for srv in p.servers() + list(p.logging_in):
                srv.close("database removed")
            # the pool is gone (as PgBouncer's kill_pool frees it): SHOW POOLS no longer lists
            # it; the next login makes a new one, paused until RESUME
            p.obsolete = True
            del self.pools[key]

    def kill_client(self, ident: int) -> bool:
        for c in self.clients:
            if c.id == ident and not c.closed:
                c.fatal("08P01", "admin forced disconnect")
                return True
        return False

    def shutdown_now(self) -> None:
        self.stopping = self.stopping or "SHUTDOWN"
        asyncio.get_running_loop().call_soon(self._finish)

    def admin_wait(self, s, command: str, dbname: str | None) -> bytes | None:
        """A console command that answers when the gateway gets there: now (-> the reply) or
        later (-> None; admin_progress answers)."""
        if self._arrived(command, dbname):
            return ready(command)
        self._admin_waits.append((s, command, dbname))
        return None

    def admin_progress(self) -> None:
        if not self._admin_waits:
            return
        done = [w for w in self._admin_waits if self._arrived(w[1], w[2])]
        if done:
            self._admin_waits = [w for w in self._admin_waits if w not in done]
            for s, command, _ in done:
                s.console_reply(ready(command))

    def _arrived(self, command: str, dbname: str | None) -> bool:
        pools = self._pools_of(dbname)
        if command == "PAUSE":
            return not any(p.active or p.connecting for p in pools)
        if command == "SUSPEND":
            return not any(c.has_buffered() for c in self.clients if not c.console) and not any(
                srv.has_buffered() for p in pools for srv in p.servers())
        return not any(srv.close_needed for p in pools for srv in p.servers())  # WAIT_CLOSE

    def admin_cancel(self, s) -> None:
        """Ctrl-C on a console session whose command waits: PgBouncer resumes."""
        self._admin_waits = [w for w in self._admin_waits if w[0] is not s]
        if self.stopping is None and self.pause_mode != "none":
            self.resume(None)
        s.console_reply(m.error_response("57014", "canceling statement due to user request") + m.ready_for_query())

    def rule_rows(self) -> list[tuple]:
        if self.policy is None:
            return []
        rs = self.policy.rules
        counts: dict[str, dict[str, int]] = {}
        for (rule, action), (n, _, _) in self.decisions.by_rule.items():
            for name in (rule or "(default_action)").split(", "):
                name = name.rsplit(":", 1)[0] if name.endswith(tuple("0123456789")) else name
                per = counts.setdefault(name, {})
                per[action] = per.get(action, 0) + n
        shadow: dict[str, dict[str, int]] = {}
        for (rule, action), (n, _, _) in self.decisions.shadow_by_rule.items():
            name = rule.rsplit(":", 1)[0] if rule.endswith(tuple("0123456789")) else rule
            per = shadow.setdefault(name, {})
            per[action] = per.get(action, 0) + n
        rows = []
        modes = {rf.name: rf.mode for rf in rs.files}
        names = [rf.name for rf in rs.files] + ["(default_action)"]
        names += sorted(n for n in counts if n not in names)  # "analysis": statements that cannot be read
        for name in names:
            mode = modes.get(name, "enforce")
            per = (shadow if mode == "shadow" else counts).get(name, {})
            rows.append((name, rs.version, timestamp(self.policy_loaded_at), sum(per.values()),
                         per.get("allow", 0), per.get("deny", 0), per.get("mask", 0), per.get("require_approval", 0),
                         mode, per.get("error", 0)))
        return rows

    def decision_rows(self) -> list[tuple]:
        rows = [(rule or "(default_action)", action, n, timestamp(last), reason, "enforce")
                for (rule, action), (n, last, reason) in sorted(self.decisions.by_rule.items())]
        rows += [(rule, action, n, timestamp(last), reason, "shadow")
                 for (rule, action), (n, last, reason) in sorted(self.decisions.shadow_by_rule.items())]
        return rows

    # ------------------------------------------------------------------ cancel requests

    def cancel_request(self, pid: int, key: int) -> None:
        c = self.cancel_keys.get((pid, key))
        if c is None:
            log.info("cancel request with an unknown key ignored")
            return
        ev = self.events.canceled
        if ev is not None:
            ev(c)
        if c.console:
            if c.console_waiting:
                self.admin_cancel(c)
            return
        if c.held is not None:  # waiting for approval: the request is withdrawn (57014)
            self.approvals.withdraw(c.held, "canceled by the client")
            return
        srv = c.server
        if srv is None and c.waiting and c.pool is not None and c in c.pool.waiters:
            # waiting for a server (not for masking's catalog: that wait ends by itself):
            # nothing was sent, so the request is dropped and fails as PostgreSQL fails a
            # cancelled statement (PgBouncer ignores this cancel: the statement would run once
            # a server comes, however late)
            c.pool.cancel_wait(c)
            c.server_unavailable("57014", "canceling statement due to user request")
            return
        if srv is None or not srv.queue:
            return  # nothing of this client is running: nothing to cancel
        self.send_cancel(srv)

    def send_cancel(self, srv: ServerConn) -> None:
        srv.cancels_in_flight += 1
        asyncio.get_running_loop().create_task(self._send_cancel(srv))

    async def _send_cancel(self, srv: ServerConn) -> None:
        db = srv.pool.db
        host = srv.peer.rpartition(":")[0] if srv.peer else db.host  # the host of a list it connected to
        try:
            async with asyncio.timeout(self.config.server_connect_timeout or 15):
                if host.startswith("/"):
                    r, w = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{db.port}")
                else:
                    r, w = await asyncio.open_connection(host, db.port)
                w.write(m.cancel_request(srv.pid, srv.key))
                await w.drain()
                await r.read()  # the server closes the connection once it has signalled
                w.close()
        except (OSError, TimeoutError) as e:
            log.warning("cancel request to %s failed: %s", srv.describe(), e)
        finally:
            srv.cancels_in_flight -= 1
            if srv.cancels_in_flight == 0 and srv.parked:
                srv.pool.release(srv)

    # ------------------------------------------------------------------ timers

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.clock = now = time.monotonic()
                self._janitor_tick(now)
            except Exception:
                log.exception("janitor failed")

    def _janitor_tick(self, now: float) -> None:
        cfg = self.config
        self.admin_progress()
        for p in list(self.pools.values()):
            p.janitor(now)
        if self.retired_pools:
            self.retired_pools = {p for p in self.retired_pools if p.active}  # sessions still on them
        for holder in self.catalogs.values():
            holder.tick(now)  # the catalog's background refresh (mask_catalog_ttl)
        if cfg.server_fast_close:
            self._fast_close()
        if self.timeouts_in_use:
            for c in list(self.clients):
                if c.closed or c.state != C_READY or c.console:
                    continue
                query_timeout, idle_tx_timeout, tx_timeout, client_idle_timeout = self.client_timeouts(c)
                if c.held is not None:
                    # waiting for a human: approval_timeout is its limit; idle_transaction_timeout
                    # too only if approval_holds_transaction says so
                    if cfg.approval_holds_transaction and idle_tx_timeout and c.tx_status != m.TX_IDLE \
                            and now - c.last_active > idle_tx_timeout:
                        c.fatal("25P03", "idle_transaction_timeout: transaction idle too long (held for approval "
                                         "longer than idle_transaction_timeout; approval_holds_transaction = on)")
                    continue
                srv = c.server
                if query_timeout and srv is not None and srv.queue and now - srv.query_start > query_timeout:
                    self.send_cancel(srv)
                    c.fatal("57014", "query_timeout: query ran too long")
                elif idle_tx_timeout and srv is not None and not srv.queue \
                        and srv.tx_status != m.TX_IDLE and now - c.last_active > idle_tx_timeout:
                    c.fatal("25P03", "idle_transaction_timeout: transaction idle too long")
                elif tx_timeout and srv is not None and c.tx_status != m.TX_IDLE and now - c.xact_start > tx_timeout:
                    if srv.queue:
                        self.send_cancel(srv)
                    c.fatal("25P03", "transaction_timeout: transaction open too long")
                elif client_idle_timeout and (srv is None or not srv.queue) \
                        and now - c.last_active > client_idle_timeout:
                    c.fatal("57P05", "client_idle_timeout: connection idle too long")

    TIMEOUTS = ("query_timeout", "idle_transaction_timeout", "transaction_timeout", "client_idle_timeout")

    def client_timeouts(self, c) -> tuple[float, float, float, float]:
        """A session's timeouts: its identity's [users] entry, else its pool's user's, else the
        global settings (PgBouncer reads the pool's user; they are the same unless the database
        forces a user)."""
        cfg = self.config
        out = []
        for key in self.TIMEOUTS:
            v = None
            for name in (c.user, c.pool.server_user if c.pool is not None else None):
                u = cfg.users.get(name) if name else None
                if u is not None and getattr(u, key):  # 0 in [users]: not set, as PgBouncer
                    v = getattr(u, key)
                    break
            out.append(getattr(cfg, key) if v is None else v)
        return tuple(out)

    def _fast_close(self) -> None:
        """server_fast_close: a session-mode server marked for closing (RECONNECT, a RELOAD that
        changed its database) closes at the end of its client's transaction, and so does the
        client, rather than at the end of the session."""
        for p in (*self.pools.values(), *self.retired_pools):
            for srv in list(p.active):
                c = srv.client
                if c is None or c.mode != "session" or not (srv.close_needed or p.obsolete):
                    continue
                if srv.tx_status == m.TX_IDLE and not srv.queue and not c.closed:
                    c.fatal("08006", "server_fast_close: database configuration changed")


def load_policy(cfg: Config) -> Policy | None:
    """The rule set of ``cfg`` (None when there is nothing to enforce). Raises RuleLoadError."""
    rs = load_rules(cfg.rules_path(), cfg.default_action, cfg.rule_timeout)
    return Policy(rs) if rs.active else None


def _file_names(policy: Policy | None) -> list[str]:
    if policy is None:
        return []
    return [f"{rf.name} (shadow)" if rf.mode == "shadow" else rf.name for rf in policy.rules.files]


def make_jwt(cfg: Config) -> JwtAuthenticator | None:
    """The token authenticator of ``cfg`` (None when no login uses auth_type = jwt). A JWKS file
    is read now, so a broken one stops startup (and is refused by a reload) with a clear error;
    an https JWKS is fetched at the first token login (and refreshed as its settings say)."""
    if not (config_mod.jwt_in_use(cfg) or (cfg.approvals_listen and cfg.jwt_jwks)):
        return None  # (the approvals API verifies reviewers' tokens with it too)
    a = JwtAuthenticator(config_mod.jwt_settings(cfg), str(cfg.path.parent))
    if a.source.path is not None:
        try:
            a.source.load_now()
        except (OSError, ValueError) as e:
            hint = " (run `pooler demo` once to make the demo's key set)" if "/.demo/" in a.source.path else ""
            raise config_mod.ConfigError(f"{cfg.path}: jwt_jwks {a.source.path}: {getattr(e, 'strerror', None) or e}{hint}") from None
    return a


def _conn_changed(a: DatabaseConfig, b: DatabaseConfig) -> bool:
    return (a.host, a.port, a.dbname, a.user, a.load_balance_hosts) != (b.host, b.port, b.dbname, b.user,
                                                                         b.load_balance_hosts)


def dump_state(gw: "Gateway") -> str:
    """A human-readable snapshot of pools and sessions (SIGUSR1 writes it to the log)."""
    lines = []
    for key, p in gw.pools.items():
        lines.append(f"pool {p.name}: idle={len(p.idle)} active={len(p.active)} connecting={p.connecting} waiters={len(p.waiters)}")
        for s in p.active:
            lines.append(f"  server pid={s.pid} state={s.state} tx={chr(s.tx_status)} queue={list(s.queue)[:8]} client={s.client.describe() if s.client else None} skip={s.skip} rbuf={len(s.rbuf)}")
    for c in gw.clients:
        lines.append(f"client {c.describe()} waiting={c.waiting} server={c.server.pid if c.server else None} rbuf={len(c.rbuf)} skip_sync={c.skip_until_sync}")
    return "\n".join(lines)
