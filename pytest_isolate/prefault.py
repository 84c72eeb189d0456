"""Copy ahead the pages a test process is going to write.

A sandbox is a fork of pytest: every page of pytest's memory it writes (and
CPython writes on every object it touches, if only its reference count) is
copied at that moment, one page fault at a time. Measured here, those faults
are most of what a forked test costs beyond plain pytest, and they fall on
the critical path: between "go" and the test's first line.

The pages a test process writes are nearly the same from one test to the
next (pytest's hooks, fixtures and report machinery), so pytest's process
learns them from a finished sandbox (``written_ranges``: the pages of its
private writable mappings that the sandbox no longer shares with pytest,
from /proc/<pid>/pagemap), and the next prepared sandbox copies them in one
``madvise(MADV_POPULATE_WRITE)`` per range while it waits for "go"
(``populate``). Populating a private mapping for writing breaks copy-on-write
without changing a byte, so nothing the test sees changes; only when the
copying happens. Nothing here imports pytest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["MADV_POPULATE_WRITE", "populate", "private_writable_mappings", "written_ranges"]

#: madvise advice (Linux 5.14+): fault pages in writable, breaking copy-on-write.
MADV_POPULATE_WRITE = 23
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PRESENT = 1 << 63
_EXCLUSIVE = 1 << 56
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

Ranges = tuple[tuple[int, int], ...]
#: Last byte of a pagemap entry -> b"w" when present and exclusive, else b".".
_WRITTEN = bytes(ord("w") if byte & 0x81 == 0x81 else ord(".") for byte in range(256))
_RUN = re.compile(b"w+")
_TOP = 7 if sys.byteorder == "little" else 0


def private_writable_mappings(pid: int | str = "self") -> list[tuple[int, int]]:
    """(start, end) of the private writable mappings: heap, anonymous memory,
    libraries' data."""
    result = []
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 5 or fields[1][:2] != b"rw" or fields[1][3:4] != b"p":
                continue
            name = fields[5].strip() if len(fields) == 6 else b""
            if name.startswith(b"[") and name != b"[heap]":
                continue  # the stack (grows on its own), the kernel's pages
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            result.append((start, end))
    return result


def written_ranges(pid: int, mappings: Sequence[tuple[int, int]], max_pages: int = 4096) -> Ranges:
    """The pages of ``mappings`` (pytest's own) that process ``pid``, a fork of
    pytest, has written: present and no longer shared. Merged into ranges;
    at most ``max_pages`` pages. Empty when the kernel does not tell."""
    ranges: list[tuple[int, int]] = []
    taken = 0
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ()
    try:
        for start, end in mappings:
            first = start // _PAGE
            count = (end - start) // _PAGE
            try:
                raw = os.pread(fd, count * 8, first * 8)
            except OSError:
                continue
            # Bits 63 (present) and 56 (exclusively mapped) are both in the
            # most significant byte of each entry: one byte per page, then
            # runs of written pages found by the regex engine, not a loop.
            flags = raw[_TOP::8].translate(_WRITTEN)
            for match in _RUN.finditer(flags):
                pages = min(match.end() - match.start(), max_pages - taken)
                ranges.append(((first + match.start()) * _PAGE, pages * _PAGE))
                taken += pages
                if taken >= max_pages:
                    return tuple(ranges)
    finally:
        os.close(fd)
    return tuple(ranges)


def populate(
    ranges: Ranges, stop: Callable[[], bool] = lambda: False, chunk: int = 64 * 4096
) -> None:
    """Copy these pages into this process now (each range that is still a
    private writable mapping; others, and old kernels, are skipped), a chunk
    at a time, until done or ``stop()`` says the time for it is over."""
    for first, length in ranges:
        for start in range(first, first + length, chunk):
            if stop():
                return
            size = min(chunk, first + length - start)
            no_advice = (
                _libc.madvise(start, size, MADV_POPULATE_WRITE) != 0
                and ctypes.get_errno() == errno.EINVAL
            )
            if no_advice:  # a kernel before 5.14: nothing to do here
                return
