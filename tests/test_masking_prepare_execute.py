"""SQL PREPARE and EXECUTE of masked statements. EXECUTE is masked as the statement the server
really runs under that name: when a PREPARE fails on the server (the name is taken by the
gateway's own copy of a protocol statement, by a protocol statement in session mode, or by
another client's statement on a pooled server), when PREPARE confirmations come back out of
step after an error, and when the plan cache holds a plan made for another statement of the same
name. SQL-level PREPARE is refused over the extended protocol."""

from __future__ import annotations

import hashlib

import psycopg
import pytest

from pooler.protocol import messages as m
from tests.conftest import upstream_entry
from tests.gwproc import REPO
from tests.masking_helpers import MASKED, USERS, assert_no_secret, conn, masking_gw
from tests.wire import SYNC, Raw, msg, parse, query, shown

HARMLESS = "SELECT 'harmless'::text, 'x'::text, 'y'::text"


def _readies(c: Raw, n: int):
    out = []
    for _ in range(n):
        out += c.until_ready()
    return out


# --------------------------------------------------------------------------- PREPARE that fails on the server


def test_failed_prepare_leaves_a_stale_statement_text(shop_gw, raw_pii):
    """The gateway records PREPARE's text before the server ran it. A PREPARE that fails (its
    name is already taken, here by the gateway's own pooler_<hash> copy of a masked protocol
    statement) leaves the harmless text recorded, and EXECUTE is judged as that text while
    the server runs the masked statement."""
    sql = "SELECT email, card_number FROM customers ORDER BY id LIMIT 3"
    sname = "pooler_" + hashlib.blake2b(sql.encode() + b"\x00\x00\x00", digest_size=10).hexdigest()
    c = Raw(shop_gw, "agent")
    try:
        c.run(query("BEGIN"))
        c.run(parse(b"s1", sql), msg(b"D", b"Ss1\x00"), SYNC)
        c.run(query(f"PREPARE {sname} AS SELECT 'harmless'::text, 'x'::text"))  # fails: 42P05
        c.run(query("ROLLBACK"))
        c.run(query("BEGIN"))
        c.run(msg(b"D", b"Ss1\x00"), SYNC)  # make sure this server has the statement
        got = c.run(query(f"EXECUTE {sname}"))
        c.run(query("ROLLBACK"))
    finally:
        c.close()
    assert_no_secret(shown(got), raw_pii)


def test_failed_prepare_in_session_mode(pg, demo_shop, gw_factory, raw_pii):
    """Session mode: a protocol-level statement and a SQL PREPARE share PostgreSQL's namespace."""
    gw = gw_factory(settings={"rules_dir": str(REPO / "rules"), "pool_mode": "session"}, users=USERS,
                    databases={"shop": upstream_entry(pg, demo_shop)})
    c = Raw(gw, "agent")
    try:
        c.run(parse(b"p", "SELECT email FROM customers ORDER BY id LIMIT 3"), SYNC)
        c.run(query("PREPARE p AS SELECT 'harmless'::text"))  # fails on the server: p exists
        got = c.run(query("EXECUTE p"))
    finally:
        c.close()
    assert_no_secret(shown(got), raw_pii)


def test_failed_prepare_runs_another_clients_statement(pg, demo_shop, gw_factory, raw_pii):
    """Transaction mode: SQL-level prepared statements live on the pooled server. A pii-reader's
    PREPARE r stays there; an agent's PREPARE r fails on that server but is recorded by the
    gateway as harmless, and the agent's EXECUTE r runs the pii-reader's statement unmasked."""
    gw = gw_factory(settings={"rules_dir": str(REPO / "rules"), "default_pool_size": "1"}, users=USERS,
                    databases={"shop": upstream_entry(pg, demo_shop)})
    with conn(gw, "dba") as dba:
        dba.execute("PREPARE r AS SELECT email, ssn FROM customers ORDER BY id LIMIT 3")
        with conn(gw) as agent:
            try:
                agent.execute("PREPARE r AS SELECT 'harmless'::text, 'x'::text")
            except psycopg.Error:
                pass
            try:
                rows = agent.execute("EXECUTE r").fetchall()
            except psycopg.errors.InvalidSqlStatementName:
                rows = []  # fail closed: the gateway does not know what r is on this server
    assert_no_secret(repr(rows), raw_pii)


# --------------------------------------------------------------------------- PREPARE confirmations out of step


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_prepare_confirmation_misattributed_after_an_error(pg, demo_shop, gw_factory, raw_pii, mode):
    """sql_prepare_done is FIFO over sql_pending. An error in a message that has no PREPARE of
    its own drops the *next* message's pending PREPAREs, but that message still runs: its
    CommandComplete PREPARE then confirms the entry of a later message, whose PREPARE has not
    run yet (and fails on the server: the name exists). The gateway records the harmless text
    of the failed PREPARE; EXECUTE runs the server's masked statement unmasked. (The server
    keeps the masked statement because DEALLOCATE is forgotten when governed, not when the
    server confirms it.)"""
    gw = masking_gw(pg, demo_shop, gw_factory, pool_mode=mode)
    c = Raw(gw, "agent")
    try:
        if mode == "transaction":
            c.run(query("BEGIN"))
            c.run(query("SAVEPOINT s"))
        r = c.run(query(f"PREPARE r AS {MASKED}"))
        assert not any(t == b"E" for t, _ in r), r
        # the gateway forgets r; the server never runs the DEALLOCATE
        c.run(query("SELECT 1/0; DEALLOCATE r"))
        if mode == "transaction":
            c.run(query("ROLLBACK TO s"))
        # pipelined without waiting: Q1 fails (no PREPARE), Q2 prepares a, Q3's PREPARE r fails
        c.s.sendall(query("SELECT 1/0")
                    + query(("ROLLBACK TO s; " if mode == "transaction" else "") + "PREPARE a AS SELECT 1")
                    + query(f"PREPARE r AS {HARMLESS}"))
        _readies(c, 3)
        if mode == "transaction":
            c.run(query("ROLLBACK TO s"))
        got = c.run(query("EXECUTE r"))
        if mode == "transaction":
            c.run(query("ROLLBACK"))
    finally:
        c.close()
    assert_no_secret(shown(got), raw_pii)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_executing_a_parsed_prepare_confirms_another_prepare(pg, demo_shop, gw_factory, raw_pii, mode):
    """A protocol-level statement whose text is "PREPARE n AS <masked>" is governed once, at
    Parse; every later Bind/Execute of it runs that PREPARE again without the gateway noting it.
    Its CommandComplete PREPARE confirms whatever SQL PREPARE is pending (here a harmless
    "PREPARE n" sent right behind it, which then fails on the server because n exists)."""
    gw = masking_gw(pg, demo_shop, gw_factory, pool_mode=mode)
    c = Raw(gw, "agent")
    try:
        r = c.run(parse(b"sA", f"PREPARE n AS {MASKED}"), SYNC)
        errs = [m.parse_error_fields(body) for t, body in r if t == b"E"]
        # SQL-level PREPARE is refused over the extended protocol, so it never runs
        assert errs and errs[0]["C"] == "42501" and "simple query" in errs[0]["M"], r
    finally:
        c.close()


# --------------------------------------------------------------------------- plan cache keyed by "EXECUTE p"


def test_plan_cache_reuses_the_plan_of_another_prepared_statement(shop_gw, raw_pii):
    """The plan cache key is the statement text ("EXECUTE p") and the RowDescription, not what p
    is: a plan made for a harmless p is reused for a p that computes from a masked column."""
    with conn(shop_gw) as c, c.transaction():  # SQL-level statements last for the transaction
        c.execute("PREPARE p AS SELECT upper(city) AS x, email FROM customers ORDER BY id LIMIT 3")
        c.execute("EXECUTE p").fetchall()
        c.execute("DEALLOCATE p")
        c.execute("PREPARE p AS SELECT upper(email) AS x, email FROM customers ORDER BY id LIMIT 3")
        rows = c.execute("EXECUTE p").fetchall()
    assert_no_secret(repr(rows), raw_pii)


def test_plan_cache_poisoned_across_sessions(shop_gw, raw_pii):
    """The cache is shared by all sessions of the database: another agent's harmless p decides."""
    with conn(shop_gw) as a, conn(shop_gw) as b:
        with a.transaction():
            a.execute("PREPARE q AS SELECT lower(city) AS y, phone, card_number, ssn FROM customers ORDER BY id LIMIT 3")
            a.execute("EXECUTE q").fetchall()
            a.execute("DEALLOCATE q")
        with b.transaction():
            b.execute("PREPARE q AS SELECT lower(card_number || ' ' || ssn) AS y, phone, card_number, ssn "
                      "FROM customers ORDER BY id LIMIT 3")
            rows = b.execute("EXECUTE q").fetchall()
    assert_no_secret(repr(rows), raw_pii)
