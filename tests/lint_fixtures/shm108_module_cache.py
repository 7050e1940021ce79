"""SHM108: module-level dicts named like caches."""
_cache = {}
SITE_CACHE = {}
_memo_table = {}


def get_site(site_id, load):
    if site_id not in SITE_CACHE:
        SITE_CACHE[site_id] = load(site_id)  # expect: SHM108
    return SITE_CACHE[site_id]


def invalidate(site_id):
    SITE_CACHE.pop(site_id, None)  # expect: SHM108


def fib(n):
    if n in _memo_table:
        return _memo_table[n]
    value = n if n < 2 else fib(n - 1) + fib(n - 2)
    _memo_table[n] = value  # expect: SHM108
    return value


def clear():
    _cache.clear()
