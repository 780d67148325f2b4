"""Mutated and cut-off sessions of the wire protocol (what a fuzzing harness threw at the proxy
loop while canary sessions checked their own data) never harm another client: each test checks
the next client's answer, or a direct writer, after the bad session.

1. Extended-protocol requests sent without Sync (Parse/Bind/Execute + Flush, then the client
   vanishes) leave no implicit transaction, and no error that skips to Sync, on a server the
   gateway puts back in its pool: nothing is committed, nobody hangs. A client that stays after
   Flush keeps its server until Sync.
2. A message shorter than its type allows (a Query with an empty body) closes only its own
   session with 08P01, also when it waited for a server inside another client's turn.
3. A CopyData cut off at the end of a read keeps its server until the rest arrives: the next
   client's bytes never become the rest of it.
4. An SSLRequest in the middle of a session is refused at once, not taken for a message of 2052
   bytes to wait for.
5. A simple Query sent while the server skips to Sync (after an error in a batch ended by Flush)
   is ignored by PostgreSQL, and the Sync's ReadyForQuery is not taken for its answer: replies
   stay matched with their requests (test_masking_protocol.py pins the masking that relies on it).
6. A Flush with a body is refused; in session pooling the reset query still runs at disconnect
   and the pool slot survives.
7. Parse/Bind/Execute + Flush, then a simple Query (which commits them): the server goes back to
   the pool at the Query's ReadyForQuery.

What the gateway answers itself for named statements while PostgreSQL skips to Sync is pinned in
test_prepared_statements.py.
"""

from __future__ import annotations

import struct

import psycopg
import pytest

from tests.conftest import one_pool, upstream_entry
from tests.wire import FLUSH, SYNC, Raw, ask, bind, closed_with, execute, msg, parse, query


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS fz; CREATE TABLE fz (id int PRIMARY KEY, v int); INSERT INTO fz VALUES (1, 1)")
    yield "fz"
    pg.execute("DROP TABLE IF EXISTS fz")


# --------------------------------------------------------------------------- no Sync


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_an_unsynced_write_of_a_vanished_client_is_never_committed(pg, gw_factory, table, mode):
    gw = one_pool(gw_factory, pg, mode)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("", "UPDATE fz SET v = 999 WHERE id = 1"), bind(), execute(), FLUSH)
    assert a.until(b"C")[-1][1].startswith(b"UPDATE 1")
    a.s.close()  # gone, without Sync and without Terminate
    assert ask(gw, "SELECT 42") == (42,)
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "1"
    # the row lock went with the transaction: a direct writer does not wait
    pg.execute("SET lock_timeout = '5s'; UPDATE fz SET v = 2 WHERE id = 1")


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_an_unsynced_batch_in_one_read_is_never_committed_either(pg, gw_factory, table, mode):
    """The same, with Parse/Bind/Execute arriving in one read (the fast lanes' shape, which
    took it for a unit ended by Sync) and the Flush after it."""
    gw = one_pool(gw_factory, pg, mode)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("", "UPDATE fz SET v = 999 WHERE id = 1"), bind(), execute())
    a.send(FLUSH)
    assert a.until(b"C")[-1][1].startswith(b"UPDATE 1")
    a.s.close()
    assert ask(gw, "SELECT 42") == (42,)
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "1"
    pg.execute("SET lock_timeout = '5s'; UPDATE fz SET v = 2 WHERE id = 1")


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_a_server_skipping_to_sync_is_not_given_to_the_next_client(pg, gw_factory, mode):
    gw = one_pool(gw_factory, pg, mode)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("", "SELECT * FROM no_such_table_fz"), FLUSH)
    assert a.until(b"E")[-1][1].find(b"42P01") >= 0
    a.close()
    assert ask(gw, "SELECT 43") == (43,)  # hung (statement ignored until Sync) before


def test_a_client_that_stays_after_flush_keeps_its_server_until_sync(pg, gw_factory, table):
    """Parse + Flush, then a simple Query: the server stays with this client (an implicit
    transaction is open), and goes back to the pool at the Sync's ReadyForQuery."""
    gw = one_pool(gw_factory, pg, size=2)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("", "UPDATE fz SET v = 5 WHERE id = 1"), bind(), execute(), FLUSH)
    a.until(b"C")
    a.send(SYNC)
    assert a.until(b"Z")[-1][1] == b"I"
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "5"
    a.close()
    assert ask(gw, "SELECT 44") == (44,)


# --------------------------------------------------------------------------- short messages


@pytest.mark.parametrize("kind", [b"Q", b"P", b"B", b"D", b"E", b"C", b"F", b"f"])
def test_an_empty_message_closes_only_its_session(pg, gw_factory, kind):
    gw = one_pool(gw_factory, pg)
    bad = Raw(gw, "postgres", "postgres")
    bad.send(msg(kind, b""))
    closed_with(bad, b"08P01")
    assert ask(gw, "SELECT 45") == (45,)


def test_an_empty_message_behind_a_wait_for_a_server_hurts_nobody_else(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    holder = psycopg.connect(gw.dsn())  # a transaction holds the only server
    holder.execute("SELECT 1")
    bad = Raw(gw, "postgres", "postgres")
    bad.send(query("SELECT 1"), msg(b"Q", b""))  # waits for the server, then the empty Query
    holder.commit()  # the server goes to the waiting client
    assert holder.execute("SELECT 46").fetchone() == (46,)
    holder.close()
    closed_with(bad, b"08P01")
    assert ask(gw, "SELECT 47") == (47,)


# --------------------------------------------------------------------------- half a CopyData


def test_a_half_sent_copydata_keeps_its_server(pg, gw_factory):
    gw = one_pool(gw_factory, pg, size=2)
    a = Raw(gw, "postgres", "postgres")
    whole = msg(b"d", b"x" * 99995)
    a.send(query("SELECT 1"), whole[:10])  # the rest of the CopyData is still to come
    a.until(b"Z")
    assert ask(gw, "SELECT 48") == (48,)  # another client (on another server) is unaffected
    a.send(whole[10:], query("SELECT 2"))  # CopyData outside COPY is ignored by PostgreSQL
    rows = a.until(b"Z")
    assert any(t == b"D" and body.endswith(b"2") for t, body in rows), rows
    a.close()
    assert ask(gw, "SELECT 49") == (49,)


def test_a_client_gone_in_the_middle_of_a_copydata_does_not_leave_it_to_the_next(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(query("SELECT 1"), msg(b"d", b"x" * 99995)[:10])
    a.until(b"Z")
    a.s.close()
    assert ask(gw, "SELECT 50") == (50,)


# --------------------------------------------------------------------------- SSLRequest mid-session


def test_an_ssl_request_in_a_session_is_refused_at_once(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    c = Raw(gw, "postgres", "postgres")
    c.s.settimeout(10)  # before: the gateway waited for 2052 more bytes
    c.send(struct.pack("!ii", 8, 80877103))
    err = closed_with(c, b"08P01")
    assert b"invalid frontend message type" in err
    try:
        c.s.close()
    except OSError:
        pass
    assert ask(gw, "SELECT 51") == (51,)


# --------------------------------------------------------------------------- requests skipped to Sync, Flush with a body, a Query after Flush


def test_a_query_skipped_while_the_server_waits_for_sync_keeps_replies_in_order(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("", "SELECT 1/0"), bind(), execute(), FLUSH)
    assert b"22012" in a.until(b"E")[-1][1]
    kinds = [t for t, _ in a.run(query("SELECT 1"), SYNC)]  # the Query is skipped, the Sync answered
    assert kinds == [b"Z"]
    rows = a.run(query("SELECT 'after'"))
    assert [t for t, _ in rows] == [b"T", b"D", b"C", b"Z"]
    assert rows[1][1].endswith(b"after")
    assert ask(gw, "SELECT 52") == (52,)  # nothing is left outstanding: the only server is free
    a.close()


def test_a_flush_with_a_body_is_refused_and_the_pool_slot_survives(pg, gw_factory):
    gw = one_pool(gw_factory, pg, mode="session")
    a = Raw(gw, "postgres", "postgres")
    a.send(msg(b"H", b"junk"))
    closed_with(a, b"08P01")
    assert ask(gw, "SELECT 53") == (53,)
    assert ask(gw, "SELECT 54") == (54,)


def test_a_query_after_flush_commits_and_frees_the_server(pg, gw_factory, table):
    gw = gw_factory(settings={"pool_mode": "transaction", "default_pool_size": 1, "query_wait_timeout": 10},
                    databases={"postgres": upstream_entry(pg)})
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("", "UPDATE fz SET v = 6 WHERE id = 1"), bind(), execute(), FLUSH)
    a.until(b"C")
    rows = a.run(query("SELECT 2"))
    assert rows[-1] == (b"Z", b"I")
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "6"  # committed by the Query
    assert ask(gw, "SELECT 55") == (55,)  # the only server is free again while A stays connected
    a.close()
