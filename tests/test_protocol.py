"""The framing between sandbox and pytest rejects garbage, truncation and floods."""

from __future__ import annotations

import os
import struct

import pytest

from pytest_isolate.protocol import (
    FrameReader,
    Message,
    ProtocolError,
    encode_exit,
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
        messages.extend(reader.feed(data[i : i + 1]))
    reader.finish()
    assert [(m.type, m.payload) for m in messages] == [("report", {"a": [1, 2]}), ("done", {})]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json at all", "not valid JSON"),
        (b'"a string"', "exactly 'type' and 'payload'"),
        (b'{"type": "report"}', "exactly 'type' and 'payload'"),
        (b'{"type": "pickle", "payload": 1}', "unknown message type 'pickle'"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
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


def test_the_init_factory_is_sent_json_that_names_every_plan_field() -> None:
    """The factory runs as root outside every sandbox: what it is sent is
    decoded as data (no pickle), and a field added to the root's plan must be
    added to its encoding too (or this fails)."""
    import dataclasses
    import json

    from pytest_isolate import initd
    from pytest_isolate.rootfs import Op, RootfsPlan

    plan = RootfsPlan(
        staging="/tmp/x/root",
        cwd="/w",
        rootless=False,
        cgroup2=True,
        ops=(Op("bind", "/usr", "/usr"), Op("tmpfs", "/tmp", writable=True, size=1 << 20)),
    )
    encoded = json.loads(initd._encode_setup((plan, "box", True, True)))[0]
    assert set(encoded) == {f.name for f in dataclasses.fields(RootfsPlan)}
    assert all(set(op) == {f.name for f in dataclasses.fields(Op)} for op in encoded["ops"])
    for setup in ((plan, "box", True, False), (None, "isolated", False, True)):
        data = initd._encode_setup(setup)
        assert data.startswith(b"[")  # JSON
        assert initd._decode_setup(data) == setup
    with pytest.raises((TypeError, ValueError, KeyError)):
        initd._decode_setup(b'[{"ops": [], "evil": 1}, "h", true, true]')


@pytest.mark.parametrize("status", [0, 9, 137, 256, 65280, 2**31 - 1])
def test_encode_exit_is_encode_frame_byte_for_byte(status: int) -> None:
    frame = encode_exit(status)
    assert frame == encode_frame("exit", {"status": status})
    assert list(FrameReader().feed(frame)) == [Message("exit", {"status": status})]
