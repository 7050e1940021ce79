"""SHM104: cached_property-like caches."""
import functools
from functools import cached_property as cp


class Settings:
    @functools.cached_property  # expect: SHM104
    def values(self):
        return {}

    @cp  # expect: SHM104
    def other(self):
        return {}

    @property
    def plain(self):
        return 1


class Lazy:
    def cached_property(self):  # a method named like it, not a decorator
        return 1
