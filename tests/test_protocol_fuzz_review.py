"""A fuzzing review of the proxy loop (2026-11-30): a harness threw mutated and cut-off sessions
at the gateway while canary sessions checked their own data. The problems it found, each
pinned by tests that failed on the reviewed code (e0f5890); the session-mode write and the
client that sends Sync later passed there too, and guard the fix:

1. extended-protocol requests a client sent without Sync (Parse/Bind/Execute + Flush, then the
   client vanished) left an implicit transaction, or an error that skips to Sync, on a server
   the gateway put back in its pool: the next client committed the write, or hung;
2. a message shorter than its type allows (a Query with an empty body) raised in a protocol
   callback, inside another client's server connection when it had waited for a server;
3. a CopyData cut off at the end of a read was half forwarded, then its server released: the
   next client's bytes became the rest of it;
4. an SSLRequest in the middle of a session was taken for a message of 2052 bytes to wait for.

A second run of the harness on the fixes found:

5. a simple Query sent while the server skipped to Sync (after an error in a batch ended by
   Flush) is ignored by PostgreSQL; the gateway took the Sync's ReadyForQuery for its answer,
   and every later reply was matched with the request before it (see
   test_sql_reading_review.py for the masking this broke);
6. a Flush with a body fails on PostgreSQL (which then skips to Sync): in session pooling the
   reset query at disconnect was skipped and the pool slot lost;
7. Parse/Bind/Execute + Flush, then a simple Query (which commits them): the server stayed tied
   to its client until a Sync that may never come (from the first fix).

A differential run (each request whole in one read, the fast lanes' shape, against the same
bytes one at a time) found:

8. while PostgreSQL skipped to Sync after an error, the gateway still answered what it answers
   itself in transaction pooling (Close and re-Parse of a named statement, DEALLOCATE): a
   CloseComplete (or a ReadyForQuery too many) PostgreSQL never sends, and a statement the
   gateway forgot while PostgreSQL kept it.
"""

from __future__ import annotations

import struct

import psycopg
import pytest

from tests.conftest import upstream_entry
from tests.test_policy_e2e import Raw


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def PN(name: str, sql: str) -> bytes:
    """Parse of statement ``name`` ("" the unnamed one), no parameter types."""
    return _msg(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def P(sql: str) -> bytes:
    return PN("", sql)


def BN(name: str) -> bytes:
    """Bind of statement ``name`` to the unnamed portal, no parameters."""
    return _msg(b"B", b"\x00" + name.encode() + b"\x00" + b"\x00\x00" * 3)


BIND = BN("")
EXECUTE = _msg(b"E", b"\x00\x00\x00\x00\x00")
FLUSH = _msg(b"H", b"")
SYNC = _msg(b"S", b"")


def CLOSE_S(name: str) -> bytes:
    return _msg(b"C", b"S" + name.encode() + b"\x00")


def Q(sql: str) -> bytes:
    return _msg(b"Q", sql.encode() + b"\x00")


def until(c: Raw, kind: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while True:
        t, body = c.read()
        out.append((t, body))
        if t == kind:
            return out


def closed_with(c: Raw, sqlstate: bytes) -> bytes:
    """Read to the end of the connection; the FATAL ErrorResponse's body."""
    err = b""
    try:
        while True:
            t, body = c.read()
            if t == b"E":
                err = body
    except (AssertionError, ConnectionError):
        pass
    assert sqlstate in err, err
    return err


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS fz; CREATE TABLE fz (id int PRIMARY KEY, v int); INSERT INTO fz VALUES (1, 1)")
    yield "fz"
    pg.execute("DROP TABLE IF EXISTS fz")


def one_pool(gw_factory, pg, mode="transaction", size=1):
    return gw_factory(settings={"pool_mode": mode, "default_pool_size": size},
                      databases={"postgres": upstream_entry(pg)})


def ask(gw, sql: str):
    """A fresh client's one-value query; a socket timeout (20 s) fails the test instead of a
    hang when its server never answers."""
    c = Raw(gw, "postgres", "postgres")
    try:
        rows = c.run(Q(sql))
    finally:
        c.close()
    assert not any(t == b"E" for t, _ in rows), rows
    (row,) = [body for t, body in rows if t == b"D"]
    (n,) = struct.unpack("!i", row[2:6])
    return (int(row[6 : 6 + n]),)


# --------------------------------------------------------------------------- 1. no Sync


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_an_unsynced_write_of_a_vanished_client_is_never_committed(pg, gw_factory, table, mode):
    gw = one_pool(gw_factory, pg, mode)
    a = Raw(gw, "postgres", "postgres")
    a.send(P("UPDATE fz SET v = 999 WHERE id = 1"), BIND, EXECUTE, FLUSH)
    assert until(a, b"C")[-1][1].startswith(b"UPDATE 1")
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
    a.send(P("UPDATE fz SET v = 999 WHERE id = 1"), BIND, EXECUTE)
    a.send(FLUSH)
    assert until(a, b"C")[-1][1].startswith(b"UPDATE 1")
    a.s.close()
    assert ask(gw, "SELECT 42") == (42,)
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "1"
    pg.execute("SET lock_timeout = '5s'; UPDATE fz SET v = 2 WHERE id = 1")


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_a_server_skipping_to_sync_is_not_given_to_the_next_client(pg, gw_factory, mode):
    gw = one_pool(gw_factory, pg, mode)
    a = Raw(gw, "postgres", "postgres")
    a.send(P("SELECT * FROM no_such_table_fz"), FLUSH)
    assert until(a, b"E")[-1][1].find(b"42P01") >= 0
    a.close()
    assert ask(gw, "SELECT 43") == (43,)  # hung (statement ignored until Sync) before


def test_a_client_that_stays_after_flush_keeps_its_server_until_sync(pg, gw_factory, table):
    """Parse + Flush, then a simple Query: the server stays with this client (an implicit
    transaction is open), and goes back to the pool at the Sync's ReadyForQuery."""
    gw = one_pool(gw_factory, pg, size=2)
    a = Raw(gw, "postgres", "postgres")
    a.send(P("UPDATE fz SET v = 5 WHERE id = 1"), BIND, EXECUTE, FLUSH)
    until(a, b"C")
    a.send(SYNC)
    assert until(a, b"Z")[-1][1] == b"I"
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "5"
    a.close()
    assert ask(gw, "SELECT 44") == (44,)


# --------------------------------------------------------------------------- 2. short messages


@pytest.mark.parametrize("kind", [b"Q", b"P", b"B", b"D", b"E", b"C", b"F", b"f"])
def test_an_empty_message_closes_only_its_session(pg, gw_factory, kind):
    gw = one_pool(gw_factory, pg)
    bad = Raw(gw, "postgres", "postgres")
    bad.send(_msg(kind, b""))
    closed_with(bad, b"08P01")
    assert ask(gw, "SELECT 45") == (45,)


def test_an_empty_message_behind_a_wait_for_a_server_hurts_nobody_else(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    holder = psycopg.connect(gw.dsn())  # a transaction holds the only server
    holder.execute("SELECT 1")
    bad = Raw(gw, "postgres", "postgres")
    bad.send(Q("SELECT 1"), _msg(b"Q", b""))  # waits for the server, then the empty Query
    holder.commit()  # the server goes to the waiting client
    assert holder.execute("SELECT 46").fetchone() == (46,)
    holder.close()
    closed_with(bad, b"08P01")
    assert ask(gw, "SELECT 47") == (47,)


# --------------------------------------------------------------------------- 3. half a CopyData


def test_a_half_sent_copydata_keeps_its_server(pg, gw_factory):
    gw = one_pool(gw_factory, pg, size=2)
    a = Raw(gw, "postgres", "postgres")
    whole = _msg(b"d", b"x" * 99995)
    a.send(Q("SELECT 1"), whole[:10])  # the rest of the CopyData is still to come
    until(a, b"Z")
    assert ask(gw, "SELECT 48") == (48,)  # another client (on another server) is unaffected
    a.send(whole[10:], Q("SELECT 2"))  # CopyData outside COPY is ignored by PostgreSQL
    rows = until(a, b"Z")
    assert any(t == b"D" and body.endswith(b"2") for t, body in rows), rows
    a.close()
    assert ask(gw, "SELECT 49") == (49,)


def test_a_client_gone_in_the_middle_of_a_copydata_does_not_leave_it_to_the_next(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(Q("SELECT 1"), _msg(b"d", b"x" * 99995)[:10])
    until(a, b"Z")
    a.s.close()
    assert ask(gw, "SELECT 50") == (50,)


# --------------------------------------------------------------------------- 4. SSLRequest mid-session


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


# --------------------------------------------------------------------------- 5-7. second run


def test_a_query_skipped_while_the_server_waits_for_sync_keeps_replies_in_order(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(P("SELECT 1/0"), BIND, EXECUTE, FLUSH)
    assert b"22012" in until(a, b"E")[-1][1]
    kinds = [t for t, _ in a.run(Q("SELECT 1"), SYNC)]  # the Query is skipped, the Sync answered
    assert kinds == [b"Z"]
    rows = a.run(Q("SELECT 'after'"))
    assert [t for t, _ in rows] == [b"T", b"D", b"C", b"Z"]
    assert rows[1][1].endswith(b"after")
    assert ask(gw, "SELECT 52") == (52,)  # nothing is left outstanding: the only server is free
    a.close()


def test_a_flush_with_a_body_is_refused_and_the_pool_slot_survives(pg, gw_factory):
    gw = one_pool(gw_factory, pg, mode="session")
    a = Raw(gw, "postgres", "postgres")
    a.send(_msg(b"H", b"junk"))
    closed_with(a, b"08P01")
    assert ask(gw, "SELECT 53") == (53,)
    assert ask(gw, "SELECT 54") == (54,)


def test_a_query_after_flush_commits_and_frees_the_server(pg, gw_factory, table):
    gw = gw_factory(settings={"pool_mode": "transaction", "default_pool_size": 1, "query_wait_timeout": 10},
                    databases={"postgres": upstream_entry(pg)})
    a = Raw(gw, "postgres", "postgres")
    a.send(P("UPDATE fz SET v = 6 WHERE id = 1"), BIND, EXECUTE, FLUSH)
    until(a, b"C")
    rows = a.run(Q("SELECT 2"))
    assert rows[-1] == (b"Z", b"I")
    assert pg.psql("SELECT v FROM fz WHERE id = 1").strip() == "6"  # committed by the Query
    assert ask(gw, "SELECT 55") == (55,)  # the only server is free again while A stays connected
    a.close()


# --------------------------------------------------------------------------- 8. skipped to Sync


DIV0 = "SELECT 1 / (random() * 0)::int"  # fails when executed (1/0 would fail at Bind, when planned)


def kinds(replies) -> bytes:
    return b"".join(t for t, _ in replies)


def still_there(c: Raw, name: str) -> None:
    """``name`` still exists for the client, as in PostgreSQL: running it fails with its own
    division by zero, not with 26000 (no such statement)."""
    c.send(BN(name), EXECUTE, SYNC)
    got = until(c, b"Z")
    assert kinds(got) == b"2EZ", got
    assert b"22012" in got[1][1], got


@pytest.mark.parametrize("request_", ["close", "deallocate", "parse"])
def test_what_the_gateway_answers_itself_is_skipped_like_postgresql_after_an_error(pg, gw_factory, request_):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(PN("s1", DIV0), BN("s1"), EXECUTE, FLUSH)
    assert kinds(until(a, b"E")) == b"12E"  # the server now ignores everything up to Sync
    a.send({"close": CLOSE_S("s1"), "deallocate": Q("DEALLOCATE s1"),
            "parse": PN("s2", DIV0)}[request_])
    a.send(SYNC)
    assert kinds(until(a, b"Z")) == b"Z"  # nothing for the skipped request: only the Sync's answer
    still_there(a, "s1")
    if request_ == "parse":  # never created
        a.send(BN("s2"), EXECUTE, SYNC)
        got = until(a, b"Z")
        assert kinds(got) == b"EZ" and b"26000" in got[0][1], got
    a.close()
    assert ask(gw, "SELECT 44") == (44,)


def test_a_close_pipelined_behind_an_error_keeps_the_statement(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(PN("s1", DIV0), SYNC)
    assert kinds(until(a, b"Z")) == b"1Z"
    a.send(BN("s1"), EXECUTE, CLOSE_S("s1"), SYNC)  # the Close is queued before the error arrives
    assert kinds(until(a, b"Z")) == b"2EZ"
    still_there(a, "s1")
    a.close()


def test_an_eviction_the_server_skips_keeps_the_statement_on_the_books(pg, gw_factory):
    """max_prepared_statements = 1: each new text evicts the last one (a Close the client never
    sees). Pipelined behind an error, that Close is skipped by the server, which keeps the
    statement: preparing the text again must not collide with it (42P05)."""
    gw = gw_factory(settings={"pool_mode": "transaction", "default_pool_size": 1, "max_prepared_statements": 1},
                    databases={"postgres": upstream_entry(pg)})
    a = Raw(gw, "postgres", "postgres")
    a.send(PN("x", DIV0), BN("x"), EXECUTE, PN("s2", "SELECT 2"), SYNC)  # s2's eviction of x is skipped
    assert kinds(until(a, b"Z")) == b"12EZ"
    a.close()
    b = Raw(gw, "postgres", "postgres")
    b.send(PN("y", DIV0), BN("y"), EXECUTE, SYNC)
    got = until(b, b"Z")
    assert kinds(got) == b"12EZ" and b"22012" in got[2][1], got
    b.close()
