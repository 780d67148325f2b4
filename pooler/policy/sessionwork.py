"""What a client message's SQL-level session commands mean for the rules: ``EXECUTE`` judged as
the statement it runs, ``PREPARE``/``DEALLOCATE``/``DISCARD ALL`` followed, the search_path the
rules see grown by ``SET search_path``, and the gateway's own refusals of session commands it
cannot follow.

Rules this module keeps:
- Pure: a function of the message's Verdict, the session (SessionInfo), the statements it has
  prepared and, for ``DISCARD ALL``/``RESET``, the server's startup parameters. Nothing here
  changes state: ``session_work`` says what the caller applies (SessionEffects). One
  implementation for the gateway's decide stage (gateway/governor.py, as messages arrive) and
  for rules tested against recordings (recording/rulediff.py, offline): a difference between
  the two would show as changes no rule made.
- Fail closed: a name already prepared is refused as PostgreSQL refuses it (otherwise a failing
  re-PREPARE would let EXECUTE be judged as text the server does not run); EXECUTE of a name
  not prepared is refused; the search_path the rules see only grows (a SET that is rolled back,
  a SET LOCAL, or a server given to another transaction can never hide a schema); effects up to
  a refusal are reported with it (the caller applies them: forgetting a prepared statement or
  growing the path never lets more through).
- Only messages whose facts have session work (engine.Verdict.session_work) come here: the hot
  path of ordinary statements never does.
"""

from __future__ import annotations

import re
from ..sql.lexing import SETTINGS as LEXING_SETTINGS, unsafe_session, unsafe_value
from .rules import Decision, combine

Refusal = tuple[str, str]  # (sqlstate, message): the governor's refusals are these too

# one item of a list-valued setting (GUC_LIST_QUOTE: search_path): a "quoted" name ("" inside
# is one ") or a bare one, then a comma or the end
_LIST_ITEM = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^,\s]+))\s*(?:,|$)')


def search_path_items(value: str) -> tuple[str, ...]:
    """The schema names of a search_path value (``"my ""odd"" schema", public``), unquoted."""
    return tuple((a.replace('""', '"') if a else b) for a, b in _LIST_ITEM.findall(value) if (a or b))


def grown_search_path(path: tuple[str, ...], value: str) -> tuple[str, ...]:
    """The search_path the rules see once a session may have set ``value``: its schemas first,
    then those seen before (the path only grows); ``$user`` is not followed."""
    return tuple(dict.fromkeys(p for p in search_path_items(value) + path if p != "$user"))


def merge_masks(d: Decision, other: Decision) -> Decision:
    """``d`` (allow or mask) with the masks of ``other`` (a mask decision) added: EXECUTE runs
    its prepared statement's masks; ``d``'s method wins for a column both mask."""
    if d.action != "mask":
        return other
    merged = dict(other.masks)
    merged.update(d.masks)
    rule = ", ".join(sorted({r for r in (d.rule, other.rule) if r}))
    return Decision("mask", "; ".join(r for r in (d.reason, other.reason) if r), rule, tuple(sorted(merged.items())))


class SessionEffects:
    """What a message's session commands do to what the rules follow (the caller applies it).
    With a refusal: the effects of the statements before the refused one. (Defaults on the
    class: made only for a message that has an effect, and only the fields it sets.)"""

    prepares: tuple[tuple[str, str], ...] = ()  # (name, text), in order; kept once the server confirms each
    forget: tuple[str, ...] = ()  # DEALLOCATE name (applied after forget_all)
    forget_all: bool = False  # DEALLOCATE ALL, DISCARD ALL
    search_paths: tuple[str, ...] = ()  # each SET search_path value, in order (grown_search_path)
    justification: str | None = None  # SET pooler.justification (RESET: "")


def session_work(policy, verdict, si, prepared, catalog=None, welcome=None,
                 shadows: list | None = None) -> tuple[Decision | Refusal, SessionEffects | None]:
    """Follow the session commands of a message the rules did not refuse (``verdict`` of
    ``policy.decide``; ``si`` the SessionInfo it was decided for; ``prepared``: SQL-level PREPARE
    name -> text the server confirmed; ``welcome``: the server's startup parameters, for what
    ``DISCARD ALL`` and ``RESET`` return to). Returns the message's Decision (each EXECUTE
    judged as the statement it runs) or the gateway's refusal (sqlstate, message), and its
    effects (None: it has none). ``shadows``, when given, gets the shadow files' opinions of
    each statement an EXECUTE runs (``merge_shadow`` adds them to the message's own)."""
    d = verdict.decision
    fx = None
    local: dict[str, str] = {}  # prepared earlier in this same message
    gone: set[str] = set()  # deallocated earlier in this same message
    cleared = False
    for f in verdict.facts:
        cmd = f.command
        if cmd == "EXECUTE":
            name = f.prepared_name or ""
            inner_sql = local.get(name)
            if inner_sql is None and not cleared and name not in gone:
                inner_sql = prepared.get(name)
            if inner_sql is None:
                return ("26000", f'prepared statement "{f.prepared_name}" does not exist'), fx
            iv = policy.decide(inner_sql, si, None, catalog)
            if shadows is not None and iv.shadow:
                shadows.append(iv.shadow)
            inner = iv.decision
            if inner.refused:
                return inner, fx
            if inner.action == "mask":
                d = merge_masks(d, inner)
        elif cmd == "PREPARE" and f.prepared_name and f.inner is not None:
            name = f.prepared_name
            if name in local or (not cleared and name not in gone and name in prepared):
                return ("42P05", f'prepared statement "{name}" already exists'), fx
            if name.startswith("pooler_"):
                return ("42501", "refused by the gateway: prepared statement names starting with "
                                 "pooler_ are reserved for the gateway"), fx
            local[name] = f.inner.sql
            if fx is None:
                fx = SessionEffects()
            fx.prepares += ((name, f.inner.sql),)
        elif cmd == "DEALLOCATE":
            name = f.prepared_name or ""
            local.pop(name, None)
            gone.add(name)
            if fx is None:
                fx = SessionEffects()
            fx.forget += (name,)
        elif cmd in ("DEALLOCATE ALL", "DISCARD ALL"):
            if cmd == "DISCARD ALL" and (why := unsafe_session(welcome or {})) is not None:
                return ("0A000", f"refused by the gateway: {why}"), fx  # it resets to the server's defaults
            local.clear()
            gone.clear()
            cleared = True
            if fx is None:
                fx = SessionEffects()
            fx.forget = ()
            fx.forget_all = True
        elif cmd in ("SET", "RESET") and (f.set_name in LEXING_SETTINGS or f.set_name == "all"):
            # the server would read the following statements otherwise than the gateway does
            if f.set_name in LEXING_SETTINGS and f.set_value is not None:
                why = unsafe_value(f.set_name, f.set_value)
            else:  # RESET, SET ... TO DEFAULT, RESET ALL: the server's default
                why = unsafe_session(welcome or {})
            if why is not None:
                return ("0A000", f"refused by the gateway: {why}"), fx
        elif cmd in ("SET", "RESET") and f.set_name == "pooler.justification":
            if fx is None:
                fx = SessionEffects()
            fx.justification = (f.set_value or "") if cmd == "SET" else ""
        elif cmd == "SET" and f.set_name == "search_path" and f.set_value is not None:
            if fx is None:
                fx = SessionEffects()
            fx.search_paths += (f.set_value,)
        elif cmd not in ("SET", "RESET") and ("search_path" in f.guc_writes or "?" in f.guc_writes):
            return ("42501", "refused by the gateway: set_config() of search_path (or of a computed "
                             "setting name) cannot be followed by the rules; use SET search_path"), fx
        elif cmd not in ("SET", "RESET") and not LEXING_SETTINGS.isdisjoint(f.guc_writes):
            return ("0A000", "refused by the gateway: set_config() of standard_conforming_strings or "
                             "client_encoding is not supported through this gateway; use SET"), fx
    return d, fx


def merge_shadow(own: tuple[Decision, ...], inner: list[tuple[Decision, ...]]) -> tuple[Decision, ...]:
    """Each shadow file's opinion of a message that EXECUTEs prepared statements: its opinion of
    the message's own text together with those of the statements it runs (``inner``, from
    session_work), per file, combined as its opinions of a message's statements are (a deny or
    an error wins, else masks merge): a shadow file judges EXECUTE as the enforced ones do."""
    by_file: dict[str, list[Decision]] = {}
    for d in own:
        by_file.setdefault(_file_of(d.rule), []).append(d)
    for opinions in inner:
        for d in opinions:
            by_file.setdefault(_file_of(d.rule), []).append(d)
    return tuple(combine(opinions, "allow") for opinions in by_file.values())


def _file_of(rule: str) -> str:
    """The file a shadow decision comes from (a failed rule names its line: ``file:12``)."""
    head, sep, tail = rule.rpartition(":")
    return head if sep and tail.isdigit() else rule


def apply_prepared(prepared: dict, fx: SessionEffects) -> None:
    """Forget in ``prepared`` what the message deallocated (its PREPAREs are added by the
    caller as the server confirms each)."""
    if fx.forget_all:
        prepared.clear()
    for name in fx.forget:
        prepared.pop(name, None)
