"""Masking plans, the DataRow rewriter, error scrubbing and the catalog, without a database."""

from __future__ import annotations

import struct

import orjson
import pytest

from pooler.masking.catalog import Catalog
from pooler.masking.plan import MaskCtx, MaskingError, build_template, plan_for, scrub_message
from pooler.sql.analyzer import analyze
from pooler.protocol import messages as m

CUSTOMERS = ["id", "full_name", "email", "phone", "card_number", "ssn", "birth_date", "city"]
MASKS = (("public.customers.email", "email"), ("public.customers.phone", "partial"),
         ("public.customers.full_name", "hash"), ("public.customers.birth_date", "null"))


def catalog(udfs=("leak",)) -> Catalog:
    def attrs(names):
        return orjson.dumps([[i + 1, n] for i, n in enumerate(names)])
    rels = [
        [b"16400", b"public", b"customers", b"r", attrs(CUSTOMERS), None],
        [b"16410", b"public", b"orders", b"r", attrs(["id", "customer_id", "total"]), None],
        [b"16420", b"public", b"contacts", b"v", attrs(["id", "mail", "shout"]),
         b" SELECT c.id, c.email AS mail, upper(c.phone) AS shout FROM public.customers c;"],
        [b"16430", b"public", b"opaque", b"v", attrs(["x"]), b"this is not sql"],
    ]
    procs = [[b"public", name.encode()] for name in udfs]
    return Catalog.from_results([rels, [[b"25", b"S"], [b"16500", b"S"]], procs, []], version=1)


def rowdesc(*fields) -> bytes:
    """fields: (name, table_oid, attnum, type_oid, format)"""
    body = struct.pack("!h", len(fields))
    for name, oid, attnum, typ, fmt in fields:
        body += name.encode() + b"\x00" + struct.pack("!ihihih", oid, attnum, typ, -1, -1, fmt)
    return body


def datarow(*vals) -> bytes:
    body = struct.pack("!h", len(vals))
    for v in vals:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return b"D" + struct.pack("!i", len(body) + 4) + body


def ctx_for(sql: str, masks=MASKS, cat=None) -> MaskCtx:
    cat = cat or catalog()
    return MaskCtx(masks, cat.lineage(sql, ("public",)), cat, "rules/40_pii.star", (sql, ("public",)), {})


def rewrite(ctx, rd, row, index=0):
    plan = plan_for(ctx, index, rd, b"key")
    if plan is None:
        return None
    return m.parse_data_row(plan.rewrite(row, 0, len(row))[5:]), plan


def test_direct_columns_get_their_methods_and_others_pass_byte_identical():
    ctx = ctx_for("SELECT id, email, phone, city, birth_date FROM customers")
    rd = rowdesc(("id", 16400, 1, 23, 0), ("email", 16400, 3, 25, 0), ("phone", 16400, 4, 25, 0),
                 ("city", 16400, 8, 25, 0), ("birth_date", 16400, 7, 1082, 0))
    row = datarow(b"7", b"ann@example.com", b"+1-555-0107", b"Oslo", b"1990-01-02")
    (vals, plan) = rewrite(ctx, rd, row)
    assert vals == [b"7", b"***@example.com", b"*******0107", b"Oslo", None]
    assert plan.report() == [("public.customers.email", "email", 1), ("public.customers.phone", "partial", 1),
                             ("public.customers.birth_date", "null", 1)]


def test_computed_columns_are_redacted_not_partially_revealed():
    ctx = ctx_for("SELECT substr(phone, 1, 3), upper(email), full_name || '' FROM customers")
    rd = rowdesc(("substr", 0, 0, 25, 0), ("upper", 0, 0, 25, 0), ("x", 0, 0, 25, 0))
    vals, _ = rewrite(ctx, rd, datarow(b"+1-", b"ANN@EXAMPLE.COM", b"Ann Lee"))
    assert vals[0] == b"***" and vals[1] == b"***"  # partial/email keep parts: computed -> redact
    assert vals[2].startswith(b"h_")  # hash stays a pseudonym


def test_unknown_origin_is_masked():
    # a table OID the catalog does not know, and a user-defined function's result
    ctx = ctx_for("SELECT leak(id), id FROM customers")
    rd = rowdesc(("leak", 0, 0, 25, 0), ("id", 16400, 1, 23, 0))
    vals, _ = rewrite(ctx, rd, datarow(b"ann@example.com", b"1"))
    assert vals == [b"***", b"1"]
    ctx = ctx_for("SELECT * FROM somewhere_new")
    rd = rowdesc(("a", 99999, 1, 25, 0), ("b", 99999, 2, 23, 0))
    vals, _ = rewrite(ctx, rd, datarow(b"secret", b"5"))
    assert vals == [b"***", None]


def test_positions_not_trusted_when_lineage_and_rowdescription_disagree():
    ctx = ctx_for("SELECT upper(email) FROM customers")
    rd = rowdesc(("a", 0, 0, 25, 0), ("b", 0, 0, 25, 0))  # two fields, lineage knows one
    vals, _ = rewrite(ctx, rd, datarow(b"X", b"Y"))
    assert vals == [b"***", b"***"]


def test_views_are_seen_through():
    ctx = ctx_for("SELECT mail, shout FROM contacts")
    rd = rowdesc(("mail", 16420, 2, 25, 0), ("shout", 16420, 3, 25, 0))
    vals, _ = rewrite(ctx, rd, datarow(b"ann@example.com", b"+1-555-0107"))
    assert vals == [b"***@example.com", b"***"]
    ctx = ctx_for("SELECT x FROM opaque")  # a view whose definition cannot be analyzed
    vals, _ = rewrite(ctx, rowdesc(("x", 16430, 1, 25, 0)), datarow(b"anything"))
    assert vals == [b"***"]


def test_whole_row_reference_is_masked_as_a_whole():
    ctx = ctx_for("SELECT row_to_json(c) FROM customers c")
    vals, _ = rewrite(ctx, rowdesc(("row_to_json", 0, 0, 114, 0)), datarow(b'{"email":"ann@example.com"}'))
    assert vals == [None]  # several methods apply (null among them): NULL


def test_binary_format_and_types():
    ctx = ctx_for("SELECT id, full_name, email FROM customers", masks=(("public.customers.*", "hash"),))
    rd = rowdesc(("id", 16400, 1, 23, 1), ("full_name", 16400, 2, 25, 1), ("email", 16400, 3, 25, 1))
    vals, _ = rewrite(ctx, rd, datarow(struct.pack("!i", 7), b"Ann", b"a@b.c"))
    assert len(vals[0]) == 4  # an int4 pseudonym in binary, still 4 bytes
    assert vals[1].startswith(b"h_")
    text_ctx = ctx_for("SELECT id FROM customers", masks=(("public.customers.*", "hash"),))
    tvals, _ = rewrite(text_ctx, rowdesc(("id", 16400, 1, 23, 0)), datarow(b"7"))
    assert struct.unpack("!i", vals[0])[0] == int(tvals[0])  # text and binary clients agree


def test_pattern_specificity_and_no_mask_means_no_plan():
    masks = (("*.*.*", "detect"), ("public.customers.email", "email"))
    ctx = ctx_for("SELECT email, city FROM customers", masks=masks)
    rd = rowdesc(("email", 16400, 3, 25, 0), ("city", 16400, 8, 25, 0))
    vals, _ = rewrite(ctx, rd, datarow(b"ann@example.com", b"call +1 415 555 2671"))
    assert vals == [b"***@example.com", b"call [phone]"]
    ctx = ctx_for("SELECT id, total FROM orders")
    assert plan_for(ctx, 0, rowdesc(("id", 16410, 1, 23, 0), ("total", 16410, 3, 1700, 0)), b"k") is None


def test_multi_statement_index_selects_the_lineage():
    ctx = ctx_for("SELECT 1; SELECT upper(email) FROM customers")
    assert plan_for(ctx, 0, rowdesc(("?column?", 0, 0, 23, 0)), b"k") is None
    assert plan_for(ctx, 1, rowdesc(("upper", 0, 0, 25, 0)), b"k") is not None


def test_malformed_rows_fail_closed():
    ctx = ctx_for("SELECT email FROM customers")
    plan = plan_for(ctx, 0, rowdesc(("email", 16400, 3, 25, 0)), b"k")
    bad = datarow(b"a", b"b")  # two columns where one was described
    with pytest.raises(MaskingError):
        plan.rewrite(bad, 0, len(bad))
    row = datarow(b"ann@example.com")
    truncated = row[:5] + row[5:7] + struct.pack("!i", 100) + b"ann"
    with pytest.raises(MaskingError):
        plan.rewrite(truncated, 0, len(truncated))


def test_scrub_error_and_notice():
    body = b"".join(k + v + b"\x00" for k, v in [
        (b"S", b"ERROR"), (b"V", b"ERROR"), (b"C", b"22P02"),
        (b"M", b'invalid input syntax for type integer: "ann@example.com"'),
        (b"D", b"Key (email)=(ann@example.com) already exists."), (b"W", b"SQL function leak")]) + b"\x00"
    out = scrub_message(b"E", body)
    f = m.parse_error_fields(out[5:])
    assert "ann@example.com" not in out[5:].decode()
    assert f["C"] == "22P02" and "D" not in f and "W" not in f
    assert "SQLSTATE 22P02" in f["M"] and "hidden" in f["M"]  # a data error: message replaced whole
    analysis = b'SERROR\x00C42703\x00Mcolumn "emial" does not exist\x00P8\x00\x00'
    kept = m.parse_error_fields(scrub_message(b"E", analysis)[5:])
    assert kept["M"] == 'column "emial" does not exist'  # errors about the statement text stay useful
    # class 42 raised while rows are read (no position): a cast of a row value to regclass
    cast = b'SERROR\x00C42P01\x00Mrelation "137_11_8919" does not exist\x00\x00'
    assert b"137_11" not in scrub_message(b"E", cast)
    oper = b'SERROR\x00C42883\x00Moperator does not exist: 137-11-8919\x00\x00'
    assert b"137-11" not in scrub_message(b"E", oper)
    in_function = b'SERROR\x00C42601\x00Msyntax error at or near "ann"\x00WPL/pgSQL function f\x00\x00'
    assert b"ann" not in scrub_message(b"E", in_function)
    raised = b"SERROR\x00C P0001\x00".replace(b" ", b"") + b"Mbad value 4111111111111111\x00\x00"
    assert b"4111" not in scrub_message(b"E", raised)
    notice = b"SNOTICE\x00C00000\x00Mvalue: Ann Lee\x00\x00"
    assert b"Ann Lee" not in scrub_message(b"N", notice)


def test_catalog_enriches_facts_with_views_and_user_functions():
    cat = catalog()
    f = cat.enrich(analyze("SELECT mail FROM contacts")[0])
    assert "public.customers.email" in f.columns and "public.customers" in f.tables
    f = cat.enrich(analyze("SELECT leak(id), upper(city) FROM customers")[0])
    assert f.user_functions == ("leak",)
    unknown = Catalog(known=False)
    assert set(unknown.enrich(analyze("SELECT upper(city) FROM customers")[0]).user_functions) == {"upper"}


def test_build_template_lists_only_masked_fields():
    ctx = ctx_for("SELECT id, email FROM customers")
    tpl = build_template(ctx, 0, m.parse_row_description(rowdesc(("id", 16400, 1, 23, 0), ("email", 16400, 3, 25, 0))))
    assert [c.index for c in tpl.columns] == [1]
