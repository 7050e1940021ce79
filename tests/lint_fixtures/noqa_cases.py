"""Suppression with # noqa comments."""
hits = {}
seen = set()


def view(path):
    hits[path] = 1  # noqa: SHM101
    seen.add(path)  # noqa
    hits["x"] = 2  # noqa: SHM102 (another code: still reported)  # expect: SHM101
    seen.add("y")  # NOQA:SHM101,SHM106
    text = "# noqa"
    hits[text] = 3  # expect: SHM101
