"""pytest-isolate: run pytest tests inside throw-away Linux containers.

``@isolated(**options)`` is the same as ``@pytest.mark.isolated(**options)``;
``pytest --isolate`` isolates every test. See docs/ for the options.
"""

from __future__ import annotations

import pytest

from .spec import IsolationSpec, SpecError

__all__ = ["IsolationSpec", "SpecError", "__version__", "isolated"]
__version__ = "0.1.0"

#: ``@isolated(memory="100M")`` marks a test (class, module) like ``@pytest.mark.isolated``.
isolated = pytest.mark.isolated
