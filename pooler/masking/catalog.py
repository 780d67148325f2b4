"""What the masking plan needs to know about a database: relations and their columns, views and
the base columns behind each view column, inheritance parents of child tables and partitions,
string types, built-in and user-defined functions.

Rules this module keeps:
- ``Catalog`` is pure data built from query results (``Catalog.from_results``); a refresh
  builds a new one (only its cache of view lineages fills in later). The loading
  (gateway/catalogs.py) lives in the gateway's event loop and uses a side connection of its
  own, never a client's session.
- Unknown means masked: a relation OID the catalog does not know, a view whose definition cannot
  be analyzed, nesting deeper than ``MAX_VIEW_DEPTH`` all resolve to ``UNKNOWN``.
- A catalog is refreshed when a session of the gateway ran DDL (at commit, before the next
  statement of a rule set that masks is decided), on RELOAD/SIGHUP, when a statement names a
  relation it does not know (at most every few seconds: gateway/catalogs.py), and in the
  background every ``mask_catalog_ttl`` seconds (DDL made outside the gateway).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import orjson

from ..sql.lineage import UNKNOWN, OutputColumn, statement_lineage
from .methods import TEXT_TYPE_OIDS

log = logging.getLogger("pooler.masking")

MAX_VIEW_DEPTH = 16

# pg_get_viewdef qualifies every name that is not visible on the search_path; with only
# pg_catalog on it, view definitions come back schema-qualified.
CATALOG_SQL = """SET search_path = pg_catalog;
SELECT c.oid::int8, n.nspname, c.relname, c.relkind,
       (SELECT json_agg(json_build_array(a.attnum, a.attname) ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)::text,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND n.nspname <> 'pg_toast';
SELECT oid::int8, typcategory FROM pg_type WHERE typcategory IN ('S', 'A', 'C', 'U');
SELECT DISTINCT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace;
SELECT inhrelid::int8, inhparent::int8 FROM pg_inherits;
RESET search_path"""


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # r table, v view, m materialized view, f foreign table, p partitioned table
    columns: dict[int, str]  # attnum -> name
    names: tuple[str, ...]  # in attnum order
    viewdef: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(slots=True)
class Catalog:
    rels: dict[int, Relation] = field(default_factory=dict)
    by_name: dict[str, Relation] = field(default_factory=dict)
    text_oids: frozenset[int] = TEXT_TYPE_OIDS
    # types that can carry text inside (arrays, composites, user-defined; json, bytea, xml ... are
    # in plan.CARRIER_OIDS): "detect" cannot look inside them, so they are redacted instead
    carrier_oids: frozenset[int] = frozenset()
    udfs: frozenset[str] = frozenset()
    builtins: frozenset[str] = frozenset()  # functions of pg_catalog/information_schema
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)  # inheritance child/partition -> parents
    loaded_at: float = 0.0
    version: int = 0
    known: bool = True  # False: the catalog could not be read; every function counts as user-defined
    _views: dict[int, tuple[OutputColumn, ...] | None] = field(default_factory=dict)

    @classmethod
    def from_results(cls, results: list[list[list[bytes | None]]], version: int = 0) -> "Catalog":
        """``results``: the rows of CATALOG_SQL's four SELECTs (text format)."""
        if len(results) != 4:
            raise ValueError(f"catalog query returned {len(results)} result sets, expected 4")
        rels, by_name = {}, {}
        for oid, nsp, rel, kind, cols, viewdef in results[0]:
            attrs = orjson.loads(cols) if cols else []
            columns = {int(num): name for num, name in attrs}
            r = Relation(int(oid), nsp.decode(), rel.decode(), kind.decode(), columns,
                         tuple(name for _, name in attrs), viewdef.decode() if viewdef else None)
            rels[r.oid] = r
            by_name[r.qualified] = r
        text_oids = frozenset(int(oid) for oid, cat in results[1] if cat == b"S") | TEXT_TYPE_OIDS
        carrier_oids = frozenset(int(oid) for oid, cat in results[1] if cat != b"S")
        udfs, builtins = set(), set()
        for nsp, name in results[2]:
            nsp, name = nsp.decode(), name.decode()
            if nsp in ("pg_catalog", "information_schema"):
                builtins.add(name)
            else:
                udfs.add(name)
                udfs.add(f"{nsp}.{name}")
        parents: dict[str, list[str]] = {}
        for child, parent in results[3]:
            c, p = rels.get(int(child)), rels.get(int(parent))
            if c is not None and p is not None:
                parents.setdefault(c.qualified, []).append(p.qualified)
        return cls(rels, by_name, text_oids, carrier_oids, frozenset(udfs), frozenset(builtins),
                   {k: tuple(v) for k, v in parents.items()}, time.monotonic(), version)

    def ancestors(self, qualified: str) -> list[str]:
        """The tables a child table or partition inherits from, transitively (its rows are
        theirs: a mask on the parent's column applies to the child's column of the same name)."""
        out: list[str] = []
        todo = list(self.parents.get(qualified, ()))
        while todo and len(out) < 64:
            p = todo.pop()
            if p not in out:
                out.append(p)
                todo.extend(self.parents.get(p, ()))
        return out

    def enrich(self, f):
        """Facts with what only the catalog knows: the base columns and tables behind the views
        a statement reads, and which of its functions are user-defined (they may read anything)."""
        import dataclasses

        inner = self.enrich(f.inner) if f.inner is not None else None
        cols = dict.fromkeys(f.columns)
        tables = dict.fromkeys(f.tables)
        functions = f.functions
        for c in f.qualified_columns:
            schema_table, _, name = c.rpartition(".")
            rel = self.by_name.get(schema_table)
            if rel is not None and name not in rel.names:
                # rel.f where rel has no column f: PostgreSQL calls f(rel) (functional notation),
                # so c.row_to_json reads the whole row, and f is a function call rules must see
                cols.setdefault(f"{schema_table}.*", None)
                if name not in functions:
                    functions += (name,)
        for c in tuple(cols):
            schema_table = c.rpartition(".")[0]
            rel = self.by_name.get(schema_table)
            if (rel is None or rel.kind not in ("v", "m")) and schema_table not in self.parents:
                continue
            srcs, _ = self.expand(frozenset((c,)), True)  # views followed, parents added
            for s in srcs:
                if s != UNKNOWN:
                    cols.setdefault(s, None)
                    tables.setdefault(s.rpartition(".")[0], None)
        if self.parents:
            for t in f.tables:
                for a in self.ancestors(t):
                    tables.setdefault(a, None)
        if self.known:
            # user-defined, or created after the catalog was read (not a built-in): may read anything
            builtins = self.builtins
            user = tuple(fn for fn in functions if fn in self.udfs or (builtins and fn not in builtins))
            user += tuple(q for q in f.functions_qualified if "." in q and q in self.udfs and q.split(".")[-1] not in user)
        else:
            user = tuple(functions)
        # relations the catalog does not know (created after it was read, by another connection, or
        # not existing at all): their columns cannot be told apart, so rules should mask them whole
        unknown = ()
        if self.known:
            # an unqualified name's candidates come in search_path order and PostgreSQL takes the
            # first that exists: a candidate the catalog does not know *before* the first known
            # one may have been created since (a view shadowing public.customers), so it is unknown
            found: set[str] = set()
            out = []
            for t in f.tables:
                rel = t.rpartition(".")[2]
                if rel in found:
                    continue
                if t in self.by_name:
                    found.add(rel)
                else:
                    out.append(t)
            unknown = tuple(out)
        else:
            unknown = tuple(f.tables)
        if (len(cols) == len(f.columns) and len(tables) == len(f.tables) and not user and not unknown
                and inner is f.inner and functions is f.functions):
            return f
        return dataclasses.replace(f, columns=tuple(cols), tables=tuple(tables), functions=functions,
                                   user_functions=user, unknown_tables=unknown, inner=inner)

    def columns_of(self, qualified: str) -> tuple[str, ...] | None:
        r = self.by_name.get(qualified)
        return r.names if r is not None else None

    def lineage(self, sql: str, search_path: tuple[str, ...]):
        return statement_lineage(sql, search_path, self.columns_of, self.udfs, self.builtins)

    def view_outputs(self, rel: Relation) -> tuple[OutputColumn, ...] | None:
        if rel.oid in self._views:
            return self._views[rel.oid]
        outs = None
        if rel.viewdef:
            try:
                lin = self.lineage(rel.viewdef, ("pg_catalog",))
                if len(lin) == 1 and lin[0].outputs is not None and len(lin[0].outputs) == len(rel.names):
                    outs = lin[0].outputs
            except Exception as e:  # noqa: BLE001 - an unanalyzable view is masked, not trusted
                log.debug("view %s: lineage unavailable: %s", rel.qualified, e)
        self._views[rel.oid] = outs
        return outs

    def expand(self, sources: frozenset[str], direct: bool, depth: int = 0) -> tuple[frozenset[str], bool]:
        """Add the base columns behind view columns (recursively); the view columns stay, so
        a mask on either the view's or the table's column applies."""
        if not sources:
            return sources, direct
        out: set[str] = set()
        for s in sources:
            if s == UNKNOWN:
                out.add(s)
                continue
            schema_table, _, col = s.rpartition(".")
            rel = self.by_name.get(schema_table)
            out.add(s)
            if self.parents and schema_table in self.parents:
                for a in self.ancestors(schema_table):
                    out.add(f"{a}.{col}")
            if rel is None or rel.kind not in ("v", "m"):
                continue
            if depth >= MAX_VIEW_DEPTH:
                out.add(UNKNOWN)
                continue
            outs = self.view_outputs(rel)
            if outs is None:
                out.add(UNKNOWN)
                continue
            if col == "*":
                picked = outs
                direct = False
            else:
                try:
                    picked = (outs[rel.names.index(col)],)
                except ValueError:
                    out.add(UNKNOWN)
                    continue
            for oc in picked:
                sub, d = self.expand(oc.sources, oc.direct, depth + 1)
                out |= sub
                direct = direct and d
        return frozenset(out), direct

    def column_sources(self, oid: int, attnum: int) -> tuple[frozenset[str], bool]:
        """Sources of a RowDescription field with a table OID (a direct column reference)."""
        rel = self.rels.get(oid)
        if rel is None:
            return frozenset((UNKNOWN,)), False
        name = rel.columns.get(attnum)
        if name is None:
            return frozenset((UNKNOWN,)), False
        return self.expand(frozenset((f"{rel.qualified}.{name}",)), True)
