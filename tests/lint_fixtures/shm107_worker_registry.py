"""SHM107: registries of workers kept in module state."""
import os

workers = {}
live_pids = set()
by_process = {}
handlers = {}


def on_start(info):
    workers[os.getpid()] = info  # expect: SHM107
    live_pids.add(os.getpid())  # expect: SHM107
    by_process[os.getpid()] = info  # expect: SHM107


def on_request(path, handler):
    handlers[path] = handler  # expect: SHM101


def register_worker(info):
    workers["x"] = info  # registration function: filled at import
