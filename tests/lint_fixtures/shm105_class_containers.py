"""SHM105: class attributes holding mutable containers, mutated through the class."""
import collections


class Plugin:
    instances = []
    by_name = {}
    seen = collections.defaultdict(set)
    limit = 10
    labels = ("a", "b")

    def __init__(self, name):
        self.__class__.instances.append(self)  # expect: SHM105
        type(self).by_name[name] = self  # expect: SHM105
        Plugin.seen[name].add(1)  # expect: SHM105
        self.mine = []
        self.mine.append(name)  # instance state, not class state

    @classmethod
    def track(cls, name):
        cls.by_name[name] = None  # expect: SHM105
        cls.instances += [name]  # expect: SHM105

        def later():
            cls.seen[name].add(2)  # expect: SHM105
        return later

    @classmethod
    def count(cls):
        return len(cls.instances), cls.limit, cls.labels

    def reads(self):
        return self.by_name.get("x")


class Child(Plugin):
    @classmethod
    def more(cls, name):
        cls.by_name[name] = 1  # expect: SHM105


class Unrelated:
    data = {}

    def fill(self):
        self.data["k"] = 1  # through self: an instance may shadow it, left alone

    @classmethod
    def register(cls, name):
        cls.data[name] = 1  # a registration method: filled at import


def outside(name):
    Plugin.by_name[name] = 2  # expect: SHM105
