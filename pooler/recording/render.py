"""A recorded session shown to people: the terminal timeline, asciicast v3, one HTML page.

Pure: records (docs/recordings.md) in, text out; the command (cli_replay.py) decides where the
text goes (a pager, a file, real-time playback).

Rules this module keeps:
- What an agent sent is data, never terminal control: every recorded string is shown with its
  control characters escaped (``\\x1b`` becomes the four characters ``\\x1b``), so a statement
  cannot move the auditor's cursor, recolour the screen or hide text. In HTML everything is
  escaped (``html.escape``) and the page forbids scripts and outside resources
  (Content-Security-Policy ``default-src 'none'``).
- Colour only through ``Style`` (off unless asked for: the command turns it on for a tty).
- The terminal timeline is rendered record by record (``Timeline.feed``), so the same code
  shows a closed session, plays it at its pace and follows a live one; lines of a statement
  that arrive after another statement's are labelled with their statement number.
- Columns are aligned by display width (``wcwidth``: wide characters take two cells).
"""

from __future__ import annotations

import html
import re
import time

import orjson
from wcwidth import wcswidth

from .timeline import statement_text, statements, summary

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
CELL_MAX = 40  # a value wider than this is cut (with …) in the terminal table


def safe(s) -> str:
    """Recorded text with control characters (and bidi overrides) made visible."""
    if s is None:
        return ""
    s = str(s)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", s)


def width(s: str) -> int:
    w = wcswidth(s)
    return len(s) if w < 0 else w


def value_text(v) -> str:
    """A recorded value as psql would show it (NULL, ``\\x...`` for binary)."""
    if v is None:
        return "NULL"
    if isinstance(v, dict) and "hex" in v:
        return "\\x" + str(v["hex"])
    return str(v)


def _cut(s: str, limit: int) -> str:
    if width(s) <= limit:
        return s
    out, w = [], 0
    for ch in s:
        cw = max(width(ch), 0)
        if w + cw > limit - 1:
            break
        out.append(ch)
        w += cw
    return "".join(out) + "…"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d} UTC"


def fmt_dur(sec) -> str:
    if sec is None:
        return "?"
    if sec < 1:
        return f"{sec * 1000:.1f} ms"
    if sec < 120:
        return f"{sec:.2f} s"
    return f"{int(sec // 60)} min {sec % 60:.0f} s"


class Style:
    """ANSI colours, or nothing at all."""

    CODES = {"allow": "32", "deny": "1;31", "mask": "33", "require_approval": "35", "error": "31",
             "refused": "1;31", "dim": "2", "bold": "1", "head": "1;36", "ok": "32"}

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, what: str, text: str) -> str:
        if not self.colour or not text:
            return text
        return f"\x1b[{self.CODES[what]}m{text}\x1b[0m"


def table(rows: list[list], style: Style, indent: str = "") -> list[str]:
    """Rows as aligned columns, psql style (`` | `` between cells; numbers stay left-aligned, as
    the recording does not say which columns are numbers)."""
    if not rows:
        return []
    cells = [[_cut(safe(value_text(v)), CELL_MAX) for v in row] for row in rows]
    n = max(len(r) for r in cells)
    widths = [max((width(r[i]) for r in cells if i < len(r)), default=0) for i in range(n)]
    out = []
    for row, raw in zip(cells, rows):
        parts = []
        for i in range(n):
            c = row[i] if i < len(row) else ""
            pad = " " * (widths[i] - width(c))
            v = raw[i] if i < len(raw) else ""
            parts.append((style("dim", c) if v is None else c) + pad)
        out.append(indent + " | ".join(parts).rstrip())
    return out


def _indent(text: str, prefix: str) -> list[str]:
    return [prefix + line for line in safe_lines(text)]


def safe_lines(text: str) -> list[str]:
    """Text's lines, each made safe (newlines split it; tabs become spaces)."""
    return [safe(line.replace("\t", "    ")) for line in (text or "").replace("\r\n", "\n").split("\n")]


def session_header(login: dict | None, sid: str, style: Style) -> list[str]:
    login = login or {}
    groups = ",".join(login.get("groups") or ())
    who = safe(login.get("user") or "?") + (f" ({safe(groups)})" if groups else "")
    bits = [style("head", f"session {safe(sid)}"), who, "→", safe(login.get("database") or "?")]
    lines = ["  ".join(bits)]
    info = []
    if login.get("client"):
        info.append(f"from {safe(login['client'])}")
    if login.get("app"):
        info.append(f"app {safe(login['app'])}")
    if login.get("auth"):
        info.append(f"auth {safe(login['auth'])}" + (" over TLS" if login.get("tls") else ""))
    if login.get("mode"):
        info.append(f"{safe(login['mode'])} pooling")
    if login.get("upstream_user"):
        info.append(f"upstream user {safe(login['upstream_user'])}")
    if login.get("ts") is not None:
        info.append(f"logged in {fmt_time(login['ts'])}")
    if info:
        lines.append(style("dim", "  ".join(info)))
    return lines


def decision_label(action, style: Style) -> str:
    name = {None: "NO RULES", "allow": "ALLOW", "deny": "DENY", "mask": "MASK",
            "require_approval": "APPROVAL"}.get(action, str(action).upper())
    return style(action if action in Style.CODES else "dim", f"{name:<8}")


class Timeline:
    """The terminal timeline of one session, built record by record: ``feed(rec)`` returns the
    lines that record adds (possibly none)."""

    PAD = " " * 11

    def __init__(self, style: Style, sid: str = "", show_rows: bool = True) -> None:
        self.style = style
        self.sid = sid
        self.start: float | None = None
        self.current_q = None
        self.sql: dict = {}
        self.show_rows = show_rows
        self.next_i: int | None = None  # the record number expected next (records count from 0, without gaps)

    def _offset(self, ts) -> str:
        if ts is None or self.start is None:
            return " " * 9
        return f"+{ts - self.start:7.3f}s"

    def _cont(self, q) -> list[str]:
        """A continuation header when ``q`` is not the statement shown last."""
        if q is None or q == self.current_q:
            return []
        self.current_q = q
        first = (self.sql.get(q) or "").strip().split("\n")[0]
        return [self.style("dim", f"{self.PAD}↳ #{q} {_cut(safe(first), 60)}")]

    def feed(self, rec: dict) -> list[str]:
        gap = self._gap(rec.get("i"))
        lines = self._lines(rec)
        return gap + lines if gap else lines

    def _gap(self, i) -> list[str]:
        """A line where records of the session are missing (``i`` jumps)."""
        if not isinstance(i, int):
            return []
        expected, self.next_i = self.next_i, i + 1
        if expected is None or i <= expected:
            return []
        n = i - expected
        return [self.style("error", f"{self.PAD}!! {n} record{'s' if n != 1 else ''} of this session missing here "
                                    "(lost while recordings could not be written, or removed: pooler recordings verify)")]

    def _lines(self, rec: dict) -> list[str]:
        s = self.style
        t = rec.get("t")
        ts = rec.get("ts")
        q = rec.get("q")
        if self.start is None and ts is not None:
            self.start = ts
        P = self.PAD
        if t == "login":
            self.start = ts
            self.sid = rec.get("sid") or self.sid
            return session_header(rec, self.sid, s)
        if t == "stmt":
            self.current_q = q
            self.sql[q] = statement_text(rec)
            route = f"{rec.get('route') or '?':<8}"
            head = f"{s('dim', self._offset(ts))}  {s('bold', f'#{q}')} {s('dim', route)} "
            head += decision_label(rec.get("action"), s)
            why = ": ".join(x for x in (safe(rec.get("rule")), safe(rec.get("reason"))) if x)
            if why:
                head += " " + why
            out = ["", head] + _indent(self.sql[q], P)
            if rec.get("redacted"):
                out.append(s("dim", f"{P}(a password literal was cut out of this text by the recorder)"))
            if rec.get("masks"):
                out.append(f"{P}{s('mask', 'masks asked:')} " + ", ".join(f"{safe(c)}={safe(m)}" for c, m in rec["masks"]))
            return out
        if t == "bind":
            params = ", ".join(f"${i}={safe(value_text(v))!s}" for i, v in enumerate(rec.get("params") or (), 1))
            return self._cont(q) + [f"{P}{s('dim', 'parameters:')} {params or '(none)'}"]
        if t == "refused":
            return self._cont(q) + [f"{P}{s('refused', 'REFUSED')} {safe(rec.get('sqlstate'))}: {safe(rec.get('message'))}"]
        if t == "held":
            return self._cont(q) + [f"{P}{s('require_approval', 'HELD')} for approval, request {safe(rec.get('request'))}"
                                    f" ({safe(rec.get('rule'))}: {safe(rec.get('reason'))})"]
        if t == "hold_ended":
            state = rec.get("state") or "?"
            by = f" by {safe(rec.get('by'))}" if rec.get("by") else ""
            what = "ok" if state == "approved" else "refused"
            return self._cont(q) + [f"{P}{s(what, state.upper())}{by}" + (f": {safe(rec.get('outcome'))}" if rec.get("outcome") else "")]
        if t == "rows":
            if not self.show_rows:
                return []
            rows = rec.get("rows") or []
            out = self._cont(q) + table(rows, s, P + "│ ")
            if rec.get("truncated"):
                out.append(s("dim", f"{P}│ … (more rows were sent than recorded)"))
            return out
        if t == "done":
            tag = rec.get("tag") or "(empty query)"
            info = [fmt_dur(rec.get("dur"))]
            if rec.get("bytes") is not None:
                info.append(f"{rec['bytes']} B")
            return self._cont(q) + [f"{P}{s('ok', safe(tag))}  {s('dim', ', '.join(info))}"]
        if t == "suspended":
            return self._cont(q) + [f"{P}{s('dim', 'portal suspended (row limit reached), ' + fmt_dur(rec.get('dur')))}"]
        if t == "error":
            return self._cont(q) + [f"{P}{s('error', 'ERROR')} {safe(rec.get('sqlstate'))}: {safe(rec.get('message'))}"]
        if t == "masked":
            cols = ", ".join(f"{safe(c)} ({safe(m)}, {n} value{'s' if n != 1 else ''})" for c, m, n in rec.get("columns") or ())
            return self._cont(q) + [f"{P}{s('mask', 'masked:')} {cols}"]
        if t == "notice":
            return self._cont(q) + [f"{P}{s('dim', safe(rec.get('severity') or 'NOTICE') + ':')} {safe(rec.get('message'))}"]
        if t == "cancel":
            return [f"{s('dim', self._offset(ts))}  {s('error', 'CANCEL')} the client asked to cancel the running statement"]
        if t == "logout":
            self.current_q = None
            figures = (f"{rec.get('statements', 0)} statements, {rec.get('refused', 0)} refused, "
                       f"{rec.get('errors', 0)} errors, {rec.get('rows', 0)} rows")
            return ["", f"{s('dim', self._offset(ts))}  {s('head', 'LOGOUT')} {safe(rec.get('reason'))} "
                        f"after {fmt_dur(rec.get('dur'))}: {figures}"]
        return []


def frames(session: dict, style: Style, show_rows: bool = True) -> list[tuple[float | None, str]]:
    """The timeline as (time, text) pieces: one per record that shows something."""
    tl = Timeline(style, session.get("sid") or "", show_rows)
    out = []
    for rec in session.get("events", ()):
        lines = tl.feed(rec)
        if lines:
            out.append((rec.get("ts"), "\n".join(lines) + "\n"))
    if session.get("logout") is None:
        out.append((None, "\n" + style("dim", "(the session has not ended: no logout record yet)") + "\n"))
    return out


def text(session: dict, style: Style, show_rows: bool = True) -> str:
    return "".join(t for _, t in frames(session, style, show_rows))


# ---------------------------------------------------------------------------- asciicast v3


def asciicast(session: dict, cols: int = 120, rows: int = 36, idle_limit: float | None = 2.0) -> str:
    """asciicast v3 (https://docs.asciinema.org/manual/asciicast/v3/): a header line, then one
    ``[interval, "o", text]`` per timeline piece (interval: seconds since the previous event),
    and an ``"m"`` marker at each statement so players can jump between them."""
    login = session.get("login") or {}
    start = session.get("start")
    header = {"version": 3, "term": {"cols": cols, "rows": rows, "type": "xterm-256color"},
              "title": f"pooler session {session.get('sid')}: {login.get('user')} on {login.get('database')}"}
    if start is not None:
        header["timestamp"] = int(start)
    if idle_limit:
        header["idle_time_limit"] = idle_limit
    lines = [orjson.dumps(header).decode()]
    last = start
    stmts = {e.get("i"): e for e in session.get("events", ()) if e.get("t") == "stmt"}
    tl = Timeline(Style(True), session.get("sid") or "")
    for rec in session.get("events", ()):
        piece = tl.feed(rec)
        if not piece:
            continue
        ts = rec.get("ts")
        interval = 0.0 if ts is None or last is None else max(ts - last, 0.0)
        if ts is not None:
            last = ts
        if rec.get("i") in stmts:
            label = f"#{rec.get('q')} {safe(statement_text(rec).strip().split(chr(10))[0])[:60]}"
            lines.append(orjson.dumps([round(interval, 6), "m", label]).decode())
            interval = 0.0
        data = "\r\n".join(piece) + "\r\n"
        lines.append(orjson.dumps([round(interval, 6), "o", data]).decode())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- one HTML page

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} .meta{color:#555} .meta td{padding:0 1.2em 0 0}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
section.deny,section.refused{border-left:5px solid #c62828} section.mask{border-left:5px solid #e0a800}
section.require_approval{border-left:5px solid #8e24aa} section.allow{border-left:5px solid #2e7d32}
pre{background:#f3f3f3;padding:.5em;white-space:pre-wrap;word-break:break-word;margin:.4em 0}
.badge{display:inline-block;padding:0 .5em;border-radius:3px;font-weight:600;color:#fff;background:#777}
.b-allow{background:#2e7d32}.b-deny{background:#c62828}.b-mask{background:#b8860b}.b-require_approval{background:#8e24aa}
.off{color:#777;font-variant-numeric:tabular-nums} .err{color:#c62828} .null{color:#999;font-style:italic}
table.rows{border-collapse:collapse;margin:.4em 0;font-family:ui-monospace,monospace;font-size:13px}
table.rows td{border:1px solid #ddd;padding:.1em .5em;vertical-align:top;white-space:pre-wrap}
"""


def _e(s) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _cell(v) -> str:
    if v is None:
        return '<td class="null">NULL</td>'
    return f"<td>{_e(value_text(v))}</td>"


def html_page(session: dict) -> str:
    """One session as a page that needs nothing else: styles inline, no scripts, no outside
    resources (the Content-Security-Policy forbids them), every recorded string escaped."""
    info = summary(session)
    login = session.get("login") or {}
    start = session.get("start")
    sid = session.get("sid")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
           f"<title>pooler session {_e(sid)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Session {_e(sid)}: {_e(login.get('user'))} on {_e(login.get('database'))}</h1>",
           '<table class="meta">']
    rows = [("groups", ", ".join(login.get("groups") or ())), ("client", login.get("client")),
            ("application", login.get("app")), ("authentication", (login.get("auth") or "") + (" over TLS" if login.get("tls") else "")),
            ("pool mode", login.get("mode")), ("upstream user", login.get("upstream_user")),
            ("logged in", fmt_time(start)), ("logged out", fmt_time(info["end"]) if info["end"] else "(not yet)"),
            ("statements", f"{info['statements']} ({info['denied']} denied, {info['masked']} masked, "
                           f"{info['refused']} refused, {info['errors']} errors)")]
    if session.get("logout"):
        rows.append(("logout", session["logout"].get("reason")))
    if info["missing"]:
        rows.append(("missing records", f"{info['missing']} (lost while recordings could not be written, or removed)"))
    for k, v in rows:
        out.append(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>")
    out.append("</table>")
    for st in statements(session):
        action = st["action"]
        cls = "refused" if st["refused"] else (action or "none")
        off = f"+{st['ts'] - start:.3f}s" if st["ts"] is not None and start is not None else ""
        label = {None: "no rules", "require_approval": "approval"}.get(action, action)
        out.append(f'<section class="{_e(cls)}" id="q{_e(st["q"])}">')
        why = ": ".join(x for x in (st["rule"], st["reason"]) if x)
        out.append(f'<div><span class="off">{_e(off)}</span> <b>#{_e(st["q"])}</b> {_e(st["route"])} '
                   f'<span class="badge b-{_e(action)}">{_e(label)}</span> {_e(why)}</div>')
        out.append(f"<pre>{_e(statement_text(st))}</pre>")
        if st["redacted"]:
            out.append("<div class=\"off\">a password literal was cut out of this text by the recorder</div>")
        if st["masks"]:
            out.append("<div>masks asked: " + _e(", ".join(f"{c}={m}" for c, m in st["masks"])) + "</div>")
        for params in st["binds"]:
            out.append("<div>parameters: " + _e(", ".join(f"${i}={value_text(v)}" for i, v in enumerate(params, 1))) + "</div>")
        for h in st["holds"]:
            out.append(f"<div>held for approval (request {_e(h['request'])}): {_e(h.get('state') or 'pending')}"
                       + (f" by {_e(h['by'])}" if h.get("by") else "") + "</div>")
        for n in st["notices"]:
            out.append(f'<div class="off">{_e(n["severity"] or "NOTICE")}: {_e(n["message"])}</div>')
        if st["refused"]:
            out.append(f'<div class="err">refused {_e(st["refused"]["sqlstate"])}: {_e(st["refused"]["message"])}</div>')
        for r in st["results"]:
            if r["shown"]:
                out.append('<table class="rows">')
                for row in r["shown"]:
                    out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
                out.append("</table>")
                if r["truncated"]:
                    out.append('<div class="off">… more rows were sent than recorded</div>')
            if r["masked"]:
                out.append("<div>masked: " + _e(", ".join(f"{c} ({m}, {n})" for c, m, n in r["masked"])) + "</div>")
            if r["t"] == "error":
                out.append(f'<div class="err">error {_e(r["sqlstate"])}: {_e(r["message"])}</div>')
            elif r["t"] == "done":
                out.append(f'<div>{_e(r["tag"] or "(empty query)")} <span class="off">{_e(fmt_dur(r["dur"]))}</span></div>')
            else:
                out.append(f'<div class="off">portal suspended {_e(fmt_dur(r["dur"]))}</div>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def columns(headers: list[str], rows: list[list[str]], style: Style, max_last: int | None = None) -> list[str]:
    """Rows of text under headers, each column as wide as its widest cell (display width); the
    last column is cut to ``max_last`` cells when given. Cells are made safe here."""
    cells = [[safe(c) for c in r] for r in rows]
    if max_last is not None:
        cells = [r[:-1] + [_cut(r[-1], max(max_last, 10))] for r in cells]
    n = len(headers)
    widths = [max([width(headers[i])] + [width(r[i]) for r in cells]) for i in range(n)]
    def line(r, head=False):
        parts = [r[i] + " " * (widths[i] - width(r[i])) if i < n - 1 else r[i] for i in range(n)]
        text = "  ".join(parts).rstrip()
        return style("bold", text) if head else text
    return [line(headers, True)] + [line(r) for r in cells]
