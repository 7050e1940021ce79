"""Type-checked use of shmreg.Cache (CI: ``mypy --strict examples/typing``).

``Cache[T]`` types its values; ``get_or_set`` and ``aget_or_set`` return
``T``; a memoized function keeps its parameters and return type.
"""

from __future__ import annotations

import asyncio

from shmreg import Cache

pages: Cache[bytes] = Cache("typed-example-pages", ttl=60)


def render(path: str) -> bytes:
    return f"<h1>{path}</h1>".encode()


def page(path: str) -> bytes:
    body = pages.get_or_set(f"page:{path}", lambda: render(path))
    return body          # bytes, as declared: no cast


def cached_length(path: str) -> int | None:
    body = pages.get(f"page:{path}")
    return None if body is None else len(body)


@pages.memoize(ttl=30)
def word_count(text: str, *, lower: bool = False) -> int:
    return len((text.lower() if lower else text).split())


async def apage(path: str) -> bytes:
    async def build() -> bytes:
        await asyncio.sleep(0)
        return render(path)

    return await pages.aget_or_set(f"apage:{path}", build)


def main() -> None:
    n: int = word_count("a b c", lower=True)   # signature and return type kept
    key: str = word_count.cache_key("a b c")
    print(page("/"), cached_length("/"), n, key, asyncio.run(apage("/a")))
    word_count.cache_clear()
    pages.unlink()


if __name__ == "__main__":
    main()
