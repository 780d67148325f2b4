"""``pooler demo``: a throwaway PostgreSQL with sample personal data and the gateway in front.

Reads conf/gateway.ini, starts PostgreSQL on the port of its first [databases] entry (local
server binaries; run as the ``postgres`` user when root), creates that entry's upstream role,
loads the shop schema, runs the gateway in the foreground and removes everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import config as config_mod
from .cli import _new_loop, load_config_or_exit, setup_logging

REPO_CONF = Path(__file__).resolve().parent.parent / "conf" / "gateway.ini"


def _quote_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _quote_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def run_demo(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else REPO_CONF
    if not path.exists():
        print(f"pooler demo: {path} not found (pass --config)", file=sys.stderr)
        return 1
    cfg = load_config_or_exit(str(path))
    setup_logging(cfg.verbose, cfg.logfile)
    log = logging.getLogger("pooler.demo")
    for w in cfg.warnings:
        log.warning("%s", w)
    if not cfg.databases:
        print(f"pooler demo: {path} has no [databases] entry", file=sys.stderr)
        return 1
    db = next(iter(cfg.databases.values()))
    from .pgcluster import PgCluster, seed_demo

    log.info("starting a throwaway PostgreSQL on %s:%s", db.host, db.port)
    cluster = PgCluster(port=db.port, host=db.host if not db.host.startswith("/") else "127.0.0.1")
    try:
        cluster.start()
    except Exception as e:
        print(f"pooler demo: could not start PostgreSQL: {e}", file=sys.stderr)
        return 1
    try:
        dbname = db.dbname or db.name
        if db.user and db.user != cluster.superuser:
            stmt = f"CREATE ROLE {_quote_ident(db.user)} LOGIN"
            if db.password:
                stmt += f" PASSWORD {_quote_lit(db.password)}"
            cluster.execute(stmt)
        seed_demo(cluster, dbname, owner=None)
        if db.user and db.user != cluster.superuser:
            cluster.execute(
                f"ALTER DATABASE {_quote_ident(dbname)} OWNER TO {_quote_ident(db.user)};"
                f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {_quote_ident(db.user)};"
                f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {_quote_ident(db.user)};",
                dbname=dbname)
        log.info("loaded the shop schema into database %r", dbname)
        users = sorted(u for u in cfg.auth_users)
        example = users[0] if users else "postgres"
        pw = cfg.auth_users.get(example, "")
        hint = f"PGPASSWORD={pw} " if pw and not pw.startswith(("md5", "SCRAM-SHA-256$")) else ""
        print(
            "\n  The gateway is ready. Connect with:\n\n"
            f"    {hint}psql 'host={cfg.listen_addr.split(',')[0]} port={cfg.listen_port} "
            f"dbname={db.name} user={example}'\n\n"
            f"  Client logins are in {cfg.resolve(cfg.auth_file) if cfg.auth_file else '(trust)'}; "
            "press Ctrl-C to stop and remove everything.\n",
            file=sys.stderr, flush=True)
        from .gateway.app import Gateway

        async def main() -> None:
            gw = Gateway(cfg)
            await gw.start()
            gw.install_signal_handlers()
            await gw.stopped.wait()

        with asyncio.Runner(loop_factory=_new_loop) as runner:
            try:
                runner.run(main())
            except OSError as e:
                log.error("could not start the gateway: %s", e)
                return 1
    finally:
        log.info("removing the throwaway PostgreSQL")
        cluster.stop()
    return 0
