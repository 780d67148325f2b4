"""Decisions for whole client messages, with caching. Pure: a decision is a function of
(rules version, SQL text, the session attributes rules may read).

Two caches:
- exact: (SQL text, session key) -> Verdict, for every rule set;
- shape: (normalized SQL, session key) -> Verdict, only when the rule set never reads
  literal-carrying fields (``sql``, ``params``, ``set_value``), nor reaches them another way
  (``getattr``, ``dir``, ``str``, ``repr``, ``json``, ``format``), and the statement's facts do not
  depend on its literals. pgbench-style traffic (same statement, different constants) then costs
  one pglast normalize per message instead of an analysis and a Starlark call.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast.parser import ParseError, normalize

from ..sql.analyzer import AnalysisError, StatementFacts, analyze
from ..sql.lexing import SETTINGS as LEXING_SETTINGS
from ..sql.secrets import may_hold_secret
from .rules import Decision, RuleSet, combine, evaluate, evaluate_shadow

CACHE_MAX = 50_000


@dataclass(frozen=True, slots=True)
class SessionInfo:
    user: str
    database: str
    groups: tuple[str, ...]
    application_name: str
    client_addr: str
    in_transaction: bool
    search_path: tuple[str, ...] = ("public",)

    def key(self) -> tuple:
        return (self.user, self.database, self.groups, self.application_name, self.client_addr,
                self.in_transaction, self.search_path)

    def to_dict(self) -> dict:
        return {"user": self.user, "database": self.database, "groups": list(self.groups),
                "application_name": self.application_name, "client_addr": self.client_addr,
                "in_transaction": self.in_transaction, "search_path": list(self.search_path)}


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    facts: tuple[StatementFacts, ...]
    session_work: bool  # PREPARE/EXECUTE/DEALLOCATE/DISCARD/search_path writes: the client tracks these
    sqlstate: str = "42501"
    unknown_tables: bool = False  # a statement names a relation the catalog does not know
    shadow: tuple[Decision, ...] = ()  # what each MODE = "shadow" file with an opinion would decide (never enforced)


# commands whose effect on the session the client must track
_SESSION_COMMANDS = frozenset({"PREPARE", "EXECUTE", "DEALLOCATE", "DEALLOCATE ALL", "DISCARD ALL",
                               "DISCARD", "SET", "RESET"})


def _literal_dependent(facts: StatementFacts) -> bool:
    """Facts that read constants (SET values, set_config names, COPY files, EXECUTE arguments,
    EXPLAIN options) differ between a statement and its normalized shape: never shape-cache them."""
    f: StatementFacts | None = facts
    while f is not None:
        if (f.set_value is not None or f.guc_writes or f.copy is not None or f.params or f.prepared_name
                or f.command in ("SET", "RESET", "EXPLAIN", "EXECUTE")):
            return True
        f = f.inner
    return False


class Policy:
    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        # some decision is enforced: an enforced file, or a default_action other than allow
        # (False for a rule set of MODE = "shadow" files only); read per statement, so kept
        self.enforcing = rules.enforcing
        self.exact: dict[tuple, Verdict] = {}
        self.shape: dict[tuple, Verdict] = {}
        self.evaluations = 0  # full analyze+evaluate runs (for tests and metrics)

    @property
    def active(self) -> bool:
        return self.rules.active


    def decide(self, sql: str, session: SessionInfo, skey: tuple | None = None, catalog=None) -> Verdict:
        """``catalog`` (masking.catalog.Catalog, when the rules may mask): facts then include the
        base columns and tables behind views and the user-defined functions called."""
        if skey is None:
            skey = session.key()
        if catalog is not None:
            skey = (skey, catalog.version)
        key = (sql, skey)
        v = self.exact.get(key)
        if v is not None:
            return v
        if self.rules.literal_blind:
            try:
                norm = normalize(sql)
            except ParseError:
                norm = None
            if norm is not None:
                nkey = (norm, skey)
                v = self.shape.get(nkey)
                if v is None and norm != sql:
                    v = self._evaluate(norm, session, catalog)
                    if v.decision.rule == "analysis" or any(_literal_dependent(f) for f in v.facts):
                        v = None
                    else:
                        if len(self.shape) >= CACHE_MAX:
                            self.shape.clear()
                        self.shape[nkey] = v
                if v is not None:
                    # the exact text too: a repeated statement then skips normalize
                    if len(self.exact) >= CACHE_MAX:
                        self.exact.clear()
                    self.exact[key] = v
                    return v
        v = self._evaluate(sql, session, catalog)
        if len(self.exact) >= CACHE_MAX:
            self.exact.clear()
        self.exact[key] = v
        return v

    def _evaluate(self, sql: str, session: SessionInfo, catalog=None) -> Verdict:
        self.evaluations += 1
        try:
            facts = tuple(analyze(sql, session.search_path))
            if catalog is not None:
                facts = tuple(catalog.enrich(f) for f in facts)
        except AnalysisError as e:
            pos = f" at position {e.position}" if e.position else ""
            msg = e.message
            if may_hold_secret(sql):  # the parser quotes the text near the error: it may be the password
                msg = msg.split(" at or near ", 1)[0]
            return Verdict(Decision("deny", f"statement could not be analyzed: {msg}{pos}", "analysis"), (), False)
        except Exception as e:  # noqa: BLE001 - an analyzer bug must refuse, never allow
            return Verdict(Decision("deny", f"statement could not be analyzed ({type(e).__name__})", "analysis"), (), False)
        unknown = any(f.unknown_tables for f in facts)
        sess = session.to_dict()
        stmts = [f.to_dict() for f in facts]
        shadow = self._shadow(stmts, sess) if self.rules.shadow_entries else ()
        decisions = []
        for stmt in stmts:
            d = evaluate(self.rules, stmt, sess)
            if d.action == "deny":
                return Verdict(d, facts, _session_work(facts), unknown_tables=unknown, shadow=shadow)
            decisions.append(d)
        if not facts:
            decisions.append(Decision("allow"))  # empty query: nothing to govern
        return Verdict(combine(decisions, "allow") if decisions else Decision("allow"), facts, _session_work(facts),
                       unknown_tables=unknown, shadow=shadow)

    def _shadow(self, stmts: list[dict], sess: dict) -> tuple[Decision, ...]:
        """Each shadow file's opinion of the whole message (its statements' opinions combined as
        enforced ones are: an error or a deny wins), for the files that have one."""
        per_file: list[list[Decision]] = [[] for _ in self.rules.shadow_entries]
        for stmt in stmts:
            for opinions, d in zip(per_file, evaluate_shadow(self.rules, stmt, sess)):
                if d is not None:
                    opinions.append(d)
        out = []
        for opinions in per_file:
            if opinions:
                deny = next((d for d in opinions if d.action == "deny"), None)
                out.append(deny or combine(opinions, "allow"))
        return tuple(out)


def _session_work(facts: tuple[StatementFacts, ...]) -> bool:
    for f in facts:
        if (f.command in _SESSION_COMMANDS or "search_path" in f.guc_writes or "?" in f.guc_writes
                or not LEXING_SETTINGS.isdisjoint(f.guc_writes)):
            return True
    return False
