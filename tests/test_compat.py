"""The pytest internals the engine relies on: each check fails loudly when a
pytest release changes one (see pytest_isolate/_pytest_compat.py)."""

from __future__ import annotations

import inspect

import _pytest.runner
import pytest
from _pytest.capture import CaptureManager, FDCapture, MultiCapture
from _pytest.config import PytestPluginManager
from _pytest.fixtures import FixtureDef, TopRequest
from _pytest.runner import SetupState

_SUBTESTS_ARE_PYTESTS = pytest.mark.skipif(
    int(pytest.__version__.split(".")[0]) < 9, reason="subtests are pytest 9's own"
)


def test_setup_state_keeps_a_stack_of_nodes_with_finalizers_and_exceptions() -> None:
    state = SetupState()
    assert isinstance(state.stack, dict)
    assert {"setup", "teardown_exact", "addfinalizer"} <= set(dir(state))
    assert list(inspect.signature(state.teardown_exact).parameters) == ["nextitem"]


def test_fixture_defs_cache_their_value_and_key() -> None:
    assert "cached_result" in inspect.getsource(FixtureDef)
    assert hasattr(TopRequest, "getfixturevalue") and hasattr(TopRequest, "_fillfixtures")


def test_capture_files_are_reachable_through_the_global_capture() -> None:
    assert "_global_capturing" in inspect.getsource(CaptureManager.__init__)
    assert {"out", "err"} <= set(inspect.signature(MultiCapture.__init__).parameters)
    source = inspect.getsource(FDCapture.__init__)
    assert "self.tmpfile" in source and "self.targetfd" in source


def test_the_runner_looks_up_runtestprotocol_in_its_module() -> None:
    source = inspect.getsource(_pytest.runner.pytest_runtest_protocol)
    assert "runtestprotocol(item, nextitem=nextitem)" in source
    assert "call_and_report" in dir(_pytest.runner)


def test_the_warning_capture_is_the_configured_filters_then_the_items_marks() -> None:
    """record_warnings: pytest 9 applies the configured filters in
    Config._catch_configured_warnings, which catch_warnings_for_item wraps
    before applying the item's filterwarnings marks with parse_warning_filter;
    before pytest 9, catch_warnings_for_item does it all."""
    import _pytest.warnings
    from _pytest.config import Config, parse_warning_filter

    source = inspect.getsource(_pytest.warnings.catch_warnings_for_item)
    assert 'iter_markers(name="filterwarnings")' in source
    assert callable(parse_warning_filter)
    if int(pytest.__version__.split(".")[0]) >= 9:
        assert "_catch_configured_warnings(record=record)" in source
        configured = inspect.getsource(Config._catch_configured_warnings)
        assert "apply_warning_filters" in configured and "yield log" in configured


def test_the_temp_path_factory_hangs_off_the_config(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_x(request):
            assert request.config._tmp_path_factory.getbasetemp().is_dir()
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_the_installed_protocol_is_removed_at_the_end_of_a_session(
    pytester: pytest.Pytester,
) -> None:
    original = _pytest.runner.runtestprotocol
    pytester.makepyfile("def test_x(): pass")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert _pytest.runner.runtestprotocol is original


def test_a_hook_caller_can_drop_one_plugins_implementation() -> None:
    """child._log_reports_at_home: in a sandbox, only the forwarder logs."""
    hook = PytestPluginManager().hook
    assert callable(getattr(hook.pytest_runtest_logreport, "_remove_plugin", None))


@_SUBTESTS_ARE_PYTESTS
def test_subtests_count_failures_in_the_stash_and_repr_their_values() -> None:
    import _pytest.subtests
    from _pytest.subtests import SubtestContext, failed_subtests_key

    assert "failed_subtests[self.request.node.id] += 1" in inspect.getsource(_pytest.subtests)
    assert isinstance(failed_subtests_key, pytest.StashKey)
    assert SubtestContext(msg=None, kwargs={"i": 1}).kwargs == {"i": "1"}
