"""``pooler replay``: recorded sessions listed, searched and played back (docs/recordings.md,
"Replay"); and ``pooler rules test DIR --against RECORDINGS`` (the rules diff).

- ``pooler replay list DIR [filters]``: one line per session.
- ``pooler replay statements DIR [filters]``: one line per statement, across sessions (the
  auditor's search: ``--identity agent-7 --table customers --day 'last tuesday' --decision deny``).
- ``pooler replay show DIR SID``: one session as a timeline; ``--speed`` plays it at its pace,
  ``--follow`` follows a live one, ``--json``, ``--asciicast FILE``, ``--html FILE``.

Output: colour only on a terminal (``--color``, ``NO_COLOR``), long output through ``$PAGER``
(``less -FRX`` when unset) on a terminal only; ``--json`` prints JSON lines for tools.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from .recording import render
from .recording.reader import iter_sessions
from .recording.timeline import DECISIONS, Filter, day_start, parse_when, statement_text, statements, summary


def _out_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _style(args) -> render.Style:
    how = getattr(args, "color", "auto")
    if how == "always":
        return render.Style(True)
    if how == "never" or os.environ.get("NO_COLOR"):
        return render.Style(False)
    return render.Style(_out_is_tty() and os.environ.get("TERM") != "dumb")


def _emit(text: str, args) -> None:
    """Print ``text``; on a terminal, through the pager when it is longer than the screen."""
    if not text.endswith("\n"):
        text += "\n"
    if _out_is_tty() and not getattr(args, "no_pager", False):
        size = shutil.get_terminal_size()
        if text.count("\n") >= size.lines:
            pager = os.environ.get("PAGER") or "less"
            env = dict(os.environ)
            env.setdefault("LESS", "FRX")  # quit if one screen, keep colours, leave the screen as is
            try:
                p = subprocess.Popen(shlex.split(pager), stdin=subprocess.PIPE, env=env)
            except (OSError, ValueError):
                p = None
            if p is not None:
                try:
                    p.communicate(text.encode("utf-8", "replace"))
                except (BrokenPipeError, KeyboardInterrupt):
                    pass
                return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        pass


def _write(text: str) -> None:
    """Output for tools (JSON lines): never paged, never coloured."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        pass


def _json_line(obj) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()


def _filter(args) -> Filter:
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
        if args.day:
            start = day_start(args.day)
            if start is None:
                raise ValueError(f"--day {args.day!r}: not a day (2026-12-01, today, yesterday, last tuesday)")
            since = start if since is None else max(since, start)
            until = start + 86400 if until is None else min(until, start + 86400)
    except ValueError as e:
        raise SystemExit(f"pooler replay: {e}")
    return Filter(identity=args.identity, group=args.group, database=args.database, since=since, until=until,
                  decision=args.decision, rule=args.rule, text=args.grep, table=args.table)


def _root(args) -> Path:
    root = Path(args.dir)
    if not root.is_dir():
        raise SystemExit(f"pooler replay: {root} is not a directory")
    return root


def _sessions(root: Path, flt: Filter):
    for s in iter_sessions(root, **flt.reader_args()):
        if flt.session(s):
            yield s


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "?"


def cmd_list(args) -> int:
    root = _root(args)
    flt = _filter(args)
    found = [summary(s) for s in _sessions(root, flt)]
    if args.json:
        _write("".join(_json_line(x) + "\n" for x in found))
        return 0
    if not found:
        print("no recorded session matches", file=sys.stderr)
        return 0
    rows = []
    for x in found:
        dur = "live" if x["live"] else render.fmt_dur((x["end"] or 0) - (x["start"] or 0))
        rows.append([_when(x["start"]), x["sid"] or "", x["user"] or "", ",".join(x["groups"]), x["database"] or "",
                     str(x["statements"]), str(x["denied"]), str(x["masked"]), str(x["errors"]), dur, x["app"] or ""])
    lines = render.columns(["START (UTC)", "SESSION", "USER", "GROUPS", "DATABASE", "STMTS", "DENIED", "MASKED",
                            "ERRORS", "DURATION", "APP"], rows, _style(args))
    lines.append(f"{len(found)} session(s)")
    _emit("\n".join(lines), args)
    return 0


def _outcome(st: dict) -> str:
    if st["refused"]:
        return f"refused {st['refused']['sqlstate']}"
    if st["holds"] and st["holds"][-1].get("state") not in (None, "approved"):
        return f"approval {st['holds'][-1]['state']}"
    got = []
    for r in st["results"]:
        if r["t"] == "error":
            got.append(f"error {r['sqlstate']}")
        elif r["t"] == "done":
            got.append(r["tag"] or "(empty)")
    if not got and st["holds"]:
        return "held"
    return "; ".join(got) or "-"


def cmd_statements(args) -> int:
    root = _root(args)
    flt = _filter(args)
    found = []
    for s in iter_sessions(root, **flt.reader_args()):
        login = s.get("login") or {}
        for st in statements(s):
            if flt.statement(st):
                found.append((login, st))
    if args.json:
        _write("".join(_json_line(dict(st, user=lg.get("user"), groups=lg.get("groups"), database=lg.get("database")))
                       + "\n" for lg, st in found))
        return 0
    if not found:
        print("no recorded statement matches", file=sys.stderr)
        return 0
    rows = []
    for lg, st in found:
        sql = " ".join(statement_text(st).split())
        rows.append([_when(st["ts"]), st["sid"] or "", str(st["q"]), lg.get("user") or "", lg.get("database") or "",
                     st["action"] or "-", st["rule"] or "-", _outcome(st), sql])
    heads = ["TIME (UTC)", "SESSION", "#", "USER", "DATABASE", "DECISION", "RULE", "OUTCOME", "STATEMENT"]
    lines = render.columns(heads, rows, _style(args))
    if _out_is_tty():  # on a terminal the statement is cut to the screen's width
        plain = render.columns(heads, rows, render.Style(False))[0]  # (no colour codes to count)
        room = shutil.get_terminal_size().columns - (render.width(plain) - len("STATEMENT"))
        lines = render.columns(heads, rows, _style(args), max_last=room)
    lines.append(f"{len(found)} statement(s)")
    _emit("\n".join(lines), args)
    return 0


def _find_session(root: Path, wanted: str, flt: Filter) -> dict:
    found = list(_sessions(root, flt))
    if wanted == "last":
        if not found:
            raise SystemExit("pooler replay: no recorded session matches")
        return max(found, key=lambda s: (s["start"] or 0.0))
    exact = [s for s in found if s["sid"] == wanted]
    if exact:
        return exact[0]
    near = [s for s in found if str(s["sid"]).startswith(wanted)]
    if len(near) == 1:
        return near[0]
    if near:
        raise SystemExit(f"pooler replay: {wanted!r} names {len(near)} sessions: "
                         + ", ".join(s["sid"] for s in near[:10]))
    raise SystemExit(f"pooler replay: no recorded session {wanted!r} (pooler replay list {root})")


def cmd_show(args) -> int:
    root = _root(args)
    flt = _filter(args)
    s = _find_session(root, args.session, flt)
    if args.asciicast or args.html:
        for path, text, what in ((args.asciicast, lambda: render.asciicast(
                s, cols=args.cols, rows=args.rows, idle_limit=args.idle_limit or None), "asciicast v3"),
                                 (args.html, lambda: render.html_page(s), "HTML page")):
            if not path:
                continue
            try:
                Path(path).write_text(text(), encoding="utf-8")
            except OSError as e:
                raise SystemExit(f"pooler replay: cannot write {path}: {e.strerror or e}")
            print(f"wrote {path} ({what} of session {s['sid']})", file=sys.stderr)
        return 0
    if args.follow:
        return _follow(root, s, args)
    if args.json:
        lines = [_json_line(dict(summary(s), type="session", login=s.get("login")))]
        lines += [_json_line(dict(st, type="statement")) for st in statements(s)]
        if s.get("logout"):
            lines.append(_json_line(dict(s["logout"], type="logout")))
        _write("\n".join(lines) + "\n")
        return 0
    style = _style(args)
    if args.speed < 0 or args.idle_limit < 0:
        raise SystemExit("pooler replay: --speed and --idle-limit must not be negative")
    if args.speed:
        return _play(render.frames(s, style, not args.no_rows), args)
    _emit(render.text(s, style, not args.no_rows), args)
    return 0


def _play(frames, args) -> int:
    """At the recording's pace (``--speed`` times faster), waits capped at ``--idle-limit``."""
    last = None
    try:
        for ts, text in frames:
            if ts is not None and last is not None:
                wait = max(ts - last, 0.0) / args.speed
                if args.idle_limit:
                    wait = min(wait, args.idle_limit)
                time.sleep(wait)
            if ts is not None:
                last = ts
            sys.stdout.write(text)
            sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    return 0


def _follow(root: Path, s: dict, args) -> int:
    from .recording.follow import follow_session

    style = _style(args)
    tl = render.Timeline(style, s["sid"], not args.no_rows)
    try:
        for rec in follow_session(root, s["sid"], interval=0.2, start=s.get("start")):
            if args.json:
                sys.stdout.write(_json_line(rec) + "\n")
            else:
                lines = tl.feed(rec)
                if lines:
                    sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    return 0


# ---------------------------------------------------------------------------- rules test --against


def rules_against(args, candidate) -> int:
    """``pooler rules test DIR --against RECORDINGS``: exit 0 when nothing would change, 1 when
    something would, 2 when the recordings or the baseline cannot be read."""
    from .policy.bundle import load_rules
    from .policy.rules import RuleLoadError
    from .recording.rulediff import compare

    root = Path(args.against)
    if not root.is_dir():
        print(f"pooler rules: --against {root} is not a directory", file=sys.stderr)
        return 2
    baseline = None
    if args.baseline:
        try:
            baseline = load_rules(Path(args.baseline), args.default_action, run_tests=False)
        except RuleLoadError as e:
            print(f"error: --baseline: {e}", file=sys.stderr)
            return 2
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as e:
        print(f"pooler rules: {e}", file=sys.stderr)
        return 2
    catalog = None
    if args.catalog:
        try:
            catalog = load_catalog(args.catalog)
        except Exception as e:  # noqa: BLE001 - any failure to read it is reported, and nothing is compared
            print(f"pooler rules: --catalog: cannot read the catalog: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    sessions = iter_sessions(root, since=since, until=until, identity=args.identity, database=args.database)
    rep = compare(sessions, candidate, baseline, catalog, since, until)
    counts = rep.counts()
    if args.json:
        print(_json_line({"sessions": rep.sessions, "statements": rep.statements, "judged": rep.judged,
                          "skipped": rep.skipped, "changed": len(rep.changes), "counts": counts,
                          "changes": [c.to_dict() for c in rep.changes]}))
        return 1 if rep.changes else 0
    base_name = f"the rules in {args.baseline}" if args.baseline else "what was recorded"
    out = []
    for c in rep.changes:
        out.append(f"CHANGED  {c.sid} #{c.q}  {c.user}@{c.database}  {render.fmt_time(c.ts)}  [{', '.join(c.kinds)}]")
        out += render._indent(c.sql, "         ")
        out.append(f"         before: {_decision_text(c.before)}")
        out.append(f"         after:  {_decision_text(c.after)}")
        out += [f"         {render.safe(d)}" for d in c.detail]
    figures = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    out.append(f"{rep.judged} statement(s) of {rep.sessions} session(s) decided again with {args.dir}, "
               f"compared with {base_name}: {len(rep.changes)} would change" + (f" ({figures})" if figures else ""))
    if rep.skipped:
        out.append(f"({rep.skipped} statement(s) recorded without rules were not compared)")
    print("\n".join(out))
    return 1 if rep.changes else 0


def load_catalog(dsn: str):
    """Masking's catalog of one database (the queries the gateway runs: masking.catalog.CATALOG_SQL),
    read with asyncpg, as masking.catalog.Catalog."""
    import asyncio

    import asyncpg

    from .config import store_connect_args
    from .masking.catalog import CATALOG_SQL, Catalog

    selects = [q.strip() for q in CATALOG_SQL.split(";") if q.strip().upper().startswith("SELECT")]

    def raw(v):
        if v is None or isinstance(v, bytes):
            return v
        return str(v).encode()

    async def read():
        conn = await asyncpg.connect(**{"timeout": 15, **store_connect_args(dsn)})
        try:
            await conn.execute("SET search_path = pg_catalog")
            return [[[raw(v) for v in row] for row in await conn.fetch(q, timeout=60)] for q in selects]
        finally:
            await conn.close()

    return Catalog.from_results(asyncio.run(read()), version=1)


def _decision_text(d) -> str:
    text = d.action + (f" by {d.rule}" if d.rule else (" (default_action)" if d.action else ""))
    if d.reason:
        text += f": {d.reason}"
    if d.masks:
        text += " [" + ", ".join(f"{c}={m}" for c, m in d.masks) + "]"
    return render.safe(text)


# ---------------------------------------------------------------------------- the parser


def _filters(p) -> None:
    g = p.add_argument_group("filters (all given must hold)")
    g.add_argument("--identity", "--user", dest="identity", help="the identity that logged in (token subject or user)")
    g.add_argument("--group", help="sessions of identities in this group")
    g.add_argument("--database", help="the database the session used")
    g.add_argument("--since", help="from this time: ISO-8601 (UTC unless it says), 'yesterday', '3h ago', ...")
    g.add_argument("--until", help="before this time (same forms as --since)")
    g.add_argument("--day", help="one UTC day: 2026-12-01, today, yesterday, tuesday / 'last tuesday'")
    g.add_argument("--decision", choices=DECISIONS,
                   help="what the rules decided (allow, deny, mask, require_approval, none = recorded without "
                        "rules), or what happened (refused by the gateway, error from the server)")
    g.add_argument("--rule", help="decided by this rule file (a part of its name: 20_agents)")
    g.add_argument("--grep", help="text in the statement, the decision's reason or an error message (any case)")
    g.add_argument("--table", help="statements that read or write this table (customers or public.customers)")


def _output(p) -> None:
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour: auto (on a terminal, unless NO_COLOR is set), always, never")
    p.add_argument("--no-pager", action="store_true", help="never page long output")


def add_parser(sub) -> None:
    r = sub.add_parser("replay", help="recorded sessions: list, search statements, play one back")
    rs = r.add_subparsers(dest="replay_cmd", required=True)
    ls = rs.add_parser("list", help="one line per recorded session")
    ls.add_argument("dir", help="the recordings directory (record_dir)")
    _filters(ls)
    _output(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per session, per line")
    ls.set_defaults(func=cmd_list)
    st = rs.add_parser("statements", help="one line per recorded statement, across sessions")
    st.add_argument("dir", help="the recordings directory (record_dir)")
    _filters(st)
    _output(st)
    st.add_argument("--json", action="store_true", help="one JSON object per statement, per line")
    st.set_defaults(func=cmd_statements)
    sh = rs.add_parser("show", help="play one session as a timeline of statements")
    sh.add_argument("dir", help="the recordings directory (record_dir)")
    sh.add_argument("session", help="session id (or a unique prefix), or 'last' for the newest that matches the filters")
    _filters(sh)
    _output(sh)
    sh.add_argument("--speed", type=float, default=0.0,
                    help="play at the recorded pace, this many times faster (1 = real time); default: at once")
    sh.add_argument("--idle-limit", type=float, default=0.0,
                    help="longest wait between two steps when playing (seconds; also the asciicast's idle_time_limit)")
    sh.add_argument("--follow", "-f", action="store_true", help="follow a live session until it logs out")
    sh.add_argument("--json", action="store_true",
                    help="JSON lines: the session, each statement, the logout (with --follow: each record as written)")
    sh.add_argument("--asciicast", metavar="FILE", help="write the timeline as asciicast v3 (asciinema play FILE)")
    sh.add_argument("--html", metavar="FILE", help="write the session as one self-contained HTML page")
    sh.add_argument("--cols", type=int, default=120, help="asciicast terminal width (default 120)")
    sh.add_argument("--rows", type=int, default=36, help="asciicast terminal height (default 36)")
    sh.add_argument("--no-rows", action="store_true", help="leave out the result rows")
    sh.set_defaults(func=cmd_show)
