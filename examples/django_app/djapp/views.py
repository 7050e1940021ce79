"""Views (and URLs) of the shmreg Django example.

  GET /                 this worker's pid
  GET /page/            a page cached for 60 s with @cache_page
  GET /item/<n>/        page n, cached 300 s with @cache_page (~2 ms to render)
  GET /compute/<n>/     an expensive value through cache.get_or_set(key, callable):
                        with shmreg it is computed once across all workers, even
                        when they all get the request at the same moment
  GET /session/         bumps a counter in the session (cache-backed sessions)
  GET /sleep/?ms=N      keeps this worker busy for N ms
  GET /stats/           how often each view body ran (shared counters)
"""

import hashlib
import os
import time

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.cache import cache_page

import shmreg

_counters = None


def counters() -> shmreg.Table:
    """The shared table of view-body counts (created by the gunicorn hooks,
    or here when the app runs without them)."""
    global _counters
    if _counters is None:
        _counters = shmreg.Table(settings.COUNTERS_TABLE, capacity=1_024, memory=1 << 20)
    return _counters


def served_by(get_response):
    """Middleware: the ``X-Served-By`` header names the worker that answered
    (a page from the cache carries the pid of the worker that rendered it)."""
    def middleware(request: HttpRequest):
        response = get_response(request)
        response["X-Served-By"] = str(os.getpid())
        return response
    return middleware


def index(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"pid": os.getpid(), "cache": settings.CACHE_KIND})


@cache_page(60)
def page(request: HttpRequest) -> JsonResponse:
    runs = counters().update_counter("page")
    return JsonResponse({"pid": os.getpid(), "rendered": runs})


@cache_page(300)
def item(request: HttpRequest, n: int) -> JsonResponse:
    counters().update_counter("item")
    h = str(n).encode()
    for _ in range(int(os.environ.get("SHMREG_DJANGO_ITEM_ROUNDS", "4000"))):
        h = hashlib.sha256(h).digest()
    return JsonResponse({"pid": os.getpid(), "n": n, "digest": h.hex()})


def expensive(n: int) -> str:
    counters().update_counter("compute")
    time.sleep(float(os.environ.get("SHMREG_DJANGO_DELAY", "0.2")))
    h = str(n).encode()
    for _ in range(10_000):
        h = hashlib.sha256(h).digest()
    return h.hex()


def compute(request: HttpRequest, n: int) -> JsonResponse:
    value = cache.get_or_set(f"compute:{n}", lambda: expensive(n), timeout=300)
    return JsonResponse({"pid": os.getpid(), "n": n, "value": value})


def session(request: HttpRequest) -> JsonResponse:
    n = request.session.get("n", 0) + 1
    request.session["n"] = n
    return JsonResponse({"pid": os.getpid(), "n": n})


def sleep(request: HttpRequest) -> JsonResponse:
    time.sleep(int(request.GET.get("ms", "50")) / 1000)
    return JsonResponse({"pid": os.getpid()})


def stats(request: HttpRequest) -> JsonResponse:
    return JsonResponse({str(k): v for k, v in counters().items()})


urlpatterns = [
    path("", index),
    path("page/", page),
    path("item/<int:n>/", item),
    path("compute/<int:n>/", compute),
    path("session/", session),
    path("sleep/", sleep),
    path("stats/", stats),
]
