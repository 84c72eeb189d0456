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

__all__ = [
    "combine_into_session",
    "prepare_dir",
    "start_in_sandbox",
    "start_in_zygote",
    "stop_in_sandbox",
]

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


#: In a zygote: the measurement it started for its test processes
#: (start_in_zygote), which each of them inherits, running.
_inherited: Any = None


def start_in_zygote(directory: str | None) -> None:
    """In a zygote, once, before its first fork: start_in_sandbox's work,
    done there rather than in every test process. Making a Coverage object
    and starting it (its configuration, its source matchers, the data file)
    cost about 20 ms a test. Each test process inherits the running tracer
    and saves to a data file of its own: coverage's data starts a new file
    when it finds its process id changed (a fork), with the suffix of the
    new process. What the zygote itself ran of the measured code (nothing,
    unless pytest_isolate is measured) is in every test's data: it ran."""
    global _inherited
    if _inherited is None:
        _inherited = start_in_sandbox(directory)


def start_in_sandbox(directory: str | None) -> Any:
    """In the sandbox: stop the inherited tracer (its data belongs to pytest's
    process) and measure with the same configuration into ``directory``;
    in a test process of a zygote, the measurement it inherited, running."""
    if _inherited is not None:
        return _inherited
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
    _share_decisions(parent, child)
    return child


def _share_decisions(parent: Any, child: Any) -> None:
    """The new tracer starts with no decision about which files to measure,
    and the first call into each file of the process asks coverage's
    matchers again (path normalisation and matching). pytest's process has
    decided for every file it ran, with the same configuration: those
    decisions are given to the new tracer (``Collector.should_trace_cache``,
    coverage's own cache; left alone where a version has none)."""
    try:
        decided = parent._collector.should_trace_cache
        cache = child._collector.should_trace_cache
    except AttributeError:
        return
    if isinstance(decided, dict) and isinstance(cache, dict):
        for name, disposition in decided.items():
            cache.setdefault(name, disposition)


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
