"""PgBouncer's periodic ``stats:`` log line (log_stats, stats_period), from a real gateway process
that served real queries."""

from __future__ import annotations

import re
import time

import psycopg

from pooler import config

# PgBouncer 1.25's line (stats.c)
LINE = re.compile(r"stats: (\d+) xacts/s, (\d+) queries/s, (\d+) client parses/s, (\d+) server parses/s, "
                  r"(\d+) binds/s, in (\d+) B/s, out (\d+) B/s, xact (\d+) us, "
                  r"query (\d+) us, wait (\d+) us$")


def stats_lines(gw) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in mt.groups()) for line in gw.log().splitlines()
            if (mt := LINE.search(line))]


def test_the_stats_line_reports_each_period_as_pgbouncer_does(gw_factory):
    g = gw_factory(settings={"stats_period": "1"})
    with psycopg.connect(g.dsn(), autocommit=True) as conn:
        for _ in range(40):
            conn.execute("SELECT 1")
    deadline = time.monotonic() + 10
    busy = []
    while time.monotonic() < deadline and not busy:
        busy = [s for s in stats_lines(g) if s[0] > 0]  # a period that saw the 40 transactions
        time.sleep(0.05)
    assert busy, g.log()[-2000:]
    xacts, queries, _, _, _, inb, outb, xact_us, query_us, _ = busy[0]
    assert queries == xacts and inb > 0 and outb > 0 and xact_us > 0 and query_us > 0


def test_log_stats_and_stats_period_are_settings_not_warnings(tmp_path):
    p = tmp_path / "gateway.ini"
    p.write_text("[databases]\nx = host=127.0.0.1\n[pgbouncer]\nauth_type = trust\nlog_stats = 0\nstats_period = 15\n")
    cfg = config.load(str(p))
    assert (cfg.log_stats, cfg.stats_period) == (False, 15.0)
    assert not [w for w in cfg.warnings if "stats" in w]
