"""Comma-separated host lists in [databases] with load_balance_hosts, as PgBouncer 1.25 uses them
(test_load_balance_hosts.py): round-robin takes the next host for every new server; disable stays
on one host until a connection to it fails. psycopg through the gateway to the real PostgreSQL,
reached over TCP (127.0.0.1) and over its Unix socket: inet_server_addr() tells them apart."""

from __future__ import annotations

import psycopg

DEAD = "127.0.0.3"  # nothing listens there


def entry(pg, hosts, extra=""):
    return f"host={hosts} port={pg.port} dbname=postgres user={pg.superuser} password={pg.password} {extra}"


def server_addrs(gw, n, dbname="postgres"):
    """Where each of ``n`` servers opened at once connected (None: the Unix socket)."""
    conns = [psycopg.connect(gw.dsn(dbname=dbname)) for _ in range(n)]
    try:
        # each in a transaction: n servers at once
        return [c.execute("SELECT host(inet_server_addr())").fetchone()[0] for c in conns]
    finally:
        for c in conns:
            c.close()


def console_rows(gw, what):
    with psycopg.connect(gw.dsn(user="postgres", dbname="pgbouncer"), autocommit=True, prepare_threshold=None) as c:
        cur = c.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def test_round_robin_spreads_new_servers_over_the_hosts(gw_factory, pg):
    gw = gw_factory(databases={"postgres": entry(pg, f"127.0.0.1,{pg.socket_dir}")},
                    settings={"admin_users": "postgres", "default_pool_size": "4"})
    addrs = server_addrs(gw, 4)
    assert sorted(addrs, key=str) == sorted(["127.0.0.1", None, "127.0.0.1", None], key=str)
    row = next(r for r in console_rows(gw, "DATABASES") if r["name"] == "postgres")
    assert row["host"] == f"127.0.0.1,{pg.socket_dir}" and row["load_balance_hosts"] == "round-robin"


def test_disable_stays_on_the_first_host_that_works(gw_factory, pg):
    gw = gw_factory(databases={"good_first": entry(pg, f"127.0.0.1,{pg.socket_dir}", "load_balance_hosts=disable"),
                               "bad_first": entry(pg, f"{DEAD},127.0.0.1,{pg.socket_dir}", "load_balance_hosts=disable")},
                    settings={"admin_users": "postgres", "default_pool_size": "3"})
    assert server_addrs(gw, 3, "good_first") == ["127.0.0.1"] * 3
    # the dead host is skipped once, then every server goes to the next one: no client sees the failure
    assert server_addrs(gw, 3, "bad_first") == ["127.0.0.1"] * 3
    assert f"{DEAD}: could not connect to server" in gw.log()
    assert gw.log().count("trying the next host of the list") == 1


def test_round_robin_skips_an_unreachable_host(gw_factory, pg):
    gw = gw_factory(databases={"postgres": entry(pg, f"{DEAD},127.0.0.1")}, settings={"default_pool_size": "3"})
    assert server_addrs(gw, 3) == ["127.0.0.1"] * 3


def test_host_lists_are_checked_at_load(tmp_path):
    import pytest

    from pooler.config import ConfigError, load

    ini = tmp_path / "g.ini"
    ini.write_text("[databases]\nx = host=a,,b\n[gateway]\nauth_type = trust\n")
    with pytest.raises(ConfigError, match=r"g.ini:2: database x: invalid host: empty host name"):
        load(ini)
    ini.write_text("[databases]\nx = host=a,b load_balance_hosts=random\n[gateway]\nauth_type = trust\n")
    with pytest.raises(ConfigError, match=r"g.ini:2: database x: invalid load_balance_hosts: expected one of round-robin, disable"):
        load(ini)
