"""Masked columns through SQL that hides where a value comes from: a table alias whose column
list renames the columns, built-in functions that read a table (or run SQL) named in a string,
and the statement texts of other sessions. A user outside pii-readers (agents, who may only
read, or analysts, who may write) never receives a raw value of a masked column."""

from __future__ import annotations

import psycopg
import pytest

from tests.masking_helpers import assert_no_secret, conn


@pytest.fixture(scope="module", autouse=True)
def vip_src(pg, demo_shop):
    pg.execute("CREATE OR REPLACE VIEW vip_src AS SELECT id, email FROM customers", dbname=demo_shop)


# --------------------------------------------------------------------------- alias column lists


@pytest.mark.parametrize("sql", [
    "SELECT b, c, d, e, f FROM customers AS t(a, b, c, d, e, f)",
    "SELECT t.c FROM customers t(a, b, c) WHERE a < 5",
    "SELECT q.c FROM (customers c JOIN orders o ON c.id = o.customer_id) AS q(a, b, c, d, e, f)",
    "SELECT v.m FROM vip_src AS v(i, m)",
])
def test_alias_column_list_renames_masked_columns(shop_gw, raw_pii, sql):
    """A table alias with a column list renames the columns: the analyzer reports
    public.customers.c (not .email), the rule masks nothing, the rows go out untouched."""
    with conn(shop_gw) as c:
        rows = c.execute(sql).fetchall()
    assert rows
    assert_no_secret(repr(rows), raw_pii)


def test_alias_column_list_lets_analysts_copy_masked_values(shop_gw, raw_pii):
    """The same trick lets an analyst copy e-mails into an unmasked table and read them back."""
    with conn(shop_gw, "ann") as c:
        try:
            c.execute("INSERT INTO products (name, price) SELECT 'leak:' || x, 1 FROM customers t(a, b, x) "
                      "WHERE a < 4")
        except psycopg.errors.InsufficientPrivilege:
            return  # refused: not a leak
        try:
            rows = c.execute("SELECT name FROM products WHERE name LIKE 'leak:%'").fetchall()
        finally:
            c.execute("DELETE FROM products WHERE name LIKE 'leak:%'")
    assert_no_secret(repr(rows), raw_pii)


# --------------------------------------------------------------------------- built-ins that read tables by name


@pytest.mark.parametrize("sql", [
    "SELECT table_to_xml('customers', true, false, '')",
    "SELECT table_to_xml_and_xmlschema('public.payments', true, false, '')",
    "SELECT schema_to_xml('public', true, false, '')",
    "SELECT word FROM ts_stat('SELECT to_tsvector(''simple'', email || '' '' || ssn) FROM customers')",
    "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, plainto_tsquery(''simple'', email) FROM customers')",
])
def test_builtin_functions_that_read_tables_by_name(shop_gw, raw_pii, sql):
    """table_to_xml/schema_to_xml/ts_stat/ts_rewrite read a table (or run SQL) named in a
    string: no masked column appears in stmt.columns, so nothing is masked."""
    with conn(shop_gw) as c:
        try:
            rows = c.execute(sql).fetchall()
        except psycopg.errors.InsufficientPrivilege:
            return  # refused: fine
    assert_no_secret(repr(rows), raw_pii)


# --------------------------------------------------------------------------- other sessions' statement texts


def test_pg_stat_get_activity_bypasses_the_pg_stat_activity_denial(shop_gw, pg, demo_shop, raw_pii):
    """40_pii.star refuses pg_stat_activity because other sessions' statement texts quote
    personal data, and the function behind the view too."""
    with psycopg.connect(pg.dsn(dbname=demo_shop), autocommit=True) as other:
        other.execute("SELECT id FROM customers WHERE email = 'james.smith@example.com'").fetchall()
        with conn(shop_gw) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT query FROM pg_stat_activity")
        with conn(shop_gw) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_stat_get_activity"):
                c.execute("SELECT query FROM pg_stat_get_activity(NULL)")
