"""The compiled parts, both optional: where they cannot be built (no C
compiler; _pid1 also needs x86_64), the package works without them.

- pytest_isolate._pid1: a rootless sandbox's pid 1 in C (else in Python);
- pytest_isolate._steps: a test process's root, hostname and loopback made by
  raw system calls (else by rootfs.py in Python), docs/performance.md.

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
        ),
        Extension(
            "pytest_isolate._steps",
            ["pytest_isolate/_steps.c"],
            optional=True,
            extra_compile_args=["-O2", "-fno-strict-aliasing"],
        ),
    ]
)
