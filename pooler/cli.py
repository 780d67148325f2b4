"""Command line: ``pooler run CONFIG``, ``pooler demo``, ``pooler token``, ``pooler rules``,
``pooler approvals`` (cli_approvals.py), ``pooler recordings`` (cli_recordings.py), ``pooler replay``
and ``pooler rules test --against`` (cli_replay.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from . import config as config_mod
from .runtime import load_config_or_exit, new_event_loop, setup_logging


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    setup_logging(cfg.verbose + (args.verbose or 0), cfg.logfile)
    log = logging.getLogger("pooler")
    for w in cfg.warnings:
        log.warning("%s", w)
    from .gateway.app import Gateway
    from .policy.rules import RuleLoadError

    async def main() -> None:
        try:
            gw = Gateway(cfg)
        except RuleLoadError as e:
            log.error("rules failed to load: %s", e)
            raise SystemExit(1)
        except config_mod.ConfigError as e:
            log.error("configuration error: %s", e)
            raise SystemExit(1)
        if gw.policy is not None:
            log.info("rules loaded from %s: %d file(s), version %s, default_action=%s",
                     cfg.rules_path(), len(gw.policy.rules.files), gw.policy.rules.version, cfg.default_action)
        await gw.start()
        gw.install_signal_handlers()
        await gw.stopped.wait()
        log.info("stopped")

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            runner.run(main())
        except (OSError, RuntimeError) as e:
            log.error("could not start: %s", e)
            return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_token(args: argparse.Namespace) -> int:
    """``pooler token SUBJECT --groups a,b``: a token signed with the demo's own key (demo only)."""
    from .demo import demo_config, mint_demo_token

    found = demo_config(args.config, "token")
    if found is None:
        return 1
    path, cfg = found
    if not config_mod.jwt_in_use(cfg):
        print(f"pooler token: {path} does not use auth_type = jwt anywhere", file=sys.stderr)
        return 1
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(mint_demo_token(cfg, args.subject, groups, args.ttl))
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    """``pooler rules check DIR`` compiles and lints; ``pooler rules test DIR`` runs the tests."""
    from pathlib import Path

    import starlark as sl

    from .policy.bundle import load_rules, run_rule_tests
    from .policy.rules import RuleLoadError

    if args.against and args.action != "test":
        print("pooler rules: --against goes with test (pooler rules test DIR --against RECORDINGS)", file=sys.stderr)
        return 2
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"pooler rules: {directory} is not a directory", file=sys.stderr)
        return 2
    try:
        rs = load_rules(directory, args.default_action, run_tests=False)
    except RuleLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.against:
        from .cli_replay import rules_against

        return rules_against(args, rs)
    problems = 0
    if args.action == "check":
        for rf in rs.files:
            src = rf.path.read_text()
            for lint in sl.parse(rf.name, src).lint():
                if str(lint.severity).endswith("Disabled"):
                    continue
                print(f"{lint.resolved_location}: {lint.short_name}: {lint.problem}")
                problems += 1
            if rf.frozen is None:
                print(f"{rf.name}: note: defines no on_statement(stmt, session); it has no effect")
        print(f"{len(rs.files)} rule file(s) compiled, {len(rs.tests)} test case(s) found, {problems} lint warning(s)")
        return 0
    results = run_rule_tests(rs)
    failed = [r for r in results if not r.ok]
    for r in results:
        mark = "PASS" if r.ok else "FAIL"
        line = f"{mark} {r.case['_file']} #{r.case['_index']} {r.case.get('name') or r.case['sql'][:60]}"
        if not r.ok:
            line += f"\n     {r.message}"
        print(line)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


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
    t = sub.add_parser("token", help="mint a login token with the demo's own key (for the demo only)")
    t.add_argument("subject", help="the agent's user name (the token's user claim)")
    t.add_argument("--groups", default="agents", help="comma-separated groups claim (default: agents)")
    t.add_argument("--ttl", type=float, default=3600, help="seconds until the token expires (default: 3600)")
    t.add_argument("--config", default=None, help="gateway ini (default: conf/gateway.ini)")
    t.set_defaults(func=cmd_token)
    ru = sub.add_parser("rules", help="rule authoring tools")
    ru.add_argument("action", choices=["check", "test"], help="check: compile and lint; test: run the *.test.toml cases")
    ru.add_argument("dir", help="rules directory")
    ru.add_argument("--default-action", default="allow", choices=["allow", "deny"])
    ag = ru.add_argument_group("test against recordings (exit status 1 when any decision would change)")
    ag.add_argument("--against", metavar="RECORDINGS",
                    help="decide every recorded statement again with DIR's rules and report what would change")
    ag.add_argument("--baseline", metavar="RULES_DIR",
                    help="compare with this rule set decided the same way, instead of the recorded decisions")
    ag.add_argument("--since", help="only statements from this time (ISO-8601, 'yesterday', '3h ago', ...)")
    ag.add_argument("--until", help="only statements before this time")
    ag.add_argument("--identity", help="only sessions of this identity")
    ag.add_argument("--database", help="only sessions of this database")
    ag.add_argument("--catalog", metavar="DSN",
                    help="read masking's catalog from this database (libpq string or URL), as the gateway does: "
                         "views are seen through, user-defined functions known")
    ag.add_argument("--json", action="store_true", help="the report as one JSON object")
    ru.set_defaults(func=cmd_rules)
    from .cli_approvals import add_parser as add_approvals

    add_approvals(sub)
    from .cli_recordings import add_parser as add_recordings

    add_recordings(sub)
    from .cli_replay import add_parser as add_replay

    add_replay(sub)
    args = p.parse_args(argv)
    return args.func(args)
