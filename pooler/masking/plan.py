"""Masking plans: which output columns of a result carry masked data, and the DataRow rewriter.

Rules this module keeps:
- Pure: a plan is built from the rules' masks, the statement's lineage (sql/lineage.py), the
  catalog and a RowDescription; no I/O.
- Fail closed. A column is masked when any of its sources matches a mask, when its origin is
  unknown (a table OID the catalog does not know, a computed column without lineage, a call to a
  user-defined function), or when masking one of its values raises (the value becomes NULL).
- A masked value stays valid for its column's type and format; methods that cannot make one
  give NULL (methods.py). Values that keep part of the input (``partial``, ``email``) are only
  applied to a column that *is* the masked column; a computed column is redacted instead (a
  substring of a phone number must not be "partially" revealed).
- Rows are rewritten one at a time; unmasked columns are copied byte for byte.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, field

from ..sql.lineage import UNKNOWN, StatementLineage
from ..protocol import messages as m
from .catalog import Catalog
from .methods import KIND_TEXT, TEXT_TYPE_OIDS, Method, detect_text, kind_of, parse_method

log = logging.getLogger("pooler.masking")

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_unpack_i32 = _I32.unpack_from
_pack_i32 = _I32.pack
NULL = b"\xff\xff\xff\xff"

# what a computed column (or one of unknown origin) gets, by the methods of its masked sources
_KEEPS_PART = frozenset({"partial", "email"})


class MaskingError(Exception):
    """A server message the masking layer cannot rewrite safely: the session must end."""


@dataclass(slots=True)
class MaskCtx:
    """What a masked statement (one client message) needs to plan its results."""
    masks: tuple[tuple[str, str], ...]  # (pattern "schema.table.column" with * parts, method spec)
    lineages: list[StatementLineage] | None  # one per statement of the SQL text (None: unknown)
    catalog: Catalog | None
    rule: str  # rule file(s) that asked for the masks (for logs)
    key: tuple  # (SQL text, search_path, statements EXECUTE runs, ...): plan cache key
    cache: dict | None = None  # the catalog holder's plan cache
    holder: object | None = None  # the CatalogHolder: plans use its current catalog

    def current_catalog(self) -> Catalog | None:
        h = self.holder
        return h.catalog if h is not None and h.catalog is not None else self.catalog


@dataclass(slots=True)
class QueryMask:
    """Per simple-Query state: which statement of the string the next result belongs to, and
    the SQL-level PREPAREs it carries (recorded one by one as the server confirms them)."""
    ctx: MaskCtx | None
    index: int = 0
    prepares: list | None = None


def _split_pattern(p: str) -> tuple[str, str, str]:
    parts = p.split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "*", parts[0], parts[1]
    if len(parts) == 1:
        return "*", "*", parts[0]
    # a dotted identifier: keep the last two parts as table and column
    return ".".join(parts[:-2]), parts[-2], parts[-1]


def compile_masks(masks) -> list:
    """The rules' (pattern, method) pairs with each pattern split into its three parts."""
    return [(_split_pattern(p), meth) for p, meth in masks]


def method_for(source: str, patterns) -> str | None:
    """The method of the most specific pattern matching ``source`` (None: not masked)."""
    schema, _, rest = source.partition(".")
    table, _, col = rest.rpartition(".")
    if not table:
        table, col = rest, ""
    best = None
    best_score = -1
    for (ps, pt, pc), method in patterns:
        if ps != "*" and ps != schema:
            continue
        if pt != "*" and pt != table:
            continue
        if col == "*":
            score = (ps != "*") + (pt != "*")  # a whole-row reference matches any column mask
        elif pc != "*" and pc != col:
            continue
        else:
            score = (ps != "*") + (pt != "*") + 2 * (pc != "*")
        if score > best_score:
            best, best_score = method, score
    return best


def _combine(methods: list[str], direct: bool) -> str:
    names = {m.split(":", 1)[0] for m in methods}
    if direct and len(set(methods)) == 1:
        return methods[0]
    if names == {"detect"}:
        return "detect"
    if "null" in names:
        return "null"
    if names == {"hash"}:
        return "hash"
    return "redact"


MEMO_MAX = 1024  # distinct values remembered per masked column (methods are deterministic)
MEMO_VALUE_MAX = 256  # longer values are not remembered


@dataclass(slots=True)
class ColumnMask:
    index: int
    slot: int  # position in Template.columns (and RowPlan.counts)
    name: str  # "schema.table.column" (or the output name) for counters and logs
    method: Method
    kind: int
    fmt: int
    memo: dict = field(default_factory=dict)  # value -> (masked value, count), for one key


@dataclass(slots=True)
class Template:
    nfields: int
    columns: list[ColumnMask]  # in field order
    memo_key: bytes | None = None


def build_template(ctx: MaskCtx, index: int, fields: list[m.FieldDescription], cat: Catalog | None = None) -> Template | None:
    """Which of these fields to mask, and how. None when no field is masked."""
    patterns = compile_masks(ctx.masks)
    if cat is None:
        cat = ctx.current_catalog()
    outputs = None
    if ctx.lineages is not None and index < len(ctx.lineages):
        outputs = ctx.lineages[index].outputs
        if outputs is not None and len(outputs) != len(fields):
            outputs = None  # the positions cannot be trusted
    text_oids = cat.text_oids if cat is not None else TEXT_TYPE_OIDS
    cols: list[ColumnMask] = []
    for i, f in enumerate(fields):
        sources: set[str] = set()
        direct = True
        if outputs is not None:
            oc = outputs[i]
            src, direct = (cat.expand(oc.sources, oc.direct) if cat is not None else (oc.sources, oc.direct))
            sources |= src
        if f.table_oid:
            if cat is not None:
                src, d = cat.column_sources(f.table_oid, f.attnum)
            else:
                src, d = frozenset((UNKNOWN,)), False
            sources |= src
            direct = d if outputs is None else (direct and d)
        elif outputs is None:
            sources.add(UNKNOWN)
            direct = False
        if not sources:
            continue
        methods = []
        unknown = False
        for s in sources:
            if s == UNKNOWN:
                unknown = True
                continue
            meth = method_for(s, patterns)
            if meth is not None:
                methods.append(meth)
        if unknown:
            methods.append("redact")
            direct = False
        if not methods:
            continue
        spec = _combine(methods, direct)
        if not direct and spec.split(":", 1)[0] in _KEEPS_PART:
            spec = "redact"
        kind = kind_of(f.type_oid, text_oids)
        if spec == "detect" and kind != KIND_TEXT and (
                f.type_oid in CARRIER_OIDS or cat is None or not cat.known or f.type_oid in cat.carrier_oids):
            # detect reads text only: free text wrapped in an array, a record, json or bytea
            # (ARRAY[city], to_jsonb(city), city::bytea) would pass unread, so it is redacted
            spec = "redact"
        named = sorted(s for s in sources if s != UNKNOWN)
        label = named[0] if len(named) == 1 and direct else (f.name.decode("utf-8", "replace") + " (computed)")
        cols.append(ColumnMask(i, len(cols), label, parse_method(spec), kind, f.format))
    if not cols:
        return None
    return Template(len(fields), cols)


# built-in types that can carry text inside: json, jsonb, bytea, xml, record, tsvector, jsonpath,
# text[]/varchar[]/name[]/bpchar[]/json[]/jsonb[]/bytea[]/xml[]
CARRIER_OIDS = frozenset({114, 3802, 17, 142, 2249, 3614, 4072, 1009, 1015, 1003, 1014, 199, 3807, 1001, 143})


def plan_for(ctx: MaskCtx, index: int, rowdesc_body: bytes, key: bytes) -> "RowPlan | None":
    """A RowPlan for the result described by this RowDescription body (cached per statement)."""
    cache = ctx.cache
    cat = ctx.current_catalog()
    ck = (ctx.key, ctx.masks, index, bytes(rowdesc_body), cat.version if cat is not None else None)
    tpl = cache.get(ck, False) if cache is not None else False
    if tpl is False:
        tpl = build_template(ctx, index, m.parse_row_description(rowdesc_body), cat)
        if cache is not None and len(ctx.key[0]) <= 20_000:
            if len(cache) > 2_000:  # templates hold memos: bounded (~2,000 x columns x 1,024 values)
                cache.clear()
            cache[ck] = tpl
    if tpl is None:
        return None
    return RowPlan(tpl, key)


class RowPlan:
    """Rewrites the DataRows of one result. Counts masked values per column."""

    __slots__ = ("tpl", "key", "counts")

    def __init__(self, tpl: Template, key: bytes) -> None:
        self.tpl = tpl
        self.key = key
        self.counts = [0] * len(tpl.columns)
        if tpl.memo_key != key:  # remembered results belong to one hash key
            for c in tpl.columns:
                c.memo.clear()
            tpl.memo_key = key

    def rewrite(self, data: bytes, pos: int, end: int) -> bytes:
        """The DataRow message data[pos:end] with its masked columns rewritten. Columns after
        the last masked one are copied without being looked at."""
        tpl = self.tpl
        (count,) = _I16.unpack_from(data, pos + 5)
        if count != tpl.nfields:
            raise MaskingError(f"DataRow has {count} columns, RowDescription had {tpl.nfields}")
        p = pos + 7
        i = 0
        start = pos + 5  # start of bytes copied unchanged
        parts = []
        key = self.key
        counts = self.counts
        for cm in tpl.columns:
            idx = cm.index
            while i < idx:
                (n,) = _unpack_i32(data, p)
                p += 4 + n if n > 0 else 4
                i += 1
            (n,) = _unpack_i32(data, p)
            i += 1
            if n < 0:
                p += 4
                continue
            vend = p + 4 + n
            if vend > end:
                raise MaskingError("DataRow column runs past the message")
            value = data[p + 4 : vend]
            memo = cm.memo
            got = memo.get(value)
            if got is None:
                try:
                    got = cm.method.apply(value, cm.kind, cm.fmt, key)
                except Exception:  # noqa: BLE001 - fail closed: a value that cannot be masked is NULL
                    got = (None, 1)
                if n <= MEMO_VALUE_MAX:
                    if len(memo) >= MEMO_MAX:
                        memo.clear()
                    memo[value] = got
            new, c = got
            parts.append(data[start:p])
            parts.append(NULL if new is None else _pack_i32(len(new)) + new)
            if c:
                counts[cm.slot] += c
            start = p = vend
        if p > end:
            raise MaskingError("DataRow length does not match its columns")
        parts.append(data[start:end])
        body = b"".join(parts)
        return b"D" + _pack_i32(len(body) + 4) + body

    def rewrite_run(self, data: bytes, pos: int, n: int) -> tuple[bytes, int]:
        """The complete DataRows that follow one another from data[pos] (up to n), rewritten;
        and where the first message that is not such a row starts. The compiled twin in
        _rows.pyx takes this method's place when it is built (``compiled``)."""
        parts = []
        while n - pos >= 5 and data[pos] == 68:  # 'D'
            (length,) = _unpack_i32(data, pos + 1)
            end = pos + 1 + length
            if end > n or length < 4:
                break
            parts.append(self.rewrite(data, pos, end))
            pos = end
        return b"".join(parts), pos

    def report(self) -> list[tuple[str, str, int]]:
        """(column, masking method, values masked) of each masked column of the result."""
        return [(c.name, c.method.name, n) for c, n in zip(self.tpl.columns, self.counts)]


# --------------------------------------------------------------------------- errors and notices

# fields of an ErrorResponse/NoticeResponse that may quote row values
_DROP_FIELDS = ("D", "H", "W", "q", "P", "p")
_QUOTED = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'|\((?:[^()]*)\)=\((?:[^()]*)\)')
# SQLSTATE classes whose messages never carry row values: connection, transaction state,
# rollback, syntax/access (analysis of the statement text, before any row is read: its quoted
# names are still replaced), resources, object state, operator intervention (cancel, shutdown)
_SAFE_CLASSES = frozenset({"08", "25", "40", "42", "53", "55", "57"})


def scrub_message(type_byte: bytes, body: bytes) -> bytes:
    """An ErrorResponse/NoticeResponse of a masked statement, with nothing that could carry a
    row value: detail, hint, context and internal query are dropped; the message itself is kept
    only for the SQLSTATE classes that cannot carry values (with its quoted parts replaced), and
    replaced by a generic one otherwise (a data error quotes the value it failed on, in ways no
    pattern can undo: ``"***"james#example.com"``, a number out of range, a RAISE)."""
    fields = m.parse_error_fields(body)
    inside_function = "W" in fields  # raised in a function: dynamic SQL may quote row values
    # an error about the statement's text points into it; class 42 raised while rows are read
    # has no position and may quote a row value (``ssn::regclass``: relation "..." does not exist)
    at_text = "P" in fields
    for k in _DROP_FIELDS:
        fields.pop(k, None)
    code = fields.get("C", "")
    if type_byte == b"E" and code[:2] == "42" and at_text and not inside_function:
        # about the statement's own text (an unknown column, a syntax error): useful, value-free
        msg, _ = detect_text(fields.get("M", ""))
    elif type_byte == b"E" and code[:2] in _SAFE_CLASSES and code[:2] != "42":
        msg = _QUOTED.sub('"***"', fields.get("M", ""))
        msg, _ = detect_text(msg)
        msg += " (values hidden by the gateway: the statement reads masked columns)"
    elif type_byte == b"N":
        msg = "notice hidden by the gateway (the statement reads masked columns)"
    else:
        msg = (f"the statement failed (SQLSTATE {code or 'unknown'}); its message is hidden by the "
               "gateway because it could contain values of masked columns")
    fields["M"] = msg
    return m.build_error_from_fields(fields, type_byte)


# --------------------------------------------------------------------------- the compiled twin

# pooler/masking/_rows.pyx, built by ./dev.sh setup (and pip install) where a C compiler is
# found; the Python above stays the definition of what it does (tests/test_masking_compiled.py
# demands the same bytes from both). POOLER_PURE_PYTHON=1 keeps the Python path.
python_rewrite_run = RowPlan.rewrite_run
compiled = False
if not os.environ.get("POOLER_PURE_PYTHON"):
    try:
        from ._rows import rewrite_run as compiled_rewrite_run
    except ImportError:
        compiled_rewrite_run = None
    if compiled_rewrite_run is not None:
        RowPlan.rewrite_run = compiled_rewrite_run
        compiled = True
else:
    compiled_rewrite_run = None
