"""Log lines stay one per event: a client's user name, database name or application_name with a
newline (sent in the startup packet, before any authentication, or set later) is escaped inside
the line of the real event and never writes a forged line into the gateway's log."""

from __future__ import annotations

import socket

import psycopg

from pooler.protocol import messages as m


def test_client_supplied_names_cannot_forge_log_lines(gw):
    forged = "2026-01-01 00:00:00,000 INFO pooler.client: login: 10.0.0.9 db=postgres user=cfo-bot tls token"
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    try:
        s.sendall(m.startup_message({"user": "eve\n" + forged, "database": "no_such_db\r\n" + forged}))
        s.recv(65536)
    finally:
        s.close()
    with psycopg.connect(gw.dsn(), application_name="app\n" + forged) as c:
        c.execute("SET application_name = 'x\n" + forged + "'")
        c.execute("SELECT 1")
    log = gw.log()
    assert "user=cfo-bot" in log  # it was logged, escaped inside the line of the real event
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), log[-2000:]
    assert "eve\\n2026-01-01" in log
