"""Sessions through the gateway, recorded, read back: what was sent and what was shown.

Real clients (psql, psycopg, asyncpg) in session and transaction pooling; the recording read
with pooler.recording.reader and compared with what the client sent and received."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from pooler.recording.reader import iter_events
from pooler.recording.verify import verify
from tests.recording_helpers import of, recording_gw, wait_logged_out


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_psql_session_is_recorded_as_sent_and_shown(gw_factory, tmp_path, mode):
    g, d = recording_gw(gw_factory, tmp_path, pool_mode=mode, record_results=3)
    script = ("SELECT 1 AS one, 'two' AS two;\n"
              "SELECT g FROM generate_series(1, 10) g;\n"
              "SELECT 1/0;\n"
              "CREATE TEMP TABLE t (a int); INSERT INTO t VALUES (1), (2);\n")
    r = subprocess.run(["psql", g.dsn(application_name="rec-test"), "-X", "-q", "-v", "ON_ERROR_STOP=0",
                        "-c", script.split("\n")[0], "-c", script.split("\n")[1], "-c", script.split("\n")[2],
                        "-c", script.split("\n")[3]],
                       capture_output=True, text=True, timeout=30)
    assert "division by zero" in r.stderr
    (s,) = wait_logged_out(d)
    login = s["login"]
    assert login["user"] == "postgres" and login["database"] == "postgres" and login["app"] == "rec-test"
    assert login["mode"] == mode and login["tls"] is False and login["client"].startswith("127.0.0.1:")
    assert login["upstream_user"] == "postgres"
    stmts = of(s, "stmt")
    assert [x["sql"] for x in stmts] == [line for line in script.split("\n") if line]
    assert all(x["route"] == "simple" and x["kind"] == "Q" for x in stmts)
    rows = {r["q"]: r for r in of(s, "rows")}
    assert rows[1]["rows"] == [["1", "two"]] and rows[1]["truncated"] is False
    assert rows[2]["rows"] == [["1"], ["2"], ["3"]] and rows[2]["truncated"] is True  # 10 sent, 3 kept
    done = of(s, "done")
    assert [(x["q"], x["tag"], x["rows"]) for x in done] == [
        (1, "SELECT 1", 1), (2, "SELECT 10", 10), (4, "CREATE TABLE", None), (4, "INSERT 0 2", 2)]
    (err,) = of(s, "error")
    assert err["q"] == 3 and err["sqlstate"] == "22012" and "division by zero" in err["message"]
    out = s["logout"]
    assert out["statements"] == 4 and out["errors"] == 1 and out["rows"] == 13
    assert [e["i"] for e in s["events"]] == list(range(len(s["events"])))  # nothing lost, nothing repeated
    g.stop()
    rep = verify(d)
    assert rep.ok, rep.problems


@pytest.mark.parametrize("mode", ["session", "transaction", "statement"])
def test_psycopg_parameters_and_extended_route_are_recorded(gw_factory, tmp_path, mode):
    g, d = recording_gw(gw_factory, tmp_path, pool_mode=mode)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        c.execute("SELECT %s::int + 1 AS n, %s::text AS who", (41, "agent"), prepare=False)
        c.execute("SELECT %s::text", (None,), prepare=False)
        c.execute("SELECT %s::bytea", (b"\x00\xff",), binary=True, prepare=False)
    (s,) = wait_logged_out(d)
    stmts = of(s, "stmt")
    assert [x["route"] for x in stmts] == ["extended"] * 3 and stmts[0]["sql"] == "SELECT $1::int + 1 AS n, $2::text AS who"
    binds = of(s, "bind")
    assert [b["q"] for b in binds] == [1, 2, 3]
    assert binds[0]["params"][1] == "agent" and binds[1]["params"] == [None]
    p = binds[0]["params"][0]
    assert p == "41" or int(p["hex"], 16) == 41  # text or binary, as the driver sent it
    assert binds[2]["params"] == [{"hex": "00ff"}]
    rows = {r["q"]: r["rows"] for r in of(s, "rows")}
    assert rows[1] == [["42", "agent"]] and rows[2] == [[None]]
    assert rows[3] == [[{"hex": "00ff"}]]  # a binary result value


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_asyncpg_prepared_statements_bind_to_their_statement(gw_factory, tmp_path, mode):
    import asyncio

    import asyncpg

    g, d = recording_gw(gw_factory, tmp_path, pool_mode=mode)

    async def run():
        c = await asyncpg.connect(host=g.host, port=g.port, user="postgres", database="postgres", ssl=False)
        try:
            st = await c.prepare("SELECT $1::int * 2 AS doubled")
            assert await st.fetchval(21) == 42
            assert await st.fetchval(5) == 10
            await c.execute("SELECT 1")
        finally:
            await c.close()

    asyncio.run(run())
    (s,) = wait_logged_out(d)
    q = next(x["q"] for x in of(s, "stmt") if x["sql"] == "SELECT $1::int * 2 AS doubled")
    binds = [b for b in of(s, "bind") if b["q"] == q]
    assert len(binds) == 2  # both executions, each with its parameter
    assert [int(b["params"][0]["hex"], 16) for b in binds] == [21, 5]  # asyncpg sends binary
    # asyncpg's fetchval executes with a row limit: each execution ends in PortalSuspended
    outcomes = [x["t"] for x in s["events"] if x.get("q") == q and x["t"] in ("done", "suspended")]
    assert len(outcomes) == 2
    assert [int(r["rows"][0][0]["hex"], 16) for r in of(s, "rows") if r["q"] == q] == [42, 10]


def test_reload_changes_rows_recorded_and_keeps_the_directory(gw_factory, tmp_path):
    import signal

    g, d = recording_gw(gw_factory, tmp_path, record_results=1)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        c.execute("SELECT g FROM generate_series(1, 3) g")
    g.settings.update(record_results="3", record_dir=str(tmp_path / "elsewhere"))
    g.write_ini()
    g.signal(signal.SIGHUP)
    g.wait_log("configuration reloaded")
    assert "record_dir: changes need a restart" in g.log()
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        c.execute("SELECT g FROM generate_series(1, 3) g")
    first, second = wait_logged_out(d, 2)
    assert of(first, "rows")[0]["rows"] == [["1"]] and of(first, "rows")[0]["truncated"] is True
    assert of(second, "rows")[0]["rows"] == [["1"], ["2"], ["3"]]
    assert not (tmp_path / "elsewhere").exists()


def test_notices_are_recorded_with_their_statement(gw_factory, tmp_path):
    g, d = recording_gw(gw_factory, tmp_path)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        c.execute("DO $$ BEGIN RAISE WARNING 'agent was warned: %', 42; END $$")
        c.execute("SELECT 1")
    (s,) = wait_logged_out(d)
    (n,) = of(s, "notice")
    assert (n["severity"], n["sqlstate"], n["message"]) == ("WARNING", "01000", "agent was warned: 42")
    assert n["q"] == next(x["q"] for x in of(s, "stmt") if x["sql"].startswith("DO "))


def test_after_an_error_in_a_pipeline_the_next_result_is_the_next_statements(gw_factory, tmp_path):
    d = tmp_path / "rec"
    g = gw_factory(settings={"record_dir": str(d), "record_fsync": "always"})
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with c.pipeline():
                c.execute("SELECT 1/0")
                c.execute("SELECT 2")  # skipped by the server after the error
        assert c.execute("SELECT 42").fetchone() == (42,)
    g.stop()
    recs = [r for r in iter_events(d) if r.get("sid")]
    q42 = next(r["q"] for r in recs if r["t"] == "stmt" and r["sql"] == "SELECT 42")
    done = [r for r in recs if r["t"] == "done" and r.get("tag") == "SELECT 1"]
    assert [r["q"] for r in done] == [q42]


def _stored(d) -> list[dict]:
    """The session records as stored in the files (not unfolded)."""
    import orjson

    from pooler.recording import files as rf

    out = []
    for f in rf.list_files(d):
        for line in rf.read_lines(f.path)[0]:
            rec = orjson.loads(line)
            if rec.get("sid"):
                out.append(rec)
    return out


def test_a_statement_and_its_result_are_stored_as_one_line_unless_it_is_still_running(gw_factory, tmp_path):
    """Folded records: a quick statement's stmt, bind, rows and done are one line of the file
    (what keeps recording cheap), read back as the records they stand for; a statement still
    running at the recorder's 100 ms hand-over is written before its result comes."""
    g, d = recording_gw(gw_factory, tmp_path)
    with psycopg.connect(g.dsn(), autocommit=True) as c:
        c.execute("SELECT 7 AS quick")
        c.execute("SELECT %s::text AS bound", ("eight",), prepare=False)
        c.execute("SELECT pg_sleep(0.5), 9 AS slow")
    (s,) = wait_logged_out(d)
    stored = _stored(d)
    quick = next(r for r in stored if r["t"] == "stmt" and r["sql"] == "SELECT 7 AS quick")
    assert quick["shown"]["rows"] == [["7"]] and quick["done"]["tag"] == "SELECT 1"
    bound = next(r for r in stored if r["t"] == "stmt" and "bound" in r["sql"])
    assert bound["bind"]["params"] == ["eight"] and bound["shown"]["rows"] == [["eight"]] and bound["done"]["rows"] == 1
    slow = next(r for r in stored if r["t"] == "stmt" and "pg_sleep" in r["sql"])
    assert "done" not in slow and "shown" not in slow
    assert [r["rows"] for r in stored if r["t"] == "rows" and r["q"] == slow["q"]] == [[["", "9"]]]
    assert len(stored) < len(s["events"])  # lines that stand for more than one record
    # read back: the records they stand for, numbered without a gap or a repeat
    assert [e["i"] for e in s["events"]] == list(range(len(s["events"])))
    q = quick["q"]
    assert [e["t"] for e in s["events"] if e.get("q") == q] == ["stmt", "rows", "done"]
    assert [e["t"] for e in s["events"] if e.get("q") == bound["q"]] == ["stmt", "bind", "rows", "done"]
    assert [e["t"] for e in s["events"] if e.get("q") == slow["q"]] == ["stmt", "rows", "done"]
    g.stop()
    assert verify(d).ok
