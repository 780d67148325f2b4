"""What a pii-reader leaves in the session of a pooled server (a custom setting, a temp table
that shadows a table, a cursor WITH HOLD, the texts of prepared statements) never reaches an
agent who gets that server next, in transaction or statement pooling: a server passing to
another identity is reset, and pg_prepared_statements is refused."""

from __future__ import annotations

import psycopg
import pytest

from tests.masking_helpers import assert_no_secret, conn, masking_gw


# --------------------------------------------------------------------------- session state of a pooled server
#
# In transaction and statement pooling the server goes back to the pool at the end of every
# transaction (ClientConn.server_ready -> Pool.release), not at the end of the session as in
# session mode (where server_reset_query, DISCARD ALL, runs in ClientConn._detach_server).
# Whatever a pii-reader left in the server session would then be read by the next client of
# that server, an agent, through statements that read no masked column, so nothing is masked.


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_custom_guc_set_by_a_pii_reader_is_read_by_an_agent(pg, demo_shop, gw_factory, raw_pii, mode):
    """set_config('x.y', <an e-mail>, false) by a pii-reader stays on the pooled server; the
    agent's current_setting('x.y') / SHOW x.y has no masked column and returns it raw."""
    gw = masking_gw(pg, demo_shop, gw_factory, default_pool_size="1", pool_mode=mode)
    with conn(gw, "dba") as dba:
        dba.execute("SELECT set_config('x.y', (SELECT email FROM customers WHERE id = 1), false)").fetchall()
    with conn(gw) as agent:
        rows = agent.execute("SELECT current_setting('x.y', true)").fetchall()
        if mode == "transaction":
            rows += agent.execute("SHOW x.y").fetchall()
    assert_no_secret(repr(rows), raw_pii)


def test_temp_table_of_a_pii_reader_shadows_a_table_for_the_next_client(pg, demo_shop, gw_factory, raw_pii):
    """A temp table (pg_temp comes first on the search_path) left on the pooled server by a
    pii-reader shadows public.products for the agent that gets the server next. The rules see
    public.products (known, nothing to mask) and ask for no mask; the catalog, read on the
    gateway's own connection, cannot see another session's temp objects."""
    gw = masking_gw(pg, demo_shop, gw_factory, default_pool_size="1")
    with conn(gw, "dba") as dba:
        dba.execute("CREATE TEMP TABLE products AS SELECT id, email AS name, 1 AS price FROM customers")
    with conn(gw) as agent:
        rows = agent.execute("SELECT name FROM products ORDER BY id LIMIT 3").fetchall()
    assert_no_secret(repr(rows), raw_pii)


def test_held_cursor_of_a_pii_reader_is_fetched_by_an_agent(pg, demo_shop, gw_factory, raw_pii):
    """DECLARE ... WITH HOLD by a pii-reader outlives its transaction on the pooled server. The
    agent's FETCH of it is not refused (only protocol portals of the agent's own session are
    tracked in mask_portals) and has no masked column: the pii-reader's rows arrive raw."""
    gw = masking_gw(pg, demo_shop, gw_factory, default_pool_size="1")
    with conn(gw, "dba") as dba:
        dba.execute("DECLARE dc CURSOR WITH HOLD FOR SELECT email, ssn FROM customers ORDER BY id")
    with conn(gw) as agent:
        try:
            rows = agent.execute("FETCH 3 FROM dc").fetchall()
        except psycopg.Error:
            rows = []  # refused: fine
    assert_no_secret(repr(rows), raw_pii)


def test_prepared_statement_texts_of_a_pii_reader_are_read_by_an_agent(pg, demo_shop, gw_factory, raw_pii):
    """Protocol-level prepared statements stay on pooled servers (by design, pooler_<hash>),
    and pg_prepared_statements shows their texts, which quote the values a pii-reader searched
    for. 40_pii.star refuses pg_stat_activity for exactly this reason, not this view."""
    gw = masking_gw(pg, demo_shop, gw_factory, default_pool_size="1")
    with conn(gw, "dba") as dba:
        for _ in range(6):  # psycopg prepares the statement from the 5th execution on
            dba.execute("SELECT id FROM customers WHERE email = 'james.smith@example.com' AND id > %s", (0,)).fetchall()
    with conn(gw) as agent:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_prepared_statements"):
            agent.execute("SELECT statement FROM pg_prepared_statements")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_prepared_statement"):
            agent.execute("SELECT statement FROM pg_prepared_statement()")
