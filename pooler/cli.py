"""Command line: ``pooler run CONFIG``, ``pooler demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from . import config as config_mod


def setup_logging(verbose: int = 0, logfile: str | None = None) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    root.addHandler(h)
    if logfile:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level)


def _new_loop():
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def load_config_or_exit(path: str) -> config_mod.Config:
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as e:
        print(f"pooler: configuration error: {e}", file=sys.stderr)
        raise SystemExit(1)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    setup_logging(cfg.verbose + (args.verbose or 0), cfg.logfile)
    log = logging.getLogger("pooler")
    for w in cfg.warnings:
        log.warning("%s", w)
    from .gateway.app import Gateway

    async def main() -> None:
        gw = Gateway(cfg)
        await gw.start()
        gw.install_signal_handlers()
        await gw.stopped.wait()
        log.info("stopped")

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        try:
            runner.run(main())
        except OSError as e:
            log.error("could not start: %s", e)
            return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pooler", description="PostgreSQL gateway for AI agents")
    p.add_argument("--version", action="version", version=f"pooler {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the gateway in the foreground")
    r.add_argument("config", help="path to the ini file (pgbouncer.ini format)")
    r.add_argument("-v", "--verbose", action="count", default=0)
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="start a throwaway PostgreSQL with sample data and the gateway on it")
    d.add_argument("--config", default=None, help="gateway ini (default: conf/gateway.ini)")
    d.set_defaults(func=cmd_demo)
    args = p.parse_args(argv)
    return args.func(args)
