"""What every command of the process shares: logging set up as the gateway logs (one line per
event), the event loop (uvloop where installed), and reading the config or exiting with its
error."""

from __future__ import annotations

import asyncio
import logging
import sys

from . import config as config_mod


# control characters a client can put in what the gateway logs (user and database names,
# application_name, SQL in refusals), escaped so that one event stays one line
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


class LineFormatter(logging.Formatter):
    """One line per event: control characters in the message are escaped (a traceback that
    follows an exception is kept as it is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


def setup_logging(verbose: int = 0, logfile: str | None = None) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    fmt = LineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
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


def new_event_loop():
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
