"""What a SQL string does, as facts rules can read. Sans-I/O and pure.

``analyze(sql, search_path)`` parses with pglast (``parse_sql_json``, the fast path: the JSON is
walked as plain dicts) and returns one ``StatementFacts`` per statement.

Rules this module keeps:
- Fail closed. What cannot be parsed raises AnalysisError; what cannot be resolved is
  over-approximated: an unqualified column is attributed to every table in scope, a name that
  could be a whole-row reference adds ``schema.table.*``, ``read_only`` is false unless the
  statement is known to be read-only.
- Tables are schema-qualified as the session's search_path would resolve them (``pg_*`` names
  resolve to ``pg_catalog``, which PostgreSQL searches first); CTE names are not tables.
- Functions are collected from every position (select lists, FROM, WHERE, defaults, CALL,
  EXECUTE arguments, COPY queries ...) by walking the whole tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson
from pglast.parser import ParseError, parse_sql_json, scan


TOO_DEEP = "statement nested too deeply to analyze"


class AnalysisError(Exception):
    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass(frozen=True, slots=True)
class StatementFacts:
    sql: str
    command: str
    statement_type: str
    read_only: bool
    changes_session: bool = False
    tables: tuple[str, ...] = ()
    tables_written: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    functions_qualified: tuple[str, ...] = ()
    has_where: bool | None = None
    copy: dict | None = None
    set_name: str | None = None
    set_value: str | None = None
    prepared_name: str | None = None
    inner: StatementFacts | None = None
    explain_analyze: bool = False
    object_type: str | None = None
    guc_writes: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    # columns named through their relation (``c.email``, ``public.customers.email``): where the
    # relation has no such column PostgreSQL reads ``c.f`` as ``f(c)`` (functional notation), which
    # Catalog.enrich turns into a whole-row read and a call of f. Not shown to rules.
    qualified_columns: tuple[str, ...] = ()
    user_functions: tuple[str, ...] = ()  # functions that are not built in (from the catalog, when masks apply)
    unknown_tables: tuple[str, ...] = ()  # relations the catalog does not know (when masks apply)

    def to_dict(self) -> dict:
        return {
            "sql": self.sql, "command": self.command, "statement_type": self.statement_type,
            "read_only": self.read_only, "changes_session": self.changes_session, "tables": list(self.tables),
            "tables_written": list(self.tables_written), "columns": list(self.columns),
            "functions": list(self.functions), "functions_qualified": list(self.functions_qualified),
            "has_where": self.has_where, "copy": self.copy, "set_name": self.set_name,
            "set_value": self.set_value, "prepared_name": self.prepared_name,
            "inner": self.inner.to_dict() if self.inner is not None else None,
            "explain_analyze": self.explain_analyze, "object_type": self.object_type,
            "guc_writes": list(self.guc_writes), "params": list(self.params),
            "user_functions": list(self.user_functions), "unknown_tables": list(self.unknown_tables),
        }


# Functions that write although they are called from a SELECT: ``read_only`` is false for a
# statement that calls one. PostgreSQL refuses nextval() and setval() in a read-only transaction;
# the others it lets run there, but they write data all the same (large objects, index
# summaries, collations, replication origins, WAL messages), or act on other sessions and the
# server (advisory locks other sessions wait on, notifications, signals, configuration reloads,
# statistics resets, server files, other servers).
WRITING_FUNCTIONS = frozenset({
    "nextval", "setval", "pg_advisory_lock", "pg_advisory_lock_shared",
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared", "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared",
    "pg_notify", "lo_import", "lo_export", "lo_create", "lo_creat", "lo_unlink", "lo_put",
    "lo_from_bytea", "lo_truncate", "lowrite", "lo_open", "dblink_exec", "dblink", "dblink_connect",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_file_write", "pg_file_rename", "pg_file_unlink", "pg_switch_wal", "pg_promote",
    "pg_create_restore_point", "pg_backup_start", "pg_backup_stop", "pg_start_backup",
    "pg_stop_backup", "pg_create_logical_replication_slot", "pg_create_physical_replication_slot",
    "pg_drop_replication_slot", "pg_logical_emit_message", "pg_stat_reset",
    "pg_import_system_collations", "pg_replication_origin_create",
    "pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    "lo_truncate64", "lo_close", "lo_lseek", "lo_lseek64", "brin_summarize_new_values",
    "brin_summarize_range", "brin_desummarize_range", "gin_clean_pending_list",
    "pg_rotate_logfile_old", "pg_file_sync", "pg_stat_reset_shared", "pg_stat_reset_slru",
    "pg_stat_reset_single_table_counters", "pg_stat_reset_single_function_counters",
    "pg_stat_reset_replication_slot", "pg_stat_reset_subscription_stats",
    "pg_replication_origin_drop", "pg_replication_origin_advance",
    "pg_replication_origin_session_setup", "pg_replication_origin_session_reset",
    "pg_replication_origin_xact_setup", "pg_replication_slot_advance",
    "pg_copy_logical_replication_slot", "pg_copy_physical_replication_slot",
    "pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes",
    "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_log_backend_memory_contexts",
    "dblink_send_query", "dblink_open", "dblink_close", "dblink_disconnect",
})

# Functions that change the session's state for the statements after it (``changes_session``):
# settings, the random seed, session-level advisory locks. set_config() and setseed() are
# read-only (a read-only transaction may run them, as it may run SET).
SESSION_FUNCTIONS = frozenset({
    "set_config", "setseed", "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
})

# Functions whose arguments' values flow into something the statement writes (lineage.py's
# write_sources): the writing functions and the session ones (set_config('x', email, ...)).
VALUE_SINK_FUNCTIONS = WRITING_FUNCTIONS | SESSION_FUNCTIONS

_TX_TAGS = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "START TRANSACTION", "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE", "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION", "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

_OBJECT_NAMES = {
    "MATVIEW": "MATERIALIZED VIEW", "FOREIGN_TABLE": "FOREIGN TABLE", "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "TSDICTIONARY": "TEXT SEARCH DICTIONARY", "TSPARSER": "TEXT SEARCH PARSER", "TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "FDW": "FOREIGN DATA WRAPPER", "FOREIGN_SERVER": "SERVER", "OPCLASS": "OPERATOR CLASS",
    "OPFAMILY": "OPERATOR FAMILY", "EVENT_TRIGGER": "EVENT TRIGGER", "USER_MAPPING": "USER MAPPING",
    "DEFACL": "DEFAULT PRIVILEGES", "LARGEOBJECT": "LARGE OBJECT", "ACCESS_METHOD": "ACCESS METHOD",
    "STATISTIC_EXT": "STATISTICS", "PUBLICATION_NAMESPACE": "PUBLICATION", "PUBLICATION_REL": "PUBLICATION",
    "TABCONSTRAINT": "TABLE", "DOMCONSTRAINT": "DOMAIN", "COLUMN": "TABLE", "ATTRIBUTE": "TYPE",
    "ROUTINE": "ROUTINE", "TRANSFORM": "TRANSFORM", "AMOP": "OPERATOR FAMILY", "AMPROC": "OPERATOR FAMILY",
}

# statement node -> fixed command tag (the rest are computed in _command)
_FIXED_TAGS = {
    "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE",
    "CopyStmt": "COPY", "VariableShowStmt": "SHOW", "ExplainStmt": "EXPLAIN", "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE", "DoStmt": "DO", "CallStmt": "CALL", "CreateStmt": "CREATE TABLE",
    "IndexStmt": "CREATE INDEX", "ViewStmt": "CREATE VIEW", "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE", "AlterRoleSetStmt": "ALTER ROLE", "DropRoleStmt": "DROP ROLE",
    "AlterSystemStmt": "ALTER SYSTEM", "TruncateStmt": "TRUNCATE TABLE", "CommentStmt": "COMMENT",
    "SecLabelStmt": "SECURITY LABEL", "ClusterStmt": "CLUSTER", "ReindexStmt": "REINDEX",
    "LockStmt": "LOCK TABLE", "ListenStmt": "LISTEN", "UnlistenStmt": "UNLISTEN", "NotifyStmt": "NOTIFY",
    "DeclareCursorStmt": "DECLARE CURSOR", "ClosePortalStmt": "CLOSE CURSOR", "CheckPointStmt": "CHECKPOINT",
    "LoadStmt": "LOAD", "CreateSchemaStmt": "CREATE SCHEMA", "CreatedbStmt": "CREATE DATABASE",
    "DropdbStmt": "DROP DATABASE", "AlterDatabaseStmt": "ALTER DATABASE", "AlterDatabaseSetStmt": "ALTER DATABASE",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE", "CreateExtensionStmt": "CREATE EXTENSION",
    "AlterExtensionStmt": "ALTER EXTENSION", "AlterExtensionContentsStmt": "ALTER EXTENSION",
    "CreateSeqStmt": "CREATE SEQUENCE", "AlterSeqStmt": "ALTER SEQUENCE", "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER", "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
    "RuleStmt": "CREATE RULE", "CreateDomainStmt": "CREATE DOMAIN", "CompositeTypeStmt": "CREATE TYPE",
    "CreateEnumStmt": "CREATE TYPE", "CreateRangeStmt": "CREATE TYPE", "AlterEnumStmt": "ALTER TYPE",
    "CreateForeignServerStmt": "CREATE SERVER", "AlterForeignServerStmt": "ALTER SERVER",
    "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER", "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER",
    "CreateUserMappingStmt": "CREATE USER MAPPING", "AlterUserMappingStmt": "ALTER USER MAPPING",
    "DropUserMappingStmt": "DROP USER MAPPING", "CreateForeignTableStmt": "CREATE FOREIGN TABLE",
    "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA", "CreatePolicyStmt": "CREATE POLICY",
    "AlterPolicyStmt": "ALTER POLICY", "CreatePublicationStmt": "CREATE PUBLICATION",
    "AlterPublicationStmt": "ALTER PUBLICATION", "CreateSubscriptionStmt": "CREATE SUBSCRIPTION",
    "AlterSubscriptionStmt": "ALTER SUBSCRIPTION", "DropSubscriptionStmt": "DROP SUBSCRIPTION",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW", "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "ReassignOwnedStmt": "REASSIGN OWNED", "DropOwnedStmt": "DROP OWNED", "CreateTableSpaceStmt": "CREATE TABLESPACE",
    "DropTableSpaceStmt": "DROP TABLESPACE", "AlterTableSpaceOptionsStmt": "ALTER TABLESPACE",
    "AlterTableMoveAllStmt": "ALTER TABLE", "ConstraintsSetStmt": "SET CONSTRAINTS", "CreateCastStmt": "CREATE CAST",
    "CreateOpClassStmt": "CREATE OPERATOR CLASS", "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY", "CreateConversionStmt": "CREATE CONVERSION",
    "CreatePLangStmt": "CREATE LANGUAGE", "CreateStatsStmt": "CREATE STATISTICS", "AlterStatsStmt": "ALTER STATISTICS",
    "AlterTSConfigurationStmt": "ALTER TEXT SEARCH CONFIGURATION", "AlterTSDictionaryStmt": "ALTER TEXT SEARCH DICTIONARY",
    "CreateTransformStmt": "CREATE TRANSFORM", "CreateAmStmt": "CREATE ACCESS METHOD", "AlterOperatorStmt": "ALTER OPERATOR",
    "AlterTypeStmt": "ALTER TYPE", "AlterCollationStmt": "ALTER COLLATION", "AlterFunctionStmt": "ALTER FUNCTION",
    "AlterDomainStmt": "ALTER DOMAIN", "CreateConversion": "CREATE CONVERSION",
}

# Statements PostgreSQL runs in a read-only transaction whatever they hold (utility.c,
# ClassifyUtilityCommandAsReadOnly): transaction control, settings, cursors, prepared statements,
# LISTEN/UNLISTEN, DISCARD, SET CONSTRAINTS, and maintenance that changes no data. EXECUTE is
# read-only by itself: the gateway judges the statement it runs again (governor.py), as
# PostgreSQL checks that statement when it runs it. SELECT, EXPLAIN, DECLARE CURSOR and COPY are
# read-only depending on what they hold (_facts).
_READ_ONLY_KINDS = frozenset({
    "TransactionStmt", "VariableSetStmt", "VariableShowStmt", "DiscardStmt", "DeallocateStmt",
    "PrepareStmt", "ExecuteStmt", "ClosePortalStmt", "FetchStmt", "ConstraintsSetStmt", "ListenStmt",
    "UnlistenStmt", "CheckPointStmt", "VacuumStmt", "ClusterStmt", "ReindexStmt",
})
# What PostgreSQL also lets a read-only transaction run, but ``read_only`` is false for: DO and
# CALL run code the gateway cannot see (PostgreSQL checks each statement inside as it runs),
# LOAD runs a library's code, ALTER SYSTEM writes the server's configuration, LOCK TABLE holds
# locks that block other sessions until the transaction ends, NOTIFY delivers a payload to
# other sessions. (COPY to a server file or program, and writes to temporary tables, are false
# too: _facts.)
_STRICTER_KINDS = frozenset({"DoStmt", "CallStmt", "LoadStmt", "AlterSystemStmt", "LockStmt", "NotifyStmt"})
# Statements that change the session's state for the statements after it (``changes_session``)
_SESSION_KINDS = frozenset({
    "VariableSetStmt", "DiscardStmt", "ListenStmt", "UnlistenStmt", "PrepareStmt", "DeallocateStmt",
    "DeclareCursorStmt", "ClosePortalStmt", "LoadStmt", "DoStmt", "CallStmt",
})

_IDENT_OK = re.compile(r"^[a-z_][a-z0-9_$]*$")


def _obj(v: str | None) -> str:
    if not v:
        return "OBJECT"
    name = v.removeprefix("OBJECT_")
    return _OBJECT_NAMES.get(name, name.replace("_", " "))


def _quote_ident(s: str) -> str:
    return s if _IDENT_OK.match(s) else '"' + s.replace('"', '""') + '"'


def _strings(items) -> list[str]:
    out = []
    for it in items or ():
        if isinstance(it, dict):
            s = it.get("String")
            if s is not None:
                out.append(s.get("sval", ""))
            elif "A_Star" in it:
                out.append("*")
    return out


def _const_text(node) -> str | None:
    """The text of an A_Const (as SET and set_config see it), else None."""
    if not isinstance(node, dict):
        return None
    c = node.get("A_Const")
    if c is None:
        tc = node.get("TypeCast")
        if tc is not None:
            return _const_text(tc.get("arg"))
        return None
    if "sval" in c:
        return c["sval"].get("sval", "")
    if "ival" in c:
        return str(c["ival"].get("ival", 0))
    if "fval" in c:
        return c["fval"].get("fval", "")
    if "boolval" in c:
        return "true" if c["boolval"].get("boolval") else "false"
    if "bsval" in c:
        return c["bsval"].get("bsval", "")
    if c.get("isnull"):
        return None
    return None


class _Scope:
    __slots__ = ("names", "real")

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}  # alias/name -> real tables behind it ([] = derived)
        self.real: list[str] = []  # real tables in this FROM


class _State:
    __slots__ = ("search_path", "tables", "written", "columns", "qualified", "functions", "functions_q",
                 "read_only", "changes_session", "guc_writes", "select_into")

    def __init__(self, search_path: tuple[str, ...]) -> None:
        self.search_path = search_path
        self.tables: dict[str, None] = {}
        self.written: dict[str, None] = {}
        self.columns: dict[str, None] = {}
        self.qualified: dict[str, None] = {}  # columns named as rel.column (see qualified_columns)
        self.functions: dict[str, None] = {}
        self.functions_q: dict[str, None] = {}
        self.read_only = True
        self.changes_session = False
        self.guc_writes: dict[str, None] = {}
        self.select_into = False

    def qualify_all(self, rv: dict) -> list[str]:
        """Every table an unqualified name may resolve to along search_path (without the catalog
        the gateway cannot tell which schema holds it: all candidates, fail closed)."""
        rel = rv.get("relname", "")
        schema = rv.get("schemaname")
        if schema:
            return [f"{schema}.{rel}"]
        if rv.get("relpersistence") == "t":
            return [f"pg_temp.{rel}"]
        out = [f"pg_catalog.{rel}"] if rel.startswith("pg_") else []
        for sp in self.search_path or ("public",):
            q = f"{sp}.{rel}"
            if q not in out:
                out.append(q)
        return out

    def qualify(self, rv: dict) -> str:
        """Where a new relation of that name is created."""
        rel = rv.get("relname", "")
        schema = rv.get("schemaname")
        if not schema:
            if rel.startswith("pg_"):
                schema = "pg_catalog"
            elif rv.get("relpersistence") == "t":
                schema = "pg_temp"
            else:
                schema = self.search_path[0] if self.search_path else "public"
        return f"{schema}.{rel}"


# --------------------------------------------------------------------------- tree walking


# nodes with nothing inside that the analysis looks for
_LEAVES = frozenset({"A_Const", "String", "ParamRef", "A_Star", "Integer", "Float", "Boolean", "BitString",
                     "TypeName", "SQLValueFunction", "Alias", "RoleSpec", "SetToDefault"})


def _walk(x, st: _State, scopes: list[_Scope], ctes: frozenset) -> None:
    if type(x) is list:
        for i in x:
            t = type(i)
            if t is dict or t is list:
                _walk(i, st, scopes, ctes)
        return
    if type(x) is not dict:
        return
    if len(x) == 1:
        for k, v in x.items():
            if k in _LEAVES:
                return
            h = _HANDLERS.get(k)
            if h is not None:
                h(v, st, scopes, ctes)
                return
    elif "relname" in x:  # an (unwrapped) RangeVar outside a FROM list
        _range_var(x, st, None, ctes)
    for v in x.values():
        t = type(v)
        if t is dict or t is list:
            _walk(v, st, scopes, ctes)


def _range_var(rv: dict, st: _State, scope: _Scope | None, ctes: frozenset) -> None:
    rel = rv.get("relname", "")
    alias = (rv.get("alias") or {}).get("aliasname")
    if not rv.get("schemaname") and not rv.get("catalogname") and rel in ctes:
        if scope is not None:
            scope.names[alias or rel] = []
        return
    qs = st.qualify_all(rv)
    for q in qs:
        st.tables[q] = None
    if (rv.get("alias") or {}).get("colnames"):
        # "customers t(a, b, c)" renames columns by position: which one "c" is needs the catalog,
        # so the statement is taken to read every column (fail closed)
        for q in qs:
            st.columns[f"{q}.*"] = None
    if scope is not None:
        scope.names[alias or rel] = qs
        if not alias:
            for q in qs:
                scope.names.setdefault(q, [q])
        scope.real.extend(qs)


def _with(wc, st: _State, scopes: list[_Scope], ctes: frozenset) -> frozenset:
    if not wc:
        return ctes
    items = wc.get("ctes") or ()
    names = []
    for it in items:
        cte = it.get("CommonTableExpr", it)
        names.append(cte.get("ctename", ""))
    if wc.get("recursive"):
        visible = ctes | frozenset(names)
        for it in items:
            cte = it.get("CommonTableExpr", it)
            _walk(cte.get("ctequery"), st, scopes, visible)
        return visible
    visible = ctes
    for it, name in zip(items, names):
        cte = it.get("CommonTableExpr", it)
        _walk(cte.get("ctequery"), st, scopes, visible)  # a CTE does not see itself
        visible = visible | {name}
    return visible


def _from_item(item, st: _State, scope: _Scope, scopes: list[_Scope], ctes: frozenset) -> list[str]:
    """Add one FROM item to ``scope``; returns the real tables it brings."""
    if not isinstance(item, dict):
        return []
    if "RangeVar" in item:
        before = len(scope.real)
        _range_var(item["RangeVar"], st, scope, ctes)
        return scope.real[before:]
    if "JoinExpr" in item:
        j = item["JoinExpr"]
        got = _from_item(j.get("larg"), st, scope, scopes, ctes) + _from_item(j.get("rarg"), st, scope, scopes, ctes)
        inner = [scope, *scopes]
        if j.get("quals") is not None:
            _walk(j["quals"], st, inner, ctes)
        for name in _strings(j.get("usingClause")):
            _column([name], st, inner)
        alias = (j.get("alias") or {}).get("aliasname")
        if alias:
            scope.names[alias] = list(got)
            if (j.get("alias") or {}).get("colnames"):
                for t in got:  # columns renamed by position: every column may be read
                    st.columns[f"{t}.*"] = None
        return got
    if "RangeSubselect" in item:
        rs = item["RangeSubselect"]
        _walk(rs.get("subquery"), st, [scope, *scopes] if rs.get("lateral") else scopes, ctes)
        alias = (rs.get("alias") or {}).get("aliasname")
        if alias:
            scope.names[alias] = []
        return []
    if "RangeTableSample" in item:
        ts = item["RangeTableSample"]
        got = _from_item(ts.get("relation"), st, scope, scopes, ctes)
        _walk(ts.get("args"), st, [scope, *scopes], ctes)
        return got
    # RangeFunction, RangeTableFunc, JsonTable ...: functions may see the FROM items before them
    body = next(iter(item.values()))
    _walk(body, st, [scope, *scopes], ctes)
    alias = (body.get("alias") or {}).get("aliasname") if isinstance(body, dict) else None
    if alias:
        scope.names[alias] = []
    return []


def _column(fields: list[str], st: _State, scopes: list[_Scope]) -> None:
    n = len(fields)
    if n == 0:
        return
    if n == 1:
        name = fields[0]
        for sc in scopes:
            for t in sc.real:
                st.columns[f"{t}.{name}"] = None
            if name == "*":
                break  # SELECT * expands the innermost FROM only
            whole = sc.names.get(name)
            if whole:  # could be a whole-row reference to that table
                for t in whole:
                    st.columns[f"{t}.*"] = None
        return
    col = fields[-1]
    qual = fields[:-1]
    if len(qual) == 1:
        a = qual[0]
        for sc in scopes:
            ts = sc.names.get(a)
            if ts is not None:
                for t in ts:
                    st.columns[f"{t}.{col}"] = None
                    if col != "*":
                        st.qualified[f"{t}.{col}"] = None
                return
        # not a range name: may be a composite column of some table (fail closed)
        for sc in scopes:
            for t in sc.real:
                st.columns[f"{t}.{a}"] = None
        return
    schema, table = qual[-2], qual[-1]
    st.columns[f"{schema}.{table}.{col}"] = None
    if col != "*":
        st.qualified[f"{schema}.{table}.{col}"] = None


def _h_column_ref(v, st, scopes, ctes):
    _column(_strings(v.get("fields")), st, scopes)


def _h_func_call(v, st, scopes, ctes):
    names = _strings(v.get("funcname"))
    if names:
        name = names[-1]
        st.functions[name] = None
        if len(names) > 1:
            q = ".".join(names[-2:])
        elif name.startswith("pg_") or name in VALUE_SINK_FUNCTIONS:
            q = f"pg_catalog.{name}"
        else:
            q = name
        st.functions_q[q] = None
        if name in WRITING_FUNCTIONS:
            st.read_only = False
        if name in SESSION_FUNCTIONS:
            st.changes_session = True
        if name == "set_config":
            args = v.get("args") or ()
            first = _const_text(args[0]) if args else None
            st.guc_writes[first.lower() if first is not None else "?"] = None
    for key in ("args", "agg_order", "agg_filter", "over"):
        if v.get(key) is not None:
            _walk(v[key], st, scopes, ctes)


def _h_select(s, st, scopes, ctes):
    ctes = _with(s.get("withClause"), st, scopes, ctes)
    if s.get("op", "SETOP_NONE") != "SETOP_NONE":
        _h_select(s.get("larg") or {}, st, scopes, ctes)
        _h_select(s.get("rarg") or {}, st, scopes, ctes)
        if s.get("lockingClause"):
            st.read_only = False
        for key in ("sortClause", "limitCount", "limitOffset"):
            if s.get(key) is not None:
                _walk(s[key], st, scopes, ctes)
        return
    scope = _Scope()
    for item in s.get("fromClause") or ():
        _from_item(item, st, scope, scopes, ctes)
    inner = [scope, *scopes]
    for key, val in s.items():
        if key in ("fromClause", "withClause", "intoClause", "larg", "rarg"):
            continue
        if isinstance(val, (dict, list)):
            _walk(val, st, inner, ctes)
    if s.get("lockingClause"):
        st.read_only = False
    into = s.get("intoClause")
    if into:
        st.read_only = False
        st.select_into = True
        rel = into.get("rel") or {}
        if rel.get("relpersistence") == "t":
            st.changes_session = True
        q = st.qualify(rel)
        st.tables[q] = None
        st.written[q] = None


def _target_scope(rv: dict, st: _State, ctes: frozenset) -> tuple[_Scope, list[str]]:
    scope = _Scope()
    qs = st.qualify_all(rv)
    for q in qs:
        st.tables[q] = None
        st.written[q] = None
        scope.names.setdefault(q, [q])
    alias = (rv.get("alias") or {}).get("aliasname")
    scope.names[alias or rv.get("relname", "")] = qs
    scope.real.extend(qs)
    st.read_only = False
    return scope, qs


def _set_targets(targets, st, qs, inner, ctes):
    for t in targets or ():
        rt = t.get("ResTarget", t) if isinstance(t, dict) else {}
        if rt.get("name"):
            for q in qs:
                st.columns[f"{q}.{rt['name']}"] = None
        for key in ("val", "indirection"):
            if rt.get(key) is not None:
                _walk(rt[key], st, inner, ctes)


def _h_insert(s, st, scopes, ctes):
    ctes = _with(s.get("withClause"), st, scopes, ctes)
    scope, q = _target_scope(_unwrap(s.get("relation")), st, ctes)
    _set_targets(s.get("cols"), st, q, scopes, ctes)
    if not s.get("cols"):
        for t in q:
            st.columns[f"{t}.*"] = None
    if s.get("selectStmt") is not None:
        _walk(s["selectStmt"], st, scopes, ctes)
    scope.names["excluded"] = list(q)
    inner = [scope, *scopes]
    oc = s.get("onConflictClause")
    if oc:
        _walk(oc.get("infer"), st, inner, ctes)
        _set_targets(oc.get("targetList"), st, q, inner, ctes)
        if oc.get("whereClause") is not None:
            _walk(oc["whereClause"], st, inner, ctes)
    if s.get("returningClause") is not None:
        _walk(s["returningClause"], st, inner, ctes)


def _h_update_or_delete(s, st, scopes, ctes):
    """UPDATE ... FROM and DELETE ... USING: the target plus the extra FROM items in scope."""
    ctes = _with(s.get("withClause"), st, scopes, ctes)
    scope, q = _target_scope(_unwrap(s.get("relation")), st, ctes)
    for item in s.get("fromClause") or s.get("usingClause") or ():
        _from_item(item, st, scope, scopes, ctes)
    inner = [scope, *scopes]
    _set_targets(s.get("targetList"), st, q, inner, ctes)
    for key in ("whereClause", "returningClause"):
        if s.get(key) is not None:
            _walk(s[key], st, inner, ctes)


def _h_merge(s, st, scopes, ctes):
    ctes = _with(s.get("withClause"), st, scopes, ctes)
    scope, q = _target_scope(_unwrap(s.get("relation")), st, ctes)
    _from_item(s.get("sourceRelation"), st, scope, scopes, ctes)
    inner = [scope, *scopes]
    if s.get("joinCondition") is not None:
        _walk(s["joinCondition"], st, inner, ctes)
    for w in s.get("mergeWhenClauses") or ():
        wc = w.get("MergeWhenClause", w)
        if wc.get("condition") is not None:
            _walk(wc["condition"], st, inner, ctes)
        _set_targets(wc.get("targetList"), st, q, inner, ctes)
        if wc.get("values") is not None:
            _walk(wc["values"], st, inner, ctes)
    if s.get("returningClause") is not None:
        _walk(s["returningClause"], st, inner, ctes)


def _unwrap(rv) -> dict:
    if isinstance(rv, dict) and "RangeVar" in rv:
        return rv["RangeVar"]
    return rv or {}


_HANDLERS = {
    "ColumnRef": _h_column_ref,
    "FuncCall": _h_func_call,
    "SelectStmt": _h_select,
    "InsertStmt": _h_insert,
    "UpdateStmt": _h_update_or_delete,
    "DeleteStmt": _h_update_or_delete,
    "MergeStmt": _h_merge,
    "RangeVar": lambda v, st, scopes, ctes: _range_var(v, st, None, ctes),
}


# --------------------------------------------------------------------------- statements


def _explain_analyze(options) -> bool:
    """Does EXPLAIN run the statement? PostgreSQL takes the last ANALYZE option given
    (``EXPLAIN (ANALYZE false, ANALYZE true)`` runs it), so every one is read."""
    analyze = False
    for o in options or ():
        d = o.get("DefElem", {})
        if d.get("defname") == "analyze":
            arg = d.get("arg")
            if arg is None:
                analyze = True
                continue
            val = (_strings([arg]) or [None])[0]
            if val is None:
                c = _const_text(arg)
                val = c if c is not None else "true"
            analyze = val.lower() not in ("false", "off", "0", "no")
    return analyze


def _command(kind: str, body: dict) -> tuple[str, str | None]:
    tag = _FIXED_TAGS.get(kind)
    if tag is not None:
        if kind == "CreateStmt" and body.get("relation", {}).get("relpersistence") == "t":
            return tag, "TABLE"
        return tag, None
    if kind == "SelectStmt":
        return ("SELECT INTO" if body.get("intoClause") else "SELECT"), None
    if kind == "VariableSetStmt":
        return ("RESET" if body.get("kind", "").startswith("VAR_RESET") else "SET"), None
    if kind == "TransactionStmt":
        return _TX_TAGS.get(body.get("kind", ""), "TRANSACTION"), None
    if kind == "DeallocateStmt":
        return ("DEALLOCATE ALL" if body.get("isall") or not body.get("name") else "DEALLOCATE"), None
    if kind == "DiscardStmt":
        return "DISCARD " + body.get("target", "DISCARD_ALL").removeprefix("DISCARD_"), None
    if kind == "CreateTableAsStmt":
        ot = body.get("objtype", "OBJECT_TABLE")
        if ot == "OBJECT_MATVIEW":
            return "CREATE MATERIALIZED VIEW", "MATERIALIZED VIEW"
        return ("SELECT INTO" if body.get("is_select_into") else "CREATE TABLE AS"), "TABLE"
    if kind == "CreateFunctionStmt":
        return ("CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"), None
    if kind == "DropStmt":
        o = _obj(body.get("removeType"))
        return f"DROP {o}", o
    if kind == "AlterTableStmt":
        o = _obj(body.get("objtype", "OBJECT_TABLE"))
        return f"ALTER {o}", o
    if kind == "RenameStmt":
        o = _obj(body.get("renameType"))
        if o in ("COLUMN", "TABCONSTRAINT"):
            o = _obj(body.get("relationType"))
        return f"ALTER {o}", o
    if kind in ("AlterObjectSchemaStmt", "AlterOwnerStmt", "AlterObjectDependsStmt"):
        o = _obj(body.get("objectType"))
        return f"ALTER {o}", o
    if kind == "DefineStmt":
        o = _obj(body.get("kind"))
        return f"CREATE {o}", o
    if kind == "GrantStmt":
        return ("GRANT" if body.get("is_grant") else "REVOKE"), _obj(body.get("objtype"))
    if kind == "GrantRoleStmt":
        return ("GRANT ROLE" if body.get("is_grant") else "REVOKE ROLE"), "ROLE"
    if kind == "VacuumStmt":
        return ("VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"), None
    if kind == "FetchStmt":
        return ("MOVE" if body.get("ismove") else "FETCH"), None
    # unknown node: derive "CREATE FOO" from "CreateFooStmt" (keeps DDL prefixes matching)
    words = re.findall(r"[A-Z][a-z]*", kind.removesuffix("Stmt"))
    return " ".join(w.upper() for w in words) or kind.upper(), None


def _set_facts(body: dict) -> tuple[str | None, str | None]:
    kind = body.get("kind", "")
    name = body.get("name")
    if kind == "VAR_RESET_ALL":
        return "all", None
    if name is None:
        return None, None
    name = name.lower()
    if kind == "VAR_SET_MULTI":
        return name.lower().replace(" ", "_"), None
    if kind != "VAR_SET_VALUE":
        return name, None
    vals = []
    for a in body.get("args") or ():
        c = _const_text(a)
        vals.append(c if c is not None else "?")
    if name == "search_path":
        return name, ", ".join(_quote_ident(v) for v in vals)
    return name, ", ".join(vals)


def _prepare_inner_sql(sql: str) -> str:
    """The statement text after ``PREPARE name [(types)] AS``."""
    depth = 0
    try:
        tokens = scan(sql)
    except ParseError:
        return sql
    for i, tok in enumerate(tokens):
        if tok.name == "ASCII_40":
            depth += 1
        elif tok.name == "ASCII_41":
            depth -= 1
        elif tok.name == "AS" and depth == 0 and i + 1 < len(tokens):
            return sql[tokens[i + 1].start :].strip()
    return sql


def _facts(kind: str, body: dict, sql: str, search_path: tuple[str, ...]) -> StatementFacts:
    st = _State(search_path)
    command, object_type = _command(kind, body)
    has_where = None
    copy = None
    set_name = set_value = prepared_name = None
    inner = None
    explain_analyze = False
    params: tuple[str, ...] = ()
    read_only = kind in _READ_ONLY_KINDS or kind == "SelectStmt"
    if kind in _SESSION_KINDS:
        st.changes_session = True

    if kind in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
        _HANDLERS[kind](body, st, [], frozenset())
        if kind in ("UpdateStmt", "DeleteStmt"):
            has_where = body.get("whereClause") is not None
    elif kind in ("ExplainStmt", "PrepareStmt", "DeclareCursorStmt", "CreateTableAsStmt", "ViewStmt"):
        q = body.get("query") or {}
        qkind, qbody = next(iter(q.items())) if q else ("SelectStmt", {})
        inner_sql = _prepare_inner_sql(sql) if kind == "PrepareStmt" else sql
        inner = _facts(qkind, qbody, inner_sql, search_path)
        for t in inner.tables:
            st.tables[t] = None
        for t in inner.tables_written:
            st.written[t] = None
        st.columns.update(dict.fromkeys(inner.columns))
        st.qualified.update(dict.fromkeys(inner.qualified_columns))
        st.functions.update(dict.fromkeys(inner.functions))
        st.functions_q.update(dict.fromkeys(inner.functions_qualified))
        st.guc_writes.update(dict.fromkeys(inner.guc_writes))
        if kind == "ExplainStmt":
            explain_analyze = _explain_analyze(body.get("options"))
            _walk(body.get("options"), st, [], frozenset())
            # EXPLAIN without ANALYZE only plans: PostgreSQL runs it in a read-only transaction
            # whatever it explains. With ANALYZE it runs the statement; the gateway does not
            # follow EXPLAIN ANALYZE EXECUTE to the prepared statement, so that is not read-only.
            if explain_analyze:
                read_only = inner.read_only and inner.command != "EXECUTE"
                st.changes_session = inner.changes_session
            else:
                read_only = True
        elif kind == "PrepareStmt":
            # PREPARE writes nothing, whatever it prepares (PostgreSQL runs it in a read-only
            # transaction); EXECUTE is judged as the statement it runs
            prepared_name = body.get("name")
            read_only = True
        elif kind == "DeclareCursorStmt":
            read_only = inner.read_only  # DECLARE starts the query (FOR UPDATE fails there)
        else:  # CTAS, CREATE VIEW: the new relation is written
            target = (body.get("into") or {}).get("rel") or body.get("view") or {}
            if target:
                q_name = st.qualify(target)
                st.tables[q_name] = None
                st.written[q_name] = None
                if target.get("relpersistence") == "t":
                    st.changes_session = True  # a temporary relation lives in the session
            read_only = False
        st.read_only = read_only
    else:
        if kind == "VariableSetStmt":
            set_name, set_value = _set_facts(body)
            if set_name and set_name not in ("transaction", "session_characteristics"):
                st.guc_writes[set_name] = None
        elif kind == "CopyStmt":
            is_from = bool(body.get("is_from"))
            filename = body.get("filename")
            copy = {"direction": "from" if is_from else "to", "program": bool(body.get("is_program")),
                    "stdio": filename is None, "filename": filename, "query": body.get("query") is not None}
            if body.get("relation"):
                rv = _unwrap(body["relation"])
                cols = _strings(body.get("attlist"))
                for q_name in st.qualify_all(rv):
                    st.tables[q_name] = None
                    for c in cols or ["*"]:
                        st.columns[f"{q_name}.{c}"] = None
                    if is_from:
                        st.written[q_name] = None
            if body.get("query") is not None:
                _walk(body["query"], st, [], frozenset())
            _walk(body.get("whereClause"), st, [], frozenset())
            read_only = not is_from and not copy["program"] and copy["stdio"]
        elif kind == "ExecuteStmt":
            prepared_name = body.get("name")
            params = tuple((_const_text(p) or "?") for p in body.get("params") or ())
            _walk(body.get("params"), st, [], frozenset())
        elif kind == "DeallocateStmt":
            prepared_name = body.get("name")
        elif kind in ("FetchStmt", "ClosePortalStmt"):
            prepared_name = body.get("portalname")  # the cursor (portal) it reads or closes
        elif kind == "CallStmt":
            fc = body.get("funccall") or {}
            _h_func_call(fc.get("FuncCall", fc), st, [], frozenset())
        elif kind == "DropStmt":
            if body.get("removeType") in ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
                                          "OBJECT_SEQUENCE"):
                for o in body.get("objects") or ():
                    names = _strings(o.get("List", {}).get("items")) if isinstance(o, dict) else []
                    if names:
                        rv = {"relname": names[-1], "schemaname": names[-2] if len(names) > 1 else None}
                        for q_name in st.qualify_all(rv):
                            st.tables[q_name] = None
                            st.written[q_name] = None
        else:
            if kind in ("CreateStmt", "CreateSeqStmt"):
                rv = _unwrap(body.get("relation") or body.get("sequence"))
                if rv.get("relpersistence") == "t":
                    st.changes_session = True  # a temporary relation lives in the session
            # DDL and the rest: every relation the statement names directly is its target
            for key in ("relation", "relations", "sequence"):
                val = body.get(key)
                if isinstance(val, dict):
                    val = [val]
                for rv in val or ():
                    rv = _unwrap(rv)
                    if "relname" in rv and kind not in ("LockStmt", "IndexStmt", "VacuumStmt", "ClusterStmt",
                                                        "ReindexStmt", "CreateTrigStmt", "RuleStmt",
                                                        "CreatePolicyStmt", "CreateStatsStmt"):
                        for q_name in st.qualify_all(rv):
                            st.written[q_name] = None
        if kind not in ("CopyStmt", "ExecuteStmt", "CallStmt", "VariableSetStmt", "DropStmt"):
            _walk(body, st, [], frozenset())
        st.read_only = read_only and st.read_only

    if command == "SELECT INTO" and kind == "SelectStmt":
        object_type = "TABLE"
    return StatementFacts(
        sql=sql, command=command, statement_type=kind, read_only=st.read_only and read_only,
        changes_session=st.changes_session,
        tables=tuple(st.tables), tables_written=tuple(st.written), columns=tuple(st.columns),
        qualified_columns=tuple(st.qualified), functions=tuple(st.functions), functions_qualified=tuple(st.functions_q), has_where=has_where,
        copy=copy, set_name=set_name, set_value=set_value, prepared_name=prepared_name, inner=inner,
        explain_analyze=explain_analyze, object_type=object_type, guc_writes=tuple(st.guc_writes),
        params=params,
    )


def analyze(sql: str, search_path: tuple[str, ...] = ("public",)) -> list[StatementFacts]:
    """One StatementFacts per statement of ``sql``. Raises AnalysisError (and nothing else) if
    it does not parse or is nested too deeply to analyze."""
    try:
        tree = orjson.loads(parse_sql_json(sql))
    except ParseError as e:
        msg = e.args[0] if e.args else "syntax error"
        pos = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], int) else None
        raise AnalysisError(str(msg), pos + 1 if pos is not None else None) from None
    except orjson.JSONDecodeError:  # the parse tree is nested deeper than orjson reads (1,024)
        raise AnalysisError(TOO_DEEP) from None
    stmts = tree.get("stmts") or ()
    if not stmts:
        return []
    raw = sql.encode() if len(stmts) > 1 else None
    out = []
    for s in stmts:
        node = s.get("stmt") or {}
        if not node:
            continue
        kind, body = next(iter(node.items()))
        if raw is not None:  # stmt_location/stmt_len are byte offsets
            start = s.get("stmt_location", 0)
            length = s.get("stmt_len", 0)
            text = (raw[start : start + length] if length else raw[start:]).decode(errors="replace").strip()
        else:
            text = sql.strip()
        try:
            out.append(_facts(kind, body or {}, text, search_path))
        except RecursionError:  # deeper than the walk can follow: nothing can be established
            raise AnalysisError(TOO_DEEP) from None
    return out
