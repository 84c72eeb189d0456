"""Frames between the sandbox and pytest: length-prefixed JSON, nothing else.

The child is untrusted. It can write anything into its end of the pipe, so
the reader bounds every frame and the total, accepts only JSON objects of the
shape ``{"type": NAME, "payload": ...}`` with a known NAME, and raises
ProtocolError for anything else; the engine turns that into a failed report.
Never pickle or marshal across this boundary. This module never imports pytest.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_FRAME",
    "MAX_TOTAL",
    "MESSAGE_TYPES",
    "FrameReader",
    "Message",
    "ProtocolError",
    "encode_exit",
    "encode_frame",
    "send_message",
]

_HEADER = struct.Struct(">I")
#: One frame: a report with a large captured output still fits.
MAX_FRAME = 32 * 1024 * 1024
#: Everything one test may send: a flood is cut off here, not in memory.
MAX_TOTAL = 128 * 1024 * 1024

#: Message types a sandbox may send, and who sends them.
MESSAGE_TYPES = frozenset(
    {
        "report",  # test process: one pytest report, pytest_report_to_serializable form
        "logreport",  # test process: a report logged during a phase (a subtest's), same form
        "subtests_failed",  # test process: how many of its subtests failed (pytest 9)
        "suite_properties",  # test process: junitxml suite properties it recorded
        "warning",  # test process: a warning recorded while the test ran
        "done",  # test process: every report was sent
        "setup_failed",  # any sandbox process: a setup step failed (step, error, errno)
        "exit",  # init (pid 1): the test process's wait status
        "session_exit",  # test process: the test called pytest.exit()
        "interrupted",  # test process: the test raised KeyboardInterrupt
        "rerun_state",  # test process: pytest-rerunfailures' state of the attempt
        "allure_written",  # test process: it wrote allure-pytest's result itself
        "kept_reports",  # test process: the reports a makereport wrapper kept on the item
    }
)


class ProtocolError(Exception):
    """The child sent something that is not a valid frame."""


@dataclass(frozen=True)
class Message:
    type: str
    payload: Any


def encode_frame(msg_type: str, payload: Any) -> bytes:
    body = json.dumps(
        {"type": msg_type, "payload": payload}, separators=(",", ":"), default=str
    ).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME} byte bound")
    return _HEADER.pack(len(body)) + body


def encode_exit(status: int) -> bytes:
    """encode_frame("exit", {"status": status}), byte for byte, without the
    json module: pid 1 sends it, and in pid 1 (a fork of pytest) every page
    the json encoder's objects sit on is copied when touched (about 70)."""
    body = b'{"type":"exit","payload":{"status":%d}}' % status
    return _HEADER.pack(len(body)) + body


def send_message(fd: int, msg_type: str, payload: Any) -> None:
    """Write one frame completely (used in the child; loops over short writes)."""
    view = memoryview(encode_frame(msg_type, payload))
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Incremental parser: feed() bytes as they arrive, get validated messages."""

    def __init__(self, max_frame: int = MAX_FRAME, max_total: int = MAX_TOTAL) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._max_total = max_total
        self._total = 0

    def feed(self, data: bytes) -> Iterator[Message]:
        self._total += len(data)
        if self._total > self._max_total:
            raise ProtocolError(f"sent more than {self._max_total} bytes of results")
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max_frame:
                raise ProtocolError(
                    f"announced a frame of {length} bytes, over the {self._max_frame} byte bound"
                )
            if len(self._buf) < _HEADER.size + length:
                return
            body = bytes(self._buf[_HEADER.size : _HEADER.size + length])
            del self._buf[: _HEADER.size + length]
            yield _decode(body)

    def finish(self) -> None:
        """Call at end of stream: leftover bytes mean a truncated frame."""
        if self._buf:
            raise ProtocolError(f"the last frame was truncated ({len(self._buf)} bytes left)")


def _decode(body: bytes) -> Message:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"a frame is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or set(obj) != {"type", "payload"}:
        raise ProtocolError("a frame is not an object with exactly 'type' and 'payload'")
    msg_type = obj["type"]
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    return Message(msg_type, obj["payload"])
