# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``RowPlan.rewrite_run`` (plan.py): the DataRows of a masked result rewritten
in C, a run of consecutive rows per call; and of the recorder's ``_row_values`` (the first rows
of a result read into a recording's values; at the end of this file).

The Python code in plan.py and methods.py is the one source of truth for behaviour; this module
must give the very same bytes, counts and errors (tests/test_masking_compiled.py runs both over
the same hostile inputs). What it does in C is only the walk over the row and the methods whose
ASCII text case is a few byte operations:

- ``null`` (any type), ``redact`` (text), ``partial`` (ASCII text), ``email`` (ASCII text whose
  domain passes the ASCII check of ``_apply_email``);
- everything else (``hash``, ``detect``, non-ASCII values, json/jsonb/int kinds, an e-mail the
  ASCII check refuses) calls the Python method itself, through the column's memo, exactly as
  ``RowPlan.rewrite`` does.

Fail closed: an exception from a Python method masks the value as NULL (as in plan.py); any
other error propagates and the gateway refuses the result.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy, memset

from .methods import KIND_TEXT as _KIND_TEXT
from .plan import MEMO_MAX, MEMO_VALUE_MAX, MaskingError

cdef enum:
    M_PYTHON = 0
    M_NULL = 1
    M_REDACT_TEXT = 2
    M_PARTIAL_TEXT = 3
    M_EMAIL_TEXT = 4

cdef int KIND_TEXT = _KIND_TEXT


cdef struct Col:
    Py_ssize_t index
    int code
    Py_ssize_t first
    Py_ssize_t last
    Py_ssize_t slot


cdef struct Out:
    char *buf
    Py_ssize_t len
    Py_ssize_t cap


cdef int out_reserve(Out *o, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = o.len + extra
    cdef Py_ssize_t cap
    cdef char *nb
    if need <= o.cap:
        return 0
    cap = o.cap * 2
    if cap < need:
        cap = need
    nb = <char *>PyMem_Realloc(o.buf, cap)
    if nb == NULL:
        raise MemoryError()
    o.buf = nb
    o.cap = cap
    return 0


cdef inline int out_put(Out *o, const char *src, Py_ssize_t n) except -1:
    if o.len + n > o.cap:
        out_reserve(o, n)
    memcpy(o.buf + o.len, src, n)
    o.len += n
    return 0


cdef inline void put_i32(char *at, long v):
    at[0] = <char>((v >> 24) & 0xFF)
    at[1] = <char>((v >> 16) & 0xFF)
    at[2] = <char>((v >> 8) & 0xFF)
    at[3] = <char>(v & 0xFF)


cdef inline int out_value(Out *o, const char *src, Py_ssize_t n) except -1:
    """A column value: its length, then its bytes."""
    if o.len + 4 + n > o.cap:
        out_reserve(o, 4 + n)
    put_i32(o.buf + o.len, n)
    memcpy(o.buf + o.len + 4, src, n)
    o.len += 4 + n
    return 0


cdef inline int out_null(Out *o) except -1:
    if o.len + 4 > o.cap:
        out_reserve(o, 4)
    memset(o.buf + o.len, 0xFF, 4)
    o.len += 4
    return 0


cdef inline long get_i32(const unsigned char *p):
    cdef long v = (<long>p[0] << 24) | (<long>p[1] << 16) | (<long>p[2] << 8) | <long>p[3]
    if v >= 0x80000000:
        v -= 0x100000000
    return v


cdef inline bint is_ascii(const unsigned char *p, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] >= 0x80:
            return False
    return True


cdef inline bint is_alnum(unsigned char c):
    return (c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122)


cdef inline bint is_alpha(unsigned char c):
    return (c >= 65 and c <= 90) or (c >= 97 and c <= 122)


cdef bint ascii_domain_ok(const unsigned char *d, Py_ssize_t n):
    """methods._ASCII_DOMAIN_RE.fullmatch: one or more labels followed by '.', then a TLD of
    2-63 letters or an "xn--" label; a label is 1-63 of [A-Za-z0-9-], not starting or ending
    with '-'."""
    cdef Py_ssize_t start = 0, i, j, k, m
    cdef int labels = 0
    cdef unsigned char c
    # the TLD is what follows the last '.'
    j = -1
    for i in range(n):
        if d[i] == 46:
            j = i
    if j < 1:
        return False
    # the labels before it: d[0:j] split at every '.' (an empty one fails)
    i = 0
    while True:
        k = i
        while k < j and d[k] != 46:
            k += 1
        m = k - i
        if m < 1 or m > 63:
            return False
        if not is_alnum(d[i]) or not is_alnum(d[k - 1]):
            return False
        for start in range(i + 1, k - 1):
            c = d[start]
            if not (is_alnum(c) or c == 45):
                return False
        labels += 1
        if k >= j:
            break
        i = k + 1
    if labels < 1:
        return False
    # the TLD
    m = n - (j + 1)
    d = d + j + 1
    if m >= 2 and m <= 63:
        for i in range(m):
            if not is_alpha(d[i]):
                break
        else:
            return True
    if m >= 5 and m <= 63 and d[0] == 120 and d[1] == 110 and d[2] == 45 and d[3] == 45:  # "xn--"
        for i in range(4, m):
            c = d[i]
            if not (is_alnum(c) or c == 45):
                return False
        return True
    return False


cdef inline bint is_space(unsigned char c):
    return c == 32 or (c >= 9 and c <= 13)


cdef object python_mask(object cm, object value, Py_ssize_t n, object key):
    """The column's Python method through its memo, as RowPlan.rewrite calls it."""
    memo = cm.memo
    got = memo.get(value)
    if got is None:
        try:
            got = cm.method.apply(value, cm.kind, cm.fmt, key)
        except Exception:  # fail closed: a value that cannot be masked is NULL
            got = (None, 1)
        if n <= MEMO_VALUE_MAX:
            if len(memo) >= MEMO_MAX:
                memo.clear()
            memo[value] = got
    return got


def rewrite_run(plan, bytes data, Py_ssize_t pos, Py_ssize_t n):
    """See RowPlan.rewrite_run (plan.py)."""
    tpl = plan.tpl
    cdef Py_ssize_t nfields = tpl.nfields
    columns = tpl.columns
    cdef Py_ssize_t ncols = len(columns)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char *d = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Col *cols = <Col *>PyMem_Malloc(sizeof(Col) * (ncols if ncols > 0 else 1))
    cdef long *counts = <long *>PyMem_Malloc(sizeof(long) * (ncols if ncols > 0 else 1))
    cdef Out o
    cdef Py_ssize_t c, i, p, start, end, vend, rowstart, first, last, k, length, count, at, dlen
    cdef long vlen
    cdef int code
    cdef bint code_done
    cdef const unsigned char *v
    cdef const unsigned char *dom
    cdef bytes text
    cdef const char *tb
    o.buf = NULL
    o.len = 0
    o.cap = 0
    if cols == NULL or counts == NULL:
        PyMem_Free(cols)
        PyMem_Free(counts)
        raise MemoryError()
    key = plan.key
    pycols = []
    redact_text = []
    try:
        for c in range(ncols):
            cm = columns[c]
            meth = cm.method
            name = meth.name
            cols[c].index = cm.index
            cols[c].slot = cm.slot
            cols[c].first = meth.first
            cols[c].last = meth.last
            kind = cm.kind
            if name == "null":
                code = M_NULL
            elif kind == KIND_TEXT and name == "redact":
                code = M_REDACT_TEXT
            elif kind == KIND_TEXT and name == "partial":
                code = M_PARTIAL_TEXT
            elif kind == KIND_TEXT and name == "email":
                code = M_EMAIL_TEXT
            else:
                code = M_PYTHON
            cols[c].code = code
            counts[c] = 0
            pycols.append(cm)
            redact_text.append(meth._text_bytes)
        o.cap = (n - pos) + 256
        o.buf = <char *>PyMem_Malloc(o.cap)
        if o.buf == NULL:
            raise MemoryError()
        while n - pos >= 5 and d[pos] == 68:  # 'D'
            length = get_i32(d + pos + 1)
            end = pos + 1 + length
            if end > n or length < 4:
                break
            if pos + 7 > size:
                raise ValueError("malformed DataRow")
            count = (<long>d[pos + 5] << 8) | d[pos + 6]
            if count >= 0x8000:
                count -= 0x10000
            if count != nfields:
                raise MaskingError(f"DataRow has {count} columns, RowDescription had {nfields}")
            rowstart = o.len
            out_reserve(&o, 7)
            o.len += 5  # 'D' and the length, written when the row is done
            p = pos + 7
            i = 0
            start = pos + 5  # start of the bytes copied unchanged
            for c in range(ncols):
                k = cols[c].index
                while i < k:
                    if p + 4 > size:
                        raise ValueError("malformed DataRow")
                    vlen = get_i32(d + p)
                    p += 4 + vlen if vlen > 0 else 4
                    i += 1
                if p + 4 > size or p < 0:
                    raise ValueError("malformed DataRow")
                vlen = get_i32(d + p)
                i += 1
                if vlen < 0:
                    p += 4
                    continue
                vend = p + 4 + vlen
                if vend > end:
                    raise MaskingError("DataRow column runs past the message")
                out_put(&o, <const char *>(d + start), p - start)
                v = d + p + 4
                code = cols[c].code
                if code == M_NULL:
                    out_null(&o)
                    counts[c] += 1
                elif code == M_REDACT_TEXT:
                    text = redact_text[c]
                    out_value(&o, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))
                    counts[c] += 1
                elif code == M_PARTIAL_TEXT and is_ascii(v, vlen):
                    first = cols[c].first
                    last = cols[c].last
                    out_reserve(&o, 4 + vlen)
                    put_i32(o.buf + o.len, vlen)
                    if first + last >= vlen:
                        memset(o.buf + o.len + 4, 42, vlen)
                    else:
                        memcpy(o.buf + o.len + 4, v, first)
                        memset(o.buf + o.len + 4 + first, 42, vlen - first - last)
                        if last:
                            memcpy(o.buf + o.len + 4 + vlen - last, v + vlen - last, last)
                    o.len += 4 + vlen
                    counts[c] += 1
                else:
                    code_done = False
                    if code == M_EMAIL_TEXT and is_ascii(v, vlen):
                        at = -1
                        for k in range(vlen - 1, -1, -1):
                            if v[k] == 64:
                                at = k
                                break
                        if at >= 0:
                            dom = v + at + 1
                            dlen = vlen - at - 1
                            for k in range(at):
                                if not is_space(v[k]):
                                    break
                            else:
                                k = -1
                            if k >= 0 and dlen <= 253 and ascii_domain_ok(dom, dlen):
                                out_reserve(&o, 8 + dlen)
                                put_i32(o.buf + o.len, 4 + dlen)
                                memcpy(o.buf + o.len + 4, b"***@", 4)
                                memcpy(o.buf + o.len + 8, dom, dlen)
                                o.len += 8 + dlen
                                counts[c] += 1
                                code_done = True
                    if not code_done:
                        value = PyBytes_FromStringAndSize(<const char *>v, vlen)
                        new, got = python_mask(pycols[c], value, vlen, key)
                        if new is None:
                            out_null(&o)
                        else:
                            out_value(&o, PyBytes_AS_STRING(new), PyBytes_GET_SIZE(new))
                        if got:
                            counts[c] += got
                start = p = vend
            if p > end:
                raise MaskingError("DataRow length does not match its columns")
            out_put(&o, <const char *>(d + start), end - start)
            o.buf[rowstart] = 68
            put_i32(o.buf + rowstart + 1, o.len - rowstart - 1)
            pos = end
        result = PyBytes_FromStringAndSize(o.buf, o.len)
        pc = plan.counts
        for c in range(ncols):
            if counts[c]:
                pc[cols[c].slot] += counts[c]
        return result, pos
    finally:
        PyMem_Free(o.buf)
        PyMem_Free(cols)
        PyMem_Free(counts)


# --------------------------------------------------------------------------- recorded rows

_row_twin = None


def set_row_twin(f):
    """The Python definition ``row_values`` hands odd input to (set by the recorder)."""
    global _row_twin
    _row_twin = f


def row_values(body):
    """Compiled twin of ``_row_values`` in pooler/gateway/recorder.py (the definition): a
    DataRow body -> (its values: text as str, NULL as None, a value that is not UTF-8 text or
    holds a control character other than tab, newline and carriage return as
    ``{"hex": ...}``; the bytes of the values). Whatever is not a well-formed body (short,
    lengths past its end, a negative column count) goes to ``python_twin``, so that odd input
    gets the very same answer or exception (tests/test_recording_rows_compiled.py)."""
    python_twin = _row_twin
    if python_twin is None:
        raise RuntimeError("row_values needs its Python twin: set_row_twin first")
    if type(body) is not bytes:
        return python_twin(body)
    cdef const unsigned char *d = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t pos = 2, size = 0, k
    cdef int ln
    cdef short ncols
    cdef unsigned char ch
    cdef bint plain
    cdef int c
    if n < 2:
        return python_twin(body)
    ncols = <short>((d[0] << 8) | d[1])
    if ncols < 0:
        return python_twin(body)
    out = []
    for c in range(ncols):
        if pos + 4 > n:
            return python_twin(body)
        ln = <int>((<unsigned int>d[pos] << 24) | (<unsigned int>d[pos + 1] << 16) | (<unsigned int>d[pos + 2] << 8)
                   | <unsigned int>d[pos + 3])
        pos += 4
        if ln < 0:
            out.append(None)
            continue
        if pos + ln > n:
            return python_twin(body)
        plain = True
        for k in range(pos, pos + ln):
            ch = d[k]
            if ch < 32 and ch != 9 and ch != 10 and ch != 13:
                plain = False
                break
        if plain:
            try:
                out.append(PyUnicode_DecodeUTF8(<const char *>(d + pos), ln, NULL))
            except UnicodeDecodeError:
                plain = False
        if not plain:
            out.append({"hex": PyBytes_FromStringAndSize(<const char *>(d + pos), ln).hex()})
        pos += ln
        size += ln
    return out, size
