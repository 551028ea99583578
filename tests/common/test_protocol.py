"""Every protocol message round-trips; malformed frames raise ProtocolError and never reach handlers."""
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol as P
from common.limits import MAX_MESSAGE_BYTES, PROTOCOL_HEADER

SAMPLES = [
    P.Hello("w1", "0xabc", 2, {"runtimes": ["blender"], "devices": [{"type": "CPU"}]}, [[1, 2]], "0.1.0"),
    P.Ready(2), P.Heartbeat([[3, 1]]), P.Heartbeat(),
    P.Progress(7, 1, 3, 8, "frame 3"),
    P.Result(7, 1, [{"frame": 1, "sha256": "a" * 64, "size": 10, "name": "frame_0001.png", "seconds": 0.5}], 0.5),
    P.Failed(7, 2, "no camera", False), P.BlobGet("b" * 64, 0, 262144),
    P.BlobPut("c" * 64, 0, 3, b"abc"), P.Bye("shutdown"),
    P.Welcome("w1", 1.0, 3, 262144, 8),
    P.Task(7, 1, 3, 30.0, "render", {"frames": [1, 2], "settings": {"format": "PNG"}}, ["d" * 64]),
    P.Cancel(7, 1, "job canceled"), P.Blob("e" * 64, 0, 3, b"xyz"), P.Blob("e" * 64, 0, 0, b"", "unknown blob"),
    P.BlobAck("f" * 64, 3, True), P.Ack(7, 1, False, "stale"), P.Disconnect("reconnect"), P.Error("bad"),
    P.Hello("w2", "", 1, {"runtimes": []}, enroll_token="rhe_token"),
    P.Release(7, 1, "outside the schedule 22:00-08:00"), P.Price("0.01", "reference second of measured work"),
    P.Earned(3, "12300000000000000", "0.0123", 1.23, 4, 0.2, 1, "0.01"),
    P.TicketGet("a" * 64), P.Ticket("a" * 64, "tK3_x", bytes(32), 1 << 30, 5556),
    P.Ticket("a" * 64, "", b"", 0, 0, "fetch it with BLOB_GET"),
]


def test_every_message_type_is_covered():
    assert {type(m) for m in SAMPLES} == set(P.MESSAGES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = P.encode(msg)
    assert frames[0] == PROTOCOL_HEADER and len(frames) == 3
    assert P.decode(frames) == msg


def _frames(cmd: int, body) -> list[bytes]:
    return [PROTOCOL_HEADER, bytes([cmd]), msgpack.packb(body, use_bin_type=True)]


@pytest.mark.parametrize("frames, why", [
    ([PROTOCOL_HEADER, b"\x02"], "expected 3 frames"),
    ([b"RHIVE/0", b"\x02", msgpack.packb({"free_slots": 1})], "upgrade the worker"),
    ([PROTOCOL_HEADER, b"\x7f", msgpack.packb({})], "unknown command"),
    ([PROTOCOL_HEADER, b"\x02\x02", msgpack.packb({})], "unknown command"),
    ([PROTOCOL_HEADER, b"\x02", b"\xc1garbage"], "not valid msgpack"),
    ([PROTOCOL_HEADER, b"\x02", msgpack.packb([1, 2])], "must be a map"),
    (_frames(0x02, {}), "missing field"),
    (_frames(0x02, {"free_slots": "1"}), "expected int"),
    (_frames(0x02, {"free_slots": True}), "expected int"),
    (_frames(0x02, {"free_slots": 1, "extra": 2}), "unknown fields"),
    (_frames(0x02, {"free_slots": 2**64 - 1}), "expected int"),
    (_frames(0x05, {"task_id": 1, "attempt": 1, "outputs": {"a": 1}, "render_seconds": 1.0}), "expected a list"),
    (_frames(0x01, {"worker_id": "w", "wallet": "", "slots": 1, "capabilities": {1: 2}}), "key"),
    ([PROTOCOL_HEADER, b"\x08", b"\x00" * (MAX_MESSAGE_BYTES + 1)], "byte limit"),
    # a declared length far beyond the bytes present (a 4 GiB bin header)
    ([PROTOCOL_HEADER, b"\x08", b"\x84\xa6sha256\xc6\xff\xff\xff\xff"], "not valid msgpack"),
    # a truncated valid message
    ([PROTOCOL_HEADER, b"\x05", P.encode(SAMPLES[5])[2][:-5]], "not valid msgpack"),
])
def test_malformed_frames_are_rejected(frames, why):
    with pytest.raises(P.ProtocolError, match=why):
        P.decode(frames)


def test_encode_refuses_non_messages():
    with pytest.raises(P.ProtocolError):
        P.encode({"free_slots": 1})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_never_raise_anything_but_protocol_error(frames):
    try:
        P.decode(frames)
    except P.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(P.MESSAGES)), st.dictionaries(st.text(max_size=12), st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8), st.booleans(), st.none(), st.floats(allow_nan=False),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3)), max_size=6))
def test_random_bodies_never_raise_anything_but_protocol_error(cmd, body):
    try:
        P.decode(_frames(cmd, body))
    except P.ProtocolError:
        pass


def test_blob_chunks_may_be_bigger_than_other_bodies_and_no_bigger_than_their_own_limit():
    """BLOB (coordinator → worker) carries download chunks of BLOB_CHUNK_SIZE; every other body, BLOB_PUT's
    upload chunks included, stays within MAX_MESSAGE_BYTES (what the coordinator receives)."""
    from common import limits as L
    assert L.MAX_MESSAGE_BYTES < L.MAX_BLOB_MESSAGE_BYTES and L.UPLOAD_CHUNK_SIZE < L.MAX_MESSAGE_BYTES
    chunk = os.urandom(L.BLOB_CHUNK_SIZE)
    assert P.decode(P.encode(P.Blob("a" * 64, 0, len(chunk), chunk))).data == chunk
    with pytest.raises(P.ProtocolError, match="byte limit"):
        P.decode([PROTOCOL_HEADER, bytes([P.Blob.command]), b"\x00" * (L.MAX_BLOB_MESSAGE_BYTES + 1)])
    with pytest.raises(P.ProtocolError, match="byte limit"):
        P.decode(P.encode(P.BlobPut("a" * 64, 0, len(chunk), chunk)))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70), st.integers(-(2**64), 2**64), st.integers(0, 2**64), st.binary(max_size=3000),
       st.text(max_size=300), st.integers(0, 400), st.integers(0, 255))
def test_a_blob_received_without_a_copy_decodes_as_from_bytes(sha, offset, total, data, error, at, byte):
    """The worker receives frames without a copy (zmq.Frame, here a bytearray) and a BLOB's chunk stays a
    view of them: decoded so, every body (also a corrupted one) means the same as decoded from bytes."""
    def dec(frames):
        try:
            m = P.decode(frames)
        except P.ProtocolError as exc:
            return ("error", str(exc).split(":")[0])
        return (type(m).__name__, *(bytes(v) if isinstance(v, memoryview) else v for v in vars(m).values()))
    try:
        frames = P.encode(P.Blob(sha, offset, total, data, error))
    except (OverflowError, ValueError):
        return  # msgpack cannot pack the int: nothing to receive
    bodies = [frames[2]]
    if frames[2]:
        corrupt = bytearray(frames[2])
        corrupt[at % len(corrupt)] = byte
        bodies += [bytes(corrupt), frames[2][:at % len(frames[2])]]
    for body in bodies:
        plain = dec([frames[0], frames[1], body])
        viewed = dec([bytearray(frames[0]), bytearray(frames[1]), bytearray(body)])
        assert viewed == plain or (viewed[0] == plain[0] == "error")
    m = P.decode([bytearray(f) for f in frames]) if dec(frames)[0] == "Blob" else None
    if m is not None and offset >= 0:
        assert type(m.data) is memoryview, "the chunk is a view of the received frame, not a copy"
