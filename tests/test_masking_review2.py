"""Second security review of streaming masking: routes by which a user outside pii-readers
(agents, who may only read, or analysts, who may write) received raw values of masked columns
through the gateway. Each test fails while the leak it describes exists."""

from __future__ import annotations


import psycopg
import pytest

from pooler.pgcluster import seed_demo
from pooler.protocol import messages as m
from tests.conftest import upstream_entry
from tests.test_masking_e2e import REPO, USERS
from tests.test_masking_review import assert_no_secret, raw  # noqa: F401 - raw is a fixture
from tests.test_masking_review import SYNC, Raw, _bind, _msg, _parse, _query, _text

DB = "mask_review2"


@pytest.fixture(scope="module")
def shop(pg):
    seed_demo(pg, DB)
    return DB






def _gw(pg, shop, gw_factory, **settings):
    s = {"rules_dir": str(REPO / "rules"), "mask_hash_key": "test-key"}
    s.update(settings)
    return gw_factory(settings=s, users=USERS, databases={"shop": upstream_entry(pg, shop)})


@pytest.fixture
def mgw(pg, shop, gw_factory):
    return _gw(pg, shop, gw_factory)


def conn(gw, user="agent"):
    return psycopg.connect(gw.dsn(user=user, dbname="shop"), autocommit=True)


def _execute(portal: bytes = b"") -> bytes:
    return _msg(b"E", portal + b"\x00" + b"\x00\x00\x00\x00")


def _readies(c: Raw, n: int):
    out = []
    for _ in range(n):
        out += c.until_ready()
    return out


MASKED = "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"
HARMLESS = "SELECT 'harmless'::text, 'x'::text, 'y'::text"


# --------------------------------------------------------------------------- 1. PREPARE confirmations out of step


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_prepare_confirmation_misattributed_after_an_error(pg, shop, gw_factory, raw, mode):
    """sql_prepare_done is FIFO over sql_pending. An error in a message that has no PREPARE of
    its own drops the *next* message's pending PREPAREs, but that message still runs: its
    CommandComplete PREPARE then confirms the entry of a later message, whose PREPARE has not
    run yet (and fails on the server: the name exists). The gateway records the harmless text
    of the failed PREPARE; EXECUTE runs the server's masked statement unmasked. (The server
    keeps the masked statement because DEALLOCATE is forgotten when governed, not when the
    server confirms it.)"""
    gw = _gw(pg, shop, gw_factory, pool_mode=mode)
    c = Raw(gw, "agent")
    try:
        if mode == "transaction":
            c.run(_query("BEGIN"))
            c.run(_query("SAVEPOINT s"))
        r = c.run(_query(f"PREPARE r AS {MASKED}"))
        assert not any(t == b"E" for t, _ in r), r
        # the gateway forgets r; the server never runs the DEALLOCATE
        c.run(_query("SELECT 1/0; DEALLOCATE r"))
        if mode == "transaction":
            c.run(_query("ROLLBACK TO s"))
        # pipelined without waiting: Q1 fails (no PREPARE), Q2 prepares a, Q3's PREPARE r fails
        c.s.sendall(_query("SELECT 1/0")
                    + _query(("ROLLBACK TO s; " if mode == "transaction" else "") + "PREPARE a AS SELECT 1")
                    + _query(f"PREPARE r AS {HARMLESS}"))
        _readies(c, 3)
        if mode == "transaction":
            c.run(_query("ROLLBACK TO s"))
        got = c.run(_query("EXECUTE r"))
        if mode == "transaction":
            c.run(_query("ROLLBACK"))
    finally:
        c.close()
    assert_no_secret(_text(got), raw)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_executing_a_parsed_prepare_confirms_another_prepare(pg, shop, gw_factory, raw, mode):
    """A protocol-level statement whose text is "PREPARE n AS <masked>" is governed once, at
    Parse; every later Bind/Execute of it runs that PREPARE again without the gateway noting it.
    Its CommandComplete PREPARE confirms whatever SQL PREPARE is pending (here a harmless
    "PREPARE n" sent right behind it, which then fails on the server because n exists)."""
    gw = _gw(pg, shop, gw_factory, pool_mode=mode)
    c = Raw(gw, "agent")
    try:
        r = c.run(_parse(b"sA", f"PREPARE n AS {MASKED}"), SYNC)
        errs = [m.parse_error_fields(body) for t, body in r if t == b"E"]
        # the fix: SQL-level PREPARE is refused over the extended protocol, so it never runs
        assert errs and errs[0]["C"] == "42501" and "simple query" in errs[0]["M"], r
    finally:
        c.close()


# --------------------------------------------------------------------------- 2. masks of a statement name replaced by a failing Parse


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_reused_statement_name_replaces_the_lineage(pg, shop, gw_factory, raw, mode):
    """A Parse that reuses a statement name fails (on the server in session mode, by the
    gateway's 42P05 in transaction mode) and the first statement stays what runs, but _govern
    has already replaced mask_stmts[name] with the masks *and lineage* of the new text. The
    old statement's rows are planned with the new statement's lineage: its computed
    upper(email) sits where the new text has the unmasked column city."""
    gw = _gw(pg, shop, gw_factory, pool_mode=mode)
    c = Raw(gw, "agent")
    try:
        r = c.run(_parse(b"s1", "SELECT upper(email) AS a, upper(ssn) AS b FROM customers ORDER BY id LIMIT 3"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        r = c.run(_parse(b"s1", "SELECT city, phone FROM customers"), SYNC)
        assert any(t == b"E" for t, _ in r), r  # the name is taken
        got = c.run(_bind(b"", b"s1"), _execute(), SYNC)
    finally:
        c.close()
    assert [t for t, _ in got].count(b"D") == 3, got
    assert_no_secret(_text(got), raw)


# --------------------------------------------------------------------------- 3. masks forgotten before the server confirms


def test_close_cursor_that_never_ran_forgets_the_portal_masks(mgw, raw):
    """CLOSE p1 is accepted by the gateway, which forgets p1's masks at once; the server never
    runs it (an earlier statement of the same Query fails). After ROLLBACK TO SAVEPOINT the
    protocol portal p1 (bound before the savepoint) is still open, and FETCH is no longer
    refused: its rows are not masked."""
    c = Raw(mgw, "agent")
    try:
        c.run(_query("BEGIN"))
        r = c.run(_parse(b"s1", "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"),
                  _bind(b"p1", b"s1"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        c.run(_query("SAVEPOINT s"))
        c.run(_query("SELECT 1/0; CLOSE p1"))
        c.run(_query("ROLLBACK TO s"))
        got = c.run(_query("FETCH ALL FROM p1"))
        c.run(_query("ROLLBACK"))
    finally:
        c.close()
    errs = [m.parse_error_fields(body) for t, body in got if t == b"E"]
    # the fix: the portal's masks stay until its transaction ends, so FETCH of it is refused
    assert errs and errs[0]["C"] == "42501" and "p1" in errs[0]["M"], got
    assert_no_secret(_text(got), raw)


def test_close_message_skipped_after_an_error_forgets_the_statement_masks(pg, shop, gw_factory, raw):
    """Session mode: a Close('S') is taken as done when it is forwarded. After an error in the
    same batch PostgreSQL skips it up to Sync, so the masked statement s1 stays on the server
    while the gateway forgot its masks: Bind s1 / Execute sends raw rows."""
    gw = _gw(pg, shop, gw_factory, pool_mode="session")
    c = Raw(gw, "agent")
    try:
        r = c.run(_parse(b"s1", "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        r = c.run(_parse(b"", "SELECT 1/0"), _bind(b"", b""), _execute(), _msg(b"C", b"Ss1\x00"), SYNC)
        assert any(t == b"E" for t, _ in r), r
        got = c.run(_bind(b"", b"s1"), _execute(), SYNC)
    finally:
        c.close()
    assert [t for t, _ in got].count(b"D") == 3, got
    assert_no_secret(_text(got), raw)


def test_failing_bind_of_a_taken_portal_name_forgets_its_masks(mgw, raw):
    """Bind of an unmasked statement to the name of an open masked portal fails on the server
    (the portal exists) but _bind_masks has already dropped the portal's masks; after
    ROLLBACK TO SAVEPOINT the masked portal is still open and Execute sends raw rows."""
    c = Raw(mgw, "agent")
    try:
        c.run(_query("BEGIN"))
        r = c.run(_parse(b"s1", "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"),
                  _bind(b"p1", b"s1"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        c.run(_query("SAVEPOINT s"))
        r = c.run(_parse(b"s2", "SELECT 'a'::text, 'b'::text, 'c'::text"), _bind(b"p1", b"s2"), SYNC)
        assert any(t == b"E" for t, _ in r), r  # portal p1 already exists
        c.run(_query("ROLLBACK TO s"))
        got = c.run(_execute(b"p1"), SYNC)
        c.run(_query("ROLLBACK"))
    finally:
        c.close()
    assert [t for t, _ in got].count(b"D") == 3, got
    assert_no_secret(_text(got), raw)


# --------------------------------------------------------------------------- 4. a new relation shadowing a known name


def test_new_relation_shadowing_a_known_name_is_not_unknown(mgw, pg, shop, raw):
    """Catalog.enrich flags a relation as unknown only when no candidate of the same *name* is
    known in any schema: a view s2.customers created outside the gateway (not in the catalog
    yet) hides behind public.customers. With s2 first on the search_path the rules see
    s2.customers.city / public.customers.city, nothing unknown, and ask for no mask, while the
    server reads the new view, which shows e-mails as "city"."""
    with conn(mgw) as c:
        c.execute("SELECT email FROM customers LIMIT 1").fetchall()  # the catalog is loaded
        pg.execute("CREATE SCHEMA IF NOT EXISTS s2; "
                   "CREATE OR REPLACE VIEW s2.customers AS SELECT id, email AS city, ssn AS country FROM public.customers",
                   dbname=shop)
        try:
            c.execute("SET search_path = s2, public")
            rows = c.execute("SELECT city, country FROM customers ORDER BY id LIMIT 3").fetchall()
        finally:
            pg.execute("DROP SCHEMA s2 CASCADE", dbname=shop)
    assert rows
    assert_no_secret(repr(rows), raw)
