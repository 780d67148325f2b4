"""PgBouncer-style ini (+ auth_file) -> typed, validated configuration.

An existing pgbouncer.ini works unchanged: ``[pgbouncer]`` is accepted as the settings section
and PgBouncer's key names are used. Unknown keys are warnings that name file, line and key; bad
values are ``ConfigError`` naming file, line and key. Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .audit.syslog import FACILITIES, parse_target

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("trust", "md5", "scram-sha-256", "plain", "any", "jwt")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                  "EdDSA", "HS256", "HS384", "HS512")


DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                      "FROM pg_authid WHERE rolname=$1 AND rolcanlogin")


class ConfigError(Exception):
    pass


@dataclass(slots=True)
class DatabaseConfig:
    name: str
    host: str = "127.0.0.1"  # or a comma-separated list (load_balance_hosts chooses)
    port: int = 5432
    load_balance_hosts: str = "round-robin"
    dbname: str | None = None  # None: same as the client's database name
    user: str | None = None  # None: the client's user name
    password: str | None = None
    password_file: str | None = None  # the upstream secret is read from this file (each reload)
    password_env: str | None = None  # ... or from this environment variable
    pool_size: int | None = None
    min_pool_size: int | None = None
    pool_mode: str | None = None
    max_db_connections: int | None = None
    max_db_client_connections: int | None = None
    reserve_pool_size: int | None = None
    server_lifetime: float | None = None  # None: the global setting
    server_idle_timeout: float | None = None
    connect_query: str | None = None
    client_encoding: str | None = None
    datestyle: str | None = None
    timezone: str | None = None
    application_name: str | None = None
    auth_type: str | None = None
    auth_user: str | None = None  # None: the global auth_user
    auth_query: str | None = None
    auth_dbname: str | None = None
    approver_groups: tuple[str, ...] = ()  # who approves this database's held statements (else the global)


@dataclass(slots=True)
class UserConfig:
    name: str
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    max_user_client_connections: int | None = None
    query_timeout: float | None = None  # None: the global setting
    idle_transaction_timeout: float | None = None
    transaction_timeout: float | None = None
    client_idle_timeout: float | None = None
    groups: tuple[str, ...] = ()
    auth_type: str | None = None
    alias: tuple[str, ...] = ()  # token logins: other startup user names this identity may use
    allow_replication: bool = False  # may open replication connections (replication=database|true)


@dataclass(slots=True)
class Config:
    path: Path
    listen_addr: str = "127.0.0.1"
    listen_port: int = 6432
    unix_socket_dir: str = ""
    unix_socket_mode: int = 0o777
    auth_type: str = "md5"
    auth_file: str | None = None
    auth_user: str | None = None  # looks up secrets of users the auth_file lacks, with auth_query
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_dbname: str | None = None  # None: the database the client asked for
    pool_mode: str = "session"
    default_pool_size: int = 20
    min_pool_size: int = 0
    max_client_conn: int = 100
    max_db_connections: int = 0
    max_user_connections: int = 0
    max_db_client_connections: int = 0
    max_user_client_connections: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    server_check_query: str = "<empty>"  # PgBouncer's default: an empty query; "" turns checks off
    server_check_delay: float = 30.0
    server_round_robin: bool = False
    server_fast_close: bool = False
    tcp_keepalive: bool = True
    tcp_keepidle: int = 0  # 0: the OS default
    tcp_keepintvl: int = 0
    tcp_keepcnt: int = 0
    tcp_user_timeout: int = 0  # milliseconds
    so_reuseport: bool = False
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 15.0
    query_wait_timeout: float = 120.0
    query_timeout: float = 0.0
    client_idle_timeout: float = 0.0
    client_login_timeout: float = 60.0
    idle_transaction_timeout: float = 0.0
    transaction_timeout: float = 0.0
    max_prepared_statements: int = 200
    max_packet_size: int = 64 * 1024 * 1024
    ignore_startup_parameters: tuple[str, ...] = ("extra_float_digits",)
    track_extra_parameters: tuple[str, ...] = ("IntervalStyle",)  # tracked per client besides the built-in ones
    logfile: str | None = None
    pidfile: str | None = None
    log_connections: bool = True
    log_disconnections: bool = True
    log_pooler_errors: bool = True
    log_stats: bool = True
    stats_period: float = 60.0
    admin_users: tuple[str, ...] = ()  # may run every console command
    stats_users: tuple[str, ...] = ()  # may run the console's SHOW commands
    admin_legacy_columns: bool = False
    metrics_listen: str | None = None  # host:port of the Prometheus endpoint (/metrics, /healthz, /readyz)
    # approvals (docs/approvals.md): statements a rule holds for a human's decision
    approval_timeout: float = 300.0  # refused if nobody decides within this (0: wait for ever)
    approver_groups: tuple[str, ...] = ()  # token groups whose members may decide (console admins always may)
    approvals_required: int = 1  # distinct reviewers who must approve
    approval_holds_transaction: bool = False  # a hold inside a transaction counts against idle_transaction_timeout
    approval_max_grant: float = 3600.0  # longest APPROVE ... FOR interval
    approval_preview_timeout: float = 5.0  # a dry run (require_approval(preview=True)) is cut off after this
    approvals_listen: str | None = None  # host:port of the reviewers' HTTP API and page
    approval_url: str | None = None  # the page's address as reviewers reach it (notices show it)
    approval_webhook: str | None = None  # POST each new/decided request as JSON here
    approvals_store: str = "memory"  # or a PostgreSQL connection string shared by several gateways
    approvals_gateway_name: str | None = None  # this gateway in the shared store (default host:listen_port)
    # the audit stream (docs/audit.md): ECS JSON events to a file, syslog and/or an HTTP endpoint
    audit_file: str | None = None  # JSON lines appended here
    audit_syslog: str | None = None  # udp://host:port | tcp://host:port | unix:/path (RFC 5424)
    audit_syslog_facility: str = "local0"
    audit_http_url: str | None = None  # batches POSTed here
    audit_http_format: str = "ndjson"  # ndjson | json (an array per batch)
    audit_http_batch: int = 100  # events per request at most
    audit_http_flush: float = 1.0  # a batch waits at most this long for more events
    audit_http_retries: int = 3  # tries after the first, doubling pauses from 0.5 s
    audit_http_timeout: float = 5.0
    audit_http_token_file: str | None = None  # the Authorization token, read from this file ...
    audit_http_token_env: str | None = None  # ... or this environment variable
    audit_http_auth_scheme: str = "Bearer"  # Authorization: <scheme> <token> (Splunk HEC: Splunk)
    audit_queue_size: int = 10000  # events waiting per destination; more are dropped and counted
    audit_http_token: str = ""  # resolved from audit_http_token_file/env; never shown or logged
    # session recordings (docs/recordings.md): off while record_dir is unset
    record_dir: str | None = None
    record_results: int = 5  # first rows of each result recorded (as the client received them)
    record_result_bytes: int = 8192  # ... at most this many bytes of values per statement
    record_rotate_size: int = 64 * 1024 * 1024
    record_rotate_age: float = 3600.0  # 0: no age limit (a file still closes when the UTC day changes)
    record_retention_days: float = 0.0  # 0: closed files are kept however old
    record_retention_size: int = 0  # 0: no cap on all files together
    record_compression: str = "zstd"
    record_fsync: str = "1s"  # always | rotate | an interval
    record_hmac_key_file: str | None = None
    record_hmac_key_env: str | None = None
    record_failure: str = "block"  # block | continue
    record_writer: str = "thread"  # thread (of the gateway) | process (a child process writes: recording/process.py)
    record_key: bytes = b""  # resolved from record_hmac_key_file/env; never logged
    verbose: int = 0
    application_name_add_host: bool = False
    rules_dir: str | None = None  # None: "rules/" beside the config file, when it exists
    default_action: str = "allow"
    rule_timeout: float = 0.05
    mask_hash_key: str | None = None  # key of the "hash" masking method (None: random per start)
    mask_hash_key_file: str | None = None
    mask_catalog_ttl: float = 60.0  # re-read the catalog (tables, views) this often, in the background
    mask_key: bytes = b""  # resolved from mask_hash_key(_file); never logged
    client_tls_sslmode: str = "disable"
    client_tls_key_file: str | None = None
    client_tls_cert_file: str | None = None
    client_tls_ca_file: str | None = None
    client_tls_protocols: str = "secure"
    client_tls_ciphers: str | None = None
    server_tls_sslmode: str = "disable"
    server_tls_key_file: str | None = None
    server_tls_cert_file: str | None = None
    server_tls_ca_file: str | None = None
    server_tls_protocols: str = "secure"
    server_tls_ciphers: str | None = None
    jwt_jwks: str | None = None
    jwt_jwks_ca_file: str | None = None
    jwt_jwks_refresh: float = 300.0
    jwt_jwks_min_refresh: float = 10.0
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwt_issuer: str | None = None
    jwt_audience: tuple[str, ...] = ()
    jwt_leeway: float = 30.0
    jwt_user_claim: str = "sub"
    jwt_groups_claim: str = "groups"
    jwt_required_claims: tuple[str, ...] = ("exp",)
    jwt_max_token_size: int = 16384
    jwt_allow_plaintext: bool = False
    jwt_expiry_action: str = "close"
    auth_fail_delay_after: int = 3
    auth_fail_max_delay: float = 5.0
    client_ssl: object = None  # ssl.SSLContext built from client_tls_* (None: TLS off)
    server_ssl: object = None  # ssl.SSLContext built from server_tls_* (None: never asked)
    databases: dict[str, DatabaseConfig] = field(default_factory=dict)
    users: dict[str, UserConfig] = field(default_factory=dict)
    auth_users: dict[str, str] = field(default_factory=dict)  # user -> secret from auth_file
    warnings: list[str] = field(default_factory=list)

    def pool_size_for(self, db: DatabaseConfig, user: str) -> int:
        """PgBouncer's pool_pool_size: the pool's user's pool_size, the database's, the default."""
        u = self.users.get(user)
        if u is not None and u.pool_size is not None:
            return u.pool_size
        return db.pool_size if db.pool_size is not None else self.default_pool_size

    def reserve_pool_size_for(self, db: DatabaseConfig, user: str) -> int:
        u = self.users.get(user)
        if u is not None and u.reserve_pool_size is not None:
            return u.reserve_pool_size
        return db.reserve_pool_size if db.reserve_pool_size is not None else self.reserve_pool_size

    def pool_mode_for(self, db: DatabaseConfig, user: str) -> str:
        u = self.users.get(user)
        if u and u.pool_mode:
            return u.pool_mode
        return db.pool_mode or self.pool_mode

    def auth_type_for(self, db: DatabaseConfig, user: str) -> str:
        """A database entry with auth_type = jwt takes tokens only: no [users] entry weakens it.
        Otherwise the most specific setting wins: the user's, the database's, the global one."""
        if db.auth_type == "jwt":
            return "jwt"
        u = self.users.get(user)
        return (u.auth_type if u else None) or db.auth_type or self.auth_type

    def database(self, name: str) -> DatabaseConfig | None:
        db = self.databases.get(name)
        if db is None:
            fallback = self.databases.get("*")
            if fallback is not None:
                # PgBouncer's "*" entry: connect to the database of the same name.
                db = DatabaseConfig(**{f: getattr(fallback, f) for f in fallback.__slots__})
                db.name = name
                if db.dbname is None or db.dbname == "*":
                    db.dbname = name
        return db

    def rules_path(self) -> Path | None:
        if self.rules_dir:
            return self.resolve(self.rules_dir)
        default = self.path.parent / "rules"
        return default if default.is_dir() else None

    def resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else (self.path.parent / p)


# Settings: key -> (attribute, parser). Parsers raise ValueError with a readable message.


def _int(v: str) -> int:
    try:
        return int(v, 0)
    except ValueError:
        raise ValueError(f"expected an integer, got {v!r}") from None


def _nonneg_int(v: str) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError(f"must not be negative, got {n}")
    return n


def _port(v: str) -> int:
    n = _int(v)
    if not 0 <= n <= 65535:
        raise ValueError(f"not a TCP port: {n}")
    return n


def _seconds(v: str) -> float:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|min|h)?\s*", v)
    if not m:
        raise ValueError(f"expected a number of seconds, got {v!r}")
    n = float(m.group(1))
    unit = m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "min": 60, "h": 3600}[unit]


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "yes", "true", "on"):
        return True
    if s in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected 0 or 1, got {v!r}")


def _choice(*choices: str):
    def parse(v: str) -> str:
        s = v.strip().lower()
        if s not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {v!r}")
        return s

    return parse


def _str(v: str) -> str:
    return v


def _opt_str(v: str) -> str | None:
    return v or None


def _list(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def _octal(v: str) -> int:
    try:
        return int(v, 8)
    except ValueError:
        raise ValueError(f"expected an octal mode such as 0777, got {v!r}") from None


_SIZE_UNITS = {None: 1, "B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _bytes(v: str) -> int:
    """A size in bytes (0 allowed: none / no cap)."""
    m = re.fullmatch(r"\s*([0-9]+)\s*(B|kB|KB|MB|GB)?\s*", v)
    if not m:
        raise ValueError(f"expected a size in bytes (e.g. 65536 or 64MB), got {v!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _size(v: str) -> int:
    """A buffer or packet size: at least 1024 bytes."""
    n = _bytes(v)
    if n < 1024:
        raise ValueError(f"must be at least 1024 bytes, got {n}")
    return n


def _hosts(v: str) -> str:
    hosts = v.split(",")
    if any(not h.strip() for h in hosts):
        raise ValueError(f"empty host name in the list {v!r}")
    return ",".join(h.strip() for h in hosts)


def _track_extra(v: str) -> tuple[str, ...]:
    names = _list(v)
    for n in names:
        if n.lower() == "options":
            raise ValueError("options itself cannot be tracked, only the parameters it sets")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n):
            raise ValueError(f"not a parameter name: {n!r}")
    return names


def _days(v: str) -> float:
    try:
        n = float(v)
    except ValueError:
        raise ValueError(f"expected a number of days, got {v!r}") from None
    if n < 0:
        raise ValueError(f"must not be negative, got {v}")
    return n


def _fsync_policy(v: str) -> str:
    s = v.strip().lower()
    if s in ("always", "rotate"):
        return s
    _seconds(s)
    return s


def fsync_interval(policy: str) -> float:
    """record_fsync as the writer takes it: 0 (every chunk), inf (only at close), or seconds."""
    if policy == "always":
        return 0.0
    if policy == "rotate":
        return float("inf")
    return _seconds(policy) or 0.0


def _tls_protocols(v: str) -> str:
    from .tls import parse_protocols

    parse_protocols(v)
    return v


def _jwt_algorithms(v: str) -> tuple[str, ...]:
    algs = _list(v)
    if not algs:
        raise ValueError("name at least one algorithm, e.g. RS256,ES256")
    by_lower = {a.lower(): a for a in JWT_ALGORITHMS}
    out = []
    for a in algs:
        if a.lower() == "none":
            raise ValueError("'none' is never accepted: tokens must be signed")
        if a.lower() not in by_lower:
            raise ValueError(f"unknown algorithm {a!r} (expected some of {', '.join(JWT_ALGORITHMS)})")
        out.append(by_lower[a.lower()])
    return tuple(out)


def _listen(v: str) -> str | None:
    v = v.strip()
    if not v:
        return None
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (or :port for every address), got {v!r}")
    return v


def _positive_int(v: str) -> int:
    n = _int(v)
    if n < 1:
        raise ValueError(f"must be at least 1, got {n}")
    return n


def _http_url(v: str) -> str | None:
    v = v.strip()
    if not v:
        return None
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
    return v


def _approvals_store(v: str) -> str:
    v = v.strip()
    if v != "memory":
        store_connect_args(v)
    return v


def _syslog_target(v: str) -> str | None:
    v = v.strip()
    if not v:
        return None
    parse_target(v)
    return v


# libpq keywords the approvals store's connection string may use, as the client (asyncpg) names them
_STORE_KEYS = {"host": "host", "hostaddr": "host", "port": "port", "user": "user", "password": "password",
               "dbname": "database", "sslmode": "ssl", "connect_timeout": "timeout",
               "application_name": "application_name"}


def store_connect_args(v: str) -> dict:
    """``approvals_store``'s connection string (a URL or libpq ``key=value`` pairs) as keyword
    arguments of ``asyncpg.connect``; ValueError names what is wrong (never the password)."""
    if v.startswith(("postgresql://", "postgres://")):
        return {"dsn": v}
    try:
        pairs = parse_connstr(v)
    except ValueError as e:
        raise ValueError(f"expected memory or a PostgreSQL connection string: {e}") from None
    if not pairs:
        raise ValueError("expected memory or a PostgreSQL connection string")
    out: dict = {}
    for k, val in pairs:
        name = _STORE_KEYS.get(k)
        if name is None:
            raise ValueError(f"unsupported key {k!r} in the connection string (supported: {', '.join(sorted(_STORE_KEYS))})")
        if name == "port":
            if not val.isdigit():
                raise ValueError(f"port must be a number, not {val!r}")
            out[name] = int(val)
        elif name == "timeout":
            try:
                out[name] = float(val)
            except ValueError:
                raise ValueError(f"connect_timeout must be a number of seconds, not {val!r}") from None
        elif name == "application_name":
            out["server_settings"] = {"application_name": val}
        else:
            out[name] = val
    return out


def _claim(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("expected a claim name or a dotted path such as realm_access.roles")
    return v


SETTINGS = {
    "listen_addr": ("listen_addr", _str),
    "listen_port": ("listen_port", _port),
    "unix_socket_dir": ("unix_socket_dir", _str),
    "unix_socket_mode": ("unix_socket_mode", _octal),
    "auth_type": ("auth_type", _choice(*AUTH_TYPES)),
    "auth_file": ("auth_file", _opt_str),
    "auth_user": ("auth_user", _opt_str),
    "auth_query": ("auth_query", _str),
    "auth_dbname": ("auth_dbname", _opt_str),
    "pool_mode": ("pool_mode", _choice(*POOL_MODES)),
    "default_pool_size": ("default_pool_size", _nonneg_int),
    "min_pool_size": ("min_pool_size", _nonneg_int),
    "max_client_conn": ("max_client_conn", _nonneg_int),
    "max_db_connections": ("max_db_connections", _nonneg_int),
    "max_user_connections": ("max_user_connections", _nonneg_int),
    "max_db_client_connections": ("max_db_client_connections", _nonneg_int),
    "max_user_client_connections": ("max_user_client_connections", _nonneg_int),
    "reserve_pool_size": ("reserve_pool_size", _nonneg_int),
    "reserve_pool_timeout": ("reserve_pool_timeout", _seconds),
    "server_check_query": ("server_check_query", _str),
    "server_check_delay": ("server_check_delay", _seconds),
    "server_round_robin": ("server_round_robin", _bool),
    "server_fast_close": ("server_fast_close", _bool),
    "tcp_keepalive": ("tcp_keepalive", _bool),
    "tcp_keepidle": ("tcp_keepidle", _nonneg_int),
    "tcp_keepintvl": ("tcp_keepintvl", _nonneg_int),
    "tcp_keepcnt": ("tcp_keepcnt", _nonneg_int),
    "tcp_user_timeout": ("tcp_user_timeout", _nonneg_int),
    "so_reuseport": ("so_reuseport", _bool),
    "transaction_timeout": ("transaction_timeout", _seconds),
    "server_reset_query": ("server_reset_query", _str),
    "server_reset_query_always": ("server_reset_query_always", _bool),
    "server_lifetime": ("server_lifetime", _seconds),
    "server_idle_timeout": ("server_idle_timeout", _seconds),
    "server_connect_timeout": ("server_connect_timeout", _seconds),
    "server_login_retry": ("server_login_retry", _seconds),
    "query_wait_timeout": ("query_wait_timeout", _seconds),
    "query_timeout": ("query_timeout", _seconds),
    "client_idle_timeout": ("client_idle_timeout", _seconds),
    "client_login_timeout": ("client_login_timeout", _seconds),
    "idle_transaction_timeout": ("idle_transaction_timeout", _seconds),
    "max_prepared_statements": ("max_prepared_statements", _nonneg_int),
    "max_packet_size": ("max_packet_size", _size),
    "ignore_startup_parameters": ("ignore_startup_parameters", _list),
    "track_extra_parameters": ("track_extra_parameters", _track_extra),
    "logfile": ("logfile", _opt_str),
    "pidfile": ("pidfile", _opt_str),
    "log_connections": ("log_connections", _bool),
    "log_disconnections": ("log_disconnections", _bool),
    "log_pooler_errors": ("log_pooler_errors", _bool),
    "log_stats": ("log_stats", _bool),
    "admin_users": ("admin_users", _list),
    "stats_users": ("stats_users", _list),
    "admin_legacy_columns": ("admin_legacy_columns", _bool),
    "approval_timeout": ("approval_timeout", _seconds),
    "approver_groups": ("approver_groups", _list),
    "approvals_required": ("approvals_required", _positive_int),
    "approval_holds_transaction": ("approval_holds_transaction", _bool),
    "approval_max_grant": ("approval_max_grant", _seconds),
    "approval_preview_timeout": ("approval_preview_timeout", _seconds),
    "approvals_listen": ("approvals_listen", _listen),
    "approval_url": ("approval_url", _opt_str),
    "approval_webhook": ("approval_webhook", _http_url),
    "approvals_store": ("approvals_store", _approvals_store),
    "approvals_gateway_name": ("approvals_gateway_name", _opt_str),
    "metrics_listen": ("metrics_listen", _listen),
    "audit_file": ("audit_file", _opt_str),
    "audit_syslog": ("audit_syslog", _syslog_target),
    "audit_syslog_facility": ("audit_syslog_facility", _choice(*FACILITIES)),
    "audit_http_url": ("audit_http_url", _http_url),
    "audit_http_format": ("audit_http_format", _choice("ndjson", "json")),
    "audit_http_batch": ("audit_http_batch", _positive_int),
    "audit_http_flush": ("audit_http_flush", _seconds),
    "audit_http_retries": ("audit_http_retries", _nonneg_int),
    "audit_http_timeout": ("audit_http_timeout", _seconds),
    "audit_http_token_file": ("audit_http_token_file", _opt_str),
    "audit_http_token_env": ("audit_http_token_env", _opt_str),
    "audit_http_auth_scheme": ("audit_http_auth_scheme", _str),
    "audit_queue_size": ("audit_queue_size", _positive_int),
    "stats_period": ("stats_period", _seconds),
    "record_dir": ("record_dir", _opt_str),
    "record_results": ("record_results", _nonneg_int),
    "record_result_bytes": ("record_result_bytes", _bytes),
    "record_rotate_size": ("record_rotate_size", _size),
    "record_rotate_age": ("record_rotate_age", _seconds),
    "record_retention_days": ("record_retention_days", _days),
    "record_retention_size": ("record_retention_size", _bytes),
    "record_compression": ("record_compression", _choice("gzip", "zstd", "none")),
    "record_fsync": ("record_fsync", _fsync_policy),
    "record_hmac_key_file": ("record_hmac_key_file", _opt_str),
    "record_hmac_key_env": ("record_hmac_key_env", _opt_str),
    "record_failure": ("record_failure", _choice("block", "continue")),
    "record_writer": ("record_writer", _choice("process", "thread")),
    "verbose": ("verbose", _nonneg_int),
    "application_name_add_host": ("application_name_add_host", _bool),
    "rules_dir": ("rules_dir", _opt_str),
    "default_action": ("default_action", _choice("allow", "deny")),
    "rule_timeout": ("rule_timeout", _seconds),
    "mask_hash_key": ("mask_hash_key", _opt_str),
    "mask_hash_key_file": ("mask_hash_key_file", _opt_str),
    "mask_catalog_ttl": ("mask_catalog_ttl", _seconds),
    "client_tls_sslmode": ("client_tls_sslmode", _choice(*SSLMODES)),
    "client_tls_key_file": ("client_tls_key_file", _opt_str),
    "client_tls_cert_file": ("client_tls_cert_file", _opt_str),
    "client_tls_ca_file": ("client_tls_ca_file", _opt_str),
    "client_tls_protocols": ("client_tls_protocols", _tls_protocols),
    "client_tls_ciphers": ("client_tls_ciphers", _opt_str),
    "server_tls_sslmode": ("server_tls_sslmode", _choice(*SSLMODES)),
    "server_tls_key_file": ("server_tls_key_file", _opt_str),
    "server_tls_cert_file": ("server_tls_cert_file", _opt_str),
    "server_tls_ca_file": ("server_tls_ca_file", _opt_str),
    "server_tls_protocols": ("server_tls_protocols", _tls_protocols),
    "server_tls_ciphers": ("server_tls_ciphers", _opt_str),
    "jwt_jwks": ("jwt_jwks", _opt_str),
    "jwt_jwks_ca_file": ("jwt_jwks_ca_file", _opt_str),
    "jwt_jwks_refresh": ("jwt_jwks_refresh", _seconds),
    "jwt_jwks_min_refresh": ("jwt_jwks_min_refresh", _seconds),
    "jwt_algorithms": ("jwt_algorithms", _jwt_algorithms),
    "jwt_issuer": ("jwt_issuer", _opt_str),
    "jwt_audience": ("jwt_audience", _list),
    "jwt_leeway": ("jwt_leeway", _seconds),
    "jwt_user_claim": ("jwt_user_claim", _claim),
    "jwt_groups_claim": ("jwt_groups_claim", _claim),
    "jwt_required_claims": ("jwt_required_claims", _list),
    "jwt_max_token_size": ("jwt_max_token_size", _nonneg_int),
    "jwt_allow_plaintext": ("jwt_allow_plaintext", _bool),
    "jwt_expiry_action": ("jwt_expiry_action", _choice("close", "keep")),
    "auth_fail_delay_after": ("auth_fail_delay_after", _nonneg_int),
    "auth_fail_max_delay": ("auth_fail_max_delay", _seconds),
}

# PgBouncer settings this gateway accepts but does not act on (yet); a warning says so.
# PgBouncer settings whose effect the gateway cannot give, and whose absence would admit or run
# as what the operator meant to prevent: refused when set (docs/operations.md).
PGBOUNCER_REFUSED = {
    "auth_hba_file": "no HBA rules engine here (use auth_type per database/user and network controls)",
    "auth_ident_file": "no ident maps here (no HBA rules engine)",
    "disable_pqexec": "the simple query protocol cannot be switched off here (the rules govern it instead)",
    "user": "the gateway does not drop privileges itself: run it as the wanted OS user",
}

PGBOUNCER_IGNORED = {
    "dns_max_ttl", "dns_nxdomain_ttl",
    "dns_zone_check_period", "pkt_buf", "sbuf_loopcnt", "tcp_defer_accept", "tcp_socket_buffer",
    "syslog", "syslog_ident", "syslog_facility", "user", "listen_backlog",
    "suspend_timeout", "peer_id",
    "client_tls_ecdhcurve", "client_tls_dheparams", "log_failed_connections",
    "cancel_wait_timeout", "query_wait_notify", "service_name", "job_name", "conffile",
    "autodb_idle_timeout", "server_reset_query_always_is_deprecated", "unix_socket_group",
    "idle_transaction_timeout_is_set", "scram_iterations", "resolv_conf",
}

DB_KEYS = {
    "host": _hosts, "port": _port, "load_balance_hosts": _choice("round-robin", "disable"), "dbname": _str, "user": _str, "password": _str,
    "pool_size": _nonneg_int, "min_pool_size": _nonneg_int, "pool_mode": _choice(*POOL_MODES),
    "max_db_connections": _nonneg_int, "connect_query": _str, "client_encoding": _str,
    "datestyle": _str, "timezone": _str, "application_name": _str,
    "auth_type": _choice(*AUTH_TYPES), "password_file": _str, "password_env": _str,
    "approver_groups": _list, "max_db_client_connections": _nonneg_int,
    "reserve_pool_size": _nonneg_int, "server_lifetime": _seconds, "server_idle_timeout": _seconds,
    "auth_user": _str, "auth_query": _str, "auth_dbname": _str,
}
DB_ALIASES = {"reserve_pool": "reserve_pool_size"}  # PgBouncer's old name
USER_KEYS = {"pool_mode": _choice(*POOL_MODES), "max_user_connections": _nonneg_int,
             "groups": _list, "auth_type": _choice(*AUTH_TYPES), "alias": _list,
             "pool_size": _nonneg_int, "reserve_pool_size": _nonneg_int,
             "max_user_client_connections": _nonneg_int, "query_timeout": _seconds,
             "idle_transaction_timeout": _seconds, "transaction_timeout": _seconds,
             "client_idle_timeout": _seconds, "allow_replication": _bool}


def parse_connstr(s: str) -> list[tuple[str, str]]:
    """libpq-style ``key=value key='quoted value'`` pairs."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(s)
    while i < n:
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            break
        m = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*").match(s, i)
        if not m:
            # never quote the text: it may be part of a password
            raise ValueError(f"expected key=value at character {i + 1}")
        key = m.group(1).lower()
        i = m.end()
        if i < n and s[i] == "'":
            i += 1
            val = []
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quoted value for {key}")
                c = s[i]
                if c == "\\" and i + 1 < n:
                    val.append(s[i + 1])
                    i += 2
                elif c == "'":
                    if i + 1 < n and s[i + 1] == "'":
                        val.append("'")
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    val.append(c)
                    i += 1
            out.append((key, "".join(val)))
        else:
            j = i
            while j < n and not s[j].isspace():
                j += 1
            out.append((key, s[i:j]))
            i = j
    return out


def _read_ini(path: Path) -> list[tuple[str, int, str | None, str]]:
    """-> [(section, line, key, value)]; a section header yields key None."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    out = []
    section = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("%include"):
            inc = Path(line[len("%include"):].strip())
            if not inc.is_absolute():
                inc = path.parent / inc
            out.extend(_read_ini(inc))
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{path}:{lineno}: malformed section header {line!r}")
            section = line[1:-1].strip().lower()
            out.append((section, lineno, None, ""))
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{lineno}: expected 'key = value', got {line!r}")
        if section is None:
            raise ConfigError(f"{path}:{lineno}: setting outside of any [section]")
        key, _, value = line.partition("=")
        key = key.strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"' and section not in ("databases", "users"):
            value = value[1:-1]
        out.append((section, lineno, key, value))
    return out


def parse_auth_file(path: Path) -> dict[str, str]:
    """userlist.txt: ``"user" "secret"`` per line; secret is plain, md5..., or SCRAM-SHA-256$..."""
    users: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read auth_file: {e.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        try:
            parts = shlex.split(line, posix=True)
        except ValueError as e:
            raise ConfigError(f"{path}:{lineno}: {e}") from None
        if len(parts) < 2:
            raise ConfigError(f"{path}:{lineno}: expected '\"user\" \"password\"'")
        users[parts[0]] = parts[1]
    return users


_PROCESS_MASK_KEY = os.urandom(32)


def _resolve_mask_key(cfg: Config, path) -> None:
    """The key of the "hash" masking method: from a file, inline, or random for this process
    (pseudonyms then change when the gateway restarts, so joins across restarts break)."""
    if cfg.mask_hash_key_file:
        try:
            key = cfg.resolve(cfg.mask_hash_key_file).read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"{path}: mask_hash_key_file: cannot read {cfg.mask_hash_key_file}: {e.strerror}") from None
        if not key:
            raise ConfigError(f"{path}: mask_hash_key_file {cfg.mask_hash_key_file} is empty")
        cfg.mask_key = key
    elif cfg.mask_hash_key:
        cfg.mask_key = cfg.mask_hash_key.encode()
    else:
        cfg.mask_key = _PROCESS_MASK_KEY


def _file_or_env_secret(cfg: Config, path, file_key: str, env_key: str, raw: bool = False) -> str | bytes | None:
    """The secret a ``*_file`` / ``*_env`` pair of settings names (None: neither is set): a
    file's one line (``raw``: its bytes, stripped), or an environment variable's value. Errors
    name the file or variable, never the secret."""
    fname, env = getattr(cfg, file_key), getattr(cfg, env_key)
    if fname and env:
        raise ConfigError(f"{path}: give only one of {file_key}, {env_key}")
    if fname:
        f = cfg.resolve(fname)
        try:
            got = f.read_bytes().strip() if raw else f.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{path}: {file_key}: cannot read {f}: {e.strerror}") from None
        if not got:
            raise ConfigError(f"{path}: {file_key} {f} is empty")
        if not raw and "\n" in got:
            raise ConfigError(f"{path}: {file_key} {f} must hold one line")
        return got
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ConfigError(f"{path}: environment variable {env} ({env_key}) is not set")
        return value.encode() if raw else value
    return None


def _resolve_audit_token(cfg: Config, path) -> None:
    """audit_http_token_file / audit_http_token_env -> cfg.audit_http_token."""
    token = _file_or_env_secret(cfg, path, "audit_http_token_file", "audit_http_token_env") or ""
    if token and not cfg.audit_http_url:
        raise ConfigError(f"{path}: an audit_http token is given but audit_http_url is not set")
    cfg.audit_http_token = token


def _resolve_record_key(cfg: Config, path) -> None:
    """The HMAC key of the recordings' hash chain (record_hmac_key_file / _env)."""
    cfg.record_key = _file_or_env_secret(cfg, path, "record_hmac_key_file", "record_hmac_key_env", raw=True) or b""
    if cfg.record_compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ConfigError(f"{path}: record_compression = zstd needs the zstandard package") from None


def _resolve_db_secret(cfg: Config, db: DatabaseConfig, where: str) -> None:
    """password_file / password_env -> db.password (read at every load, so a reload rotates it).
    Errors name the file or variable, never a secret."""
    given = [k for k in ("password", "password_file", "password_env") if getattr(db, k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: database {db.name}: give only one of {', '.join(given)}")
    if db.password_file is not None:
        f = cfg.resolve(db.password_file)
        try:
            text = f.read_text()
        except OSError as e:
            raise ConfigError(f"{where}: database {db.name}: cannot read password_file {f}: {e.strerror}") from None
        secret = text.rstrip("\r\n")
        if not secret or "\n" in secret:
            raise ConfigError(f"{where}: database {db.name}: password_file {f} must hold one line")
        db.password = secret
    elif db.password_env is not None:
        secret = os.environ.get(db.password_env)
        if not secret:
            raise ConfigError(f"{where}: database {db.name}: environment variable {db.password_env} (password_env) is not set")
        db.password = secret


def _check_tls(cfg: Config) -> None:
    import ssl

    from . import tls

    for side, build in (("client", tls.client_side_context), ("server", tls.server_side_context)):
        mode = getattr(cfg, f"{side}_tls_sslmode")
        files = {k: getattr(cfg, f"{side}_tls_{k}_file") for k in ("cert", "key", "ca")}
        files = {k: str(cfg.resolve(v)) if v else None for k, v in files.items()}
        if mode != "disable":
            for k, f in files.items():
                if f and not os.path.isfile(f):
                    hint = " (run `pooler demo` once to make the demo's certificate)" if "/.demo/" in f else ""
                    raise ConfigError(f"{cfg.path}: {side}_tls_{k}_file {f}: no such file{hint}")
        try:
            ctx = build(mode, files["cert"], files["key"], files["ca"],
                        getattr(cfg, f"{side}_tls_protocols"), getattr(cfg, f"{side}_tls_ciphers"))
        except (ValueError, OSError, ssl.SSLError) as e:
            raise ConfigError(f"{cfg.path}: {side}_tls_sslmode = {mode}: {e}") from None
        setattr(cfg, f"{side}_ssl", ctx)


def jwt_in_use(cfg: Config) -> bool:
    return (cfg.auth_type == "jwt" or any(d.auth_type == "jwt" for d in cfg.databases.values())
            or any(u.auth_type == "jwt" for u in cfg.users.values()))


def _check_jwt(cfg: Config) -> None:
    if not jwt_in_use(cfg):
        return
    if not cfg.jwt_jwks:
        raise ConfigError(f"{cfg.path}: auth_type = jwt needs jwt_jwks (a JWKS file or an https:// URL)")
    if cfg.jwt_jwks.startswith("http://"):
        raise ConfigError(f"{cfg.path}: jwt_jwks must be an https:// URL or a file, not http://")
    if not cfg.jwt_issuer:
        raise ConfigError(f"{cfg.path}: auth_type = jwt needs jwt_issuer (the issuer tokens must name)")
    if not cfg.jwt_audience:
        raise ConfigError(f"{cfg.path}: auth_type = jwt needs jwt_audience (the aud tokens must carry, so a "
                          "token issued to another application is refused; `*` accepts any audience)")
    if "*" in cfg.jwt_audience:
        cfg.warnings.append(f"{cfg.path}: jwt_audience = *: tokens issued to any application are accepted")
    if cfg.jwt_allow_plaintext:
        cfg.warnings.append(f"{cfg.path}: jwt_allow_plaintext = 1: tokens are accepted over unencrypted "
                            "TCP connections (for tests only)")
    elif cfg.client_ssl is None and cfg.listen_addr:
        cfg.warnings.append(f"{cfg.path}: auth_type = jwt without client TLS: token logins are only "
                            "accepted over the Unix socket (set client_tls_sslmode and its files)")
    for d in cfg.databases.values():
        if d.name != "*" and not d.user and (d.auth_type == "jwt" or (d.auth_type is None and cfg.auth_type == "jwt")):
            cfg.warnings.append(f"{cfg.path}: database {d.name} takes token logins but names no upstream "
                                "user: such logins will be refused (set user= and a password)")


def jwt_settings(cfg: Config):
    from .auth.jwt import JwtSettings

    return JwtSettings(
        jwks=cfg.jwt_jwks or "", jwks_ca_file=str(cfg.resolve(cfg.jwt_jwks_ca_file)) if cfg.jwt_jwks_ca_file else None,
        jwks_refresh=cfg.jwt_jwks_refresh, jwks_min_refresh=cfg.jwt_jwks_min_refresh,
        algorithms=cfg.jwt_algorithms, issuer=cfg.jwt_issuer,
        audience=() if "*" in cfg.jwt_audience else cfg.jwt_audience,
        leeway=cfg.jwt_leeway, user_claim=cfg.jwt_user_claim, groups_claim=cfg.jwt_groups_claim,
        required_claims=cfg.jwt_required_claims, max_token_size=cfg.jwt_max_token_size or 16384)


def load(path: str | os.PathLike) -> Config:
    path = Path(path).resolve()
    cfg = Config(path=path)
    settings_seen = False
    for section, lineno, key, value in _read_ini(path):
        where = f"{path}:{lineno}"
        if key is None:
            if section in ("gateway", "pgbouncer"):
                settings_seen = True
            elif section not in ("databases", "users", "peers"):
                cfg.warnings.append(f"{where}: unknown section [{section}] ignored")
            continue
        if section in ("gateway", "pgbouncer"):
            k = key.lower()
            if k in SETTINGS:
                attr, parser = SETTINGS[k]
                try:
                    setattr(cfg, attr, parser(value))
                except ValueError as e:
                    raise ConfigError(f"{where}: invalid value for {key}: {e}") from None
            elif k in PGBOUNCER_REFUSED:
                v = value.strip().strip("'\"")
                if v and not (k == "disable_pqexec" and v.lower() in ("0", "no", "off", "false")):
                    raise ConfigError(f"{where}: {key} is not supported: {PGBOUNCER_REFUSED[k]}; remove the setting")
            elif k in PGBOUNCER_IGNORED:
                cfg.warnings.append(f"{where}: setting {key} is not supported by pooler; ignored")
            else:
                cfg.warnings.append(f"{where}: unknown setting {key} ignored")
        elif section == "databases":
            try:
                pairs = parse_connstr(value)
            except ValueError as e:
                raise ConfigError(f"{where}: database {key}: {e}") from None
            db = DatabaseConfig(name=key)
            for k, v in pairs:
                k = DB_ALIASES.get(k, k)
                if k in DB_KEYS:
                    try:
                        setattr(db, k, DB_KEYS[k](v))
                    except ValueError as e:
                        raise ConfigError(f"{where}: database {key}: invalid {k}: {e}") from None
                else:
                    cfg.warnings.append(f"{where}: database {key}: unknown parameter {k} ignored")
            _resolve_db_secret(cfg, db, where)
            cfg.databases[key] = db
        elif section == "users":
            try:
                pairs = parse_connstr(value)
            except ValueError as e:
                raise ConfigError(f"{where}: user {key}: {e}") from None
            u = UserConfig(name=key)
            for k, v in pairs:
                if k in USER_KEYS:
                    try:
                        setattr(u, k, USER_KEYS[k](v))
                    except ValueError as e:
                        raise ConfigError(f"{where}: user {key}: invalid {k}: {e}") from None
                else:
                    cfg.warnings.append(f"{where}: user {key}: unknown parameter {k} ignored")
            cfg.users[key] = u
    if not settings_seen:
        raise ConfigError(f"{path}: no [gateway] (or [pgbouncer]) section")
    _complete(cfg, path)
    if not cfg.databases:
        cfg.warnings.append(f"{path}: no [databases] entries; every login will be refused")
    return cfg


def _complete(cfg: Config, path: Path) -> None:
    """What follows from the settings, checked: the auth_file, TLS contexts, token settings,
    the rules directory, the masking key. Raises ConfigError."""
    if cfg.auth_file:
        cfg.auth_users = parse_auth_file(cfg.resolve(cfg.auth_file))
    elif cfg.auth_type in ("md5", "scram-sha-256", "plain"):
        raise ConfigError(f"{path}: auth_type = {cfg.auth_type} needs auth_file")
    _check_tls(cfg)
    _check_jwt(cfg)
    if cfg.rules_dir and not cfg.resolve(cfg.rules_dir).is_dir():
        raise ConfigError(f"{path}: rules_dir {cfg.rules_dir} is not a directory")
    if not 0 < cfg.rule_timeout <= 10:
        raise ConfigError(f"{path}: rule_timeout must be between 0 and 10 seconds")
    _resolve_mask_key(cfg, path)
    _resolve_audit_token(cfg, path)
    _resolve_record_key(cfg, path)
    if not cfg.listen_addr and not cfg.unix_socket_dir:
        raise ConfigError(f"{path}: neither listen_addr nor unix_socket_dir is set")


# settings a running gateway cannot take (they are read once, at start)
RESTART_KEYS = frozenset({"listen_addr", "listen_port", "unix_socket_dir", "unix_socket_mode", "pidfile", "so_reuseport",
                          "logfile", "max_packet_size", "track_extra_parameters", "metrics_listen", "approvals_listen",
                          "approval_webhook", "approvals_store", "approval_max_grant", "approvals_gateway_name",
                          "record_dir", "record_rotate_size", "record_rotate_age", "record_retention_days",
                          "record_retention_size", "record_compression", "record_fsync", "record_hmac_key_file",
                          "record_hmac_key_env", "record_writer"}
                         | {k for k in SETTINGS if k.startswith("audit_")})  # SET never redirects the audit stream
# settings whose values are never shown (SHOW CONFIG, SHOW <setting>)
# (a connection string may hold a password; an HTTP address an API key)
SECRET_KEYS = frozenset({"mask_hash_key", "approvals_store", "audit_http_url"})


def with_setting(cfg: Config, key: str, value: str) -> Config:
    """A copy of ``cfg`` with one setting changed, checked as load() checks a file (the admin
    console's SET). Raises ConfigError."""
    import dataclasses

    k = key.lower()
    if k not in SETTINGS:
        raise ConfigError(f"unknown setting {key}")
    if k in RESTART_KEYS:
        raise ConfigError(f"{k} cannot be changed while the gateway runs (restart it)")
    attr, parser = SETTINGS[k]
    try:
        parsed = parser(value)
    except ValueError as e:
        raise ConfigError(f"invalid value for {k}: {e}") from None
    new = dataclasses.replace(cfg, warnings=[])
    setattr(new, attr, parsed)
    _complete(new, new.path)
    return new


def _shown(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return str(int(v)) if v == int(v) else repr(v)
    if isinstance(v, tuple):
        return ",".join(v)
    return str(v)


def describe(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(key, value, default, changeable) of every setting, as PgBouncer's SHOW CONFIG."""
    defaults = Config(path=cfg.path)
    rows = []
    for key in sorted(SETTINGS):
        attr, _ = SETTINGS[key]
        value, default = getattr(cfg, attr), getattr(defaults, attr)
        if key == "unix_socket_mode":
            value, default = oct(value)[2:].rjust(4, "0"), oct(default)[2:].rjust(4, "0")
        shown = _shown(value)
        if key in SECRET_KEYS and value:
            shown = "********"
        rows.append((key, shown, _shown(default), "no" if key in RESTART_KEYS else "yes"))
    return rows
