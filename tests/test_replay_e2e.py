"""``pooler replay`` on real recordings: sessions run through the gateway with psql and psycopg
(the shipped rules: masks, denials, errors), recorded, then listed, searched, played, exported
and followed live, and checked against what the sessions did."""

from __future__ import annotations

import html.parser
import json
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tests.gwproc import REPO
from tests.masking_helpers import assert_no_secret
from tests.replay_helpers import (AGENT, ANALYST, ESC_SQL, pooler, pooler_process, record_demo_sessions,
                                  start_recording_gateway)


@pytest.fixture(scope="module")
def recorded(pg, demo_shop, tmp_path_factory):
    g, rec = start_recording_gateway(pg, demo_shop, tmp_path_factory.mktemp("replay"))
    try:
        sessions = record_demo_sessions(g, rec)
        yield g, rec, sessions
    finally:
        g.stop()


def sid_of(sessions, user):
    (s,) = [s for s in sessions if s["login"]["user"] == user]
    return s["sid"]


def test_list_shows_each_session_and_its_figures(recorded):
    _, rec, sessions = recorded
    r = pooler_process("replay", "list", str(rec))  # the command as installed, once
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["START", "(UTC)", "SESSION", "USER", "GROUPS"]
    assert lines[-1] == "3 session(s)"
    body = lines[1:-1]
    assert [line.split()[3] for line in body] == ["agent", "ann", "dba"]  # in start order
    agent = body[0].split()
    assert agent[2] == sid_of(sessions, "agent") and agent[4] == "agents" and agent[5] == "shop"
    assert agent[6:10] == ["5", "2", "1", "0"]  # statements, denied, masked, errors
    assert "\x1b[" not in r.stdout  # not a terminal: no colour


def test_list_filters_and_json(recorded):
    _, rec, sessions = recorded

    def sids(*flt):
        r = pooler("replay", "list", str(rec), "--json", *flt)
        assert r.returncode == 0, r.stderr
        return [json.loads(line)["sid"] for line in r.stdout.splitlines() if line.strip()]

    agent, ann, dba = (sid_of(sessions, u) for u in ("agent", "ann", "dba"))
    assert sids() == [agent, ann, dba]
    assert sids("--identity", "ann") == [ann]
    assert sids("--group", "pii-readers") == [dba]
    assert sids("--database", "shop") == [agent, ann, dba] and sids("--database", "other") == []
    assert sids("--decision", "deny") == [agent]
    assert sids("--decision", "error") == [ann]
    assert sids("--decision", "mask") == [agent, ann]
    assert sids("--rule", "40_pii") == [agent, ann]
    assert sids("--grep", "division BY zero") == [ann]  # error messages are searched too
    assert sids("--table", "products") == [agent, ann]
    assert sids("--since", "1 hour ago") == [agent, ann, dba] and sids("--since", "2099-01-01") == []
    assert sids("--day", "today") == [agent, ann, dba] and sids("--day", "yesterday") == []
    (one,) = [json.loads(line) for line in pooler("replay", "list", str(rec), "--json", "--identity", "agent").stdout.splitlines()]
    assert one["statements"] == 5 and one["denied"] == 2 and one["masked"] == 1 and one["live"] is False
    assert one["groups"] == ["agents"] and one["app"] == "agent-psql"


def test_the_auditors_question_in_one_command(recorded):
    """Every statement agent X ran against customers that day that was denied."""
    _, rec, sessions = recorded
    r = pooler("replay", "statements", str(rec), "--identity", "agent", "--table", "customers",
               "--day", "today", "--decision", "deny")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "SESSION", "#", "USER", "DATABASE", "DECISION", "RULE", "OUTCOME",
                                "STATEMENT"]
    assert lines[-1] == "1 statement(s)" and len(lines) == 3
    row = lines[1]
    assert sid_of(sessions, "agent") in row and " agent " in row and "rules/20_agents.star" in row
    assert row.endswith("DELETE FROM customers WHERE id = 1") and "refused 42501" in row
    j = pooler("replay", "statements", str(rec), "--json", "--identity", "agent", "--table", "public.customers")
    got = [json.loads(line) for line in j.stdout.splitlines()]
    assert [(x["q"], x["action"]) for x in got] == [(1, "mask"), (2, "deny")]
    assert got[1]["refused"]["sqlstate"] == "42501" and "agents may only read data" in got[1]["refused"]["message"]
    every = [json.loads(line) for line in
             pooler("replay", "statements", str(rec), "--json", "--identity", "agent").stdout.splitlines()]
    # each result belongs to its own statement; a refused one has none
    assert [[r["tag"] for r in x["results"]] for x in every] == [["SELECT 2"], [], [], ["SELECT 1"], ["SELECT 1"]]
    assert every[4]["results"][0]["shown"] == [["1"]] and every[3]["results"][0]["shown"][0][0].isdigit()
    none = pooler("replay", "statements", str(rec), "--identity", "agent", "--table", "customers", "--day", "last monday")
    assert none.returncode == 0 and none.stdout == "" and "no recorded statement matches" in none.stderr


def test_show_plays_the_session_as_its_timeline(recorded, raw_pii):
    _, rec, sessions = recorded
    r = pooler("replay", "show", str(rec), sid_of(sessions, "agent"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0].startswith(f"session {sid_of(sessions, 'agent')}  agent (agents)  →  shop")
    # the statements in the order sent, each with its decision
    pos = [out.index(sql.split(" -- ")[0]) for sql in AGENT]
    assert pos == sorted(pos)
    assert "MASK     rules/40_pii.star: personal data is masked outside group pii-readers" in out
    assert "DENY     rules/20_agents.star: agents may only read data (DELETE writes)" in out
    assert "REFUSED 42501: refused by rules/20_agents.star" in out
    # the rows as the agent was shown them: masked, never raw
    assert "***@example.com" in out and "h_" in out
    assert_no_secret(out, raw_pii)
    assert "masked: public.customers.full_name (hash, 2 values), public.customers.email (email, 2 values)" in out
    assert "SELECT 2" in out and "SELECT 1" in out
    # what the agent typed cannot drive the auditor's terminal
    assert "\x1b" not in out and "\\x1b[2J\\x1b[31m<script>" in out
    assert "LOGOUT" in out and "5 statements, 2 refused, 0 errors" in out


def test_show_json_is_what_the_sessions_did(recorded):
    _, rec, sessions = recorded
    r = pooler("replay", "show", str(rec), sid_of(sessions, "ann"), "--json")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["type"] for x in lines] == ["session", "statement", "statement", "statement", "logout"]
    head, stmts = lines[0], lines[1:4]
    assert head["user"] == "ann" and head["login"]["groups"] == ["analysts"]
    assert [s["sql"] for s in stmts] == [sql.replace("%s", "$1") for sql, _ in ANALYST]
    assert [s["route"] for s in stmts] == ["extended", "extended", "simple"]
    (p,) = stmts[0]["binds"][0]
    assert p == "1" or int(p["hex"], 16) == 1  # as the driver sent it: text or binary
    assert stmts[0]["results"][0]["tag"] == "SELECT 1"
    assert stmts[1]["action"] == "mask" and stmts[1]["results"][0]["shown"] == [["***@example.com"]]
    assert stmts[2]["results"][0]["t"] == "error" and stmts[2]["results"][0]["sqlstate"] == "22012"
    run = sid_of(sessions, "dba").split(".")[0] + "."  # every session of this gateway run
    several = pooler("replay", "show", str(rec), run)
    assert several.returncode != 0 and f"{run!r} names 3 sessions" in several.stderr
    last = pooler("replay", "show", str(rec), "last", "--json")
    assert json.loads(last.stdout.splitlines()[0])["user"] == "dba"
    missing = pooler("replay", "show", str(rec), "nope")
    assert missing.returncode != 0 and "no recorded session 'nope'" in missing.stderr


def test_follow_json_gives_each_record_as_written(recorded):
    _, rec, sessions = recorded
    s = next(x for x in sessions if x["login"]["user"] == "ann")
    r = pooler("replay", "show", str(rec), s["sid"], "--follow", "--json")  # ended: it stops at the logout
    assert r.returncode == 0 and [json.loads(line) for line in r.stdout.splitlines()] == s["events"]


def test_speed_plays_the_same_timeline(recorded):
    _, rec, sessions = recorded
    sid = sid_of(sessions, "agent")
    at_once = pooler("replay", "show", str(rec), sid).stdout
    played = pooler("replay", "show", str(rec), sid, "--speed", "1000")
    assert played.returncode == 0 and played.stdout == at_once


def test_asciicast_v3_export(recorded, tmp_path):
    _, rec, sessions = recorded
    s = next(x for x in sessions if x["login"]["user"] == "agent")
    f = tmp_path / "agent.cast"
    r = pooler("replay", "show", str(rec), s["sid"], "--asciicast", str(f))
    assert r.returncode == 0, r.stderr
    lines = f.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 3 and header["term"]["cols"] == 120 and header["term"]["rows"] == 36
    assert header["timestamp"] == int(s["start"]) and "agent" in header["title"]
    events = [json.loads(x) for x in lines[1:]]
    assert all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], float) and e[0] >= 0
               and e[1] in ("o", "m") and isinstance(e[2], str) for e in events)
    # intervals add up to the session's span (they are relative, v3)
    span = s["events"][-1]["ts"] - s["start"]
    assert abs(sum(e[0] for e in events) - span) < 0.01
    markers = [e[2] for e in events if e[1] == "m"]
    assert [m.split(" ", 1)[0] for m in markers] == ["#1", "#2", "#3", "#4", "#5"]
    shown = "".join(e[2] for e in events if e[1] == "o")
    assert "DELETE FROM orders WHERE id = 1" in shown and "***@example.com" in shown
    assert "\r\n" in shown and "\n" not in shown.replace("\r\n", "")  # a terminal stream: CRLF
    assert "\x1b[2J" not in shown  # colours of our own only, never the agent's control sequences


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def test_html_page_is_self_contained_and_escaped(recorded, tmp_path, raw_pii):
    _, rec, sessions = recorded
    f = tmp_path / "agent.html"
    r = pooler("replay", "show", str(rec), sid_of(sessions, "agent"), "--html", str(f))
    assert r.returncode == 0, r.stderr
    page = f.read_text()
    p = _Page()
    p.feed(page)
    assert "script" not in p.tags and "img" not in p.tags and "link" not in p.tags
    assert not [v for k, v in p.attrs if k in ("src", "href")]  # nothing from outside
    assert "default-src 'none'" in page
    text = "".join(p.text)
    assert ESC_SQL in text  # the agent's text, shown exactly, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "agents may only read data (DELETE writes)" in text and "***@example.com" in text
    assert_no_secret(page, raw_pii)
    assert text.count("SELECT count(*) FROM products") == 1


def _read_until(proc, needle: str, deadline: float, buf: list) -> str:
    """Lines of ``proc``'s stdout until one holds ``needle`` (a reader thread; bounded wait)."""
    while time.monotonic() < deadline:
        text = "".join(buf)
        if needle in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not followed; got: {''.join(buf)[-2000:]}")


def test_follow_shows_a_live_session_as_it_happens(pg, demo_shop, tmp_path):
    g, rec = start_recording_gateway(pg, demo_shop, tmp_path)
    with psycopg.connect(g.dsn(user="agent", dbname="shop", application_name="live"), autocommit=True) as c:
        c.execute("SELECT 'first statement'")
        proc = subprocess.Popen([sys.executable, "-m", "pooler", "replay", "show", str(rec), "last", "--identity",
                                 "agent", "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        buf: list[str] = []
        threading.Thread(target=lambda: [buf.append(line) for line in proc.stdout], daemon=True).start()
        try:
            deadline = time.monotonic() + 20
            _read_until(proc, "first statement", deadline, buf)
            c.execute("SELECT 'second statement, later'")
            _read_until(proc, "second statement, later", deadline, buf)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("DROP TABLE orders")
            _read_until(proc, "REFUSED 42501", deadline, buf)
            assert proc.poll() is None  # still following: the session has not ended
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(20) == 0  # the logout ends it
    g.stop()
    out = "".join(buf)
    assert "LOGOUT" in out and out.index("first statement") < out.index("second statement") < out.index("DROP TABLE")


def _on_a_terminal(args, env_extra, tmp_path):
    """Run ``pooler ARGS`` with its stdout on a pseudo-terminal; -> what reached the terminal."""
    import os
    import pty

    master, slave = pty.openpty()
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TERM": "xterm", **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "pooler", *args], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    os.close(slave)
    got = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other side closed: the process is done writing
            break
        if not chunk:
            break
        got += chunk
    assert proc.wait(30) == 0, proc.stderr.read()
    os.close(master)
    return got.decode("utf-8", "replace")


def test_on_a_terminal_colour_and_a_pager_for_long_output(recorded, tmp_path):
    _, rec, sessions = recorded
    pager = tmp_path / "pager.sh"
    pager.write_text('#!/bin/sh\ncat > "$1"\n')
    pager.chmod(0o755)
    paged = tmp_path / "paged.txt"
    show = ["replay", "show", str(rec), sid_of(sessions, "agent")]
    env = {"PAGER": f"{pager} {paged}", "COLUMNS": "200"}
    # longer than the screen: through $PAGER, in colour
    screen = _on_a_terminal(show, dict(env, LINES="10"), tmp_path)
    text = paged.read_text()
    assert "DELETE FROM orders WHERE id = 1" in text and "\x1b[1;31mDENY" in text
    assert "DELETE FROM orders" not in screen
    paged.unlink()
    # it fits: straight to the terminal, in colour
    screen = _on_a_terminal(show, dict(env, LINES="500"), tmp_path)
    assert not paged.exists() and "\x1b[1;31mDENY" in screen and "DELETE FROM orders WHERE id = 1" in screen
    # --no-pager, and NO_COLOR
    screen = _on_a_terminal(show + ["--no-pager"], dict(env, LINES="10", NO_COLOR="1"), tmp_path)
    assert not paged.exists() and "DELETE FROM orders WHERE id = 1" in screen and "\x1b[" not in screen


def test_html_page_in_a_browser_shows_everything_and_loads_nothing(recorded, tmp_path):
    """The page in headless Chromium: the agent's text shown as text (no script of it runs), the
    styles apply under the page's own Content-Security-Policy, and nothing is fetched."""
    import shutil
    import tempfile

    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("chromium and chromedriver are not installed (./dev.sh setup --with-browser)")
    _, rec, sessions = recorded
    f = tmp_path / "agent.html"
    assert pooler("replay", "show", str(rec), sid_of(sessions, "agent"), "--html", str(f)).returncode == 0
    profile = tempfile.mkdtemp(prefix="pooler-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f.as_uri())
        sections = driver.find_elements(By.TAG_NAME, "section")
        assert [s.get_attribute("id") for s in sections] == ["q1", "q2", "q3", "q4", "q5"]
        assert "<script>alert(1)</script>" in sections[4].text  # shown, not run (an alert would fail this call)
        assert "***@example.com" in sections[0].text and "agents may only read data" in sections[1].text
        assert sections[1].value_of_css_property("border-left-color") == "rgba(198, 40, 40, 1)"
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_statements_fit_the_terminal_width(recorded, tmp_path):
    import re

    _, rec, _ = recorded
    screen = _on_a_terminal(["replay", "statements", str(rec), "--no-pager"], {"COLUMNS": "110", "LINES": "500"},
                            tmp_path)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in screen.replace("\r\n", "\n").splitlines()]
    assert lines[-1] == "9 statement(s)" and len(lines) == 11
    assert max(len(line) for line in lines) <= 110
    assert any(line.endswith("…") for line in lines)  # the agent's longest statement was cut to fit
