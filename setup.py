"""Build the one extension, fastrelay._core, from fastrelay/_core.pyx.

FASTRELAY_DEBUG=1 builds with annotation, line tracing and bounds checks (like uvloop's `make debug`).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTRELAY_DEBUG", "") not in ("", "0")

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "linetrace": DEBUG,
    "embedsignature": True,
}
macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O0", "-g"] if DEBUG else ["-O3"]

extensions = [
    Extension(
        "fastrelay._core",
        ["fastrelay/_core.pyx"],
        define_macros=macros,
        extra_compile_args=cflags,
        depends=[
            "fastrelay/_tokenizer.pxi",
            "fastrelay/_framing.pxi",
            "fastrelay/_shm.pxi",
            "fastrelay/_routetable.pxi",
        ],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
