"""Final review of the masking/catalog/identity-reset diff (c5b4071..af547d9). Each test here
failed on the reviewed code and pins one problem found in review."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


from pooler.gateway.app import Gateway
from pooler.gateway.catalogs import CatalogHolder
from tests.test_masking_review import SYNC, Raw, _bind, _msg, _parse, assert_no_secret, raw  # noqa: F401
from tests.test_masking_review2 import _gw
from tests.test_masking_review4 import shop  # noqa: F401 - fixture

MASKED = "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"
FLUSH = _msg(b"H", b"")


def _execute(portal: bytes = b"") -> bytes:
    return _msg(b"E", portal + b"\x00" + b"\x00\x00\x00\x00")


# --------------------------------------------------------------------------- 1. raw rows (e2e)


def test_portal_bound_before_an_earlier_ready_for_query_stays_masked(pg, shop, gw_factory, raw):
    """ServerConn.data_received clears client.mask_portals at every ReadyForQuery 'I', even when
    requests sent after that Sync are still queued. A Bind of a masked statement sent behind the
    Sync (then Flush, Execute later) creates a live portal whose masks are dropped by the earlier
    ReadyForQuery: its Execute streams raw rows."""
    gw = _gw(pg, shop, gw_factory)
    c = Raw(gw, "agent")
    try:
        c.s.sendall(_parse(b"", MASKED) + _bind(b"", b"") + _execute() + SYNC + _bind(b"", b"") + FLUSH)
        first = c.until_ready()
        assert_no_secret(repr([b for t, b in first if t == b"D"]), raw)
        t, _ = c.read()
        assert t == b"2"  # BindComplete of the second portal (bound in a new implicit transaction)
        c.s.sendall(_execute() + SYNC)
        rows = [b for t, b in c.until_ready() if t == b"D"]
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw)
    finally:
        c.close()


# --------------------------------------------------------------------------- 2. gateway crash (e2e)


def test_reparsing_a_masked_statement_name_keeps_its_key_flat(pg, shop, gw_factory, raw):
    """Governor.decide stored _either(old, ctx) on each Parse of a name already in
    mask_stmts, and its key nested the old key: 300,000 re-Parses (each failing with 42P05)
    built a tuple so deep that hashing it in plan_for overflowed CPython's C stack and the
    gateway process died with every session. The merged key is flat now, and a name parsed
    again and again still runs masked."""
    from pooler.gateway.governor import _either
    from pooler.masking.plan import MaskCtx

    ctx = MaskCtx((("public.customers.email", "email"),), None, None, "r", ("sql", ("public",)), {})
    merged = ctx
    for _ in range(1000):
        merged = _either(merged, ctx)
    assert merged.key == ("either", ctx.masks)
    gw = _gw(pg, shop, gw_factory, pool_mode="session")
    c = Raw(gw, "agent")
    try:
        c.run(_parse(b"s", MASKED), SYNC)
        c.s.sendall((_parse(b"s", "SELECT 1") + SYNC) * 500)
        for _ in range(500):
            assert any(t == b"E" for t, _ in c.until_ready())  # the name is taken
        rows = [b for t, b in c.run(_bind(b"", b"s"), _execute(), SYNC) if t == b"D"]
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw)
    finally:
        c.close()

# --------------------------------------------------------------------------- 3. catalog holder (unit)


def _fake_pool(release: asyncio.Event, obsolete=False):
    class Srv:
        async def run_query(self, sql):
            await release.wait()
            return [[], [], [], []]

        def close(self, reason):
            pass

    class P:
        name = "shop"
        catalog_key = ("127.0.0.1", 5432, "shop")
        gw = SimpleNamespace(config=SimpleNamespace(mask_catalog_ttl=60.0, server_connect_timeout=5))
        loads = 0

        async def open_connection(self, side=False):
            P.loads += 1
            return Srv()

    p = P()
    p.obsolete = obsolete
    return p


def test_catalog_invalidated_during_a_load_still_wakes_its_sessions():
    """CatalogHolder._load wakes its waiters inside its own finally. A RELOAD (SIGHUP) or a DDL
    commit during the load left stale=True, so the woken session (ClientSession._hold_ended ->
    _govern) waits again; holder.wait -> _start sees self.loading not done (we are still in it)
    and starts nothing, and tick() only refreshes when not stale: the session hangs for good."""

    async def main():
        release = asyncio.Event()
        holder = CatalogHolder(_fake_pool(release))
        done = asyncio.get_running_loop().create_future()

        def wake():  # what the session does when woken: _govern again
            if holder.stale:
                holder.wait(wake)
            elif not done.done():
                done.set_result(holder.catalog)

        holder.wait(wake)
        await asyncio.sleep(0)
        holder.invalidate()  # SIGHUP / DDL committed while the catalog is read
        release.set()
        await asyncio.wait_for(done, 3)

    asyncio.run(main())


def test_session_of_an_obsolete_pool_is_served_a_loaded_catalog():
    """Gateway.catalog_for replaces a holder whose pool is obsolete. A session that survives a
    RELOAD keeps its (obsolete) pool: every _govern then gets a brand-new stale holder, waits,
    loads, is woken, gets another new holder... the session never runs a statement and the
    gateway reads the catalog in a loop."""
    gw = SimpleNamespace(catalogs={})
    pool = _fake_pool(asyncio.Event(), obsolete=True)
    h1 = Gateway.catalog_for(gw, pool)
    h1.stale = False  # loaded
    h2 = Gateway.catalog_for(gw, pool)
    assert h2 is h1 and not h2.stale
