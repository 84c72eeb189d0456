"""pytest-isolate: run pytest tests inside throw-away Linux containers.

``@isolated(**options)`` is the same as ``@pytest.mark.isolated(**options)``;
``pytest --isolate`` isolates every test. See docs/ for the options. The layer
modules (namespaces, rootfs, cgroups, capabilities, seccomp, images, pods)
import without pytest; only ``isolated`` needs it, so it is resolved lazily.
"""

from __future__ import annotations

# Not typing's: the init factory imports this package, and typing is
# milliseconds of its start-up (mypy reads the name as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .spec import IsolationSpec, SpecError

__all__ = ["IsolationSpec", "Pod", "SpecError", "__version__", "isolated", "pod"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("IsolationSpec", "SpecError"):
        # Lazily too: the init factory (initd.py), a small interpreter of its
        # own, imports this package and has no use for the spec's machinery.
        from . import spec

        return getattr(spec, name)
    if name == "isolated":
        import pytest

        #: ``@isolated(memory="100M")`` marks a test, class or module like
        #: ``@pytest.mark.isolated``.
        return pytest.mark.isolated
    if name in ("pod", "Pod"):
        from . import pods

        return getattr(pods, name)
    raise AttributeError(f"module 'pytest_isolate' has no attribute {name!r}")
