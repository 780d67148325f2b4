"""Shared pytest fixtures.

``pg``      -- one throwaway PostgreSQL cluster for the whole session (pooler.pgcluster.PgCluster):
               started on a free port of 127.0.0.1, superuser ``postgres`` with ``pg.password``,
               scram-sha-256 over TCP, trust over the unix socket; stopped and removed at the end.
``pg_bin``  -- the directory holding the PostgreSQL server binaries.
``gw_factory``, ``gw`` -- gateway processes in front of ``pg``.
``demo_shop``, ``raw_pii``, ``shop_gw`` -- the demo shop behind the shipped rules (masking tests).

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


def login_roles(pg, roles: dict[str, str]) -> dict[str, str]:
    """(Re)create LOGIN roles with these passwords on the test cluster; -> ``roles``."""
    for r, pw in roles.items():
        pg.execute(f"DROP ROLE IF EXISTS {r}")
        pg.execute(f"CREATE ROLE {r} LOGIN PASSWORD '{pw}'")
    return roles


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


def one_pool(gw_factory, pg, mode="transaction", size=1):
    """A gateway whose database postgres has one pool of ``size`` servers in pool mode ``mode``."""
    return gw_factory(settings={"pool_mode": mode, "default_pool_size": size},
                      databases={"postgres": upstream_entry(pg)})


IDENTITIES = {"u1": "groups=g1", "u2": "groups=g2", "u3": "groups=g3"}


def identities_gw(gw_factory, pg, size=1, extra_db="", settings=None, users=None):
    """A gateway whose users (``IDENTITIES`` unless ``users``: three identities) share one pool of
    ``size`` servers of database postgres (its entry extended by ``extra_db``), so a server
    passes from one identity to another; database bench is served too."""
    s = {"default_pool_size": str(size)}
    s.update(settings or {})
    dbs = {"postgres": upstream_entry(pg) + extra_db, "bench": upstream_entry(pg, "bench")}
    return gw_factory(settings=s, users=users or IDENTITIES, databases=dbs)


# --------------------------------------------------------------------------- the demo shop, masked


@pytest.fixture(scope="module")
def demo_shop(pg, request):
    """The demo shop (pooler.pgcluster.seed_demo) in a database of the requesting test module's
    own, named after it: what one module's tests create there stays out of the others'.
    (test_masking_e2e.py and test_policy_e2e.py seed their own ``shop``.)"""
    from pooler.pgcluster import seed_demo

    return seed_demo(pg, "shop_" + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))


@pytest.fixture(scope="module")
def raw_pii(pg, demo_shop):
    """The real personal values of ``demo_shop``, read directly from PostgreSQL, as one flat list
    (for tests.masking_helpers.assert_no_secret; test_masking_e2e.py has its own ``raw``)."""
    out = pg.psql("SELECT full_name, email, phone, card_number, ssn FROM customers", dbname=demo_shop)
    vals = []
    for line in out.strip().splitlines():
        vals += [v for v in line.split("|") if v]
    vals += pg.psql("SELECT iban FROM payments WHERE iban IS NOT NULL", dbname=demo_shop).split()
    return vals


@pytest.fixture
def shop_gw(pg, demo_shop, gw_factory):
    """The shipped rules (hash key "test-key") in front of ``demo_shop``, served as database shop."""
    from tests.masking_helpers import masking_gw

    return masking_gw(pg, demo_shop, gw_factory)
