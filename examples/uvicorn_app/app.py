"""An ASGI app whose ``uvicorn --workers N`` processes share a counter table
and a worker registry through shmreg (see README.md next to this file).

    uvicorn app:app --app-dir examples/uvicorn_app --workers 4

The tables are temporary: the last worker to stop unlinks them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable, Dict

import shmreg.uvicorn
from shmreg.uvicorn import TableSpec

PREFIX = os.environ.get("SHMREG_EXAMPLE_PREFIX", "uvicorn-example-")
COUNTERS = PREFIX + "counters"

shmreg.uvicorn.configure(tables={COUNTERS: TableSpec(capacity=4_096, memory=1 << 20)},
                         registry=PREFIX + "workers", temporary=True)

Message = Dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _app(scope: Message, receive: Receive, send: Send) -> None:
    counters = shmreg.uvicorn.table(COUNTERS)
    body: dict[str, Any] = {"pid": os.getpid(), "requests": counters.update_counter("requests"),
                            "workers": sorted(r.pid for _, r in shmreg.uvicorn.registry().items())}
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


app = shmreg.uvicorn.wrap(_app)
