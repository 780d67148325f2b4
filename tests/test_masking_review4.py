"""Fourth review of streaming masking, the DECISION side: SQL by which a user outside
pii-readers gets personal data while 40_pii.star decides "allow" because stmt.columns/tables
miss the personal column. Each test failed before its fix: the catalog follows pg_inherits,
so inheritance children and partitions carry their parents' masks."""

from __future__ import annotations

import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.test_masking_review import assert_no_secret, raw  # noqa: F401 - raw is a fixture
from tests.test_masking_review2 import _gw

DB = "mask_review4"
DB_PART = "mask_review4_part"


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, DB)
    return DB


def conn(gw, user="agent"):
    return psycopg.connect(gw.dsn(user=user, dbname="shop"), autocommit=True)


# --------------------------------------------------------------------------- 1. inheritance children


@pytest.mark.parametrize("sql", [
    "SELECT email, ssn, card_number FROM customers_archive ORDER BY id",
    "SELECT * FROM customers_archive ORDER BY id",
    "SELECT upper(email), phone FROM ONLY customers_archive ORDER BY id",
])
def test_inheritance_child_of_customers_is_not_masked(pg, shop, gw_factory, raw, sql):
    """An admin archives customers into a child table (INHERITS customers). Its rows are rows of
    customers: `SELECT * FROM customers` returns them, masked. Read through the child's own name
    the rules see public.customers_archive.email, which no PII key names (40_pii.star keys are
    exact table names; Catalog.enrich follows views, not pg_inherits), so they arrive raw."""
    gw = _gw(pg, shop, gw_factory)
    with conn(gw, "dba") as dba:
        dba.execute("CREATE TABLE IF NOT EXISTS customers_archive () INHERITS (customers)")
        dba.execute("TRUNCATE customers_archive")
        dba.execute("INSERT INTO customers_archive SELECT id + 1000, full_name, email, phone, card_number, ssn, "
                    "birth_date, city, created_at FROM ONLY customers WHERE id <= 3")
    with conn(gw) as agent:
        parent = agent.execute("SELECT email, ssn FROM customers WHERE id > 1000").fetchall()
        assert len(parent) == 3
        assert_no_secret(repr(parent), raw)  # through the parent: masked
        rows = agent.execute(sql).fetchall()
    assert len(rows) == 3
    assert_no_secret(repr(rows), raw)


# --------------------------------------------------------------------------- 2. partitions


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
def test_partition_of_customers_is_not_masked(pg, part_shop, gw_factory, raw, sql):
    """customers partitioned by id: every row lives in a partition. Read through the parent the
    rows are masked; read through a partition's own name (a plain table, relkind 'r') the rules
    see public.customers_p1.*, no PII key matches, and the e-mails, SSNs and card numbers of
    that partition arrive raw (Catalog does not map a partition to its parent)."""
    gw = _gw(pg, part_shop, gw_factory)
    with conn(gw) as agent:
        parent = agent.execute("SELECT email, ssn FROM customers ORDER BY id LIMIT 5").fetchall()
        assert_no_secret(repr(parent), raw)  # through the parent: masked
        rows = agent.execute(sql).fetchall()
    assert len(rows) == 5
    assert_no_secret(repr(rows), raw)
