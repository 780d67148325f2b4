"""``approvals_store = <PostgreSQL connection string>``: requests and grants shared by several
gateways, in two tables the gateway creates, kept in step with LISTEN/NOTIFY (asyncpg).

Rules this module keeps:
- The store decides: a decision is made in one transaction on the stored record (``SELECT ... FOR
  UPDATE``, the book's own rules applied to it, ``UPDATE``), then announced with NOTIFY; every
  gateway (the deciding one too) applies what the store says to its mirror, and the gateway
  holding the statement wakes its session. So a reviewer on any gateway releases a statement held
  on another, and two reviewers deciding at once cannot both win.
- Fail closed: a request that cannot be written to the store is refused to its client at once;
  a decision that cannot reach the store is an error for the reviewer (the statement waits on,
  and times out refused); after a lost LISTEN connection the mirror is read again, so a missed
  notification never leaves a decided statement waiting or runs one that was not approved.
- A gateway starting withdraws the requests it left pending in the store before: their clients
  are gone, and nothing runs later on its own.
- All of it runs on the event loop as asyncio I/O; the proxy loop never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import asyncpg
import orjson

from ..config import store_connect_args
from ..approvals.book import (APPROVED, PENDING, WITHDRAWN, ApprovalBook, ApprovalError, grant_from,
                              grant_record, request_from, request_record)

log = logging.getLogger("pooler.approvals")

CHANNEL = "pooler_approvals"
SCHEMA = """
CREATE TABLE IF NOT EXISTS pooler_approval_requests (
    id text PRIMARY KEY, gateway text NOT NULL, state text NOT NULL,
    created timestamptz NOT NULL DEFAULT now(), record jsonb NOT NULL);
CREATE INDEX IF NOT EXISTS pooler_approval_requests_state ON pooler_approval_requests (state, created);
CREATE TABLE IF NOT EXISTS pooler_approval_grants (
    id text PRIMARY KEY, until double precision NOT NULL, record jsonb NOT NULL);
"""


class StoreError(Exception):
    pass


# what a store that cannot be reached (or answers with an error) raises
_UNREACHABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class PgStore:
    def __init__(self, desk, dsn: str, gateway_name: str) -> None:
        self.desk = desk
        self.connect_args = store_connect_args(dsn)
        self.name = gateway_name
        self.pool = None  # asyncpg pool for writes
        self.listener = None  # the LISTEN connection
        self._watch: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def book(self) -> ApprovalBook:
        return self.desk.book

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reach the store; if it cannot be reached now, the gateway starts anyway (statements no
        rule holds are not its business) and keeps trying every second: until it answers, every
        statement a rule holds is refused and decisions are errors."""
        try:
            await self._connect()
        except StoreError as e:
            log.error("%s; statements held for approval are refused until it answers", e)
        self._watch = asyncio.get_running_loop().create_task(self._watchdog())

    async def _connect(self) -> None:
        try:
            if self.pool is None:
                pool = await asyncpg.create_pool(**{"timeout": 10, **self.connect_args}, min_size=1, max_size=4,
                                                 command_timeout=10)
                try:
                    async with pool.acquire() as c:
                        await c.execute(SCHEMA)
                        await self._withdraw_stale(c)
                except BaseException:
                    await pool.close()
                    raise
                self.pool = pool
            await self._listen()
        except _UNREACHABLE as e:
            raise StoreError(f"approvals_store unreachable: {e}") from None
        log.info("approvals store ready (%d requests and %d grants shared)", len(self.book.pending),
                 len(self.book.grants))

    async def _withdraw_stale(self, c) -> None:
        """This gateway's requests from before it (re)started: their clients are gone."""
        stale = await c.fetch("SELECT id, record FROM pooler_approval_requests WHERE gateway = $1 AND state = $2",
                              self.name, PENDING)
        for row in stale:
            rec = request_from(orjson.loads(row["record"]))
            rec.state, rec.outcome = WITHDRAWN, "the gateway holding it restarted"
            await self._write(c, rec)
            await self._notify(c, request=rec.id)
        if stale:
            log.warning("approvals store: %d request(s) this gateway held before it stopped were withdrawn",
                        len(stale))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for t in list(self._tasks):
            try:
                await asyncio.wait_for(t, 2)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                pass
        for conn in (self.listener,):
            if conn is not None and not conn.is_closed():
                await conn.close()
        if self.pool is not None:
            await self.pool.close()

    async def _listen(self) -> None:
        self.listener = await asyncpg.connect(**{"timeout": 10, **self.connect_args})
        await self.listener.add_listener(CHANNEL, self._notified)
        await self._resync()

    async def _resync(self) -> None:
        """Read every pending request, recent decisions and live grants: the mirror catches up."""
        async with self.pool.acquire() as c:
            rows = await c.fetch("SELECT record FROM pooler_approval_requests WHERE state = $1 OR "
                                 "created > now() - interval '1 day' ORDER BY created", PENDING)
            grants = await c.fetch("SELECT record FROM pooler_approval_grants WHERE until > "
                                   "extract(epoch FROM now()) - 86400")
        for row in rows:
            self.book.apply(request_from(orjson.loads(row["record"])))
        for row in grants:
            self.book.apply_grant(grant_from(orjson.loads(row["record"])))

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.listener is None or self.listener.is_closed():
                try:
                    await self._connect()
                    log.info("approvals store: LISTEN connection back")
                except Exception as e:  # noqa: BLE001 - retried every second
                    log.warning("approvals store unreachable: %s", e)

    # ------------------------------------------------------------------ notifications

    def _notified(self, conn, pid, channel, payload: str) -> None:
        self._spawn(self._fetch(orjson.loads(payload)))

    async def _fetch(self, note: dict) -> None:
        async with self.pool.acquire() as c:
            if "request" in note:
                row = await c.fetchrow("SELECT record FROM pooler_approval_requests WHERE id = $1", note["request"])
                if row is not None:
                    self.book.apply(request_from(orjson.loads(row["record"])))
            if "grant" in note:
                row = await c.fetchrow("SELECT record FROM pooler_approval_grants WHERE id = $1", note["grant"])
                if row is not None:
                    self.book.apply_grant(grant_from(orjson.loads(row["record"])))

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.warning("approvals store: %s", t.exception())

    # ------------------------------------------------------------------ writes

    async def _write(self, c, rec) -> None:
        await c.execute("INSERT INTO pooler_approval_requests (id, gateway, state, record) VALUES ($1, $2, $3, $4) "
                        "ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, record = EXCLUDED.record",
                        rec.id, self.name, rec.state, orjson.dumps(request_record(rec)).decode())

    async def _notify(self, c, **what) -> None:
        await c.execute("SELECT pg_notify($1, $2)", CHANNEL, orjson.dumps(what).decode())

    def submitted(self, req) -> None:
        """A request held here: written to the store; if it cannot be, refused at once."""
        async def write() -> None:
            try:
                if self.pool is None:
                    raise StoreError("not reached since the gateway started")
                async with self.pool.acquire() as c:
                    await self._write(c, req)
                    await self._notify(c, request=req.id)
            except Exception as e:  # noqa: BLE001 - fail closed
                log.error("approvals store: request %s could not be stored: %s", req.id, e)
                self.book.withdraw(req.id, f"the approvals store is unreachable ({e})")
        self._spawn(write())

    def ended_here(self, req) -> None:
        """Expired or withdrawn here: the store learns it, unless a reviewer decided first
        (then the statement has not run either: the client was refused here)."""
        if self.pool is None:
            return  # never stored: its submission was refused
        async def write() -> None:
            async with self.pool.acquire() as c:
                async with c.transaction():
                    row = await c.fetchrow("SELECT state FROM pooler_approval_requests WHERE id = $1 FOR UPDATE",
                                           req.id)
                    if row is None or row["state"] != PENDING:
                        if row is not None and row["state"] == APPROVED:
                            log.warning("approval request %s was approved in the store as it %s here; it did not run",
                                        req.id, req.state)
                        return
                    await self._write(c, req)
                    await self._notify(c, request=req.id)
        self._spawn(write())

    def grant_used(self, g) -> None:
        if self.pool is None:
            return
        async def write() -> None:
            async with self.pool.acquire() as c:
                await c.execute("UPDATE pooler_approval_grants SET record = jsonb_set(record, '{uses}', "
                                "to_jsonb((record->>'uses')::int + 1)) WHERE id = $1", g.id)
        self._spawn(write())

    async def _in_store(self, what: str, work):
        """``work(connection)`` in one transaction on the store (its NOTIFY goes out at commit);
        a store that cannot be reached is the reviewer's error: nothing was ``what``."""
        if self.pool is None:
            raise ApprovalError(f"the approvals store is unreachable; nothing was {what}", 503)
        try:
            async with self.pool.acquire() as c, c.transaction():
                return await work(c)
        except _UNREACHABLE as e:
            raise ApprovalError(f"the approvals store is unreachable ({e}); nothing was {what}", 503) from None

    async def decide(self, action: str, rid: str, reviewer, arg):
        """APPROVE / DENY on the stored record, under its row lock; returns the request after it."""
        scratch = ApprovalBook(max_grant=self.book.max_grant)

        async def work(c):
            row = await c.fetchrow("SELECT record FROM pooler_approval_requests WHERE id = $1 FOR UPDATE", rid)
            if row is None:
                raise ApprovalError(f"approval request {rid!r} does not exist", 404)
            req = request_from(orjson.loads(row["record"]))
            (scratch.pending if req.state == PENDING else scratch.decided)[rid] = req
            req = scratch.approve(rid, reviewer, arg) if action == "approve" else scratch.deny(rid, reviewer, arg)
            await c.execute("UPDATE pooler_approval_requests SET state = $2, record = $3 WHERE id = $1",
                            rid, req.state, orjson.dumps(request_record(req)).decode())
            for g in scratch.grants.values():
                await c.execute("INSERT INTO pooler_approval_grants (id, until, record) VALUES ($1, $2, $3)",
                                g.id, g.until, orjson.dumps(grant_record(g)).decode())
            await self._notify(c, request=rid, **({"grant": req.grant_id} if req.grant_id else {}))
            return req

        req = await self._in_store("decided", work)
        # the deciding gateway knows the outcome now: its reviewer sees it at once (the
        # notification that follows finds it applied)
        self.book.apply(req)
        for g in scratch.grants.values():
            self.book.apply_grant(g)
        return req

    async def revoke(self, gid: str, reviewer):
        async def work(c):
            row = await c.fetchrow("SELECT record FROM pooler_approval_grants WHERE id = $1 FOR UPDATE", gid)
            if row is None:
                raise ApprovalError(f"grant {gid!r} does not exist", 404)
            scratch = ApprovalBook(max_grant=self.book.max_grant)
            g = grant_from(orjson.loads(row["record"]))
            scratch.grants[gid] = g
            scratch.revoke(gid, reviewer)
            await c.execute("UPDATE pooler_approval_grants SET record = $2 WHERE id = $1", gid,
                            orjson.dumps(grant_record(g)).decode())
            await self._notify(c, grant=gid)
            return g

        g = await self._in_store("revoked", work)
        self.book.apply_grant(g)
        return g


def default_gateway_name(cfg) -> str:
    return f"{socket.gethostname()}:{cfg.listen_port}"
