"""`pooler demo`: throwaway PostgreSQL + sample data + gateway, cleaned up on Ctrl-C."""

import os
import re
import signal
import subprocess
import sys

import psycopg
import pytest

from tests.gwproc import REPO, free_port, wait_port


def test_demo_starts_serves_sample_data_and_cleans_up(tmp_path):
    pg_port, gw_port = free_port(), free_port()
    conf = (REPO / "conf" / "gateway.ini").read_text()
    conf = conf.replace("port=55433", f"port={pg_port}").replace("listen_port = 6432", f"listen_port = {gw_port}")
    conf = conf.replace("rules_dir = ../rules", f"rules_dir = {REPO / 'rules'}")
    ini = tmp_path / "gateway.ini"
    ini.write_text(conf)
    (tmp_path / "userlist.txt").write_text((REPO / "conf" / "userlist.txt").read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pooler", "demo", "--config", str(ini)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tok = "no token yet"
    try:
        wait_port("127.0.0.1", gw_port, proc, timeout=120)
        dsn = f"host=127.0.0.1 port={gw_port} dbname=shop user=agent password=agent-password sslmode=disable"
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == (200,)
            # the agent is logged in upstream as the configured service role, not as itself
            assert conn.execute("SELECT current_user").fetchone() == ("shop_gateway",)
            # the shipped rules govern the agent: it may read, never write
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="agents may only read"):
                conn.execute("DELETE FROM orders WHERE id = 1")
        # an AI agent logs in with a token minted by `pooler token`, over TLS, with psql
        token = subprocess.run([sys.executable, "-m", "pooler", "token", "--config", str(ini), "agent-42",
                                "--groups", "agents"], capture_output=True, text=True, env=env, timeout=60)
        assert token.returncode == 0, token.stderr
        tok = token.stdout.strip()
        r = subprocess.run(["psql", "-X", "-At", f"host=127.0.0.1 port={gw_port} dbname=shop user=agent-42 sslmode=require",
                            "-c", "SELECT count(*) FROM orders", "-c", "DELETE FROM orders WHERE id = 1"],
                           capture_output=True, text=True, env=dict(env, PGPASSWORD=tok), timeout=60)
        assert r.stdout.strip().isdigit(), r.stderr
        assert "agents may only read" in r.stderr
        # a token for a group the rules do not restrict: the same DELETE is not refused by them
        other = subprocess.run([sys.executable, "-m", "pooler", "token", "--config", str(ini), "ops-bot",
                                "--groups", "operators"], capture_output=True, text=True, env=env, timeout=60)
        with psycopg.connect(f"host=127.0.0.1 port={gw_port} dbname=shop user=ops-bot sslmode=require "
                             f"password={other.stdout.strip()}") as conn:
            assert conn.pgconn.ssl_in_use
            conn.execute("DELETE FROM payments WHERE id = -1")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert re.search(r"psql 'host=127\.0\.0\.1 port=\d+ dbname=shop user=agent'", out)
    assert re.search(r"PGPASSWORD=\$\(.* -m pooler token --config \S+ agent-42 --groups agents\) psql "
                     r"'host=127\.0\.0\.1 port=\d+ dbname=shop user=agent-42 sslmode=require'", out)
    assert tok not in out  # tokens are never logged
    assert "demo-upstream-secret" not in out  # the upstream secret is never printed
    # every session was recorded beside the demo's files, the chain holds, and no secret is in it
    from pooler.recording import files as rf
    from pooler.recording.reader import iter_sessions
    from pooler.recording.verify import verify

    rec = tmp_path / ".demo" / "recordings"
    assert f"Sessions are recorded in {rec}" in out
    assert verify(rec).ok
    users = [s["login"]["user"] for s in iter_sessions(rec)]
    assert {"agent", "agent-42", "ops-bot"} <= set(users)
    assert any(e.get("sql") == "DELETE FROM orders WHERE id = 1" and e.get("action") == "deny"
               for s in iter_sessions(rec) for e in s["events"])
    # ... and the demo says how to play them back: the token agent's session, as README shows it
    assert f"pooler replay show {rec} last" in out
    from tests.replay_helpers import pooler

    shown = pooler("replay", "show", str(rec), "last", "--identity", "agent-42")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("session ") and "agent-42 (agents)  →  shop" in shown.stdout
    assert "auth jwt over TLS" in shown.stdout and "DENY     rules/20_agents.star" in shown.stdout
    text = "\n".join(b"\n".join(rf.read_lines(f.path)[0]).decode() for f in rf.list_files(rec))
    assert tok not in text and "agent-password" not in text and "demo-upstream-secret" not in text
    m = re.search(r"removing the throwaway PostgreSQL", out)
    assert m, out
    # the cluster is gone: nothing listens on its port any more
    import socket
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", pg_port)) != 0
