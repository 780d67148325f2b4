"""Shared pytest fixtures.

``pg``      -- one throwaway PostgreSQL cluster for the whole session (pooler.pgcluster.PgCluster):
               started on a free port of 127.0.0.1, superuser ``postgres`` with ``pg.password``,
               scram-sha-256 over TCP, trust over the unix socket; stopped and removed at the end.
``pg_bin``  -- the directory holding the PostgreSQL server binaries.

Tests that must stop/restart PostgreSQL themselves should prefer a private ``PgCluster()``
(or restore the session cluster with ``pg.start_server()``) so later tests are not affected.
"""

from __future__ import annotations

import pytest

from pooler.pgcluster import PgCluster, find_pg_bindir


@pytest.fixture(scope="session")
def pg_bin() -> str:
    return find_pg_bindir()


@pytest.fixture(scope="session")
def pg(pg_bin):
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- the gateway

from tests.gwproc import GatewayProc  # noqa: E402


def send_until_closed(gw, data: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes to a gateway; everything it answers until it closes the connection."""
    import socket

    out = b""
    with socket.create_connection((gw.host, gw.port), timeout=timeout) as s:
        s.sendall(data)
        while chunk := s.recv(65536):
            out += chunk
    return out


def upstream_entry(pg, dbname: str = "postgres") -> str:
    """A [databases] connection string to the test cluster as its superuser."""
    return f"host=127.0.0.1 port={pg.port} dbname={dbname} user={pg.superuser} password={pg.password}"


@pytest.fixture
def gw_factory(pg, tmp_path):
    """Start gateways as subprocesses: ``gw_factory(settings=..., auth_users=..., databases=...)``.
    Every [databases] entry defaults to the test cluster; all are stopped after the test."""
    started: list[GatewayProc] = []

    def make(settings=None, auth_users=None, databases=None, users=None, start=True):
        dbs = databases or {"postgres": upstream_entry(pg), "*": upstream_entry(pg, "postgres").replace(" dbname=postgres", "")}
        wd = tmp_path / f"gw{len(started)}"
        wd.mkdir()
        g = GatewayProc(dbs, settings=settings, auth_users=auth_users, users=users, workdir=str(wd))
        started.append(g)
        return g.start() if start else g

    yield make
    for g in started:
        g.stop()


@pytest.fixture
def gw(gw_factory):
    """A transaction-mode gateway (pool of 5, trust auth) in front of the test cluster."""
    return gw_factory()


@pytest.fixture(scope="session")
def pgbench_db(pg):
    """A database initialised by ``pgbench -i``."""
    import subprocess

    pg.execute("CREATE DATABASE bench")
    r = subprocess.run(["pgbench", "-i", "-q", "-s", "1", pg.dsn(dbname="bench")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return "bench"
