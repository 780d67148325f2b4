"""The interfaces between the gateway's stages: what each object may ask of the one it serves.

A lower module is written against these, never against the class above it, so that the pool
knows servers but not sessions, and a server connection knows the protocol but not a client's
statement tables (docs/architecture.md draws the stages):

    Gateway (app.py) --SessionHost--> ClientSession (session.py) --Waiter--> Pool (pool.py)
    Pool --PoolHost--> Gateway          ServerConn (server.py) --ServerHome--> Pool
    ServerConn --ClientSide--> ClientSession --Bookkeeping--> StatementBook (statements.py)

The outstanding-request queue is the per-request interface between forwarding (session.py) and
replies (server.py): every request sent to a server appends one entry ``(kind, info)``, the
reply side pops it when the reply arrives, and ``info`` carries what that reply needs: the masks
of its results (masking.plan.MaskCtx / QueryMask), what to undo in the client's statement table
should PostgreSQL skip the request, or the name a CloseComplete confirms. The server may go back
to its pool only when the queue is empty at ReadyForQuery 'I' (PgBouncer's outstanding-request
queue, the same rule).
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

# ids of client sessions and server connections (SHOW CLIENTS/SERVERS' id, KILL_CLIENT), one
# sequence for both as in PgBouncer
next_socket_id = itertools.count(1).__next__

# ---------------------------------------------------------------- the outstanding-request queue
# kinds of queue entries (what reply each request sent to a server expects)
R_PARSE = 1          # '1' forwarded; info = (server_name, client_name) to undo on error
R_PARSE_SKIP = 2     # '1' swallowed (injected Parse); info = server_name
R_BIND = 3
R_DESCRIBE = 4       # 't' then 'T' | 'n'
R_EXECUTE = 5        # ends at 'C' | 'I' | 's' (or 'E'); info = MaskCtx of a masked portal
R_CLOSE = 6          # info = (kind byte, name) whose masks go at CloseComplete
R_CLOSE_SKIP = 7     # '3' swallowed (eviction of a prepared statement); info = its server name
R_SYNC = 8           # ends at 'Z'
R_QUERY = 9          # simple Query or FunctionCall: ends at 'Z'; info = QueryMask or None
R_QUERY_SKIP = 10    # internal query (parameter sync, reset): swallowed up to and incl. 'Z'
R_FAKE_PARSE = 11    # gateway emits ParseComplete; info = (server_name, client_name) to undo
R_FAKE_CLOSE = 12    # gateway emits CloseComplete; info = undo record of the client's statement
R_FAKE_DONE = 13     # gateway emits CommandComplete DEALLOCATE + ReadyForQuery; info as R_FAKE_CLOSE
R_BIND_SKIP = 14     # '2' swallowed (injected refusal)
R_EXECUTE_REFUSAL = 15  # injected refusal: its ErrorResponse is forwarded without CONTEXT
R_QUERY_REFUSAL = 16    # simple-Query refusal: ErrorResponse forwarded without CONTEXT, ends at 'Z'
R_DESCRIBE_MASK = 17    # injected Describe of a masked portal: 'T' | 'n' swallowed, builds the row plan

FAKE_FIRST, FAKE_LAST = R_FAKE_PARSE, R_FAKE_DONE  # replies the gateway makes up, in queue order


# ---------------------------------------------------------------- server connection -> session

class Bookkeeping(Protocol):
    """The client's statement tables (statements.StatementBook), as replies confirm or undo
    what forwarding assumed."""

    mask_portals: dict[bytes, Any]  # portals whose rows are masked (the fast lane checks it)

    def parse_skipped(self, client_name: bytes, server_name: bytes) -> None:
        """A Parse of the client's named statement failed or was skipped: the name is free."""

    def close_skipped(self, undo: tuple) -> None:
        """A Close or DEALLOCATE the gateway answered itself was skipped: the statement stays."""

    def close_confirmed(self, info: tuple[int, bytes]) -> None:
        """CloseComplete of a statement ('S') or portal ('P'): its masks go."""

    def all_discarded(self) -> None:
        """DISCARD ALL or DEALLOCATE ALL ran: the client has no prepared statements left."""

    def sql_prepare_confirmed(self, name: str, text: str) -> None:
        """The server ran an SQL-level PREPARE: EXECUTE of ``name`` is judged as ``text``."""


class ClientSide(Protocol):
    """What a server connection may do with the client session linked to it."""

    book: Bookkeeping
    pending_param_sync: bool  # the session's parameters are being applied to this server

    def write(self, data: bytes) -> None:
        """Forward reply bytes to the client."""

    def pause_reading(self) -> None:
        """The server's socket buffer is full: stop reading requests from the client."""

    def resume_reading(self) -> None: ...

    def server_ready(self, srv: Any, status: int, reply: bytes = b"") -> None:
        """ReadyForQuery arrived with nothing outstanding (``reply``: the bytes up to it, not yet
        written): the release stage."""

    def server_lost(self, srv: Any, reason: str) -> None:
        """The server connection died under the session."""

    def server_failed(self, srv: Any, sqlstate: str, message: str) -> None:
        """The reply side cannot go on safely (a result that cannot be masked, the session's
        parameters that cannot be applied): the server is closed, the session ends with this
        error."""

    def param_changed(self, name: str, value: str) -> None:
        """ParameterStatus of a tracked parameter the client's own statement changed."""

    def param_sync_done(self, srv: Any) -> None:
        """The SETs that bring this server to the client's parameters have run."""


# ---------------------------------------------------------------- pool -> waiting session

class Waiter(Protocol):
    """What a pool may do with a session waiting for a server."""

    closed: bool
    wait_started: float  # monotonic time it began to wait (query_wait_timeout, wait time)

    def server_assigned(self, srv: Any) -> None: ...

    def server_unavailable(self, sqlstate: str, message: str) -> None:
        """No server can be had now (connecting failed): fail the waiting request."""

    def server_failed(self, srv: Any, sqlstate: str, message: str) -> None:
        """Taking ``srv`` went wrong (a bug): ``srv`` is closed, the session ends."""

    def fatal(self, sqlstate: str, message: str) -> None: ...

    def describe(self) -> str: ...


# ---------------------------------------------------------------- server connection -> pool

class ServerHome(Protocol):
    """What a server connection asks of the pool it belongs to."""

    name: str
    server_user: str
    server_password: str | None
    scram_keys: tuple[bytes, bytes] | None  # SCRAM pass-through keys (auth_query), when no password is known
    events: Any  # events.Events: the gateway's observers

    def startup_params(self) -> dict[str, str]:
        """The StartupMessage parameters of a new server connection."""

    def mask_key(self) -> bytes:
        """Key of the ``hash`` masking method (config)."""

    def has_scram_secret(self) -> bool:
        """The auth_file holds only a SCRAM secret for the upstream user."""

    def tcp_settings(self) -> Any:
        """The config whose tcp_* settings new connections take (netopts.tune_socket)."""

    def release(self, srv: Any) -> None:
        """A server that finished its reset (server_reset_query) with nobody linked."""

    def server_gone(self, srv: Any) -> None:
        """The connection closed."""

    def catalog_changed(self) -> None:
        """DDL committed through this server: masking's catalog of the database is stale."""


# ---------------------------------------------------------------- pool -> gateway

class PoolHost(Protocol):
    """What a pool asks of the gateway (limits across pools, shutdown, the config)."""

    config: Any  # config.Config
    stopping: str | None
    limits_in_use: bool
    events: Any
    clock: float  # monotonic time, advanced by the janitor every second (idle and lifetime limits)

    def may_open_server(self, pool: Any) -> bool: ...

    def server_closed(self, pool: Any) -> None: ...

    def pool_has_idle(self, pool: Any) -> None: ...

    def catalog_changed(self, catalog_key: tuple) -> None:
        """DDL committed on that database: masking's catalog of it must be read again."""

    def pool_paused(self, dbname: str) -> bool:
        """Is the database paused (PAUSE, KILL): a new pool of it starts paused."""

    def admin_progress(self) -> None:
        """A server went back or closed: console commands that wait for that may answer."""


# ---------------------------------------------------------------- session -> gateway

class SessionHost(Protocol):
    """What a client session (and its login) asks of the gateway."""

    config: Any  # config.Config
    stopping: str | None  # how the gateway is stopping (None: it is not)
    policy: Any  # policy.engine.Policy | None
    jwt: Any  # auth.jwt.JwtAuthenticator | None
    events: Any
    record_block: str | None  # why statements are refused now (recordings cannot be written), or None

    def client_arrived(self, session: Any) -> bool: ...

    def may_open_server(self, pool: Any) -> bool:
        """Room for one more server connection of the pool's database and user (a replication
        connection asks too)."""
        ...

    def admit(self, session: Any, database: str, user: str, db_limit: int, user_limit: int) -> str | None:
        """Count a client against its database's and user's client limits; the name of the
        limit it would exceed instead (it is then not counted)."""
        ...

    def client_left(self, session: Any, logged_in: bool) -> None: ...

    def register_cancel_key(self, session: Any) -> tuple[int, int]: ...

    def cancel_request(self, pid: int, key: int) -> None: ...

    def send_cancel(self, srv: Any) -> None: ...

    def auth_failed(self, session: Any, reason: str) -> float:
        """A failed login: -> seconds to wait before refusing it."""

    def scram_secret(self, user: str, secret: str) -> Any: ...

    def auth_query_user(self, db: Any) -> str | None:
        """The auth_user of a database (its own, else the global one)."""

    async def auth_query_secret(self, db: Any, user: str) -> str | None:
        """A user's secret looked up upstream with auth_query (None: it has none)."""

    def get_pool(self, db: Any, user: str) -> Any: ...

    def catalog_for(self, pool: Any) -> Any: ...
