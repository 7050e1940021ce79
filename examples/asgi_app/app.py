"""An asyncio (ASGI) app under gunicorn with uvicorn workers, sharing a shmreg
Cache: a value is computed once across all workers, and a worker waiting for
another's computation keeps serving its other requests (the wait is
``asyncio.sleep``, never a blocking sleep).

  GET /                 this worker's pid
  GET /compute/<n>      an expensive value via ``await cache.aget_or_set(...)``
                        (a coroutine factory; 0.3 s of simulated I/O)
  GET /tick             answers at once, even while this worker waits on /compute
  GET /stats            how often the computation really ran

Plain ASGI, no framework: the point is the cache.  The tables come from the
gunicorn hooks (gunicorn.conf.py); ``shmreg.gunicorn.cache()`` returns this
worker's attached Cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import shmreg.gunicorn

PREFIX = os.environ.get("SHMREG_ASGI_PREFIX", "asgiexample-")
DELAY = float(os.environ.get("SHMREG_ASGI_DELAY", "0.3"))


async def expensive(n: int) -> str:
    shmreg.gunicorn.table(PREFIX + "counters").update_counter("compute")
    await asyncio.sleep(DELAY)              # e.g. a database or HTTP call
    return hashlib.sha256(str(n).encode()).hexdigest()


async def route(path: str) -> dict:
    if path.startswith("/compute/"):
        n = int(path.rsplit("/", 1)[1])
        cache = shmreg.gunicorn.cache(PREFIX + "cache")
        value = await cache.aget_or_set(f"compute:{n}", lambda: expensive(n), ttl=300)
        return {"pid": os.getpid(), "n": n, "value": value}
    if path == "/stats":
        return {str(k): v for k, v in shmreg.gunicorn.table(PREFIX + "counters").items()}
    return {"pid": os.getpid()}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps(await route(scope["path"])).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"x-served-by", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": body})
