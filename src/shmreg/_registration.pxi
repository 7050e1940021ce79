# Included by _core.pyx (one compilation unit with it).
# Sentinels and the Registration result type.

class _Missing:
    __slots__ = ()

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()
#: Sentinel for "no default given" (``pop``/``take``); ``get(k, MISSING)``
#: returns it for an absent key.
MISSING = _MISSING
# Internal: makes a lookup raise KeyError instead of returning a default.
_RAISE = object()


@cython.freelist(32)
@cython.final
cdef class Registration:
    """A live registration: the owning process's ``pid`` and the ``value``.

    Behaves like the named tuple ``(pid, value)`` (unpacking, indexing,
    equality with tuples), built in C because ``Registry.lookup`` is a hot
    read path.
    """
    cdef readonly object pid
    cdef readonly object value

    def __init__(self, pid, value):
        self.pid = pid
        self.value = value

    def __iter__(self):
        return iter((self.pid, self.value))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (self.pid, self.value)[i]

    def __eq__(self, other):
        if isinstance(other, (Registration, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash((self.pid, self.value))

    def __repr__(self):
        return f"Registration(pid={self.pid!r}, value={self.value!r})"

    def __reduce__(self):
        return (Registration, (self.pid, self.value))

    def _asdict(self):
        return {"pid": self.pid, "value": self.value}
