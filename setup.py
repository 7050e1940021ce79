"""Build the Cython core.  SHMREG_DEBUG=1 builds with C assertions and no -O2."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("SHMREG_DEBUG") == "1"
ext = Extension(
    "shmreg._core",
    ["src/shmreg/_core.pyx"],
    include_dirs=["src/shmreg"],
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    undef_macros=["NDEBUG"] if debug else [],
    define_macros=[("SHMREG_DEBUG", "1")] if debug else [],
)
print(f"shmreg: building the {'debug' if debug else 'release'} core")
setup(ext_modules=cythonize([ext], compiler_directives={"language_level": "3"}))
