"""Named prepared statements in transaction pooling, where the gateway answers some requests
itself (Close and re-Parse of a named statement, DEALLOCATE, the Close that evicts a statement
past max_prepared_statements). After an error, while PostgreSQL skips everything up to Sync,
those requests are skipped alike: the client gets no CloseComplete (nor a ReadyForQuery too
many) PostgreSQL would not send, the statement PostgreSQL kept stays on the gateway's books, and
a statement never created is not there."""

from __future__ import annotations

import pytest

from tests.conftest import one_pool, upstream_entry
from tests.wire import FLUSH, SYNC, Raw, ask, bind, close, execute, parse, query


DIV0 = "SELECT 1 / (random() * 0)::int"  # fails when executed (1/0 would fail at Bind, when planned)


def kinds(replies) -> bytes:
    return b"".join(t for t, _ in replies)


def still_there(c: Raw, name: str) -> None:
    """``name`` still exists for the client, as in PostgreSQL: running it fails with its own
    division by zero, not with 26000 (no such statement)."""
    c.send(bind(stmt=name), execute(), SYNC)
    got = c.until(b"Z")
    assert kinds(got) == b"2EZ", got
    assert b"22012" in got[1][1], got


# --------------------------------------------------------------------------- skipped to Sync


@pytest.mark.parametrize("request_", ["close", "deallocate", "parse"])
def test_what_the_gateway_answers_itself_is_skipped_like_postgresql_after_an_error(pg, gw_factory, request_):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("s1", DIV0), bind(stmt="s1"), execute(), FLUSH)
    assert kinds(a.until(b"E")) == b"12E"  # the server now ignores everything up to Sync
    a.send({"close": close(b"S", "s1"), "deallocate": query("DEALLOCATE s1"),
            "parse": parse("s2", DIV0)}[request_])
    a.send(SYNC)
    assert kinds(a.until(b"Z")) == b"Z"  # nothing for the skipped request: only the Sync's answer
    still_there(a, "s1")
    if request_ == "parse":  # never created
        a.send(bind(stmt="s2"), execute(), SYNC)
        got = a.until(b"Z")
        assert kinds(got) == b"EZ" and b"26000" in got[0][1], got
    a.close()
    assert ask(gw, "SELECT 44") == (44,)


def test_a_close_pipelined_behind_an_error_keeps_the_statement(pg, gw_factory):
    gw = one_pool(gw_factory, pg)
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("s1", DIV0), SYNC)
    assert kinds(a.until(b"Z")) == b"1Z"
    a.send(bind(stmt="s1"), execute(), close(b"S", "s1"), SYNC)  # the Close is queued before the error arrives
    assert kinds(a.until(b"Z")) == b"2EZ"
    still_there(a, "s1")
    a.close()


def test_an_eviction_the_server_skips_keeps_the_statement_on_the_books(pg, gw_factory):
    """max_prepared_statements = 1: each new text evicts the last one (a Close the client never
    sees). Pipelined behind an error, that Close is skipped by the server, which keeps the
    statement: preparing the text again must not collide with it (42P05)."""
    gw = gw_factory(settings={"pool_mode": "transaction", "default_pool_size": 1, "max_prepared_statements": 1},
                    databases={"postgres": upstream_entry(pg)})
    a = Raw(gw, "postgres", "postgres")
    a.send(parse("x", DIV0), bind(stmt="x"), execute(), parse("s2", "SELECT 2"), SYNC)  # s2's eviction of x is skipped
    assert kinds(a.until(b"Z")) == b"12EZ"
    a.close()
    b = Raw(gw, "postgres", "postgres")
    b.send(parse("y", DIV0), bind(stmt="y"), execute(), SYNC)
    got = b.until(b"Z")
    assert kinds(got) == b"12EZ" and b"22012" in got[2][1], got
    b.close()
