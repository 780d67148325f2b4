# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``seal_run`` (pooler/recording/writer.py): a chunk of records sealed into
the hash chain, SHA-256 (or HMAC-SHA-256) by OpenSSL's libcrypto, the interpreter lock released
while it hashes and copies (a writer thread no longer takes it from the proxy loop for that).

The Python ``seal_run`` is the one source of truth for behaviour: this must give the very
same bytes, index, last hash and size for the same arguments (tests/test_recording_seal_compiled.py
runs both over the same inputs, keyed and not, cut by the rotation limit).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy


cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c)
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t length)
    int SHA256_Final(unsigned char *md, SHA256_CTX *c)

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass
    ctypedef struct ENGINE:
        pass
    const EVP_MD *EVP_sha256()

cdef extern from "openssl/hmac.h" nogil:
    ctypedef struct HMAC_CTX:
        pass
    HMAC_CTX *HMAC_CTX_new()
    void HMAC_CTX_free(HMAC_CTX *ctx)
    int HMAC_Init_ex(HMAC_CTX *ctx, const void *key, int len, const EVP_MD *md, ENGINE *impl)
    int HMAC_Update(HMAC_CTX *ctx, const unsigned char *data, size_t len)
    int HMAC_Final(HMAC_CTX *ctx, unsigned char *md, unsigned int *len)


cdef const char *HEX = b"0123456789abcdef"
cdef const char *MIDDLE = b',"h":"'   # 6 bytes
cdef const char *END = b'"}\n'        # 3 bytes
DEF SUFFIX_LEN = 72                   # format.SUFFIX_LEN: ',"h":"' + 64 hex + '"}'


cdef inline void _hex(const unsigned char *md, char *out) noexcept nogil:
    cdef int k
    for k in range(32):
        out[2 * k] = HEX[md[k] >> 4]
        out[2 * k + 1] = HEX[md[k] & 15]


def seal_run(const unsigned char[::1] data, Py_ssize_t pos, bytes prev, long long size, long long limit, key):
    """See writer.seal_run."""
    cdef Py_ssize_t n = data.shape[0]
    cdef const unsigned char *base = &data[0] if n else NULL
    cdef const unsigned char *nl
    cdef Py_ssize_t start = pos, stop = pos, ln, total = 0, count = 0, i
    if pos < 0 or pos > n:
        raise ValueError("offset out of range")
    # which records this run seals (the size each adds is known before hashing), and their bytes
    while stop < n:
        nl = <const unsigned char *>memchr(base + stop, 10, n - stop)
        if nl == NULL:
            break
        ln = nl - (base + stop)
        total += (ln - 1 if ln > 0 else 0) + 6 + 64 + 3
        size += ln + SUFFIX_LEN
        stop += ln + 1
        count += 1
        if size >= limit:
            break
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *o = PyBytes_AS_STRING(out)
    cdef char h[64]
    cdef unsigned char md[32]
    cdef unsigned int mdlen = 32
    cdef SHA256_CTX sha
    cdef HMAC_CTX *mac = NULL
    cdef const char *p = PyBytes_AS_STRING(prev)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(prev)
    cdef bytes kb = bytes(key) if key else b""
    cdef const char *kp = PyBytes_AS_STRING(kb)
    cdef int klen = <int>PyBytes_GET_SIZE(kb)
    cdef int ok = 1
    cdef const unsigned char *r
    if klen:
        mac = HMAC_CTX_new()
        if mac == NULL or not HMAC_Init_ex(mac, kp, klen, EVP_sha256(), NULL):
            HMAC_CTX_free(mac)
            raise MemoryError("HMAC_Init_ex failed")
    try:
        with nogil:
            pos = start
            for i in range(count):
                r = base + pos
                nl = <const unsigned char *>memchr(r, 10, n - pos)
                ln = nl - r
                if klen:
                    ok = (HMAC_Init_ex(mac, NULL, 0, NULL, NULL) and HMAC_Update(mac, <const unsigned char *>p, plen)
                          and HMAC_Update(mac, r, ln) and HMAC_Final(mac, md, &mdlen))
                else:
                    ok = SHA256_Init(&sha) and SHA256_Update(&sha, p, plen) and SHA256_Update(&sha, r, ln) and SHA256_Final(md, &sha)
                if not ok:
                    break
                _hex(md, h)
                if ln > 0:
                    memcpy(o, r, ln - 1)
                    o += ln - 1
                memcpy(o, MIDDLE, 6)
                memcpy(o + 6, h, 64)
                memcpy(o + 70, END, 3)
                o += 73
                p = o - 67  # this record's h: the next one hashes after it
                plen = 64
                pos += ln + 1
    finally:
        if mac != NULL:
            HMAC_CTX_free(mac)
    if not ok:
        raise RuntimeError("libcrypto failed to hash a record")
    if count:
        prev = PyBytes_FromStringAndSize(o - 67, 64)
    return out, stop, prev, size, count
