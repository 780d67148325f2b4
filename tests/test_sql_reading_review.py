"""A security review of how the gateway reads SQL (2026-11-30), as the demo's agent. Each
end-to-end test here failed on the reviewed code (e4e514f): the gateway and PostgreSQL read
the same text differently, so a write or personal data got past the shipped rules.

1. ``SET standard_conforming_strings = off``: ``'\\'`` ends a string for pglast, not for the
   server, so the rest of the text ran unseen.
2. A client-only encoding (SJIS, BIG5, GBK, GB18030, UHC, JOHAB): a two-byte character's second
   byte may be a backslash; the gateway read the bytes as UTF-8.
3. ``EXPLAIN (ANALYZE false, ANALYZE true)``: the gateway took the first option, PostgreSQL
   the last, so the statement ran (a DELETE, or a cast whose error echoes a masked value).
4. ``c.row_to_json`` is ``row_to_json(c)`` when ``c`` has no such column (functional notation):
   the gateway saw a column named row_to_json, nothing to mask.

A second round (after these were fixed) found, among others:

5. a row value cast to regclass/regtype fails with SQLSTATE class 42, whose messages the
   gateway passed through as "about the statement text": ``relation "137-11-8919" does not
   exist``;
6. in a LATIN1 session a masked portal named ``é`` was recorded as the Bind's bytes but looked
   up as the UTF-8 bytes of the name in ``FETCH ... FROM "é"``, which then read it unmasked;
7. column lineage bound a name to the wrong FROM item, so a computed column carried no masked
   source: ``p.*::text`` is named ``p`` (not ``text``), ``unnest`` of an array of rows expands
   to the row's columns, and a set operation takes its column names from its left branch.
"""

from __future__ import annotations

import psycopg
import pytest

from pooler.sql.analyzer import analyze
from pooler.sql.lexing import codec, unsafe_session, unsafe_value
from tests.conftest import send_until_closed
from tests.test_masking_review import Raw, _msg, _parse, assert_no_secret, raw  # noqa: F401
from tests.test_masking_review2 import _gw
from tests.test_masking_review4 import shop  # noqa: F401 - fixture

SYNC = _msg(b"S", b"")


def _q(sql: bytes) -> bytes:
    return _msg(b"Q", sql + b"\x00")


@pytest.fixture
def agw(pg, shop, gw_factory):  # noqa: F811
    return _gw(pg, shop, gw_factory)


def agent(gw, **kw):
    return psycopg.connect(gw.dsn(user="agent", dbname="shop", **kw), autocommit=True)


def _items(pg, shop, order_id: int) -> int:  # noqa: F811
    return int(pg.psql(f"SELECT count(*) FROM order_items WHERE order_id = {order_id}", dbname=shop).strip())


def masked_or_refused(gw, sql: str, raw) -> None:  # noqa: F811
    """The agent's rows come back without a raw personal value; refusing is fine too, leaking
    (in the rows or in an error message) is not."""
    with agent(gw) as c:
        try:
            rows = c.execute(sql).fetchall()
        except psycopg.Error as e:
            assert_no_secret(str(e), raw)
            return
    assert rows
    assert_no_secret(repr(rows), raw)


def _refused(conn, sql: str, sqlstate: str, *words: str) -> str:
    with pytest.raises(psycopg.Error) as ei:
        conn.execute(sql)
    assert ei.value.sqlstate == sqlstate, (sql, ei.value.sqlstate, str(ei.value))
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))
    return str(ei.value)


# --------------------------------------------------------------------------- 1. standard_conforming_strings


def test_standard_conforming_strings_cannot_be_turned_off(pg, shop, agw, raw):  # noqa: F811
    before = _items(pg, shop, 6)
    assert before > 0
    with agent(agw) as c:
        _refused(c, "SET standard_conforming_strings = off", "0A000", "standard_conforming_strings")
        _refused(c, "SET LOCAL standard_conforming_strings TO false", "0A000", "standard_conforming_strings")
        _refused(c, "SELECT set_config('standard_conforming_strings', 'off', false)", "0A000", "set_config")
        _refused(c, "SELECT 1; SET standard_conforming_strings = 0", "0A000")
        c.execute("SET standard_conforming_strings = on")  # harmless: allowed
        # what the bypass sent next is one SELECT of two constants, and runs as exactly that
        rows = c.execute(r"SELECT '\' AS x, '; DELETE FROM order_items WHERE order_id = 6; --'").fetchall()
        assert rows == [("\\", "; DELETE FROM order_items WHERE order_id = 6; --")]
        rows = c.execute(r"SELECT '\' AS x, '; SELECT email, ssn, card_number FROM customers; --'").fetchall()
        assert_no_secret(repr(rows), raw)
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
    assert _items(pg, shop, 6) == before


def test_standard_conforming_strings_off_sent_in_a_pipeline_never_takes_effect(pg, shop, agw):  # noqa: F811
    """The refusal is decided before anything reaches the server, so a statement pipelined
    behind the SET (sent before the SET's answer came back) is still read correctly."""
    before = _items(pg, shop, 6)
    c = Raw(agw, "agent")
    try:
        c.send(_q(b"SET standard_conforming_strings = off"),
               _q(rb"SELECT '\' AS x, '; DELETE FROM order_items WHERE order_id = 6; --'"))
        first = c.until_ready()
        assert any(t == b"E" and b"0A000" in body for t, body in first)
        second = c.until_ready()
        assert not any(t == b"E" for t, _ in second)
        assert any(t == b"C" and body.startswith(b"SELECT 1") for t, body in second)
    finally:
        c.close()
    assert _items(pg, shop, 6) == before


def test_standard_conforming_strings_off_at_login_is_refused(agw):
    from pooler.protocol import messages as m

    data = send_until_closed(agw, m.startup_message(
        {"user": "agent", "database": "shop", "standard_conforming_strings": "off"}))
    assert data[:1] == b"E" and b"0A000" in data and b"standard_conforming_strings" in data


# --------------------------------------------------------------------------- 2. client encodings


@pytest.mark.parametrize("enc", ["SJIS", "BIG5", "GBK", "GB18030", "UHC", "JOHAB", "Shift_JIS", "win932"])
def test_client_only_encodings_are_refused_at_login(agw, enc):
    with pytest.raises(psycopg.OperationalError) as ei:
        agent(agw, client_encoding=enc)
    assert "client_encoding" in str(ei.value) and "UTF8" in str(ei.value)


def test_client_only_encodings_cannot_be_set(pg, shop, agw, raw):  # noqa: F811
    before = _items(pg, shop, 4)
    with agent(agw) as c:
        _refused(c, "SET client_encoding = 'SJIS'", "0A000", "client_encoding")
        _refused(c, "SET NAMES 'big5'", "0A000", "client_encoding")
        _refused(c, "SET client_encoding TO 'windows-936'", "0A000", "client_encoding")
        _refused(c, "SELECT set_config('client_encoding', 'SJIS', false)", "0A000", "set_config")
        c.execute("SET client_encoding = 'LATIN1'")  # bytes below 0x80 are ASCII: safe
        c.execute("SET client_encoding = 'UTF8'")
        assert c.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    # the SJIS bypass as UTF-8 is one string constant, and stays one
    c = Raw(agw, "agent")
    try:
        rows = c.run(_q(b"SELECT E'\xc3\x81\\'; DELETE FROM order_items WHERE order_id = 4; --'"))
        assert not any(t == b"E" for t, _ in rows)
    finally:
        c.close()
    assert _items(pg, shop, 4) == before


def test_sql_in_an_ascii_safe_client_encoding_is_read_as_the_server_reads_it(agw, raw):  # noqa: F811
    """LATIN1 bytes above 0x7f are not UTF-8: the gateway used to refuse such statements."""
    with agent(agw, client_encoding="LATIN1") as c:
        assert c.execute("SELECT 'café' AS x").fetchone() == ("café",)
        rows = c.execute("SELECT email AS \"é\" FROM customers WHERE city <> 'Zürich' ORDER BY id LIMIT 3").fetchall()
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw)  # still masked
        _refused(c, "DELETE FROM orders WHERE note = 'é'", "42501", "20_agents")


def test_a_gateway_without_rules_passes_these_settings_through(pg, shop, gw_factory):  # noqa: F811
    """Without rules there is nothing to read SQL for: PgBouncer's behaviour."""
    from tests.conftest import upstream_entry

    gw = gw_factory(databases={"shop": upstream_entry(pg, shop)})
    with psycopg.connect(gw.dsn(dbname="shop"), autocommit=True) as c:
        c.execute("SET standard_conforming_strings = off")
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        c.execute("SET standard_conforming_strings = on")


# --------------------------------------------------------------------------- 3. EXPLAIN (ANALYZE ..., ANALYZE ...)


def test_the_last_analyze_option_of_explain_counts(pg, shop, agw, raw):  # noqa: F811
    before = _items(pg, shop, 5)
    with agent(agw) as c:
        _refused(c, "EXPLAIN (ANALYZE false, ANALYZE true) DELETE FROM order_items WHERE order_id = 5",
                 "42501", "20_agents")
        msg = ""
        try:
            c.execute("EXPLAIN (ANALYZE off, ANALYZE on) SELECT email::int FROM customers")
        except psycopg.Error as e:
            msg = str(e)
        assert_no_secret(msg, raw)
        # ANALYZE true, then false: only planned, as PostgreSQL does
        c.execute("EXPLAIN (ANALYZE true, ANALYZE false) SELECT count(*) FROM products")
    assert _items(pg, shop, 5) == before


# --------------------------------------------------------------------------- 4. functional notation


@pytest.mark.parametrize("sql", [
    "SELECT c.row_to_json FROM customers c ORDER BY id LIMIT 5",
    "SELECT public.customers.to_jsonb FROM public.customers ORDER BY id LIMIT 5",
    "SELECT c.concat, c.json_build_array FROM customers c ORDER BY id LIMIT 5",
    "SELECT c.row_to_json::text AS t FROM customers c ORDER BY id LIMIT 5",
    "SELECT cc.to_json FROM customer_contacts cc LIMIT 5",
    "SELECT p.row_to_json FROM payments p ORDER BY p.id LIMIT 5",
])
def test_functional_notation_reads_the_row_masked(agw, raw, sql):  # noqa: F811
    masked_or_refused(agw, sql, raw)


def test_functional_notation_reads_the_row_masked_in_binary(agw, raw):  # noqa: F811
    with agent(agw) as c:
        rows = c.cursor(binary=True).execute("SELECT c.to_jsonb FROM customers c ORDER BY id LIMIT 5").fetchall()
    assert rows
    assert_no_secret(repr(rows), raw)


def test_real_columns_named_through_their_table_stay_plain(agw):
    """Only names that are not columns are read as function calls."""
    with agent(agw) as c:
        rows = c.execute("SELECT p.name, products.price FROM products p, LATERAL (SELECT 1) x, "
                         "products ORDER BY p.id LIMIT 1").fetchall()
    assert rows and isinstance(rows[0][0], str)


def test_releasing_advisory_locks_is_a_write_for_agents(agw):
    with agent(agw) as c:
        _refused(c, "SELECT pg_advisory_unlock_all()", "42501", "20_agents")


# --------------------------------------------------------------------------- unit


def test_unsafe_values():
    assert unsafe_value("standard_conforming_strings", "on") is None
    assert unsafe_value("standard_conforming_strings", "TRUE") is None
    for v in ("off", "false", "0", "no", "", None, "of"):
        assert unsafe_value("standard_conforming_strings", v) is not None, v
    for v in ("UTF8", "utf-8", "unicode", "LATIN1", "WIN1252", "EUC_JP", "SQL_ASCII"):
        assert unsafe_value("client_encoding", v) is None, v
    for v in ("SJIS", "Shift_JIS", "shift-jis-2004", "MS_KANJI", "BIG5", "windows-950", "GBK", "GB18030",
              "UHC", "WIN949", "JOHAB", ""):
        assert unsafe_value("client_encoding", v) is not None, v
    assert unsafe_value("search_path", "anything") is None
    assert codec("LATIN1") == "latin_1" and codec("win-1252") == "cp1252" and codec("EUC_JP") == "euc_jp"
    assert codec("UTF8") == codec("SQL_ASCII") == codec(None) == "utf-8"
    assert "é".encode("cp1252").decode(codec("WIN1252")) == "é"
    assert unsafe_session({"client_encoding": "UTF8", "standard_conforming_strings": "on"}) is None
    assert "client_encoding" in unsafe_session({"client_encoding": "SJIS", "standard_conforming_strings": "on"})
    assert unsafe_session({"client_encoding": "", "standard_conforming_strings": ""}) is None  # not known yet


def test_explain_takes_the_last_analyze_option():
    assert analyze("EXPLAIN (ANALYZE false, ANALYZE true) DELETE FROM t")[0].explain_analyze
    assert not analyze("EXPLAIN (ANALYZE true, ANALYZE false) DELETE FROM t")[0].explain_analyze
    assert analyze("EXPLAIN (ANALYZE, ANALYZE off, ANALYZE) DELETE FROM t")[0].read_only is False


def test_qualified_columns_are_recorded_for_the_catalog():
    f = analyze("SELECT c.row_to_json, email, public.orders.x FROM customers c, orders")[0]
    assert set(f.qualified_columns) == {"public.customers.row_to_json", "public.orders.x"}
    assert "qualified_columns" not in f.to_dict()  # not a fact rules read


# --------------------------------------------------------------------------- 5. class 42 at run time


@pytest.mark.parametrize("sql", [
    "SELECT ssn::regclass FROM customers ORDER BY id LIMIT 1",
    "SELECT full_name::regtype FROM customers ORDER BY id LIMIT 1",
    "SELECT card_number::regoper FROM customers ORDER BY id LIMIT 1",
    "SELECT 1 FROM customers WHERE ssn::regrole IS NOT NULL",
])
def test_a_row_value_in_a_catalog_lookup_error_stays_hidden(agw, raw, sql):  # noqa: F811
    with agent(agw) as c:
        with pytest.raises(psycopg.Error) as ei:
            c.execute(sql)
    assert_no_secret(str(ei.value), raw)
    assert "hidden" in str(ei.value)


def test_errors_about_the_statement_text_stay_readable(agw):
    with agent(agw) as c:
        with pytest.raises(psycopg.errors.UndefinedColumn) as ei:
            c.execute("SELECT emial FROM customers")
    assert 'column "emial" does not exist' in str(ei.value)


# --------------------------------------------------------------------------- 6. portal names in LATIN1


def test_a_masked_portal_named_in_latin1_cannot_be_fetched(agw, raw):  # noqa: F811
    select = "SELECT email, ssn FROM customers ORDER BY id"
    c = Raw(agw, "agent", client_encoding="LATIN1")
    try:
        c.run(_q(b"BEGIN"))
        got = c.run(_parse(b"", select), _msg(b"B", b"\xe9\x00\x00\x00\x00\x00\x00\x00\x00"),
                    _msg(b"E", b"\xe9\x00\x00\x00\x00\x01"), SYNC)
        assert any(t == b"D" for t, _ in got)
        rows = c.run(_q('FETCH 3 FROM "\xe9"'.encode("latin-1")))
        assert_no_secret(repr(rows), raw)
        assert any(t == b"E" and b"42501" in body for t, body in rows)
        c.run(_q(b"ROLLBACK"))
    finally:
        c.close()


# --------------------------------------------------------------------------- 7. lineage names


@pytest.mark.parametrize("sql", [
    # p.*::text is named "p": "text" below is the outer (customer row) column
    "SELECT (SELECT text FROM (SELECT p.*::text FROM products p LIMIT 1) s) "
    "FROM (SELECT c::text AS text FROM customers c) o LIMIT 3",
    "SELECT x.r FROM (SELECT 1 AS c) o, LATERAL (SELECT c AS r FROM (SELECT c.*::text FROM customers c) s) x",
    # unnest of an array of customer rows has the customers' columns
    "SELECT x.* FROM (SELECT 1 AS ssn, 2 AS card_number) o, "
    "LATERAL (SELECT ssn, card_number FROM unnest(ARRAY(SELECT c FROM customers c)) u) x",
    # a UNION is named after its left branch, whose columns are not known here
    "SELECT x.r FROM (SELECT 'harmless' AS email) o, LATERAL (SELECT email AS r FROM ("
    "SELECT * FROM jsonb_populate_record(null::customers, (SELECT to_jsonb(c) FROM customers c LIMIT 1)) "
    "UNION ALL SELECT 1,'','','','','',null,'',now()) s) x",
])
def test_computed_columns_are_traced_to_the_right_relation(agw, raw, sql):  # noqa: F811
    masked_or_refused(agw, sql, raw)


# --------------------------------------------------------------------------- 8. replies kept in order


def test_a_skipped_query_does_not_shift_masking_to_the_wrong_reply(agw, raw):  # noqa: F811
    """After an error in a batch ended by Flush, PostgreSQL skips a simple Query up to the Sync;
    the gateway took the Sync's ReadyForQuery for the Query's, and the next masked result met
    the Sync's queue entry: no masking plan, rows in clear."""
    bind = _msg(b"B", b"\x00\x00" + b"\x00\x00" * 3)
    execute = _msg(b"E", b"\x00\x00\x00\x00\x00")
    c = Raw(agw, "agent")
    try:
        c.send(_parse(b"", "SELECT 1/0"), bind, execute, _msg(b"H", b""))
        while c.read()[0] != b"E":
            pass
        c.run(_q(b"SELECT 1"), SYNC)
        rows = c.run(_q(b"SELECT email, full_name FROM customers ORDER BY id LIMIT 3"))
        assert sum(1 for t, _ in rows if t == b"D") == 3
        assert_no_secret(repr(rows), raw)
        rows = c.run(_parse(b"", "SELECT email, full_name FROM customers ORDER BY id LIMIT 3"), bind,
                     _msg(b"D", b"P\x00"), execute, SYNC)
        assert sum(1 for t, _ in rows if t == b"T") == 1
        assert_no_secret(repr(rows), raw)
    finally:
        c.close()
