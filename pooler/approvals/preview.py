"""Dry runs for reviewers (``require_approval(reason, preview = True)``): which statements may be
run inside a transaction that is then rolled back, the statement that shows what they would
change, and the changed rows masked as the agent would see them. Pure functions; the gateway
runs the statement (gateway/holds.py).

Rules this module keeps:
- Only what a rollback undoes is dry-run: one INSERT, UPDATE or DELETE (MERGE too), calling no
  function but a short list of built-ins without outside effects. Everything else (VACUUM,
  CREATE INDEX CONCURRENTLY, anything that cannot run in a transaction block, DO, CALL, user
  functions, sequences, advisory locks, dblink, NOTIFY ...) is never dry-run, and the reviewer is
  told why.
- The rows shown are masked with the masks the agent's statement runs under; a value whose
  column the rules mask is never shown raw.
"""

from __future__ import annotations

from pglast import ast, parse_sql
from pglast.stream import RawStream

from ..masking.methods import KIND_TEXT, MethodError, parse_method
from ..masking.plan import compile_masks, method_for

SAMPLE_ROWS = 5
DRY_COMMANDS = ("INSERT", "UPDATE", "DELETE", "MERGE")
# built-ins a dry run may call: no effect outside the transaction, nothing a rollback leaves behind
PURE_FUNCTIONS = frozenset({
    "abs", "avg", "btrim", "ceil", "ceiling", "char_length", "coalesce", "concat", "concat_ws", "count",
    "current_date", "current_time", "current_timestamp", "date_part", "date_trunc", "extract", "floor",
    "format", "greatest", "initcap", "least", "left", "length", "localtime", "localtimestamp", "lower",
    "lpad", "ltrim", "max", "md5", "min", "mod", "now", "nullif", "overlay", "position", "power", "repeat",
    "replace", "reverse", "right", "round", "rpad", "rtrim", "sign", "split_part", "sqrt", "strpos",
    "substr", "substring", "sum", "to_char", "to_date", "to_number", "to_timestamp", "translate", "trim",
    "trunc", "upper", "age", "make_date", "make_interval", "make_timestamp", "jsonb_set", "jsonb_build_object",
    "json_build_object", "array_append", "array_remove", "array_length", "cardinality", "string_agg",
    "array_agg", "bool_and", "bool_or", "every", "gen_random_uuid", "random",
})


def why_not(facts) -> str | None:
    """None if the statement may be dry-run, else why not (shown to the reviewer)."""
    if len(facts) != 1:
        return "it is several statements; only a single INSERT, UPDATE, DELETE or MERGE is dry-run"
    f = facts[0]
    if f.command not in DRY_COMMANDS:
        return f"{f.command} is not dry-run: only INSERT, UPDATE, DELETE and MERGE are, inside a rolled-back transaction"
    other = sorted({fn.rsplit(".", 1)[-1] for fn in f.functions} - PURE_FUNCTIONS)
    if other:
        return (f"it calls {', '.join(other)}, whose effects outside the transaction (sequences, locks, files, "
                "other servers) a rollback may not undo")
    return None


def note_for(facts) -> str:
    """What the reviewer should know about a dry run that did run."""
    note = "run in a transaction that was rolled back, on committed data (not the agent's open transaction)"
    if facts and facts[0].command in ("INSERT", "MERGE"):
        note += "; sequences used by column defaults advanced (PostgreSQL never rolls them back)"
    return note


def preview_sql(sql: str) -> str:
    """The statement with ``RETURNING *`` in a CTE: its changed rows, with their count in each."""
    stmts = parse_sql(sql)
    if len(stmts) != 1:
        raise ValueError("not a single statement")
    stmt = stmts[0].stmt
    if not isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
        raise ValueError(f"{type(stmt).__name__} cannot be previewed")
    stmt.returningClause = ast.ReturningClause(exprs=(ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),))),))
    inner = RawStream()(stmt)
    return (f"WITH pooler_preview AS ({inner}) SELECT count(*) OVER () AS pooler_rows, * FROM pooler_preview "
            f"LIMIT {SAMPLE_ROWS}")


def masked_sample(table: str, names: list[str], rows: list[list[bytes | None]], masks, key: bytes,
                  codec: str = "utf-8") -> tuple[int, list[str], list[list[str | None]]]:
    """(rows changed, column names, the first rows as text) from the preview's result, each value
    masked as the agent's masks say for ``table``'s columns (``schema.table``)."""
    patterns = compile_masks(masks)
    count = 0
    cols = names[1:]
    out: list[list[str | None]] = []
    methods = []
    for c in cols:
        spec = method_for(f"{table}.{c}", patterns) if patterns else None
        try:
            methods.append(parse_method(spec) if spec else None)
        except MethodError:
            methods.append(parse_method("redact"))  # fail closed: an unreadable method redacts
    for row in rows:
        count = int(row[0]) if row and row[0] is not None else count
        shown: list[str | None] = []
        for v, meth in zip(row[1:], methods):
            if v is None:
                shown.append(None)
                continue
            if meth is not None:
                v, _ = meth.apply(v, KIND_TEXT, 0, key)
                if v is None:
                    shown.append(None)
                    continue
            shown.append(v.decode(codec, "replace"))
        out.append(shown)
    return count, cols, out
