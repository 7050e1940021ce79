# Included by _core.pyx (one compilation unit with it).
# Codecs between Python objects and the bytes stored in a segment.

# ---- key and value encoding ------------------------------------------------

cdef struct KeyRef:
    shm_key_t k
    unsigned char buf[8]


cdef struct ValRef:
    shm_val_t v
    char buf[8]


cdef inline object encode_key(object key, KeyRef *r):
    """Fill ``r`` from ``key`` (see encode_key_any); bytes, the common key
    type, inline: no call on the hot paths."""
    if type(key) is bytes and PyBytes_GET_SIZE(key) <= SHM_MAX_KEY:
        r.k.p = <const unsigned char *>PyBytes_AS_STRING(key)
        r.k.n = PyBytes_GET_SIZE(key)
        r.k.ktype = SHM_KT_BYTES
        return None
    return encode_key_any(key, r)


cdef object encode_key_any(object key, KeyRef *r):
    """Fill ``r`` from ``key``; returns an object that must outlive ``r.k.p``.

    The key's type is part of the key (``1 != "1"``).  Subclasses are stored
    as their base type, as a dict treats them (``True == 1``,
    ``IntEnum.X == 1``): they read back as ``bool``/``int``/``str``/``bytes``.
    """
    cdef object t = type(key)
    cdef object keep = None
    cdef int overflow = 0
    cdef long long iv
    cdef Py_ssize_t n
    if t is str:
        r.k.p = <const unsigned char *>PyUnicode_AsUTF8AndSize(key, &n)
        r.k.n = n
        r.k.ktype = SHM_KT_STR
        keep = key
    elif t is bytes:
        r.k.p = <const unsigned char *>PyBytes_AS_STRING(key)
        r.k.n = PyBytes_GET_SIZE(key)
        r.k.ktype = SHM_KT_BYTES
    elif t is int:
        iv = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            memcpy(r.buf, &iv, 8)
            r.k.p = r.buf
            r.k.n = 8
            r.k.ktype = SHM_KT_INT
        else:
            keep = str(key).encode("ascii")
            r.k.p = <const unsigned char *>PyBytes_AS_STRING(keep)
            r.k.n = PyBytes_GET_SIZE(keep)
            r.k.ktype = SHM_KT_BIGINT
    elif isinstance(key, str):
        return encode_key_any(str.__str__(key), r)
    elif isinstance(key, bytes):
        return encode_key_any(bytes(key), r)
    elif isinstance(key, int):
        return encode_key_any(int.__index__(key), r)
    else:
        raise TypeError(f"keys must be str, bytes or int, not {type(key).__name__}")
    if r.k.n > SHM_MAX_KEY:
        raise ValueError(f"key too long: {r.k.n} bytes encoded (at most {SHM_MAX_KEY})")
    return keep


cdef object decode_key(unsigned ktype, const char *p, Py_ssize_t n):
    """Decode a stored key; anything implausible is a corrupt table."""
    cdef long long iv
    if ktype == SHM_KT_STR:
        try:
            return PyUnicode_DecodeUTF8(<char *>p, n, NULL)
        except UnicodeDecodeError as e:
            raise CorruptTableError(f"stored str key is not valid UTF-8 ({e})") from None
    if ktype == SHM_KT_BYTES:
        return PyBytes_FromStringAndSize(<char *>p, n)
    if ktype == SHM_KT_INT and n == 8:
        memcpy(&iv, p, 8)
        return PyLong_FromLongLong(iv)
    if ktype == SHM_KT_BIGINT:
        raw = PyBytes_FromStringAndSize(<char *>p, n)
        try:
            return int(raw)
        except ValueError:
            raise CorruptTableError(f"stored big int key is not a decimal number ({raw[:40]!r})") from None
    raise CorruptTableError(f"item with unknown key type {ktype} (length {n})")


cdef object encode_value(object v, ValRef *r):
    """Fill ``r`` from ``v``; returns an object that must outlive ``r.v.p``."""
    cdef object t = type(v)
    cdef int overflow = 0
    cdef long long iv
    cdef double dv
    cdef Py_ssize_t n
    cdef object keep
    if t is bytes:
        r.v.p = PyBytes_AS_STRING(v)
        r.v.n = PyBytes_GET_SIZE(v)
        r.v.vtype = SHM_VT_BYTES
        return v
    if t is str:
        try:
            r.v.p = PyUnicode_AsUTF8AndSize(v, &n)
            r.v.n = n
            r.v.vtype = SHM_VT_STR
            return v
        except UnicodeEncodeError:
            pass  # lone surrogates: keep the exact str through pickle
    elif t is int:
        iv = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow == 0:
            memcpy(r.buf, &iv, 8)
            r.v.p = r.buf
            r.v.n = 8
            r.v.vtype = SHM_VT_INT
            return None
    elif t is float:
        dv = PyFloat_AS_DOUBLE(v)
        memcpy(r.buf, &dv, 8)
        r.v.p = r.buf
        r.v.n = 8
        r.v.vtype = SHM_VT_FLOAT
        return None
    elif t is bool:
        r.buf[0] = 1 if v else 0
        r.v.p = r.buf
        r.v.n = 1
        r.v.vtype = SHM_VT_BOOL
        return None
    elif v is None:
        r.v.p = r.buf
        r.v.n = 0
        r.v.vtype = SHM_VT_NONE
        return None
    try:
        keep = _pickle_dumps(v, 5)
    except Exception as e:
        raise TypeError(f"cannot store a value of type {type(v).__name__}: "
                        f"not picklable ({e})") from e
    r.v.p = PyBytes_AS_STRING(keep)
    r.v.n = PyBytes_GET_SIZE(keep)
    r.v.vtype = SHM_VT_PICKLE
    return keep


class _ClassLookupError(Exception):
    """find_class failed: the pickle is fine, its class is not importable here."""


class _LookupTracingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except Exception as e:
            raise _ClassLookupError() from e


cdef object unpickle(bytes raw):
    """Unpickle a stored value.

    Garbage fed to pickle can fail in any way (AttributeError from an APPEND
    on a dict, IndexError, ...).  A failure to import the pickled class is
    the caller's business and propagates as is; any other failure means the
    stored bytes are not a pickle we wrote: CorruptTableError.  (Telling the
    two apart costs a second, traced unpickling, on the error path only.)
    """
    try:
        return _pickle_loads(raw)
    except Exception as e:
        try:
            return _LookupTracingUnpickler(io.BytesIO(raw)).load()
        except _ClassLookupError as lookup:
            raise lookup.__cause__ from None
        except Exception:
            pass
        raise CorruptTableError(f"stored value is not a valid pickle: {e!r}") from e


class PickledValue(bytes):
    """A pickled value returned as its raw bytes, not unpickled.

    Unpickling runs code chosen by whoever wrote the value.  A table whose
    writers are not trusted (another user's table opened by root, for
    instance) hands back pickled values as this opaque ``bytes`` subclass
    instead; ``pickle.loads(value)`` unpickles it if you decide to trust it.
    """
    __slots__ = ()

    def __repr__(self):
        return f"<pickled value, {len(self)} bytes, not unpickled>"


cdef object decode_value(int vtype, const char *p, Py_ssize_t n, bint allow_pickle=True):
    """Decode a value from memory that no writer can change any more."""
    cdef long long iv
    cdef double dv
    if vtype == SHM_VT_BYTES:
        return PyBytes_FromStringAndSize(<char *>p, n)
    if vtype == SHM_VT_STR:
        try:
            return PyUnicode_DecodeUTF8(<char *>p, n, NULL)
        except UnicodeDecodeError as e:
            raise CorruptTableError(f"stored str value is not valid UTF-8 ({e})") from None
    if vtype == SHM_VT_INT and n == 8:
        memcpy(&iv, p, 8)
        return PyLong_FromLongLong(iv)
    if vtype == SHM_VT_FLOAT and n == 8:
        memcpy(&dv, p, 8)
        return PyFloat_FromDouble(dv)
    if vtype == SHM_VT_BOOL and n == 1:
        return p[0] != 0
    if vtype == SHM_VT_NONE and n == 0:
        return None
    if vtype == SHM_VT_PICKLE:
        if not allow_pickle:
            return PickledValue(PyBytes_FromStringAndSize(<char *>p, n))
        return unpickle(PyBytes_FromStringAndSize(<char *>p, n))
    raise CorruptTableError(f"item with unknown value type {vtype} (length {n})")


def decode_raw(int vtype, bytes raw, bint allow_pickle=True):
    """Decode a value read by ``CoreTable._get_raw``."""
    return decode_value(vtype, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), allow_pickle)


cdef inline void recbuf_init(shm_recbuf_t *b) noexcept nogil:
    b.data = NULL
    b.len = b.cap = b.nrec = 0


cdef list parse_records(shm_recbuf_t *b, int what, bint allow_pickle):
    """Decode records: what 0 keys, 1 values, 2 values (single), 3 (key, value),
    4 (key, value, expires_ns, owner)."""
    cdef list out = []
    cdef size_t pos = 0
    cdef uint32_t klen, vlen, owner
    cdef uint64_t exp
    cdef unsigned ktype
    cdef int vtype
    cdef char *r
    while pos < b.len:
        r = b.data + pos
        memcpy(&klen, r, 4)
        memcpy(&vlen, r + 4, 4)
        ktype = <uint8_t>r[8]
        vtype = <uint8_t>r[9]
        if what == 0:
            out.append(decode_key(ktype, r + SHM_REC_HDR, klen))
        elif what == 1 or what == 2:
            out.append(decode_value(vtype, r + SHM_REC_HDR + klen, vlen, allow_pickle))
        elif what == 3:
            out.append((decode_key(ktype, r + SHM_REC_HDR, klen),
                        decode_value(vtype, r + SHM_REC_HDR + klen, vlen, allow_pickle)))
        else:
            memcpy(&owner, r + 12, 4)
            memcpy(&exp, r + 16, 8)
            out.append((decode_key(ktype, r + SHM_REC_HDR, klen),
                        decode_value(vtype, r + SHM_REC_HDR + klen, vlen, allow_pickle), exp, owner))
        pos += SHM_REC_HDR + ((<uint64_t>klen + vlen + 7) & ~(<uint64_t>7))
    return out
