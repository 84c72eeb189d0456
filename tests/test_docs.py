"""The docs name every option with its three spellings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_isolate.spec import OPTIONS

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_option_is_documented_with_its_three_spellings(option: object) -> None:
    text = (DOCS / "options.md").read_text()
    assert f"`{option.name}`" in text  # type: ignore[attr-defined]
    assert f"`{option.cli}=" in text  # type: ignore[attr-defined]
    assert f"`{option.ini}`" in text  # type: ignore[attr-defined]
