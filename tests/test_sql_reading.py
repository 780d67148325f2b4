"""The gateway reads SQL as PostgreSQL reads it, so that what the rules judge and what the masks
cover is what the server runs (the demo's agent behind the shipped rules):

1. ``standard_conforming_strings`` stays on (with it off, ``'\\'`` would end a string for the
   analyzer but not for the server): SET, set_config and a startup parameter that would turn
   it off are refused.
2. Client-only encodings (SJIS, BIG5, GBK, GB18030, UHC, JOHAB), where a two-byte character's
   second byte may be a backslash, are refused at login and in SET; SQL in an ASCII-safe
   encoding such as LATIN1 is decoded as the server decodes it, portal names included.
3. EXPLAIN takes the last of repeated ANALYZE options, as PostgreSQL does.
4. ``c.row_to_json`` is ``row_to_json(c)`` when ``c`` has no such column (functional notation):
   the row is read masked.
5. Column lineage binds a name to the FROM item PostgreSQL binds it to: ``p.*::text`` is named
   ``p`` (not ``text``), ``unnest`` of an array of rows expands to the row's columns, and a set
   operation takes its column names from its left branch.

Without rules there is nothing to read SQL for, and these settings pass through.
"""

from __future__ import annotations

import psycopg
import pytest

from pooler.sql.analyzer import analyze
from pooler.sql.lexing import codec, unsafe_session, unsafe_value
from tests.conftest import send_until_closed
from tests.masking_helpers import assert_no_secret
from tests.wire import SYNC, Raw, msg, parse, query


def agent(gw, **kw):
    return psycopg.connect(gw.dsn(user="agent", dbname="shop", **kw), autocommit=True)


def _items(pg, db, order_id: int) -> int:
    return int(pg.psql(f"SELECT count(*) FROM order_items WHERE order_id = {order_id}", dbname=db).strip())


def masked_or_refused(gw, sql: str, raw) -> None:
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


# --------------------------------------------------------------------------- standard_conforming_strings


def test_standard_conforming_strings_cannot_be_turned_off(pg, demo_shop, shop_gw, raw_pii):
    before = _items(pg, demo_shop, 6)
    assert before > 0
    with agent(shop_gw) as c:
        _refused(c, "SET standard_conforming_strings = off", "0A000", "standard_conforming_strings")
        _refused(c, "SET LOCAL standard_conforming_strings TO false", "0A000", "standard_conforming_strings")
        _refused(c, "SELECT set_config('standard_conforming_strings', 'off', false)", "0A000", "set_config")
        _refused(c, "SELECT 1; SET standard_conforming_strings = 0", "0A000")
        c.execute("SET standard_conforming_strings = on")  # harmless: allowed
        # what the bypass sent next is one SELECT of two constants, and runs as exactly that
        rows = c.execute(r"SELECT '\' AS x, '; DELETE FROM order_items WHERE order_id = 6; --'").fetchall()
        assert rows == [("\\", "; DELETE FROM order_items WHERE order_id = 6; --")]
        rows = c.execute(r"SELECT '\' AS x, '; SELECT email, ssn, card_number FROM customers; --'").fetchall()
        assert_no_secret(repr(rows), raw_pii)
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
    assert _items(pg, demo_shop, 6) == before


def test_standard_conforming_strings_off_sent_in_a_pipeline_never_takes_effect(pg, demo_shop, shop_gw):
    """The refusal is decided before anything reaches the server, so a statement pipelined
    behind the SET (sent before the SET's answer came back) is still read correctly."""
    before = _items(pg, demo_shop, 6)
    c = Raw(shop_gw, "agent")
    try:
        c.send(query(b"SET standard_conforming_strings = off"),
               query(rb"SELECT '\' AS x, '; DELETE FROM order_items WHERE order_id = 6; --'"))
        first = c.until_ready()
        assert any(t == b"E" and b"0A000" in body for t, body in first)
        second = c.until_ready()
        assert not any(t == b"E" for t, _ in second)
        assert any(t == b"C" and body.startswith(b"SELECT 1") for t, body in second)
    finally:
        c.close()
    assert _items(pg, demo_shop, 6) == before


def test_standard_conforming_strings_off_at_login_is_refused(shop_gw):
    from pooler.protocol import messages as m

    data = send_until_closed(shop_gw, m.startup_message(
        {"user": "agent", "database": "shop", "standard_conforming_strings": "off"}))
    assert data[:1] == b"E" and b"0A000" in data and b"standard_conforming_strings" in data


# --------------------------------------------------------------------------- client encodings


@pytest.mark.parametrize("enc", ["SJIS", "BIG5", "GBK", "GB18030", "UHC", "JOHAB", "Shift_JIS", "win932"])
def test_client_only_encodings_are_refused_at_login(shop_gw, enc):
    with pytest.raises(psycopg.OperationalError) as ei:
        agent(shop_gw, client_encoding=enc)
    assert "client_encoding" in str(ei.value) and "UTF8" in str(ei.value)


def test_client_only_encodings_cannot_be_set(pg, demo_shop, shop_gw, raw_pii):
    before = _items(pg, demo_shop, 4)
    with agent(shop_gw) as c:
        _refused(c, "SET client_encoding = 'SJIS'", "0A000", "client_encoding")
        _refused(c, "SET NAMES 'big5'", "0A000", "client_encoding")
        _refused(c, "SET client_encoding TO 'windows-936'", "0A000", "client_encoding")
        _refused(c, "SELECT set_config('client_encoding', 'SJIS', false)", "0A000", "set_config")
        c.execute("SET client_encoding = 'LATIN1'")  # bytes below 0x80 are ASCII: safe
        c.execute("SET client_encoding = 'UTF8'")
        assert c.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    # the SJIS bypass as UTF-8 is one string constant, and stays one
    c = Raw(shop_gw, "agent")
    try:
        rows = c.run(query(b"SELECT E'\xc3\x81\\'; DELETE FROM order_items WHERE order_id = 4; --'"))
        assert not any(t == b"E" for t, _ in rows)
    finally:
        c.close()
    assert _items(pg, demo_shop, 4) == before


def test_sql_in_an_ascii_safe_client_encoding_is_read_as_the_server_reads_it(shop_gw, raw_pii):
    """LATIN1 bytes above 0x7f are not UTF-8: they are decoded as the server decodes them, and such
    statements run (masked, or refused by the rules) like any other."""
    with agent(shop_gw, client_encoding="LATIN1") as c:
        assert c.execute("SELECT 'café' AS x").fetchone() == ("café",)
        rows = c.execute("SELECT email AS \"é\" FROM customers WHERE city <> 'Zürich' ORDER BY id LIMIT 3").fetchall()
        assert len(rows) == 3
        assert_no_secret(repr(rows), raw_pii)  # still masked
        _refused(c, "DELETE FROM orders WHERE note = 'é'", "42501", "20_agents")


def test_a_gateway_without_rules_passes_these_settings_through(pg, demo_shop, gw_factory):
    """Without rules there is nothing to read SQL for: PgBouncer's behaviour."""
    from tests.conftest import upstream_entry

    gw = gw_factory(databases={"shop": upstream_entry(pg, demo_shop)})
    with psycopg.connect(gw.dsn(dbname="shop"), autocommit=True) as c:
        c.execute("SET standard_conforming_strings = off")
        assert c.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        c.execute("SET standard_conforming_strings = on")


# --------------------------------------------------------------------------- EXPLAIN (ANALYZE ..., ANALYZE ...)


def test_the_last_analyze_option_of_explain_counts(pg, demo_shop, shop_gw, raw_pii):
    before = _items(pg, demo_shop, 5)
    with agent(shop_gw) as c:
        _refused(c, "EXPLAIN (ANALYZE false, ANALYZE true) DELETE FROM order_items WHERE order_id = 5",
                 "42501", "20_agents")
        msg = ""
        try:
            c.execute("EXPLAIN (ANALYZE off, ANALYZE on) SELECT email::int FROM customers")
        except psycopg.Error as e:
            msg = str(e)
        assert_no_secret(msg, raw_pii)
        # ANALYZE true, then false: only planned, as PostgreSQL does
        c.execute("EXPLAIN (ANALYZE true, ANALYZE false) SELECT count(*) FROM products")
    assert _items(pg, demo_shop, 5) == before


# --------------------------------------------------------------------------- functional notation


@pytest.mark.parametrize("sql", [
    "SELECT c.row_to_json FROM customers c ORDER BY id LIMIT 5",
    "SELECT public.customers.to_jsonb FROM public.customers ORDER BY id LIMIT 5",
    "SELECT c.concat, c.json_build_array FROM customers c ORDER BY id LIMIT 5",
    "SELECT c.row_to_json::text AS t FROM customers c ORDER BY id LIMIT 5",
    "SELECT cc.to_json FROM customer_contacts cc LIMIT 5",
    "SELECT p.row_to_json FROM payments p ORDER BY p.id LIMIT 5",
])
def test_functional_notation_reads_the_row_masked(shop_gw, raw_pii, sql):
    masked_or_refused(shop_gw, sql, raw_pii)


def test_functional_notation_reads_the_row_masked_in_binary(shop_gw, raw_pii):
    with agent(shop_gw) as c:
        rows = c.cursor(binary=True).execute("SELECT c.to_jsonb FROM customers c ORDER BY id LIMIT 5").fetchall()
    assert rows
    assert_no_secret(repr(rows), raw_pii)


def test_real_columns_named_through_their_table_stay_plain(shop_gw):
    """Only names that are not columns are read as function calls."""
    with agent(shop_gw) as c:
        rows = c.execute("SELECT p.name, products.price FROM products p, LATERAL (SELECT 1) x, "
                         "products ORDER BY p.id LIMIT 1").fetchall()
    assert rows and isinstance(rows[0][0], str)


def test_releasing_advisory_locks_is_a_write_for_agents(shop_gw):
    with agent(shop_gw) as c:
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


# --------------------------------------------------------------------------- portal names in LATIN1


def test_a_masked_portal_named_in_latin1_cannot_be_fetched(shop_gw, raw_pii):
    select = "SELECT email, ssn FROM customers ORDER BY id"
    c = Raw(shop_gw, "agent", client_encoding="LATIN1")
    try:
        c.run(query(b"BEGIN"))
        got = c.run(parse(b"", select), msg(b"B", b"\xe9\x00\x00\x00\x00\x00\x00\x00\x00"),
                    msg(b"E", b"\xe9\x00\x00\x00\x00\x01"), SYNC)
        assert any(t == b"D" for t, _ in got)
        rows = c.run(query('FETCH 3 FROM "\xe9"'.encode("latin-1")))
        assert_no_secret(repr(rows), raw_pii)
        assert any(t == b"E" and b"42501" in body for t, body in rows)
        c.run(query(b"ROLLBACK"))
    finally:
        c.close()


# --------------------------------------------------------------------------- lineage names


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
def test_computed_columns_are_traced_to_the_right_relation(shop_gw, raw_pii, sql):
    masked_or_refused(shop_gw, sql, raw_pii)
