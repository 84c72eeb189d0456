"""Coverage measured inside sandboxes, merged into the session's data.

A sandbox leaves through os._exit, which skips coverage's exit handlers (users
of pytest-forked lose most of their coverage that way), and its project tree is
read-only. So each sandbox restarts coverage with the session's configuration,
writing to a private data file under the session's temp base (bound writable),
saves it before leaving, and pytest's process combines those files into its
own data before pytest-cov (or coverage run) reports. Needs coverage >= 7.10
(``CoverageConfig.serialize``); older versions measure nothing in sandboxes.
This module never imports pytest.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

__all__ = ["combine_into_session", "prepare_dir", "start_in_sandbox", "stop_in_sandbox"]

_SUBDIR = ".isolate-coverage"


def _current() -> Any:
    # Not imported: not measuring (and importing it would cost ~50 ms).
    module = sys.modules.get("coverage")
    coverage_class = getattr(module, "Coverage", None)
    if coverage_class is None:
        return None
    return coverage_class.current()


def prepare_dir(basetemp: str | None) -> str | None:
    """In pytest's process: where sandboxes write coverage data, or None when
    coverage is not measuring this session."""
    if basetemp is None or _current() is None:
        return None
    path = os.path.join(basetemp, _SUBDIR)
    os.makedirs(path, exist_ok=True)
    return path


def start_in_sandbox(directory: str | None) -> Any:
    """In the sandbox: stop the inherited tracer (its data belongs to pytest's
    process) and measure with the same configuration into ``directory``."""
    parent = _current()
    if parent is None or directory is None:
        return None
    try:
        from coverage import Coverage
        from coverage.control import CONFIG_DATA_PREFIX

        config = CONFIG_DATA_PREFIX + parent.config.serialize()
    except (ImportError, AttributeError):
        return None
    parent.stop()
    child = Coverage(config_file=config, data_suffix=True)
    # After construction: the serialized configuration carries the session's
    # data file, which lives in the read-only project tree.
    child.set_option("run:data_file", os.path.join(directory, ".coverage"))
    child.start()
    return child


def stop_in_sandbox(child: Any) -> None:
    if child is not None:
        child.stop()
        child.save()


def combine_into_session(directory: str | None) -> int:
    """In pytest's process: merge the sandboxes' data files into the session's
    coverage data (and remove them). Returns how many files were merged."""
    cov = _current()
    if cov is None or directory is None:
        return 0
    files = glob.glob(os.path.join(directory, ".coverage.*"))
    if files:
        cov.combine(data_paths=files, keep=False)
    return len(files)
