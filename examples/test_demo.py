"""A demonstration suite: run it with ``pytest examples/ -v --isolate``.

Three tests, three outcomes a reader should recognise:

- ``test_passes`` passes, exactly as without isolation;
- ``test_fails_with_assertion`` fails with pytest's normal assertion message;
- ``test_exceeds_memory_limit`` allocates 300 MB under a 100 MB limit and is
  killed by the kernel's OOM killer inside its own cgroup: pytest survives and
  reports the test as failed, naming the limit it broke.
"""

from __future__ import annotations

import socket

import pytest


def test_passes() -> None:
    # Inside the sandbox: its own hostname, no network but loopback, / read-only.
    assert socket.gethostname() == "isolated"
    with pytest.raises(OSError):
        open("/etc/hostname-was-here", "w")  # noqa: SIM115 - the open itself must fail


def test_fails_with_assertion() -> None:
    answer = 6 * 7
    assert answer == 43, "the demonstration expects this assertion to fail"


@pytest.mark.isolated(memory="100M")
def test_exceeds_memory_limit() -> None:
    # 300 MB, touched page by page so the memory is really charged to the cgroup.
    hog = bytearray(300 * 1024 * 1024)
    for offset in range(0, len(hog), 4096):
        hog[offset] = 1
    pytest.fail(f"allocated {len(hog)} bytes under a 100M limit: no limit was in force")
