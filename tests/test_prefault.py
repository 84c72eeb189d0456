"""Copying ahead the pages a test process writes (prefault.py), against the
real kernel: the pages a fork wrote are found, populating them breaks
copy-on-write without changing a byte, and it stops when told to."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Iterable, Iterator

import pytest
from conftest import requires

from pytest_isolate.prefault import populate, private_writable_mappings, written_ranges

PAGE = os.sysconf("SC_PAGE_SIZE")


def _buffer(pages: int) -> tuple[ctypes.Array[ctypes.c_char], int]:
    buf = ctypes.create_string_buffer(pages * PAGE + PAGE)
    start = (ctypes.addressof(buf) + PAGE - 1) // PAGE * PAGE  # page aligned
    for page in range(pages):
        ctypes.memset(start + page * PAGE, 7, PAGE)  # present and ours before the fork
    return buf, start


def _written_in(ranges: tuple[tuple[int, int], ...], start: int, pages: int) -> set[int]:
    found = set()
    for first, length in ranges:
        for addr in range(first, first + length, PAGE):
            if start <= addr < start + pages * PAGE:
                found.add((addr - start) // PAGE)
    return found


@contextlib.contextmanager
def _fork_that_wrote(start: int, pages: Iterable[int]) -> Iterator[int]:
    """A fork that wrote one byte of each of ``pages`` (counted from
    ``start``) and waits, alive, until the block ends."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        for page in pages:
            ctypes.memset(start + page * PAGE, 9, 1)
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    try:
        os.read(ready_r, 1)
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_the_pages_a_fork_wrote_are_found_and_no_others() -> None:
    buf, start = _buffer(64)
    with _fork_that_wrote(start, (3, 4, 5, 40)) as pid:
        ranges = written_ranges(pid, private_writable_mappings())
    assert _written_in(ranges, start, 64) == {3, 4, 5, 40}
    del buf


def test_the_learned_set_is_capped() -> None:
    buf, start = _buffer(256)
    with _fork_that_wrote(start, range(256)) as pid:
        ranges = written_ranges(pid, [(start, start + 256 * PAGE)], max_pages=100)
    assert sum(length for _, length in ranges) // PAGE == 100
    del buf


def test_a_process_that_is_gone_yields_nothing() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)
    assert written_ranges(pid, private_writable_mappings()) == ()


@requires("root")
def test_populating_copies_the_pages_without_changing_them() -> None:
    """After populate(), writing the pages takes no more faults, and the
    parent's and the child's contents are what each wrote."""
    pages = 128
    buf, start = _buffer(pages)
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        populate(((start, pages * PAGE),))
        unchanged = ctypes.string_at(start, pages * PAGE) == b"\x07" * (pages * PAGE)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for page in range(pages):
            ctypes.memset(start + page * PAGE, 1, 1)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        os.write(result_w, f"{int(unchanged)} {faults}".encode())
        os._exit(0)
    os.close(result_w)
    unchanged, faults = os.read(result_r, 100).split()
    os.waitpid(pid, 0)
    os.close(result_r)
    assert unchanged == b"1"
    assert int(faults) < pages // 4  # copied ahead: not one fault per page
    assert ctypes.string_at(start, pages * PAGE) == b"\x07" * (pages * PAGE)  # ours untouched
    del buf


def test_populating_stops_when_told() -> None:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    buf, start = _buffer(16)
    populate(((start, 16 * PAGE),), stop=stop, chunk=PAGE)
    assert len(calls) == 3  # two chunks, then stopped
    del buf


@pytest.mark.parametrize("bad", [((0, PAGE),), ((1 << 46, 4 * PAGE),)])
def test_ranges_no_longer_mapped_are_skipped(bad: tuple[tuple[int, int], ...]) -> None:
    populate(bad)  # no exception, nothing touched
