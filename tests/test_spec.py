"""Spec parsing: every bad value names the source, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_isolate.spec import (
    Bind,
    SpecError,
    default_values,
    format_size,
    parse_size,
    resolve_spec,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100M", 100 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("512k", 512 * 1024),
        ("256mb", 256 * 2**20),
        ("1GiB", 2**30),
        (4096, 4096),
        ("2048", 2048),
    ],
)
def test_sizes_accept_bytes_and_binary_suffixes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1X", "", "-5M", "M", "0", True, "1.5.5G"])
def test_bad_sizes_name_the_value_and_the_fix(text: object) -> None:
    with pytest.raises(SpecError, match="size"):
        parse_size(text)


def test_format_size_is_readable() -> None:
    assert format_size(100 * 2**20) == "100.0 MiB"
    assert format_size(512) == "512 B"


def _resolve(*markers: tuple[tuple[object, ...], dict[str, object]], **base: object):
    values = default_values()
    values.update(base)
    return resolve_spec(base=values, marker_layers=list(markers), where="t.py::test_x")


def test_nearest_marker_wins_per_option() -> None:
    spec = _resolve(((), {"memory": "100M"}), ((), {"memory": "1G", "pids": 10}))
    assert spec.enabled and spec.memory == 100 * 2**20 and spec.pids == 10


def test_marker_overrides_command_line_and_positional_false_disables() -> None:
    assert _resolve(((), {"memory": "1M"}), memory=2**30, enabled=True).memory == 2**20
    assert not _resolve(((False,), {}), enabled=True).enabled


def test_bad_marker_value_names_marker_test_value_and_fix() -> None:
    with pytest.raises(SpecError) as info:
        _resolve(((), {"memory": "1X"}))
    assert str(info.value) == (
        "isolated(memory='1X') in t.py::test_x: invalid size '1X'; use bytes or a K/M/G "
        "suffix, e.g. '256M'"
    )


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(SpecError, match=r"unknown option 'memroy'; valid options: .*memory"):
        _resolve(((), {"memroy": "1M"}))


def test_positional_arguments_other_than_a_bool_are_refused() -> None:
    with pytest.raises(SpecError, match="only positional argument is True or False"):
        _resolve((("100M",), {}))


def test_binds_parse_modes_and_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = _resolve(((), {"binds": ["/data:/mnt/data:rw", "/etc/hosts"]}))
    assert spec.binds == (Bind("/data", "/mnt/data", True), Bind("/etc/hosts", "/etc/hosts"))
    # HOST:MODE, the container path the same; a relative host path is below
    # pytest's working directory.
    monkeypatch.chdir(tmp_path)
    spec = _resolve(((), {"binds": ["/out:rw", ".hypothesis:rw", "data:/x", "/in:ro"]}))
    here = str(tmp_path)
    assert spec.binds == (
        Bind("/out", "/out", True),
        Bind(f"{here}/.hypothesis", f"{here}/.hypothesis", True),
        Bind(f"{here}/data", "/x"),
        Bind("/in", "/in"),
    )
    monkeypatch.setenv("HOME", "/home/someone")
    spec = _resolve(((), {"binds": ["~/.cache:rw"]}))
    assert spec.binds == (Bind("/home/someone/.cache", "/home/someone/.cache", True),)
    with pytest.raises(SpecError, match="container path 'x' must be absolute"):
        _resolve(((), {"binds": ["/data:x"]}))
    with pytest.raises(SpecError, match="no host path"):
        _resolve(((), {"binds": [":/x"]}))
    with pytest.raises(SpecError, match="use 'HOST', 'HOST:ro'"):
        _resolve(((), {"binds": ["/a:/b:rx"]}))


def test_strict_from_command_line_is_a_ceiling_for_markers() -> None:
    with pytest.raises(SpecError, match=r"strict mode .* forbids a marker to loosen 'memory'"):
        _resolve(((), {"memory": "1G"}), strict=True, memory=100 * 2**20)
    with pytest.raises(SpecError, match="does not let a marker turn isolation off"):
        _resolve(((False,), {}), strict=True, enabled=True)
    tighter = _resolve(((), {"memory": "10M"}), strict=True, memory=100 * 2**20)
    assert tighter.memory == 10 * 2**20 and tighter.caps_drop == ("ALL",)


def test_layers_must_keep_their_prerequisites() -> None:
    with pytest.raises(SpecError, match="'rootfs' requires layer 'namespaces'"):
        _resolve(((), {"layers": "rootfs"}))
