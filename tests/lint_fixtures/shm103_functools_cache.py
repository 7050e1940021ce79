"""SHM103: functools caches on module-level functions and methods."""
import functools
import functools as ft
from functools import cache, lru_cache
from functools import lru_cache as memo

my_cache = functools.lru_cache(maxsize=100)


@functools.lru_cache(maxsize=None)  # expect: SHM103
def price(item):
    return item


@ft.cache  # expect: SHM103
def rate(currency):
    return currency


@lru_cache  # expect: SHM103
def a():
    return 1


@cache  # expect: SHM103
def b():
    return 2


@memo(maxsize=10)  # expect: SHM103
def c():
    return 3


@my_cache  # expect: SHM103
def d():
    return 4


class Prices:
    @functools.lru_cache()  # expect: SHM103
    def lookup(self, item):
        return item

    @staticmethod
    def plain(item):
        return item


def factory():
    # A cache on a nested function lives and dies with the call.
    @lru_cache
    def inner(x):
        return x
    return inner


def lru_cache_alike(f):
    return f


@functools.wraps(a)
def wrapped():
    return a()
