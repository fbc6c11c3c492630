"""The wire codec: round trips, and every kind of bad bytes refused with a CodecError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from inferq.broker.codec import Limits, decode_tensor, decode_tensor_map, encode_tensor, packb, unpackb
from inferq.broker.messages import ALIAS_HEADER, JobEvent, JobRequest, alias_from_headers, pack_events, unpack_events
from inferq.errors import CodecError, MessageTooLarge


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "int64", "uint8", "bool"])
def test_tensor_round_trips_bit_exact(dtype: str) -> None:
    array = (np.random.default_rng(1).standard_normal((3, 4, 5)) * 10).astype(dtype)
    back = decode_tensor(unpackb(packb(encode_tensor(array))))
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array)


def test_big_endian_and_strided_arrays_are_sent_as_little_endian_c_order() -> None:
    array = np.arange(12, dtype=">f4").reshape(3, 4).T
    back = decode_tensor(unpackb(packb(encode_tensor(array))))
    assert np.array_equal(back, array) and back.dtype.byteorder in "<="


@pytest.mark.parametrize(
    "tensor, message",
    [
        ({"dtype": "object", "shape": [1], "data": b"x" * 8}, "not allowed"),
        ({"dtype": "float32", "shape": [2], "data": b"x" * 4}, "expected 8"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "non-negative"),
        ({"dtype": "float32", "shape": "2", "data": b"xxxxxxxx"}, "shape"),
        ({"dtype": "float32", "shape": [2], "data": "text"}, "raw bytes"),
        ({"dtype": "float32", "shape": [2]}, "exactly dtype, shape and data"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"xxxx"}, "at most 8"),
    ],
)
def test_malformed_tensors_are_refused_with_a_reason(tensor: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_tensor(unpackb(packb(tensor)))


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",                                   # never-used byte
        b"\xdd\xff\xff\xff\xff",                    # array declaring 4 billion items
        b"\xdb\xff\xff\xff\xff",                    # str declaring 4 GiB
        b"\x91" * 100_000 + b"\xc0",                # 100k nested arrays
        msgpack.packb({1: 2}),                      # non-string map key
        msgpack.packb(msgpack.ExtType(1, b"x")),    # extension types (how pickle-ish payloads would arrive)
        msgpack.packb([1]) + b"\x00",               # trailing garbage
    ],
)
def test_msgpack_bombs_and_garbage_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        unpackb(data)


def test_message_over_the_size_limit_is_refused_before_parsing() -> None:
    with pytest.raises(MessageTooLarge):
        unpackb(packb({"a": b"x" * 2000}), Limits(max_message_bytes=1000))


def test_tensor_map_must_name_tensors() -> None:
    with pytest.raises(CodecError):
        decode_tensor_map({})
    with pytest.raises(CodecError):
        decode_tensor_map([encode_tensor(np.zeros(1, np.float32))])


def test_ledger_messages_carry_several_events() -> None:
    events = [JobEvent("a", "queued", "mlp", "1"), JobEvent("b", "failed", error={"code": "x", "message": "y"})]
    assert unpack_events(pack_events(events)) == (events, 0)
    with pytest.raises(CodecError):
        unpack_events(packb({"job_id": "a"}))


def test_a_malformed_event_spoils_no_other_event_of_its_message() -> None:
    good = JobEvent("a", "succeeded", "mlp", "1", ts=5.0)
    wire = [{"job_id": "x", "status": "exploded", "ts": 1.0}, {"job_id": "y", "status": "queued", "ts": "a"},
            {"job_id": "z", "status": "queued", "ts": 1.0, "model": 7}, dict(good.to_wire(), added_by_a_newer_worker=1)]
    assert unpack_events(packb(wire)) == ([good], 3)


def test_a_jobs_routing_alias_travels_in_its_headers_and_a_forged_one_is_dropped() -> None:
    message = JobRequest("j1", {"x": np.zeros((1, 2), np.float32)}, alias="canary").to_message()
    assert message.headers[ALIAS_HEADER] == "canary"
    assert alias_from_headers(message.headers) == "canary"
    assert ALIAS_HEADER not in JobRequest("j2", {"x": np.zeros((1, 2), np.float32)}).to_message().headers
    for forged in ("", "Canary", "x" * 40, "a b", 7, None, ["canary"]):
        assert alias_from_headers({ALIAS_HEADER: forged}) is None, forged
