"""The one compiled part: pytest_isolate._pid1, a rootless sandbox's pid 1 in C.

Optional: where it cannot be built (no C compiler, not x86_64), the package
works without it and a rootless pid 1 stays in Python (docs/performance.md).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pytest_isolate._pid1",
            ["pytest_isolate/_pid1.c"],
            optional=True,
            extra_compile_args=["-O2", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE"],
        )
    ]
)
