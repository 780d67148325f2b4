"""Masking's catalog of each upstream database, loaded on a side connection of the gateway's
own and kept fresh (masking/catalog.py holds the pure ``Catalog`` and says when it is re-read).

A catalog is read again when a session of the gateway ran DDL (at commit, before the next
statement of a rule set that masks is decided), on RELOAD/SIGHUP, when a statement names a
relation it does not know (at most every UNKNOWN_RELOAD_INTERVAL seconds), and in the background
every ``mask_catalog_ttl`` seconds (DDL made outside the gateway). Sessions that need it wait
(the hold stage) and are woken when it is there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ..masking.catalog import CATALOG_SQL, Catalog
from .pool import Pool

log = logging.getLogger("pooler.masking")

UNKNOWN_RELOAD_INTERVAL = 2.0  # a relation the catalog does not know: read it again at most this often


class CatalogHolder:
    """The catalog of one upstream database: loads it on a side connection, refreshes it, and
    wakes the sessions that wait for it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.catalog: Catalog | None = None
        self.stale = True  # must be (re)loaded before the next masked statement is planned
        self.loading: asyncio.Task | None = None
        self.waiters: list[Callable[[], None]] = []
        self.version = 0
        self.lineage_cache: dict[tuple, list] = {}
        self.plan_cache: dict[tuple, object] = {}
        self.refresh_at = float("inf")  # when the background refresh (mask_catalog_ttl) is due

    def tick(self, now: float) -> None:
        """Janitor, every second: the background refresh; the current catalog serves meanwhile."""
        if not self.stale and now > self.refresh_at:
            self.refresh_at = float("inf")
            self._start()

    def invalidate(self) -> None:
        self.stale = True

    def saw_unknown(self) -> None:
        """A statement named a relation this catalog does not know: read it again (at most every
        UNKNOWN_RELOAD_INTERVAL seconds) before the next statement; this one is decided with it
        unknown (the shipped rules mask everything then)."""
        cat = self.catalog
        if not self.stale and cat is not None and time.monotonic() - cat.loaded_at > UNKNOWN_RELOAD_INTERVAL:
            self.stale = True

    def wait(self, wake: Callable[[], None]) -> None:
        self.waiters.append(wake)
        self._start()

    def _start(self) -> None:
        if self.loading is None or self.loading.done():
            self.loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        started_stale = self.stale
        self.stale = False  # DDL seen while loading sets it again
        try:
            results = await self._query()
            self.version += 1
            self.catalog = Catalog.from_results(results, self.version)
            self.lineage_cache.clear()
            self.plan_cache.clear()
            log.debug("catalog of %s loaded: %d relations", self.pool.name, len(self.catalog.rels))
        except Exception as e:  # noqa: BLE001
            if started_stale:
                # out of date: plan without one (every origin unknown, masked)
                self.catalog = Catalog(known=False, version=-self.version - 1, loaded_at=time.monotonic())
                self.lineage_cache.clear()
                self.plan_cache.clear()
            log.warning("catalog of %s could not be loaded (masked statements mask every column "
                        "whose origin is unknown): %s", self.pool.name, e)
        finally:
            ttl = self.pool.gw.config.mask_catalog_ttl
            if self.catalog is not None and not self.catalog.known:
                ttl = min(ttl or 5.0, 5.0)  # an unreadable catalog is tried again soon
            self.refresh_at = time.monotonic() + ttl if ttl else float("inf")
            waiters, self.waiters = self.waiters, []
            # after this task is done: a DDL or RELOAD during the load made it stale again, so a
            # new load starts first, and the sessions woken then wait for that one
            asyncio.get_running_loop().call_soon(self._wake, waiters)

    def _wake(self, waiters: list) -> None:
        if self.stale:
            self._start()
        for wake in waiters:
            try:
                wake()
            except Exception:  # noqa: BLE001
                log.exception("waking a session after the catalog load failed")

    async def _query(self) -> list:
        limit = max(self.pool.gw.config.server_connect_timeout or 15, 5)
        async with asyncio.timeout(2 * limit):  # connect + read, never unbounded
            srv = await self.pool.open_connection(side=True)
            try:
                return await srv.run_query(CATALOG_SQL)
            finally:
                srv.close("catalog read")
