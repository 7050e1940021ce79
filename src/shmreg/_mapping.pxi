# Included by _core.pyx (one compilation unit with it).
# Mappings: one per segment per process, shared by its handles.

# One mapping per segment per process, shared by every handle on it:
# (st_dev, st_ino) -> _Mapping.  Sharing matters beyond saving address
# space: the process's liveness holder (whose lock lives in the mapping) and
# its pidfd cache belong to the segment, not to a handle.
cdef dict _mappings = {}


@cython.final
cdef class _Mapping:
    cdef shm_view_t view
    cdef int fd              # kept open: fstat tells when the segment was unlinked
    cdef object key
    cdef int handles         # open CoreTable handles
    cdef int pins            # operations in flight, over all handles
    cdef int leases          # watcher leases held by threads of this process
    cdef shm_holder_t *holder    # liveness holder thread of this process's slot
    cdef uint32_t self_owner     # this process's owner id (0: none yet)

    def __cinit__(self):
        cdef int i
        self.view.base = NULL
        self.fd = -1
        self.holder = NULL
        self.view.pidfds = <int *>malloc(SHM_NPROCS * sizeof(int))
        self.view.pidfd_gen = <uint32_t *>malloc(SHM_NPROCS * sizeof(uint32_t))
        if self.view.pidfds == NULL or self.view.pidfd_gen == NULL:
            raise MemoryError()
        for i in range(SHM_NPROCS):
            self.view.pidfds[i] = -1
            self.view.pidfd_gen[i] = 0

    def __dealloc__(self):
        if self.view.base != NULL and self.holder == NULL:
            shm_close_pidfds(&self.view)
            munmap(self.view.base, self.view.size)
            self.view.base = NULL
        if self.fd >= 0 and self.view.base == NULL:
            os.close(self.fd)
        free(self.view.pidfds)
        free(self.view.pidfd_gen)

    cdef bint idle(self):
        return self.handles <= 0 and self.pins <= 0 and self.leases <= 0

    cdef void maybe_unmap(self) noexcept:
        """Unmap once idle.  A liveness holder's lock lives in the mapping:
        while the segment has a name (others may read this process's owned
        entries, or open it anew) both are kept; once it is unlinked nobody
        new can attach, and both are released."""
        if self.view.base == NULL or not self.idle():
            return
        try:
            if self.holder != NULL:
                if os.fstat(self.fd).st_nlink > 0:
                    return
                shm_holder_release(self.holder)
                self.holder = NULL
                self.self_owner = 0
            shm_close_pidfds(&self.view)
            munmap(self.view.base, self.view.size)
            self.view.base = NULL
            os.close(self.fd)
            self.fd = -1
            if _mappings.get(self.key) is self:
                del _mappings[self.key]
        except Exception:
            pass

    cdef void forget_after_fork(self) noexcept:
        # The holder thread (and any lease-holding thread) did not survive
        # the fork: this process is a new owner with no leases.
        if self.holder != NULL:
            shm_holder_forget(self.holder)
            self.holder = NULL
        self.self_owner = 0
        self.leases = 0


def _release_unlinked():
    """Release the mappings kept only for a liveness holder whose segment has
    been unlinked since (called by ``shmreg.unlink``)."""
    cdef _Mapping m
    for m in list(_mappings.values()):
        m.maybe_unmap()


def _after_fork_in_child():
    cdef _Mapping m
    for m in list(_mappings.values()):
        m.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _mapped_segments():
    """``[(key, handles, pins, leases, has_holder)]`` of this process's mappings (tests)."""
    cdef _Mapping m
    return [(m.key, m.handles, m.pins, m.leases, m.holder != NULL) for m in _mappings.values()]


_ATTACH_INCOMPATIBLE = (SHM_ATTACH_SMALL, SHM_ATTACH_UNINIT, SHM_ATTACH_MAGIC, SHM_ATTACH_VERSION,
                        SHM_ATTACH_BUILD)


cdef object attach_error(int err, shm_header_t *h):
    msg = shm_attach_message(err).decode()
    if err == SHM_ATTACH_VERSION:
        msg = f"table has layout version {h.layout}; this shmreg reads version {SHM_LAYOUT_VERSION}"
    if err in _ATTACH_INCOMPATIBLE:
        return IncompatibleTableError(msg)
    return CorruptTableError(msg)


cdef object lock_name(int which):
    if which >= 0:
        return f"shard {which}"
    return "the process table" if which == -1 else "the watcher lease"
