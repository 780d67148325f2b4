"""Masked statements and portals over the extended protocol. The masks of a statement or a
portal last exactly as long as the server keeps what they belong to (a Parse or Bind that fails
on a taken name, a Close or CLOSE the server skips after an error, a portal bound behind a Sync,
a portal read with SQL FETCH), and every reply is masked with its own request's plan, also when
PostgreSQL skips requests up to Sync after an error."""

from __future__ import annotations

import pytest

from pooler.protocol import messages as m
from tests.masking_helpers import MASKED, assert_no_secret, masking_gw
from tests.wire import FLUSH, SYNC, Raw, bind, describe, execute, msg, parse, query, shown


# --------------------------------------------------------------------------- portals


@pytest.mark.parametrize("fetch_via", ["simple", "extended"])
def test_sql_fetch_from_a_masked_protocol_portal(shop_gw, raw_pii, fetch_via):
    """A portal bound from a masked statement (Bind, kept open by a transaction) can be read with
    SQL FETCH: FETCH has no masked columns, so its rows are not masked."""
    c = Raw(shop_gw, "agent")
    try:
        c.run(query("BEGIN"))
        r = c.run(parse(b"s1", "SELECT email, ssn FROM customers ORDER BY id LIMIT 3"), bind(b"p1", b"s1"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        if fetch_via == "simple":
            got = c.run(query("FETCH ALL FROM p1"))
        else:
            got = c.run(parse(b"", "FETCH ALL FROM p1"), bind(b"", b""),
                        msg(b"E", b"\x00\x00\x00\x00\x00"), SYNC)
        c.run(query("ROLLBACK"))
    finally:
        c.close()
    assert_no_secret(shown(got), raw_pii)


def test_portal_bound_before_an_earlier_ready_for_query_stays_masked(pg, demo_shop, gw_factory, raw_pii):
    """ServerConn.data_received clears client.mask_portals at every ReadyForQuery 'I', even when
    requests sent after that Sync are still queued. A Bind of a masked statement sent behind the
    Sync (then Flush, Execute later) creates a live portal whose masks are dropped by the earlier
    ReadyForQuery: its Execute streams raw rows."""
    gw = masking_gw(pg, demo_shop, gw_factory)
    c = Raw(gw, "agent")
    try:
        c.s.sendall(parse(b"", MASKED) + bind(b"", b"") + execute() + SYNC + bind(b"", b"") + FLUSH)
        first = c.until_ready()
        assert_no_secret(repr([b for t, b in first if t == b"D"]), raw_pii)
        t, _ = c.read()
        assert t == b"2"  # BindComplete of the second portal (bound in a new implicit transaction)
        c.s.sendall(execute() + SYNC)
        rows = [b for t, b in c.until_ready() if t == b"D"]
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw_pii)
    finally:
        c.close()


# --------------------------------------------------------------------------- statement names


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_reused_statement_name_replaces_the_lineage(pg, demo_shop, gw_factory, raw_pii, mode):
    """A Parse that reuses a statement name fails (on the server in session mode, by the
    gateway's 42P05 in transaction mode) and the first statement stays what runs, but _govern
    has already replaced mask_stmts[name] with the masks *and lineage* of the new text. The
    old statement's rows are planned with the new statement's lineage: its computed
    upper(email) sits where the new text has the unmasked column city."""
    gw = masking_gw(pg, demo_shop, gw_factory, pool_mode=mode)
    c = Raw(gw, "agent")
    try:
        r = c.run(parse(b"s1", "SELECT upper(email) AS a, upper(ssn) AS b FROM customers ORDER BY id LIMIT 3"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        r = c.run(parse(b"s1", "SELECT city, phone FROM customers"), SYNC)
        assert any(t == b"E" for t, _ in r), r  # the name is taken
        got = c.run(bind(b"", b"s1"), execute(), SYNC)
    finally:
        c.close()
    assert [t for t, _ in got].count(b"D") == 3, got
    assert_no_secret(shown(got), raw_pii)


def test_reparsing_a_masked_statement_name_keeps_its_key_flat(pg, demo_shop, gw_factory, raw_pii):
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
    gw = masking_gw(pg, demo_shop, gw_factory, pool_mode="session")
    c = Raw(gw, "agent")
    try:
        c.run(parse(b"s", MASKED), SYNC)
        c.s.sendall((parse(b"s", "SELECT 1") + SYNC) * 500)
        for _ in range(500):
            assert any(t == b"E" for t, _ in c.until_ready())  # the name is taken
        rows = [b for t, b in c.run(bind(b"", b"s"), execute(), SYNC) if t == b"D"]
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw_pii)
    finally:
        c.close()


# --------------------------------------------------------------------------- masks forgotten before the server confirms


def _masked_portal_behind_a_savepoint(c: Raw) -> None:
    """In a transaction: protocol portal p1 bound from the masked statement s1, then SAVEPOINT s."""
    c.run(query("BEGIN"))
    r = c.run(parse(b"s1", MASKED), bind(b"p1", b"s1"), SYNC)
    assert not any(t == b"E" for t, _ in r), r
    c.run(query("SAVEPOINT s"))


def test_close_cursor_that_never_ran_forgets_the_portal_masks(shop_gw, raw_pii):
    """CLOSE p1 is accepted by the gateway, which forgets p1's masks at once; the server never
    runs it (an earlier statement of the same Query fails). After ROLLBACK TO SAVEPOINT the
    protocol portal p1 (bound before the savepoint) is still open, and FETCH is no longer
    refused: its rows are not masked."""
    c = Raw(shop_gw, "agent")
    try:
        _masked_portal_behind_a_savepoint(c)
        c.run(query("SELECT 1/0; CLOSE p1"))
        c.run(query("ROLLBACK TO s"))
        got = c.run(query("FETCH ALL FROM p1"))
        c.run(query("ROLLBACK"))
    finally:
        c.close()
    errs = [m.parse_error_fields(body) for t, body in got if t == b"E"]
    # the portal's masks stay until its transaction ends, so FETCH of it is refused
    assert errs and errs[0]["C"] == "42501" and "p1" in errs[0]["M"], got
    assert_no_secret(shown(got), raw_pii)


def test_close_message_skipped_after_an_error_forgets_the_statement_masks(pg, demo_shop, gw_factory, raw_pii):
    """Session mode: a Close('S') is taken as done when it is forwarded. After an error in the
    same batch PostgreSQL skips it up to Sync, so the masked statement s1 stays on the server
    while the gateway forgot its masks: Bind s1 / Execute sends raw rows."""
    gw = masking_gw(pg, demo_shop, gw_factory, pool_mode="session")
    c = Raw(gw, "agent")
    try:
        r = c.run(parse(b"s1", "SELECT email, ssn, card_number FROM customers ORDER BY id LIMIT 3"), SYNC)
        assert not any(t == b"E" for t, _ in r), r
        r = c.run(parse(b"", "SELECT 1/0"), bind(b"", b""), execute(), msg(b"C", b"Ss1\x00"), SYNC)
        assert any(t == b"E" for t, _ in r), r
        got = c.run(bind(b"", b"s1"), execute(), SYNC)
    finally:
        c.close()
    assert [t for t, _ in got].count(b"D") == 3, got
    assert_no_secret(shown(got), raw_pii)


def test_failing_bind_of_a_taken_portal_name_forgets_its_masks(shop_gw, raw_pii):
    """Bind of an unmasked statement to the name of an open masked portal fails on the server
    (the portal exists) but _bind_masks has already dropped the portal's masks; after
    ROLLBACK TO SAVEPOINT the masked portal is still open and Execute sends raw rows."""
    c = Raw(shop_gw, "agent")
    try:
        _masked_portal_behind_a_savepoint(c)
        r = c.run(parse(b"s2", "SELECT 'a'::text, 'b'::text, 'c'::text"), bind(b"p1", b"s2"), SYNC)
        assert any(t == b"E" for t, _ in r), r  # portal p1 already exists
        c.run(query("ROLLBACK TO s"))
        got = c.run(execute(b"p1"), SYNC)
        c.run(query("ROLLBACK"))
    finally:
        c.close()
    assert [t for t, _ in got].count(b"D") == 3, got
    assert_no_secret(shown(got), raw_pii)


# --------------------------------------------------------------------------- replies kept in order after an error


def test_execute_after_an_error_leaves_a_stale_describe_that_captures_the_next_result(shop_gw, raw_pii):
    """After an ErrorResponse PostgreSQL ignores everything up to Sync. An Execute of a (stale)
    masked portal sent after the error reached the gateway queues R_DESCRIBE_MASK + R_EXECUTE
    that never get a reply; the next query's RowDescription is swallowed by the stale entry
    (the client gets DataRows without a RowDescription) and planned with the stale statement's
    masks (only e-mail), so its phone, ssn and card numbers are sent raw."""
    c = Raw(shop_gw, "agent")
    try:
        c.run(parse(b"s1", "SELECT email FROM customers ORDER BY id LIMIT 2"), bind(b"p1", b"s1"), SYNC)
        c.s.sendall(parse(b"", "SELECT no_such_column FROM customers") + msg(b"H", b""))
        assert c.read()[0] == b"E"
        c.run(msg(b"E", b"p1\x00\x00\x00\x00\x00"), SYNC)
        got = c.run(query("SELECT phone, ssn, card_number FROM customers ORDER BY id LIMIT 2"))
    finally:
        c.close()
    kinds = [t for t, _ in got]
    assert_no_secret(shown(got), raw_pii)
    assert kinds[0] == b"T", f"reply without RowDescription: {kinds}"


def test_a_skipped_query_does_not_shift_masking_to_the_wrong_reply(shop_gw, raw_pii):
    """After an error in a batch ended by Flush, PostgreSQL skips a simple Query up to the Sync;
    the gateway took the Sync's ReadyForQuery for the Query's, and the next masked result met
    the Sync's queue entry: no masking plan, rows in clear."""
    c = Raw(shop_gw, "agent")
    try:
        c.send(parse(b"", "SELECT 1/0"), bind(), execute(), FLUSH)
        while c.read()[0] != b"E":
            pass
        c.run(query(b"SELECT 1"), SYNC)
        rows = c.run(query(b"SELECT email, full_name FROM customers ORDER BY id LIMIT 3"))
        assert sum(1 for t, _ in rows if t == b"D") == 3
        assert_no_secret(repr(rows), raw_pii)
        rows = c.run(parse(b"", "SELECT email, full_name FROM customers ORDER BY id LIMIT 3"), bind(),
                     describe(b"P"), execute(), SYNC)
        assert sum(1 for t, _ in rows if t == b"T") == 1
        assert_no_secret(repr(rows), raw_pii)
    finally:
        c.close()
