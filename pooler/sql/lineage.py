"""Column lineage: which table columns each output column of a statement is derived from.

``statement_lineage(sql, search_path, columns_of, udfs)`` parses with pglast (``parse_sql_json``,
walked as plain dicts like analyzer.py) and returns one ``StatementLineage`` per statement.

Rules this module keeps (fail closed: over-approximation is fine, under-approximation is a bug):
- A source is ``schema.table.column``; ``schema.table.*`` marks a whole-row reference; ``UNKNOWN``
  marks a value whose origin cannot be established (a user-defined function, a name that resolves
  nowhere, a function that runs arbitrary SQL ...). The caller masks such columns.
- Names are resolved with PostgreSQL's scoping: inner FROM level first, then the outer ones; a
  table whose columns are unknown (``columns_of`` returns None) "may have" every column, so a name
  found only there is also looked up further out and all candidates are kept.
- Unqualified tables are resolved along search_path like analyzer.py; with ``columns_of`` the first
  candidate the catalog knows wins (what PostgreSQL picks), else every candidate is kept.
- ``outputs`` is None when the result columns cannot be listed positionally (``*`` over a relation
  whose columns are unknown, EXECUTE, FETCH, CALL, COPY ... TO).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson
from pglast.parser import parse_sql_json

from .analyzer import _LEAVES, TOO_DEEP, VALUE_SINK_FUNCTIONS, AnalysisError, _State, _explain_analyze, _strings, _unwrap

UNKNOWN = "?"


@dataclass(frozen=True, slots=True)
class OutputColumn:
    sources: frozenset[str]  # "schema.table.column"; "schema.table.*" for a whole-row reference; UNKNOWN
    direct: bool  # the value IS a column's value (bare column reference, through subqueries/CTEs/set ops)


@dataclass(frozen=True, slots=True)
class StatementLineage:
    outputs: tuple[OutputColumn, ...] | None  # one per result column; None if they cannot be listed
    write_sources: frozenset[str]  # columns whose values flow into data the statement writes


_EMPTY = frozenset()
_NO_SOURCES = OutputColumn(_EMPTY, False)
_UNKNOWN_COL = OutputColumn(frozenset({UNKNOWN}), False)

# functions that run SQL given as text, or read data outside the tables a query names
_OPAQUE_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema", "table_to_xml",
    "table_to_xml_and_xmlschema", "cursor_to_xml", "schema_to_xml", "schema_to_xml_and_xmlschema",
    "database_to_xml", "database_to_xml_and_xmlschema", "dblink", "dblink_get_result", "dblink_fetch",
    "ts_stat", "ts_rewrite", "crosstab", "crosstab2", "crosstab3", "crosstab4", "connectby",
    "pg_read_file", "pg_read_binary_file", "lo_get", "loread", "current_setting", "pg_stat_file",
})

# system columns every table has (resolvable although columns_of does not list them)
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


_QUERY_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

# nodes PostgreSQL names "?column?" (FigureColname strength 0)
_UNNAMED = frozenset({"A_Const", "ParamRef", "BoolExpr", "NullTest", "BooleanTest", "A_Expr", "RowCompareExpr",
                      "A_Indices", "SetToDefault"})
_FIXED_NAMES = {
    "A_ArrayExpr": "array", "RowExpr": "row", "CoalesceExpr": "coalesce", "GroupingFunc": "grouping",
    "XmlSerialize": "xmlserialize", "JsonObjectConstructor": "json_object", "JsonArrayConstructor": "json_array",
    "JsonArrayQueryConstructor": "json_array", "JsonObjectAgg": "json_objectagg", "JsonArrayAgg": "json_arrayagg",
    "JsonParseExpr": "json", "JsonScalarExpr": "json_scalar", "JsonSerializeExpr": "json_serialize",
    "MergeSupportFunc": "merge_action",
}


def _oc(parts: Sequence[OutputColumn]) -> OutputColumn:
    """Union of several candidate lineages of one value."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return _UNKNOWN_COL
    src: set[str] = set()
    direct = True
    for p in parts:
        src |= p.sources
        direct = direct and p.direct
    return OutputColumn(frozenset(src), direct)


def _weak(oc: OutputColumn) -> OutputColumn:
    return OutputColumn(oc.sources, False) if oc.direct else oc


# --------------------------------------------------------------------------- relations in scope

Cols = list  # list[tuple[str | None, OutputColumn]]; a None name is one that could not be determined


class _Rel:
    __slots__ = ()

    def lookup(self, name: str) -> tuple[OutputColumn | None, bool]:
        """(lineage, definite): None if the relation certainly has no such column; definite False
        when the relation only may have it."""
        raise NotImplementedError

    def columns(self) -> Cols | None:
        raise NotImplementedError

    def whole(self) -> OutputColumn:
        raise NotImplementedError


class _TableRel(_Rel):
    __slots__ = ("cands", "cols")

    def __init__(self, cands: list[str], cols: list[str] | None) -> None:
        self.cands = cands
        self.cols = cols

    def lookup(self, name):
        if self.cols is None:
            return OutputColumn(frozenset(f"{q}.{name}" for q in self.cands), True), False
        if name in self.cols or name in _SYSTEM_COLUMNS:
            return OutputColumn(frozenset({f"{self.cands[0]}.{name}"}), True), True
        return None, False

    def columns(self):
        if self.cols is None:
            return None
        q = self.cands[0]
        return [(c, OutputColumn(frozenset({f"{q}.{c}"}), True)) for c in self.cols]

    def whole(self):
        src = {f"{q}.*" for q in self.cands}
        if self.cols is not None:
            src.update(f"{self.cands[0]}.{c}" for c in self.cols)
        return OutputColumn(frozenset(src), False)


class _DerivedRel(_Rel):
    """A subquery, CTE, VALUES list, function or renamed relation: named output columns."""

    __slots__ = ("cols", "allsrc", "wsrc")

    def __init__(self, cols: Cols | None, allsrc: frozenset, wsrc: frozenset | None = None) -> None:
        self.cols = cols
        self.allsrc = allsrc
        self.wsrc = wsrc  # whole-row sources when they differ from the union of the columns

    def lookup(self, name):
        if self.cols is None:
            return OutputColumn(self.allsrc, False), False
        found = [oc for n, oc in self.cols if n == name]
        definite = bool(found)
        found += [oc for n, oc in self.cols if n is None]
        if not found:
            return None, False
        return _oc(found), definite

    def columns(self):
        return self.cols

    def whole(self):
        if self.wsrc is not None:
            return OutputColumn(self.wsrc, False)
        if self.cols is None:
            return OutputColumn(self.allsrc, False)
        return OutputColumn(_oc([oc for _, oc in self.cols]).sources if self.cols else _EMPTY, False)


class _JoinRel(_Rel):
    __slots__ = ("left", "right", "using", "full", "cols")

    def __init__(self, left: _Rel, right: _Rel, using: list[str], natural: bool, full: bool) -> None:
        self.left = left
        self.right = right
        self.full = full
        lc, rc = left.columns(), right.columns()
        if natural:
            if lc is None or rc is None:
                using = None
            else:
                rnames = {n for n, _ in rc}
                using = [n for n, _ in lc if n is not None and n in rnames]
        self.using = using
        if lc is None or rc is None or using is None or (using and any(n is None for n, _ in lc + rc)):
            self.cols = None
            return
        cols = [(u, self._merged(u)) for u in using]
        uset = set(using)
        cols += [(n, oc) for n, oc in lc if n not in uset]
        cols += [(n, oc) for n, oc in rc if n not in uset]
        self.cols = cols

    def _merged(self, name: str) -> OutputColumn:
        parts = [oc for oc, _ in (self.left.lookup(name), self.right.lookup(name)) if oc is not None]
        oc = _oc(parts)
        return _weak(oc) if self.full else oc

    def lookup(self, name):
        if self.cols is not None:
            found = [oc for n, oc in self.cols if n == name]
            return (_oc(found), True) if found else (None, False)
        l_oc, l_def = self.left.lookup(name)
        r_oc, r_def = self.right.lookup(name)
        parts = [oc for oc in (l_oc, r_oc) if oc is not None]
        if not parts:
            return None, False
        oc = _oc(parts)
        if self.full and (self.using is None or name in self.using):  # COALESCE of both sides
            oc = _weak(oc)
        return oc, (l_def or r_def)

    def columns(self):
        return self.cols

    def whole(self):
        return OutputColumn(self.left.whole().sources | self.right.whole().sources, False)


class _RenamedRel(_Rel):
    """A relation with an alias column list over columns that cannot be listed."""

    __slots__ = ("base", "names")

    def __init__(self, base: _Rel, names: list[str]) -> None:
        self.base = base
        self.names = names

    def lookup(self, name):
        if name in self.names:
            return _weak(self.base.whole()), True
        return self.base.lookup(name)

    def columns(self):
        return None

    def whole(self):
        return self.base.whole()


def _rename(rel: _Rel, colnames: list[str]) -> _Rel:
    if not colnames:
        return rel
    cols = rel.columns()
    if cols is None:
        return _RenamedRel(rel, colnames)
    cols = [(colnames[i] if i < len(colnames) else n, oc) for i, (n, oc) in enumerate(cols)]
    w = rel.whole().sources
    return _DerivedRel(cols, w, w)


class _Item:
    """One namespace entry of a FROM level (PostgreSQL's ParseNamespaceItem)."""

    __slots__ = ("names", "quals", "cols_visible", "rel")

    def __init__(self, names: tuple, quals: frozenset, cols_visible: bool, rel: _Rel) -> None:
        self.names = names  # names it can be qualified by (alias, or table name)
        self.quals = quals  # "schema.table" names for schema-qualified references
        self.cols_visible = cols_visible
        self.rel = rel


class _Result:
    __slots__ = ("cols", "allsrc", "wsrc")

    def __init__(self, cols: Cols | None, allsrc: frozenset, wsrc: frozenset | None = None) -> None:
        self.cols = cols
        self.allsrc = allsrc
        self.wsrc = wsrc  # whole-row sources when they differ from the union of the columns

    def sources(self) -> frozenset:
        if self.cols is None:
            return self.allsrc
        out = set()
        for _, oc in self.cols:
            out |= oc.sources
        return frozenset(out)


# --------------------------------------------------------------------------- output names


def _figure(node) -> tuple[str | None, int]:
    """PostgreSQL's FigureColname: (name, strength); name None when it cannot be told."""
    if not isinstance(node, dict) or len(node) != 1:
        return None, 0
    k, v = next(iter(node.items()))
    if k == "ColumnRef":
        f = [x for x in _strings(v.get("fields")) if x != "*"]  # the last name, ignoring "*": p.*::text is "p"
        if f:
            return f[-1], 2
        return None, 0
    if k == "FuncCall":
        f = _strings(v.get("funcname"))
        return (f[-1], 2) if f else (None, 0)
    if k == "A_Indirection":
        for ind in reversed(v.get("indirection") or ()):
            if isinstance(ind, dict) and "String" in ind:
                return ind["String"].get("sval", ""), 2
        return _figure(v.get("arg"))
    if k == "TypeCast":
        name, strength = _figure(v.get("arg"))
        if strength <= 1:
            tn = _strings((v.get("typeName") or {}).get("names"))
            if tn:
                return tn[-1], 1
            return None, 0
        return name, strength
    if k == "CollateClause":
        return _figure(v.get("arg"))
    if k == "A_Expr":
        return ("nullif", 2) if v.get("kind") == "AEXPR_NULLIF" else ("?column?", 0)
    if k == "SubLink":
        t = v.get("subLinkType")
        if t == "EXISTS_SUBLINK":
            return "exists", 2
        if t == "ARRAY_SUBLINK":
            return "array", 2
        if t == "EXPR_SUBLINK":
            sel = (v.get("subselect") or {}).get("SelectStmt") or {}
            while sel.get("op", "SETOP_NONE") != "SETOP_NONE":
                sel = sel.get("larg") or {}
            tl = sel.get("targetList") or ()
            if not tl:
                return None, 0
            rt = tl[0].get("ResTarget", {})
            if rt.get("name"):
                return rt["name"], 2
            name, _ = _figure(rt.get("val"))
            return (name, 2) if name is not None else (None, 0)
        return "?column?", 0
    if k == "CaseExpr":
        name, strength = _figure(v.get("defresult")) if v.get("defresult") else ("?column?", 0)
        if strength <= 1:
            return "case", 1
        return name, strength
    if k == "MinMaxExpr":
        return ("greatest" if v.get("op") == "IS_GREATEST" else "least"), 2
    if k == "SQLValueFunction":
        return v.get("op", "").removeprefix("SVFOP_").removesuffix("_N").lower() or None, 2
    if k == "XmlExpr":
        op = v.get("op", "")
        return ("?column?", 0) if op == "IS_DOCUMENT" else (op.removeprefix("IS_").lower(), 2)
    if k == "JsonFuncExpr":
        return v.get("op", "").removesuffix("_OP").lower() or None, 2
    name = _FIXED_NAMES.get(k)
    if name is not None:
        return name, 2
    if k in _UNNAMED:
        return "?column?", 0
    return None, 0


def _target_name(rt: dict) -> str | None:
    if rt.get("name"):
        return rt["name"]
    name, _ = _figure(rt.get("val"))
    return name


# --------------------------------------------------------------------------- the walk


@functools.lru_cache(maxsize=8)
def _udf_index(udfs: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Lower-cased user-defined function names, and their bare names: built once per catalog."""
    lowered = frozenset(u.lower() for u in udfs)
    return lowered, frozenset(u.rsplit(".", 1)[-1] for u in lowered)


class _Ctx:
    __slots__ = ("search_path", "columns_of", "udfs", "udf_names", "refs", "writes", "aliases", "_cols",
                 "_state", "builtins")

    def __init__(self, search_path, columns_of, udfs, builtins=frozenset()) -> None:
        self.search_path = tuple(search_path)
        self.columns_of = columns_of
        self.builtins = builtins  # when known: any other function is user-defined (may read anything)
        self.udfs, self.udf_names = _udf_index(frozenset(udfs))
        self.refs: list[set] = [set()]  # sources referenced while analyzing each open query
        self.writes: set = set()
        self.aliases: list[dict] = [{}]  # output names ORDER BY / GROUP BY may refer to
        self._cols: dict[str, list[str] | None] = {}
        self._state = _State(self.search_path)

    # ---- tables

    def cols_of(self, q: str) -> list[str] | None:
        if q in self._cols:
            return self._cols[q]
        got = self.columns_of(q)
        cols = list(got) if got is not None else None
        self._cols[q] = cols
        return cols

    def table(self, rv: dict) -> _TableRel:
        cands = self._state.qualify_all(rv)
        lookup = cands
        if not rv.get("schemaname") and rv.get("relpersistence") != "t" and "pg_temp" not in self.search_path:
            lookup = [f"pg_temp.{rv.get('relname', '')}", *cands]  # PostgreSQL searches pg_temp first
        for q in lookup:
            cols = self.cols_of(q)
            if cols is not None:
                return _TableRel([q], cols)
        return _TableRel(cands, None)

    # ---- names

    def note(self, oc: OutputColumn) -> OutputColumn:
        self.refs[-1] |= oc.sources
        return oc

    def resolve(self, fields: list[str], scopes: list[list[_Item]]) -> OutputColumn:
        return self.note(self._resolve(fields, scopes))

    def _resolve(self, fields, scopes):
        n = len(fields)
        if n == 0:
            return _UNKNOWN_COL
        if n == 1:
            name = fields[0]
            if name == "*":
                parts = [it.rel.whole() for it in (scopes[0] if scopes else ()) if it.cols_visible]
                return _weak(_oc(parts))
            return self._unqualified(name, scopes)
        if n > 3:
            fields = fields[-3:]
            n = 3
        if n == 2:
            a, b = fields
            item = self._named(a, scopes)
            if item is not None:
                return self._in_item(item, b)
            return _weak(self._unqualified(a, scopes))  # a composite column's field
        s, t, c = fields
        parts = []
        q = f"{s}.{t}"
        for level in scopes:
            hits = [it for it in level if q in it.quals]
            if hits:
                parts += [self._in_item(it, c) for it in hits]
                break
        item = self._named(s, scopes)  # rel.column.field
        if item is not None:
            oc, _ = item.rel.lookup(t) if t != "*" else (item.rel.whole(), True)
            if oc is not None:
                parts.append(_weak(oc))
        if not parts:
            return OutputColumn(frozenset({f"{q}.{c}" if c != "*" else f"{q}.*"}), c != "*")
        return _oc(parts)

    def _in_item(self, item: _Item, col: str) -> OutputColumn:
        if col == "*":
            return item.rel.whole()
        oc, _ = item.rel.lookup(col)
        if oc is not None:
            return oc
        # not a column: PostgreSQL tries col(item) (functional notation) - fail closed
        return OutputColumn(item.rel.whole().sources | {UNKNOWN}, False)

    @staticmethod
    def _named(name: str, scopes) -> _Item | None:
        for level in scopes:
            for it in level:
                if name in it.names:
                    return it
        return None

    def _unqualified(self, name: str, scopes) -> OutputColumn:
        parts = []
        definite = False
        for level in scopes:
            for it in level:
                if it.cols_visible:
                    oc, d = it.rel.lookup(name)
                    if oc is not None:
                        parts.append(oc)
                        definite = definite or d
            if definite:
                return _oc(parts)
        item = self._named(name, scopes)  # a whole-row reference
        if item is not None:
            parts.append(item.rel.whole())
        elif not parts:
            alias = self.aliases[-1].get(name)
            return alias if alias is not None else _UNKNOWN_COL
        return _oc(parts)

    # ---- expressions

    def expr(self, node, scopes, ctes) -> OutputColumn:
        if isinstance(node, dict) and len(node) == 1 and "ColumnRef" in node:
            return self.resolve(_strings(node["ColumnRef"].get("fields")), scopes)
        acc: set = set()
        self._src(node, scopes, ctes, acc)
        return OutputColumn(frozenset(acc), False)

    def _src(self, x, scopes, ctes, acc: set) -> None:
        if type(x) is list:
            for i in x:
                t = type(i)
                if t is dict or t is list:
                    self._src(i, scopes, ctes, acc)
            return
        if type(x) is not dict:
            return
        if len(x) == 1:
            k, v = next(iter(x.items()))
            if k in _LEAVES:
                return
            if k == "ColumnRef":
                acc |= self.resolve(_strings(v.get("fields")), scopes).sources
                return
            if k == "SubLink":
                if v.get("testexpr") is not None:
                    self._src(v["testexpr"], scopes, ctes, acc)
                r = self.query(v.get("subselect") or {}, scopes, ctes)
                acc |= r.sources()
                acc |= r.allsrc
                return
            if k in _QUERY_KINDS:
                r = self.query(x, scopes, ctes)
                acc |= r.sources()
                acc |= r.allsrc
                return
            if k == "FuncCall":
                names = [s.lower() for s in _strings(v.get("funcname"))]
                name = names[-1] if names else ""
                if (name in self.udf_names or ".".join(names[-2:]) in self.udfs or name in _OPAQUE_FUNCTIONS
                        or (self.builtins and name not in self.builtins)):
                    acc.add(UNKNOWN)
                    self.refs[-1].add(UNKNOWN)
                if name in VALUE_SINK_FUNCTIONS:
                    sub: set = set()
                    self._src(v, scopes, ctes, sub)
                    self.writes |= sub
                    acc |= sub
                    return
            if type(v) is dict:
                for val in v.values():
                    t = type(val)
                    if t is dict or t is list:
                        self._src(val, scopes, ctes, acc)
            elif type(v) is list:
                self._src(v, scopes, ctes, acc)
            return
        for val in x.values():
            t = type(val)
            if t is dict or t is list:
                self._src(val, scopes, ctes, acc)

    def targets(self, targets, scopes, ctes) -> Cols | None:
        """A target or RETURNING list; None if a ``*`` cannot be expanded."""
        out: Cols = []
        unknown = False
        for t in targets or ():
            rt = t.get("ResTarget", t) if isinstance(t, dict) else {}
            val = rt.get("val")
            cr = val.get("ColumnRef") if isinstance(val, dict) and len(val) == 1 else None
            if cr is not None:
                fields = _strings(cr.get("fields"))
                if fields and fields[-1] == "*":
                    cols = self._star(fields[:-1], scopes)
                    if cols is None:
                        unknown = True
                    else:
                        out.extend(cols)
                    continue
            out.append((_target_name(rt), self.expr(val, scopes, ctes)))
        return None if unknown else out

    def _star(self, qual: list[str], scopes) -> Cols | None:
        if not qual:
            items = [it for it in (scopes[0] if scopes else ()) if it.cols_visible]
        else:
            item = None
            if len(qual) == 1:
                item = self._named(qual[0], scopes)
            else:
                q = ".".join(qual[-2:])
                for level in scopes:
                    item = next((it for it in level if q in it.quals), None)
                    if item is not None:
                        break
            if item is None:
                if len(qual) >= 2:
                    self.note(OutputColumn(frozenset({".".join(qual[-2:]) + ".*"}), False))
                else:
                    self.note(_UNKNOWN_COL)
                return None
            items = [item]
        out: Cols = []
        unknown = False
        for it in items:
            cols = it.rel.columns()
            if cols is None:
                self.note(it.rel.whole())
                unknown = True
            else:
                for _, oc in cols:
                    self.note(oc)
                out.extend(cols)
        return None if unknown else out

    # ---- queries

    def query(self, node: dict, scopes, ctes) -> _Result:
        """Analyze a (sub)query; its ``allsrc`` holds every source referenced anywhere inside."""
        self.refs.append(set())
        self.aliases.append({})
        try:
            kind, body = next(iter(node.items())) if node else ("", {})
            if kind == "SelectStmt":
                cols = self._select(body, scopes, ctes)
            elif kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
                cols = self._dml(kind, body, scopes, ctes)
            else:
                self.refs[-1].add(UNKNOWN)
                cols = None
        finally:
            self.aliases.pop()
            allsrc = frozenset(self.refs.pop())
        self.refs[-1] |= allsrc
        return _Result(cols, allsrc)

    def _with(self, wc, scopes, ctes: dict) -> dict:
        if not wc:
            return ctes
        items = [it.get("CommonTableExpr", it) for it in wc.get("ctes") or ()]
        if not wc.get("recursive"):
            for cte in items:
                r = self.query(cte.get("ctequery") or {}, scopes, ctes)
                rel = _rename(_DerivedRel(r.cols, r.allsrc), _strings(cte.get("aliascolnames")))
                ctes = {**ctes, cte.get("ctename", ""): rel}
            return ctes
        # WITH RECURSIVE: iterate to a fixpoint; a CTE that is a set operation (may be recursive)
        # gets the union of all its columns' sources in every column
        names = [cte.get("ctename", "") for cte in items]
        env = {**ctes}
        for name in names:
            env[name] = _DerivedRel(None, _EMPTY)
        for cte, name in zip(items, names):  # seed with the non-recursive terms
            q = cte.get("ctequery") or {}
            sel = q.get("SelectStmt")
            if sel is not None and sel.get("op", "SETOP_NONE") != "SETOP_NONE":
                q = {"SelectStmt": sel.get("larg") or {}}
            env[name] = self._cte_rel(cte, self.query(q, scopes, env), None, True)
        for _ in range(20):
            changed = False
            for cte, name in zip(items, names):
                q = cte.get("ctequery") or {}
                sel = q.get("SelectStmt")
                collapse = sel is not None and sel.get("op", "SETOP_NONE") != "SETOP_NONE"
                rel = self._cte_rel(cte, self.query(q, scopes, env), env[name], collapse)
                if _rel_key(rel) != _rel_key(env[name]):
                    env[name] = rel
                    changed = True
            if not changed:
                return env
        for name in names:  # no fixpoint (should not happen): fail closed
            env[name] = _DerivedRel(None, frozenset({UNKNOWN}))
        return env

    def _cte_rel(self, cte, r: _Result, prev: _Rel | None, collapse: bool) -> _Rel:
        allsrc = r.allsrc | (prev.allsrc if isinstance(prev, _DerivedRel) else _EMPTY)
        cols = r.cols
        if cols is not None and collapse:
            src = r.sources()
            if isinstance(prev, _DerivedRel) and prev.cols is not None:
                for _, oc in prev.cols:
                    src = src | oc.sources
            cols = [(n, OutputColumn(src, False)) for n, _ in cols]
        return _rename(_DerivedRel(cols, allsrc), _strings(cte.get("aliascolnames")))

    def _select(self, s: dict, scopes, ctes) -> Cols | None:
        ctes = self._with(s.get("withClause"), scopes, ctes)
        if s.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = self.query({"SelectStmt": s.get("larg") or {}}, scopes, ctes)
            right = self.query({"SelectStmt": s.get("rarg") or {}}, scopes, ctes)
            return _combine([left, right])
        if s.get("valuesLists"):
            rows = []
            for row in s["valuesLists"]:
                exprs = row.get("List", {}).get("items", []) if isinstance(row, dict) else []
                cols = [(f"column{i + 1}", self.expr(e, scopes, ctes)) for i, e in enumerate(exprs)]
                rows.append(_Result(cols, _EMPTY))
            return _combine(rows)
        level: list[_Item] = []
        for item in s.get("fromClause") or ():
            self._from(item, level, scopes, ctes)
        inner = [level, *scopes]
        cols = self.targets(s.get("targetList"), inner, ctes)
        for key in ("whereClause", "havingClause", "windowClause", "limitCount", "limitOffset"):
            if s.get(key) is not None:
                self._src(s[key], inner, ctes, set())
        if cols is not None:
            self.aliases[-1] = {n: oc for n, oc in cols if n is not None}
        for key in ("groupClause", "sortClause", "distinctClause"):
            if s.get(key) is not None:
                self._src(s[key], inner, ctes, set())
        return cols

    def _from(self, item, level: list[_Item], scopes, ctes) -> _Rel | None:
        if not isinstance(item, dict) or len(item) != 1:
            return None
        k, v = next(iter(item.items()))
        alias = v.get("alias") or {}
        aname = alias.get("aliasname")
        colnames = _strings(alias.get("colnames"))
        lateral_scopes = [list(level), *scopes]
        if k == "RangeVar":
            rel_name = v.get("relname", "")
            quals = _EMPTY
            if not v.get("schemaname") and not v.get("catalogname") and rel_name in ctes:
                rel = ctes[rel_name]
            else:
                rel = self.table(v)
                if not aname:
                    quals = frozenset(rel.cands)
            rel = _rename(rel, colnames)
            level.append(_Item((aname or rel_name,), quals, True, rel))
            return rel
        if k == "JoinExpr":
            start = len(level)
            left = self._from(v.get("larg"), level, scopes, ctes)
            right = self._from(v.get("rarg"), level, scopes, ctes)
            if left is None or right is None:
                left = left or _DerivedRel(None, frozenset({UNKNOWN}))
                right = right or _DerivedRel(None, frozenset({UNKNOWN}))
            jt = v.get("jointype", "JOIN_INNER")
            rel: _Rel = _JoinRel(left, right, _strings(v.get("usingClause")), bool(v.get("isNatural")),
                                 jt == "JOIN_FULL")
            if v.get("quals") is not None:
                self._src(v["quals"], [level, *scopes], ctes, set())
            if aname:
                del level[start:]
                rel = _rename(rel, colnames)
                level.append(_Item((aname,), _EMPTY, True, rel))
            else:
                for it in level[start:]:
                    it.cols_visible = False
                level.append(_Item((), _EMPTY, True, rel))
            ua = (v.get("join_using_alias") or {}).get("aliasname")
            if ua:
                ucols = [(u, rel.lookup(u)[0] or _UNKNOWN_COL) for u in _strings(v.get("usingClause"))]
                level.append(_Item((ua,), _EMPTY, False, _DerivedRel(ucols, _EMPTY)))
            return rel
        if k == "RangeSubselect":
            r = self.query(v.get("subquery") or {}, lateral_scopes if v.get("lateral") else scopes, ctes)
            rel = _rename(_DerivedRel(r.cols, r.allsrc), colnames)
            level.append(_Item((aname,) if aname else (), _EMPTY, True, rel))
            return rel
        if k == "RangeTableSample":
            rel = self._from(v.get("relation"), level, scopes, ctes)
            self._src(v.get("args"), lateral_scopes, ctes, set())
            self._src(v.get("repeatable"), lateral_scopes, ctes, set())
            return rel
        # RangeFunction, RangeTableFunc (XMLTABLE), JsonTable: implicitly LATERAL
        acc: set = set()
        body = {kk: vv for kk, vv in v.items() if kk != "alias"}
        self._src(body, lateral_scopes, ctes, acc)
        src = frozenset(acc)
        names = _function_columns(k, v, aname)
        if names is None:
            rel = _DerivedRel(None, src)
        else:
            rel = _DerivedRel([(n, OutputColumn(src, False)) for n in names], src)
        rel = _rename(rel, colnames)
        level.append(_Item((aname,) if aname else (), _EMPTY, True, rel))
        return rel

    def _target(self, rv: dict) -> tuple[_TableRel, _Item]:
        rel = self.table(rv)
        alias = (rv.get("alias") or {}).get("aliasname")
        quals = _EMPTY if alias else frozenset(rel.cands)
        return rel, _Item((alias or rv.get("relname", ""),), quals, True, rel)

    def _returning(self, s: dict, rel: _Rel, level: list[_Item], scopes, ctes) -> Cols:
        rc = s.get("returningClause")
        if rc is None and s.get("returningList") is None:
            return []
        exprs = rc.get("exprs") if isinstance(rc, dict) else s.get("returningList")
        names = {"old", "new"}
        for o in (rc or {}).get("options") or () if isinstance(rc, dict) else ():
            val = o.get("ReturningOption", o).get("value")
            if val:
                names.add(val)
        extra = [_Item((n,), _EMPTY, False, rel) for n in sorted(names)]
        return self.targets(exprs, [level + extra, *scopes], ctes)

    def _dml(self, kind: str, s: dict, scopes, ctes) -> Cols | None:
        ctes = self._with(s.get("withClause"), scopes, ctes)
        rel, item = self._target(_unwrap(s.get("relation")))
        level = [item]
        if kind == "InsertStmt":
            src = _EMPTY
            if s.get("selectStmt") is not None:
                r = self.query(s["selectStmt"], scopes, ctes)
                src = r.sources()
                self.writes |= src
            oc = s.get("onConflictClause")
            if oc:
                excluded = _DerivedRel(None, src)
                inner = [level + [_Item(("excluded",), _EMPTY, False, excluded)], *scopes]
                self._assignments(oc.get("targetList"), inner, ctes)
                self._src(oc.get("whereClause"), inner, ctes, set())
            return self._returning(s, rel, level, scopes, ctes)
        for it in s.get("fromClause") or s.get("usingClause") or ():
            self._from(it, level, scopes, ctes)
        if kind == "MergeStmt":
            self._from(s.get("sourceRelation"), level, scopes, ctes)
        inner = [level, *scopes]
        if kind == "UpdateStmt":
            self._assignments(s.get("targetList"), inner, ctes)
        elif kind == "MergeStmt":
            self._src(s.get("joinCondition"), inner, ctes, set())
            for w in s.get("mergeWhenClauses") or ():
                wc = w.get("MergeWhenClause", w)
                self._src(wc.get("condition"), inner, ctes, set())
                self._assignments(wc.get("targetList"), inner, ctes)
                for e in wc.get("values") or ():
                    self.writes |= self.expr(e, inner, ctes).sources
        self._src(s.get("whereClause"), inner, ctes, set())
        return self._returning(s, rel, level, scopes, ctes)

    def _assignments(self, targets, scopes, ctes) -> None:
        for t in targets or ():
            rt = t.get("ResTarget", t) if isinstance(t, dict) else {}
            if rt.get("val") is not None:
                self.writes |= self.expr(rt["val"], scopes, ctes).sources
            if rt.get("indirection") is not None:  # SET arr[expr] = ...
                self._src(rt["indirection"], scopes, ctes, self.writes)


def _rel_key(rel: _Rel):
    if isinstance(rel, _DerivedRel):
        return (tuple(rel.cols) if rel.cols is not None else None, rel.allsrc)
    return id(rel)


def _combine(results: list[_Result]) -> Cols | None:
    """Position-wise union of set-operation branches / VALUES rows, named as the first (left)
    one: when its columns are not known, neither are the result's."""
    if results[0].cols is None:
        return None
    known = [r.cols for r in results if r.cols is not None]
    width = len(known[0])
    if any(len(c) != width for c in known):
        return None
    extra = set()
    for r in results:
        if r.cols is None:
            extra |= r.allsrc
    out: Cols = []
    for i in range(width):
        oc = _oc([c[i][1] for c in known])
        if extra:
            oc = OutputColumn(oc.sources | extra, False)
        out.append((known[0][i][0], oc))
    return out


# table functions whose output columns are known: name -> column names (None: the function's name)
_SETOF_SCALAR = frozenset({
    "generate_series", "generate_subscripts", "regexp_matches", "regexp_split_to_table", "string_to_table",
    "json_array_elements", "json_array_elements_text", "jsonb_array_elements", "jsonb_array_elements_text",
    "json_object_keys", "jsonb_object_keys", "jsonb_path_query", "pg_ls_dir", "upper", "lower", "now",
    "random", "md5", "length", "substr", "substring", "concat", "format", "coalesce", "to_char",
})
_SETOF_MULTI = {
    "json_each": ["key", "value"], "jsonb_each": ["key", "value"], "json_each_text": ["key", "value"],
    "jsonb_each_text": ["key", "value"],
}


def _function_columns(kind: str, v: dict, alias: str | None) -> list[str] | None:
    if kind == "JsonTable":
        names: list[str] = []

        def cols(lst) -> None:
            for c in lst or ():
                jc = c.get("JsonTableColumn", c)
                if jc.get("coltype") == "JTC_NESTED":
                    cols(jc.get("columns"))
                else:
                    names.append(jc.get("name"))

        cols(v.get("columns"))
        return names
    if kind == "RangeTableFunc":
        return [c.get("RangeTableFuncCol", c).get("colname") for c in v.get("columns") or ()]
    if kind != "RangeFunction":
        return None
    names = []
    funcs = v.get("functions") or ()
    for f in funcs:
        items = f.get("List", {}).get("items", []) if isinstance(f, dict) else []
        call = items[0] if items else {}
        coldefs = items[1] if len(items) > 1 else None
        if isinstance(coldefs, dict):  # ROWS FROM (f() AS (a int, ...))
            coldefs = (coldefs.get("List") or {}).get("items")
        if coldefs is None and v.get("coldeflist"):
            coldefs = v["coldeflist"]
        if coldefs:
            names += [c.get("ColumnDef", c).get("colname") for c in coldefs]
            continue
        fc = call.get("FuncCall") if isinstance(call, dict) else None
        if fc is None:
            return None
        fname = (_strings(fc.get("funcname")) or [""])[-1]
        if len(_strings(fc.get("funcname"))) > 1 and _strings(fc.get("funcname"))[0] != "pg_catalog":
            return None
        if fname == "unnest":
            n = len(fc.get("args") or ())
            if n <= 1:
                return None  # an array of a composite type expands to that type's columns
            names += ["unnest"] * n
        elif fname in _SETOF_SCALAR:
            names.append(alias if alias and len(funcs) == 1 else fname)
        elif fname in _SETOF_MULTI:
            names += _SETOF_MULTI[fname]
        else:
            return None
    if v.get("ordinality"):
        names.append("ordinality")
    return names


# --------------------------------------------------------------------------- statements


def _statement(kind: str, body: dict, ctx: _Ctx) -> StatementLineage:
    outputs: tuple[OutputColumn, ...] | None = ()
    if kind == "SelectStmt":
        into = body.get("intoClause")
        leftmost = body
        while leftmost.get("op", "SETOP_NONE") != "SETOP_NONE" and not into:
            leftmost = leftmost.get("larg") or {}
            into = leftmost.get("intoClause")
        r = ctx.query({kind: body}, [], {})
        if into:
            ctx.writes |= r.sources()
        else:
            outputs = tuple(oc for _, oc in r.cols) if r.cols is not None else None
    elif kind in _QUERY_KINDS:
        r = ctx.query({kind: body}, [], {})
        outputs = tuple(oc for _, oc in r.cols) if r.cols is not None else None
    elif kind == "ExplainStmt":
        outputs = (_NO_SOURCES,)
        if _explain_analyze(body.get("options")):
            q = body.get("query") or {}
            if q:
                k, b = next(iter(q.items()))
                ctx.writes |= _statement(k, b or {}, _Ctx(ctx.search_path, ctx.columns_of, ctx.udfs, ctx.builtins)).write_sources
    elif kind == "VariableShowStmt":
        outputs = (_NO_SOURCES,)
    elif kind == "CreateTableAsStmt":
        q = body.get("query") or {}
        if q and next(iter(q)) in _QUERY_KINDS:
            ctx.writes |= ctx.query(q, [], {}).sources()
        else:  # CREATE TABLE AS EXECUTE
            ctx.writes.add(UNKNOWN)
    elif kind == "FetchStmt":
        outputs = () if body.get("ismove") else None
    elif kind in ("ExecuteStmt", "CallStmt"):
        outputs = None
        ctx.writes.add(UNKNOWN)
    elif kind == "DoStmt":
        ctx.writes.add(UNKNOWN)
    elif kind == "CopyStmt":
        if body.get("query") is not None:
            ctx.query(body["query"], [], {})  # writes of a data-modifying query
        if not body.get("is_from"):
            outputs = None
    elif kind == "AlterTableStmt":
        _alter_table(body, ctx)
    return StatementLineage(outputs, frozenset(ctx.writes))


def _alter_table(body: dict, ctx: _Ctx) -> None:
    """ALTER COLUMN ... TYPE ... USING expr and generated columns rewrite rows from other columns."""
    rv = _unwrap(body.get("relation"))
    if not rv:
        return
    rel, item = ctx._target(rv)
    scopes = [[item]]
    for c in body.get("cmds") or ():
        cmd = c.get("AlterTableCmd", c) if isinstance(c, dict) else {}
        cd = (cmd.get("def") or {}).get("ColumnDef")
        if not cd:
            continue
        if cd.get("raw_default") is not None:
            ctx.writes |= ctx.expr(cd["raw_default"], scopes, {}).sources
        for con in cd.get("constraints") or ():
            k = con.get("Constraint", con)
            if k.get("raw_expr") is not None and k.get("contype") in ("CONSTR_GENERATED", "CONSTR_DEFAULT"):
                ctx.writes |= ctx.expr(k["raw_expr"], scopes, {}).sources


def statement_lineage(sql: str, search_path: tuple[str, ...] = ("public",),
                      columns_of: Callable[[str], Sequence[str] | None] = lambda q: None,
                      udfs: frozenset[str] = frozenset(),
                      builtins: frozenset[str] = frozenset()) -> list[StatementLineage]:
    """One StatementLineage per statement of ``sql`` (the statements of parse_sql_json).
    Raises pglast.parser.ParseError if the SQL does not parse, analyzer.AnalysisError if its
    parse tree is nested too deeply to read."""
    try:
        tree = orjson.loads(parse_sql_json(sql))
    except orjson.JSONDecodeError:  # deeper than orjson reads (1,024 levels)
        raise AnalysisError(TOO_DEEP) from None
    out = []
    cache: dict[str, list[str] | None] = {}
    for s in tree.get("stmts") or ():
        node = s.get("stmt") or {}
        if not node:
            continue
        kind, body = next(iter(node.items()))
        ctx = _Ctx(search_path, columns_of, udfs, builtins)
        ctx._cols = cache
        try:
            out.append(_statement(kind, body or {}, ctx))
        except RecursionError:  # pathologically nested: nothing can be established
            out.append(StatementLineage(None, frozenset({UNKNOWN})))
    return out
