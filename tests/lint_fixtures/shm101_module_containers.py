"""SHM101: module-level containers mutated inside a function."""
import collections
import collections as coll
from collections import Counter, defaultdict as dd, deque

hits = {}
seen = set()
queue = deque(maxlen=10)
by_user = dd(list)
totals = coll.Counter()
names: list = []
tally = Counter()
also = dict()

# Constants and import-time filling: left alone.
CHOICES = ("a", "b")
LOOKUP = {"a": 1}
LOOKUP["b"] = 2
for _k in ("c", "d"):
    LOOKUP[_k] = 3
FROZEN = frozenset({1, 2})


def view(path, user):
    hits[path] = hits.get(path, 0) + 1  # expect: SHM101
    seen.add(path)  # expect: SHM101
    queue.append(path)  # expect: SHM101
    by_user[user].append(path)  # expect: SHM101
    totals.update([path])  # expect: SHM101
    names.extend([user])  # expect: SHM101
    tally[path] += 1  # expect: SHM101
    also.setdefault(path, []).append(user)  # expect: SHM101
    del hits[path]  # expect: SHM101
    return LOOKUP.get(path), CHOICES


def readers_only(path):
    # Reading module state, and mutating a copy, is fine.
    local = dict(hits)
    local[path] = 1
    return len(seen), path in LOOKUP, local


def shadowed(hits, seen):
    # Parameters shadow the module names.
    hits[1] = 2
    seen.add(3)


def local_rebinding():
    queue = []
    queue.append(1)
    return queue


def nested_closure():
    def inner(x):
        names.append(x)  # expect: SHM101

    def shadows():
        hits = {}
        hits["x"] = 1

        def deeper():
            hits["y"] = 2  # the enclosing function's hits, not the module's
        return deeper
    return inner, shadows


def with_global():
    global names
    names += ["x"]  # expect: SHM101


lam = lambda key: seen.add(key)  # expect: SHM101


def reset():
    # Clearing returns the state a fresh worker has: workers converge.
    hits.clear()
    names[:] = []


class View:
    def get(self, key):
        hits[key] = 1  # expect: SHM101
        return collections.OrderedDict()


if __name__ == "__main__":
    scratch = {}

    def main():
        scratch["x"] = 1
        hits["y"] = 2
    main()
