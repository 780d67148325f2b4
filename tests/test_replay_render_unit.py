"""The replay's pure parts without a gateway: statements grouped from records, filters, times
people type, the terminal timeline (escaping, alignment, colour), asciicast v3 and HTML."""

from __future__ import annotations

import html.parser
import json
from datetime import datetime, timezone

import pytest

from pooler.recording import render
from pooler.recording.timeline import Filter, parse_when, statements, summary

T0 = 1_796_000_000.0


def ev(t, i, ts, **kw):
    return dict({"t": t, "ts": T0 + ts, "sid": "run.1", "i": i}, **kw)


def session(events, logout=True):
    evs = [ev("login", 0, 0, client="127.0.0.1:5000", tls=False, user="agent-7", login_name="agent-7",
              groups=["agents"], auth="jwt", database="shop", app="bot", upstream_user="app", mode="transaction")]
    evs += events
    if logout:
        evs.append(ev("logout", len(evs), 9.0, reason="client closed", dur=9.0, statements=2, errors=0, refused=0,
                      rows=0, bytes_sent=0, bytes_received=0))
    return {"sid": "run.1", "start": T0, "end": T0 + 9 if logout else None, "login": evs[0],
            "logout": evs[-1] if logout else None, "events": evs}


PIPELINE = session([
    ev("stmt", 1, 1.0, q=1, kind="P", route="extended", sql="SELECT a FROM t WHERE id = $1", action="allow",
       rule="", reason="", masks=[]),
    ev("stmt", 2, 1.0, q=2, kind="P", route="extended", sql="SELECT email FROM customers", action="mask",
       rule="rules/40_pii.star", reason="pii", masks=[["public.customers.email", "email"]]),
    ev("bind", 3, 1.0, q=1, stmt="", portal="", params=["7"]),
    ev("bind", 4, 1.0, q=2, stmt="", portal="", params=[]),
    ev("rows", 5, 1.5, q=1, rows=[["x"]], truncated=False, row_bytes=1),
    ev("done", 6, 1.5, q=1, tag="SELECT 1", rows=1, bytes=40, dur=0.5),
    ev("rows", 7, 2.0, q=2, rows=[["***@example.com"], [None]], truncated=True, row_bytes=15),
    ev("done", 8, 2.0, q=2, tag="SELECT 9", rows=9, bytes=400, dur=1.0),
    ev("masked", 9, 2.0, q=2, columns=[["public.customers.email", "email", 2]]),
])


def test_statements_group_every_record_under_its_statement():
    a, b = statements(PIPELINE)
    assert (a["q"], a["binds"], [r["tag"] for r in a["results"]], a["results"][0]["shown"]) == (1, [["7"]], ["SELECT 1"], [["x"]])
    assert b["action"] == "mask" and b["results"][0]["shown"] == [["***@example.com"], [None]]
    assert b["results"][0]["truncated"] is True and b["results"][0]["masked"] == [["public.customers.email", "email", 2]]
    s = summary(PIPELINE)
    assert (s["statements"], s["masked"], s["denied"], s["user"], s["live"]) == (2, 1, 0, "agent-7", False)


def test_a_multi_statement_query_keeps_each_result():
    s = session([ev("stmt", 1, 1, q=1, kind="Q", route="simple", sql="BEGIN; SELECT 1; COMMIT", action="allow",
                    rule="", reason="", masks=[]),
                 ev("done", 2, 1, q=1, tag="BEGIN", rows=None, bytes=10, dur=0.001),
                 ev("rows", 3, 1, q=1, rows=[["1"]], truncated=False, row_bytes=1),
                 ev("done", 4, 1, q=1, tag="SELECT 1", rows=1, bytes=30, dur=0.001),
                 ev("done", 5, 1, q=1, tag="COMMIT", rows=None, bytes=10, dur=0.001)])
    (st,) = statements(s)
    assert [(r["tag"], r["shown"]) for r in st["results"]] == [("BEGIN", None), ("SELECT 1", [["1"]]), ("COMMIT", None)]


def test_control_characters_never_reach_the_terminal():
    assert render.safe("a\x1b[2Jb\x07c\x9bd\u202ee") == "a\\x1b[2Jb\\x07c\\x9bd\\u202ee"
    assert render.safe("naïve 日本 tab\tnew") == "naïve 日本 tab\tnew"  # text stays text
    s = session([ev("stmt", 1, 1, q=1, kind="Q", route="simple", sql="SELECT '\x1b]0;owned\x07'", action="allow",
                    rule="", reason="\x1b[8mhidden", masks=[]),
                 ev("error", 2, 1, q=1, sqlstate="XX000", message="bad \x1b[1m")])
    out = render.text(s, render.Style(False))
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;owned\\x07" in out and "\\x1b[8mhidden" in out


def test_rows_are_aligned_by_display_width():
    lines = render.table([["日本語", "1"], ["abc", None], [{"hex": "00ff"}, "x" * 60]], render.Style(False))
    bars = [render.width(line[: line.index(" | ")]) for line in lines]
    assert bars == [6, 6, 6]  # the separator in the same terminal column: wide characters take two cells
    assert lines[1].endswith("| NULL") and lines[2].startswith("\\x00ff")
    assert lines[2].endswith("…") and render.width(lines[2].split(" | ")[1]) == render.CELL_MAX


def test_colour_only_when_asked():
    plain = render.text(PIPELINE, render.Style(False))
    coloured = render.text(PIPELINE, render.Style(True))
    assert "\x1b[" not in plain and "\x1b[33mMASK" in coloured
    assert plain.count("\n") == coloured.count("\n")


def test_lines_of_an_earlier_statement_say_which_statement_they_belong_to():
    out = render.text(PIPELINE, render.Style(False)).splitlines()
    i = out.index("           parameters: $1=7")
    assert out[i - 1].strip() == "↳ #1 SELECT a FROM t WHERE id = $1"  # after #2 was shown
    j = next(k for k, line in enumerate(out) if "***@example.com" in line)
    assert out[j - 1].strip() == "↳ #2 SELECT email FROM customers"
    assert "           │ … (more rows were sent than recorded)" in out


def test_columns_fit_the_widest_cell():
    lines = render.columns(["A", "LONGER"], [["wide value", "x"], ["v", "日本"]], render.Style(False))
    assert lines == ["A           LONGER", "wide value  x", "v           日本"]


def test_asciicast_v3_intervals_are_relative_and_markers_name_statements():
    lines = render.asciicast(PIPELINE, cols=100, rows=30).splitlines()
    header = json.loads(lines[0])
    assert header == {"version": 3, "term": {"cols": 100, "rows": 30, "type": "xterm-256color"},
                      "title": "pooler session run.1: agent-7 on shop", "timestamp": int(T0), "idle_time_limit": 2.0}
    events = [json.loads(x) for x in lines[1:]]
    assert [e[2].split(" ")[0] for e in events if e[1] == "m"] == ["#1", "#2"]
    assert sum(e[0] for e in events) == pytest.approx(9.0)
    outs = [e for e in events if e[1] == "o"]
    assert outs[0][0] == 0.0 and all("\n" not in e[2].replace("\r\n", "") for e in outs)


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_page_escapes_everything_recorded():
    evil = '<img src=x onerror="alert(1)">'
    s = session([ev("stmt", 1, 1, q=1, kind="Q", route="simple", sql=f"SELECT '{evil}'", action="deny",
                    rule="rules/x.star", reason=evil, masks=[]),
                 ev("refused", 2, 1, q=1, sqlstate="42501", message=evil),
                 ev("stmt", 3, 2, q=2, kind="Q", route="simple", sql="SELECT 1", action="allow", rule="", reason="",
                    masks=[]),
                 ev("rows", 4, 2, q=2, rows=[[evil, None]], truncated=False, row_bytes=10),
                 ev("done", 5, 2, q=2, tag="SELECT 1", rows=1, bytes=10, dur=0.01)])
    page = render.html_page(s)
    p = _Tags()
    p.feed(page)
    assert {t for t, _ in p.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "table", "tr", "td",
                                      "section", "div", "span", "b", "pre"}
    assert not any("src" in a or "onerror" in a or "href" in a for _, a in p.tags)
    assert page.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") == 4  # text, reason, refusal, row
    assert '<td class="null">NULL</td>' in page and "default-src 'none'" in page


def test_times_people_type():
    now = datetime(2026, 12, 3, 15, 30, tzinfo=timezone.utc).timestamp()  # a Thursday
    day = 86400
    midnight = datetime(2026, 12, 3, tzinfo=timezone.utc).timestamp()
    assert parse_when("today", now) == midnight and parse_when("yesterday", now) == midnight - day
    assert parse_when("last tuesday", now) == midnight - 2 * day and parse_when("Tuesday", now) == midnight - 2 * day
    assert parse_when("thursday", now) == midnight - 7 * day  # the one before today
    assert parse_when("3h ago", now) == now - 3 * 3600 and parse_when("2 days ago", now) == now - 2 * day
    assert parse_when("2026-12-01T10:00", now) == datetime(2026, 12, 1, 10, tzinfo=timezone.utc).timestamp()
    assert parse_when("2026-12-01T10:00+01:00", now) == datetime(2026, 12, 1, 9, tzinfo=timezone.utc).timestamp()
    with pytest.raises(ValueError, match="cannot read 'next blue moon' as a time"):
        parse_when("next blue moon", now)


def test_filters_per_statement():
    a, b = statements(PIPELINE)
    assert Filter(table="customers").statement(b) and not Filter(table="customers").statement(a)
    assert Filter(table="public.customers").statement(b) and Filter(table="t").statement(a)
    assert Filter(decision="mask").statement(b) and not Filter(decision="deny").statement(b)
    assert Filter(rule="40_pii").statement(b) and not Filter(rule="40_pii").statement(a)
    assert Filter(text="EMAIL").statement(b) and not Filter(text="email").statement(a)
    assert Filter(since=T0 + 1.5).statement(a) is False and Filter(until=T0 + 1.5).statement(a)
    # text PostgreSQL's grammar cannot read is searched for the table's name itself
    broken = dict(a, sql="SELEC * FROM customers WHERE")
    assert Filter(table="customers").statement(broken) and not Filter(table="orders").statement(broken)
    assert Filter(decision="mask").session(PIPELINE) and not Filter(decision="deny").session(PIPELINE)


def test_approvals_and_cancels_on_the_timeline():
    s = session([
        ev("stmt", 1, 1, q=1, kind="Q", route="simple", sql="UPDATE products SET price = 1", action="require_approval",
           rule="rules/30_bulk_writes.star", reason="UPDATE without WHERE", masks=[]),
        ev("held", 2, 1, q=1, request="3f2a91c0", rule="rules/30_bulk_writes.star", reason="UPDATE without WHERE"),
        ev("hold_ended", 3, 4, q=1, request="3f2a91c0", state="approved", by="admin", outcome="approved by admin"),
        ev("done", 4, 4.1, q=1, tag="UPDATE 20", rows=20, bytes=20, dur=0.1),
        ev("stmt", 5, 5, q=2, kind="Q", route="simple", sql="DELETE FROM orders", action="require_approval",
           rule="rules/30_bulk_writes.star", reason="DELETE without WHERE", masks=[]),
        ev("held", 6, 5, q=2, request="77aa", rule="rules/30_bulk_writes.star", reason="DELETE without WHERE"),
        ev("cancel", 7, 6),
        ev("hold_ended", 8, 6, q=2, request="77aa", state="withdrawn", by="", outcome="canceled by the client"),
    ])
    a, b = statements(s)
    assert a["holds"] == [{"request": "3f2a91c0", "rule": "rules/30_bulk_writes.star", "reason": "UPDATE without WHERE",
                           "state": "approved", "by": "admin", "outcome": "approved by admin", "ts": T0 + 1}]
    assert b["holds"][0]["state"] == "withdrawn" and b["canceled"] is True and a["canceled"] is False
    assert Filter(decision="require_approval").statement(b) and summary(s)["held"] == 2
    out = render.text(s, render.Style(False))
    assert "APPROVAL rules/30_bulk_writes.star: UPDATE without WHERE" in out
    assert "HELD for approval, request 3f2a91c0 (rules/30_bulk_writes.star: UPDATE without WHERE)" in out
    assert "APPROVED by admin: approved by admin" in out and "UPDATE 20" in out
    assert "CANCEL the client asked to cancel the running statement" in out
    assert "WITHDRAWN: canceled by the client" in out
    page = render.html_page(s)
    assert "held for approval (request 3f2a91c0): approved by admin" in page


def test_missing_records_are_shown_where_they_are_missing():
    s = session([ev("stmt", 1, 1, q=1, kind="Q", route="simple", sql="SELECT 1", action="allow", rule="", reason="",
                    masks=[]),
                 ev("done", 4, 2, q=1, tag="SELECT 1", rows=1, bytes=1, dur=0.1)])  # records 2 and 3 are lost
    s["events"][-1]["i"] = 5
    out = render.text(s, render.Style(False)).splitlines()
    i = next(k for k, line in enumerate(out) if "missing here" in line)
    assert out[i].strip().startswith("!! 2 records of this session missing here") and "SELECT 1  " in out[i + 1]
    assert summary(s)["missing"] == 2 and summary(PIPELINE)["missing"] == 0
