"""Keys and values as Redis strings, and back (data from a server is untrusted).

Keys: one type letter then the key (``s`` UTF-8 str, ``b`` bytes, ``i``
decimal int), so ``1`` and ``"1"`` stay different keys, under the table's
hash tag: ``{shmreg:NAME}:k:s...``.

Values: an int64 is stored as its plain decimal, so the server's
``INCRBY`` works on it (``update_counter`` runs there).  Every other value is
one type byte (the local engine's value type, 1-7: never a digit or ``-``)
followed by the same bytes the local engine stores: UTF-8 for str, the
bytes, an 8-byte little-endian double, one byte for bool, nothing for None,
a pickle for anything else.  So ``_get_raw`` hands ``_core.decode_raw``
exactly what it decodes for a local table, and compare-and-swap compares
encodings.
"""

from __future__ import annotations

import pickle
import re
import struct
from typing import Any

from shmreg._core import PickledValue, decode_raw
from shmreg.errors import CorruptTableError

VT_NONE, VT_BOOL, VT_INT, VT_FLOAT, VT_BYTES, VT_STR, VT_PICKLE = range(1, 8)
_INT64 = struct.Struct("<q")
_DOUBLE = struct.Struct("<d")
_MIN64, _MAX64 = -(1 << 63), (1 << 63) - 1
_DIGITS = b"-0123456789"
_DECIMAL = re.compile(rb"-?[0-9]{1,19}")


def key_suffix(key: Any) -> bytes:
    """The type letter and bytes of ``key`` (a subclass counts as its base
    type, as in a dict: ``True`` is the key ``1``).

    :raises TypeError: not str, bytes or int.
    """
    if isinstance(key, str):
        return b"s" + str.encode(key, "utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + bytes(key)
    if isinstance(key, int):
        return b"i" + str(int(key)).encode("ascii")
    raise TypeError(f"keys must be str, bytes or int, not {type(key).__name__}")


def decode_key_suffix(raw: bytes) -> Any:
    """Inverse of :func:`key_suffix`; :raises CorruptTableError: not one of ours."""
    kind, body = raw[:1], raw[1:]
    try:
        if kind == b"s":
            return body.decode("utf-8", "surrogatepass")
        if kind == b"b":
            return body
        if kind == b"i" and body and body.lstrip(b"-").isdigit():
            return int(body)
    except UnicodeDecodeError:
        pass
    raise CorruptTableError(f"not a shmreg key on the server: {raw[:40]!r}")


def prefix_suffix(prefix: str | bytes) -> bytes:
    """The key suffix every key starting with ``prefix`` starts with."""
    if isinstance(prefix, str):
        return b"s" + prefix.encode("utf-8", "surrogatepass")
    if isinstance(prefix, bytes):
        return b"b" + prefix
    raise TypeError(f"prefix must be str or bytes, not {type(prefix).__name__}")


def encode_value(value: Any) -> bytes:
    """The stored form of ``value`` (see the module docstring)."""
    t = type(value)
    if t is bytes:
        return b"\x05" + value
    if t is str:
        return b"\x06" + value.encode("utf-8", "surrogatepass")
    if t is int:
        if _MIN64 <= value <= _MAX64:
            return str(value).encode("ascii")
    elif t is float:
        return b"\x04" + _DOUBLE.pack(value)
    elif t is bool:
        return b"\x02\x01" if value else b"\x02\x00"
    elif value is None:
        return b"\x01"
    # Subclasses, big ints and everything else: pickle, as the local engine.
    return b"\x07" + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def to_raw(stored: bytes) -> tuple[int, bytes]:
    """``(value type, local encoding)`` of a stored value, for ``decode_raw``.

    :raises CorruptTableError: not a value shmreg wrote.
    """
    if not isinstance(stored, bytes) or not stored:
        raise CorruptTableError(f"stored value is not a shmreg value: {stored!r:.60}")
    if stored[0] in _DIGITS:
        try:
            if not _DECIMAL.fullmatch(stored):
                raise ValueError
            return VT_INT, _INT64.pack(int(stored))
        except (ValueError, struct.error):
            raise CorruptTableError(f"stored value is not a valid int: {stored[:40]!r}") from None
    vtype = stored[0]
    if not VT_NONE <= vtype <= VT_PICKLE:
        raise CorruptTableError(f"stored value has unknown type byte {vtype} ({len(stored)} bytes)")
    return vtype, stored[1:]


def from_raw(vtype: int, raw: bytes) -> bytes:
    """Inverse of :func:`to_raw` (the stored form of a ``_get_raw`` result)."""
    if vtype == VT_INT:
        return str(_INT64.unpack(raw)[0]).encode("ascii")
    return bytes((vtype,)) + raw


def decode_value(stored: bytes, allow_pickle: bool) -> Any:
    """The value of a stored string; a pickle comes back as
    :class:`~shmreg.PickledValue` unless ``allow_pickle``.

    :raises CorruptTableError: malformed (wrong length for its type,
        invalid UTF-8, a broken pickle).
    """
    if isinstance(stored, bytes) and stored and stored[0] in _DIGITS:
        try:
            if not _DECIMAL.fullmatch(stored):
                raise ValueError
            return int(stored)
        except ValueError:
            raise CorruptTableError(f"stored value is not a valid int: {stored[:40]!r}") from None
    vtype, raw = to_raw(stored)
    if vtype == VT_PICKLE and not allow_pickle:
        return PickledValue(raw)
    return decode_raw(vtype, raw, allow_pickle)
