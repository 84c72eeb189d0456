"""The framing between sandbox and pytest rejects garbage, truncation and floods."""

from __future__ import annotations

import os
import struct

import pytest

from pytest_isolate.protocol import (
    FrameReader,
    ProtocolError,
    encode_frame,
    send_message,
)


def test_frames_round_trip_through_a_pipe_in_pieces() -> None:
    r, w = os.pipe()
    send_message(w, "report", {"a": [1, 2]})
    send_message(w, "done", {})
    os.close(w)
    data = os.read(r, 1 << 16)
    os.close(r)
    reader = FrameReader()
    messages = []
    for i in range(len(data)):  # one byte at a time: frames span reads
        messages.extend(reader.feed(data[i:i + 1]))
    reader.finish()
    assert [(m.type, m.payload) for m in messages] == [("report", {"a": [1, 2]}), ("done", {})]


@pytest.mark.parametrize(("body", "reason"), [
    (b"not json at all", "not valid JSON"),
    (b'"a string"', "exactly 'type' and 'payload'"),
    (b'{"type": "report"}', "exactly 'type' and 'payload'"),
    (b'{"type": "pickle", "payload": 1}', "unknown message type 'pickle'"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_garbage_frames_are_rejected_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        list(FrameReader().feed(struct.pack(">I", len(body)) + body))


def test_an_oversized_frame_is_rejected_before_it_is_buffered() -> None:
    reader = FrameReader(max_frame=1024)
    with pytest.raises(ProtocolError, match="announced a frame of 4294967295 bytes"):
        list(reader.feed(b"\xff\xff\xff\xff"))


def test_a_flood_is_cut_at_the_total_bound() -> None:
    reader = FrameReader(max_total=10_000)
    frame = encode_frame("warning", {"message": "x" * 3000})
    with pytest.raises(ProtocolError, match="more than 10000 bytes"):
        for _ in range(10):
            list(reader.feed(frame))


def test_a_truncated_last_frame_is_reported_at_the_end() -> None:
    reader = FrameReader()
    frame = encode_frame("done", {})
    assert list(reader.feed(frame[:-1])) == []
    with pytest.raises(ProtocolError, match="truncated"):
        reader.finish()


def test_encoding_refuses_frames_over_the_bound() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame("report", "x" * (33 * 1024 * 1024))
