"""Build the core: the plain-C engine (src/shmreg/engine/*.c) and its Cython
binding (src/shmreg/_core.pyx) as one extension.  SHMREG_DEBUG=1 builds
with C assertions, no -O2, and an invariant check of every shard a writer
unlocks."""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("SHMREG_DEBUG") == "1"
engine = sorted(glob.glob("src/shmreg/engine/*.c"))
ext = Extension(
    "shmreg._core",
    ["src/shmreg/_core.pyx", *engine],
    include_dirs=["src/shmreg"],
    depends=sorted(glob.glob("src/shmreg/engine/*.h") + glob.glob("src/shmreg/*.pxi")) + ["src/shmreg/_engine.pxd"],
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    undef_macros=["NDEBUG"] if debug else [],
    define_macros=[("SHMREG_DEBUG", "1")] if debug else [],
)
print(f"shmreg: building the {'debug' if debug else 'release'} core ({len(engine)} engine files)")
setup(ext_modules=cythonize([ext], compiler_directives={"language_level": "3"}))
