"""What the masking catalog knows about relations, and when. A view or materialized view created
after the catalog was read (outside the gateway or through it) and a new relation that shadows a
known name on the search_path are masked; inheritance children and partitions carry their
parents' masks (the catalog follows pg_inherits); a catalog invalidated while it loads still
wakes its sessions, and a session of a pool made obsolete by a RELOAD is served a loaded
catalog."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pooler.gateway.app import Gateway
from pooler.gateway.catalogs import CatalogHolder
from pooler.pgcluster import seed_demo
from tests.masking_helpers import assert_no_secret, conn, masking_gw

DB_PART = "shop_partitioned"


# --------------------------------------------------------------------------- relations the catalog does not know yet


def test_view_created_outside_the_gateway_is_not_masked(shop_gw, pg, demo_shop, raw_pii):
    """docs: "A table or view the catalog does not know yet is masked whole". The rule only sees
    public.fresh_v.contact (the catalog cannot say what is behind it), asks for no mask, and
    the view's e-mails go out raw until the next background refresh."""
    with conn(shop_gw) as c:
        c.execute("SELECT email FROM customers LIMIT 1").fetchall()  # the catalog is loaded
        pg.execute("CREATE OR REPLACE VIEW fresh_v AS SELECT id, email AS contact FROM customers", dbname=demo_shop)
        try:
            rows = c.execute("SELECT contact FROM fresh_v").fetchall()
            rows += c.execute("SELECT * FROM fresh_v").fetchall()
        finally:
            pg.execute("DROP VIEW fresh_v", dbname=demo_shop)
    assert_no_secret(repr(rows), raw_pii)


def test_materialized_view_created_through_the_gateway(shop_gw, raw_pii):
    """CREATE MATERIALIZED VIEW (and CREATE TABLE AS / SELECT INTO) report the tag "SELECT n",
    which ServerConn._check_tag does not treat as DDL: the catalog is not reloaded and the new
    matview over customers is not masked."""
    with conn(shop_gw, "dba") as dba, conn(shop_gw) as agent:
        agent.execute("SELECT email FROM customers LIMIT 1").fetchall()
        dba.execute("CREATE MATERIALIZED VIEW mv_contacts AS SELECT id, email AS contact, phone FROM customers")
        try:
            rows = agent.execute("SELECT contact, phone FROM mv_contacts").fetchall()
        finally:
            dba.execute("DROP MATERIALIZED VIEW mv_contacts")
    assert_no_secret(repr(rows), raw_pii)


def test_new_relation_shadowing_a_known_name_is_not_unknown(shop_gw, pg, demo_shop, raw_pii):
    """Catalog.enrich flags a relation as unknown only when no candidate of the same *name* is
    known in any schema: a view s2.customers created outside the gateway (not in the catalog
    yet) hides behind public.customers. With s2 first on the search_path the rules see
    s2.customers.city / public.customers.city, nothing unknown, and ask for no mask, while the
    server reads the new view, which shows e-mails as "city"."""
    with conn(shop_gw) as c:
        c.execute("SELECT email FROM customers LIMIT 1").fetchall()  # the catalog is loaded
        pg.execute("CREATE SCHEMA IF NOT EXISTS s2; "
                   "CREATE OR REPLACE VIEW s2.customers AS SELECT id, email AS city, ssn AS country FROM public.customers",
                   dbname=demo_shop)
        try:
            c.execute("SET search_path = s2, public")
            rows = c.execute("SELECT city, country FROM customers ORDER BY id LIMIT 3").fetchall()
        finally:
            pg.execute("DROP SCHEMA s2 CASCADE", dbname=demo_shop)
    assert rows
    assert_no_secret(repr(rows), raw_pii)


# --------------------------------------------------------------------------- inheritance children


@pytest.mark.parametrize("sql", [
    "SELECT email, ssn, card_number FROM customers_archive ORDER BY id",
    "SELECT * FROM customers_archive ORDER BY id",
    "SELECT upper(email), phone FROM ONLY customers_archive ORDER BY id",
])
def test_inheritance_child_of_customers_is_not_masked(pg, demo_shop, gw_factory, raw_pii, sql):
    """An admin archives customers into a child table (INHERITS customers). Its rows are rows of
    customers: `SELECT * FROM customers` returns them, masked. Read through the child's own name
    the rules see public.customers_archive.email, which no PII key names (40_pii.star keys are
    exact table names; Catalog.enrich follows views, not pg_inherits), so they arrive raw."""
    gw = masking_gw(pg, demo_shop, gw_factory)
    with conn(gw, "dba") as dba:
        dba.execute("CREATE TABLE IF NOT EXISTS customers_archive () INHERITS (customers)")
        dba.execute("TRUNCATE customers_archive")
        dba.execute("INSERT INTO customers_archive SELECT id + 1000, full_name, email, phone, card_number, ssn, "
                    "birth_date, city, created_at FROM ONLY customers WHERE id <= 3")
    with conn(gw) as agent:
        parent = agent.execute("SELECT email, ssn FROM customers WHERE id > 1000").fetchall()
        assert len(parent) == 3
        assert_no_secret(repr(parent), raw_pii)  # through the parent: masked
        rows = agent.execute(sql).fetchall()
    assert len(rows) == 3
    assert_no_secret(repr(rows), raw_pii)


# --------------------------------------------------------------------------- partitions


@pytest.fixture(scope="module")
def part_shop(pg):
    """The demo shop with customers turned into a partitioned table (as a large table would be)."""
    seed_demo(pg, DB_PART)
    pg.execute("ALTER TABLE customers RENAME TO customers_old; "
               "CREATE TABLE customers (LIKE customers_old INCLUDING DEFAULTS) PARTITION BY RANGE (id); "
               "CREATE TABLE customers_p1 PARTITION OF customers FOR VALUES FROM (1) TO (101); "
               "CREATE TABLE customers_p2 PARTITION OF customers FOR VALUES FROM (101) TO (MAXVALUE); "
               "INSERT INTO customers SELECT * FROM customers_old; "
               "DROP TABLE customers_old CASCADE", dbname=DB_PART)
    return DB_PART


@pytest.mark.parametrize("sql", [
    "SELECT email, ssn, card_number FROM customers_p1 ORDER BY id LIMIT 5",
    "SELECT * FROM customers_p2 ORDER BY id LIMIT 5",
])
def test_partition_of_customers_is_not_masked(pg, part_shop, gw_factory, raw_pii, sql):
    """customers partitioned by id: every row lives in a partition. Read through the parent the
    rows are masked; read through a partition's own name (a plain table, relkind 'r') the rules
    see public.customers_p1.*, no PII key matches, and the e-mails, SSNs and card numbers of
    that partition arrive raw (Catalog does not map a partition to its parent)."""
    gw = masking_gw(pg, part_shop, gw_factory)
    with conn(gw) as agent:
        parent = agent.execute("SELECT email, ssn FROM customers ORDER BY id LIMIT 5").fetchall()
        assert_no_secret(repr(parent), raw_pii)  # through the parent: masked
        rows = agent.execute(sql).fetchall()
    assert len(rows) == 5
    assert_no_secret(repr(rows), raw_pii)


# --------------------------------------------------------------------------- catalog holder (unit)


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
