"""SHM106: module-level counters."""
import itertools
from itertools import count as counter

_ids = itertools.count()
_seq = counter(1)
requests_served = 0
version = "1"


def new_id():
    return next(_ids)  # expect: SHM106


def new_seq():
    return _seq.__next__()  # expect: SHM106


def served():
    global requests_served
    requests_served += 1  # expect: SHM106


def not_a_counter(n):
    requests_served = n  # a local
    requests_served += 1
    return requests_served


def local_count():
    c = itertools.count()
    return next(c)


FIRST = next(_ids)  # at import: left alone
