"""What the gateway tells its observers (pooler/gateway/events.py), end to end: a gateway in
this process (tests/inproc.py) in front of the test cluster, real clients (psycopg, psql), an
observer that records every event. Recording, metrics and the console build on these."""

from __future__ import annotations

import logging
import subprocess

import psycopg
import pytest

from pooler.pgcluster import seed_demo
from tests.conftest import upstream_entry
from tests.inproc import LiveGateway, Recorder, rules_dir

RULES = """
def on_statement(stmt, session):
    if stmt.command == "DELETE":
        return deny("no deletes through the test gateway")
    return None
"""


@pytest.fixture
def live(pg, tmp_path):
    started = []

    def make(settings=None, users=None, databases=None):
        g = LiveGateway(databases or {"postgres": upstream_entry(pg)}, settings=settings, users=users,
                        workdir=str(tmp_path / f"gw{len(started)}"))
        started.append(g)
        return g.start()

    (tmp_path / "gw0").mkdir()
    (tmp_path / "gw1").mkdir()
    yield make
    for g in started:
        g.stop()


def session_of(rec: Recorder, user: str):
    return rec.wait_for(lambda e: e[0] == "login" and e[1].user == user)[1]


def names(rec: Recorder, s, wanted=None) -> list[str]:
    return [e[0] for e in rec.events if e[1] is s and (wanted is None or e[0] in wanted)]


def test_a_sessions_events_follow_each_statement_from_login_to_logout(live, tmp_path):
    g = live(settings={"rules_dir": str(rules_dir(tmp_path, RULES))}, users={"agent": "groups=agents,bots"})
    rec = Recorder()
    g.subscribe(rec)
    with psycopg.connect(g.dsn(user="agent", application_name="ev-test"), autocommit=True) as conn:
        s = session_of(rec, "agent")
        assert (s.user, s.groups, s.database, s.auth_method) == ("agent", ("agents", "bots"), "postgres", "trust")
        rows = conn.execute("SELECT 1 AS a UNION ALL SELECT 2 UNION ALL SELECT 3").fetchall()
        assert rows == [(1,), (2,), (3,)]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no deletes"):
            conn.execute("DELETE FROM pg_class WHERE false")
    rec.wait_for(lambda e: e[0] == "logout" and e[1] is s)

    decided = [e for e in rec.of("decided", s)]
    assert [(k, sql) for _, _, k, sql, _ in decided] == [
        ("Q", "SELECT 1 AS a UNION ALL SELECT 2 UNION ALL SELECT 3"), ("Q", "SELECT 1/0"),
        ("Q", "DELETE FROM pg_class WHERE false")]  # psycopg sends a statement without parameters as a Query
    assert [d.action for *_, d in decided] == ["allow", "allow", "deny"]
    (completed,) = rec.of("completed", s)  # the SELECT; the failed and refused ones did not complete
    _, _, srv, tag, rows_n, nbytes, seconds = completed
    assert (tag, rows_n) == ("SELECT 3", 3)
    assert nbytes > 3 * 5 and seconds >= 0
    (failed,) = rec.of("failed", s)
    assert failed[3:] == ("22012", "division by zero")
    (refused,) = rec.of("refused", s)
    assert refused[2] == "42501" and "10_test.star" in refused[3] and "no deletes" in refused[3]
    # each statement: decided, then a server, the request sent, the result, the round's end, the
    # server back (transaction pooling); the refused DELETE never took a server
    flow = names(rec, s, {"decided", "server_assigned", "forwarded", "completed", "failed", "ready",
                          "server_released", "refused"})
    assert flow == ["decided", "server_assigned", "forwarded", "completed", "ready", "server_released",
                    "decided", "server_assigned", "forwarded", "failed", "ready", "server_released",
                    "decided", "refused"]
    readies = rec.of("ready", s)
    assert [r[3] for r in readies] == [ord("I"), ord("I")]
    assert all(r[5] > 0 and r[6] > 0 for r in readies)  # bytes both ways in each round
    assert names(rec, s)[0] == "login" and names(rec, s)[-1] == "logout"
    assert rec.of("logout", s)[0][2] == "client terminated the session"


def test_masked_results_report_what_was_masked_and_errors_stay_scrubbed(live, pg):
    seed_demo(pg, "events_shop")
    repo_rules = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "rules")
    g = live(settings={"rules_dir": repo_rules},
             databases={"events_shop": upstream_entry(pg, "events_shop")}, users={"agent": "groups=agents"})
    ssn = pg.psql("SELECT ssn FROM customers ORDER BY id LIMIT 1", dbname="events_shop").strip()
    rec = Recorder()
    g.subscribe(rec)
    with psycopg.connect(g.dsn(user="agent", dbname="events_shop"), autocommit=True) as conn:
        s = session_of(rec, "agent")
        got = conn.execute("SELECT id, email FROM customers ORDER BY id LIMIT 3").fetchall()
        assert all("***" in email for _, email in got)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as err:
            conn.execute("SELECT ssn::int FROM customers ORDER BY id LIMIT 1")
        assert ssn not in str(err.value)
    masked = rec.of("masked", s)  # the SELECT's result, then the failing one's (no row masked)
    assert masked[0][2] == [("public.customers.email", "email", 3)]
    assert [n for _, _, n in masked[1][2]] == [0]
    (decided,) = [e for e in rec.of("decided", s) if "email" in e[3]]
    assert decided[4].action == "mask" and dict(decided[4].masks)["public.customers.email"] == "email"
    (failed,) = rec.of("failed", s)
    assert failed[3] == "22P02" and ssn not in failed[4]  # what the client saw, never the value


def test_a_query_string_completes_once_per_statement_and_prepared_statements_are_decided_once(live):
    g = live()
    rec = Recorder()
    g.subscribe(rec)
    out = subprocess.run(["psql", g.dsn(), "-XAtc", "SELECT 1; SELECT 2, 3; SELECT 4 WHERE false"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    s = rec.wait_for(lambda e: e[0] == "logout")[1]
    assert [(e[3], e[4]) for e in rec.of("completed", s)] == [("SELECT 1", 1), ("SELECT 1", 1), ("SELECT 0", 0)]
    assert [e[2:4] for e in rec.of("decided", s)] == [("Q", "SELECT 1; SELECT 2, 3; SELECT 4 WHERE false")]
    assert rec.of("decided", s)[0][4] is None  # no rules: nothing judged it
    with psycopg.connect(g.dsn(), autocommit=True) as conn:
        s2 = rec.wait_for(lambda e: e[0] == "login" and e[1] is not s)[1]
        for i in range(3):
            assert conn.execute("SELECT %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)
    completed = rec.of("completed", s2)
    assert [e[3] for e in completed] == ["SELECT 1"] * 3
    assert [e[3] for e in rec.of("decided", s2)] == ["SELECT $1::int + 1"]  # parsed once, bound three times


class Broken(Recorder):
    def completed(self, *a):
        raise RuntimeError("observer bug")

    def ready(self, *a):
        raise RuntimeError("observer bug")


def test_an_observer_that_raises_never_breaks_a_session(live, caplog):
    g = live()
    broken = Broken()
    g.subscribe(broken)
    with caplog.at_level(logging.ERROR, logger="pooler.events"):
        with psycopg.connect(g.dsn(), autocommit=True) as conn:
            for i in range(3):
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    assert "observer bug" in caplog.text and "failed on completed" in caplog.text
    assert broken.of("server_released")  # its other events still came


def test_pool_counters_count_as_pgbouncer_does(live):
    g = live()
    with psycopg.connect(g.dsn(), autocommit=True) as conn:
        for i in range(3):
            conn.execute("SELECT 1")
        with conn.transaction():
            conn.execute("SELECT 2")
        for i in range(2):
            conn.execute("SELECT %s::int", (i,), prepare=True)
    key = next(iter(g.gw.pools.values())).key
    c = g.call(g.gw.stats.counters, key)
    # autocommit: 3 one-round transactions; BEGIN / SELECT / COMMIT: one transaction of 3 rounds;
    # psycopg prepares in a round of its own (Parse, Sync), then Bind/Execute/Sync: 2 + 1 rounds
    assert (c.xact_count, c.query_count) == (7, 9)
    assert c.server_assignment_count == 7  # transaction pooling: one server per transaction
    assert (c.client_parse_count, c.server_parse_count, c.bind_count) == (1, 1, 2)
    assert c.client_login_count == 1
    assert c.client_bytes > 0 and c.server_bytes > 0 and c.xact_time > 0 and c.query_time > 0
    line = g.call(g.gw.stats.rotate)
    assert line.startswith("stats: ") and " xacts/s, " in line and " wait " in line


def test_self_guarded_events_are_called_directly_and_the_others_through_the_guard():
    """An observer's ``self_guarded`` events reach it without the hub's wrapper (it catches its
    own exceptions); any other event of it that raises is caught by the hub, which tells the
    observer (observer_failed) and goes on."""
    from pooler.gateway.events import Events, Observer

    failed = []

    class Obs(Observer):
        self_guarded = frozenset(("login",))

        def login(self, s) -> None:
            pass

        def logout(self, s, reason: str) -> None:
            raise RuntimeError("boom")

        def observer_failed(self, event: str, exc: BaseException) -> None:
            failed.append((event, type(exc).__name__))

    hub = Events()
    obs = Obs()
    hub.subscribe(obs)
    assert hub.login == obs.login  # the bound method itself: no wrapper call
    assert hub.logout != obs.logout
    hub.logout(None, "bye")  # raises inside: swallowed
    assert failed == [("logout", "RuntimeError")]
