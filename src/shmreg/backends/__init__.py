"""Table engines behind the one surface: shared memory (``shmreg._core``,
the default) and Redis/Valkey (:mod:`shmreg.backends.redis`, ``url=``).
:mod:`shmreg.backends.base` lists what an engine provides."""
