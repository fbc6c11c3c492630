"""Job documents written to the client in pieces, so a large result is never copied into one body.

A document under ``SMALL_BYTES`` goes out as one plain response. A larger one
goes through a ``web.StreamResponse``: msgpack tensors are written as their
headers followed by slices of the result's own bytes, JSON tensors as their
numbers a slice at a time. The bytes are the same as the one-piece forms
(``packb(document)`` and ``json.dumps(document) + "\\n"``), so a client cannot
tell the two apart; only the edge's memory can.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from aiohttp import web

from inferq.broker.codec import decode_tensor_map, packb
from inferq.edge import v2
from inferq.edge.responses import json_response

SMALL_BYTES = 256 * 1024  # below this, one piece is cheaper than a stream
SLICE_BYTES = 1024 * 1024  # msgpack: raw bytes per write
SLICE_ITEMS = 64 * 1024  # JSON: numbers per write (each about 10-20 characters)
MSGPACK = "application/msgpack"
_DATA = "\x00inferq-data-%d\x00"  # stands for a tensor's numbers in the JSON skeleton


def tensor_bytes(outputs: Mapping[str, Any] | None) -> int:
    """The raw bytes of wire tensors (how large the answer will be, roughly)."""
    return sum(len(t.get("data", b"")) for t in (outputs or {}).values() if isinstance(t, Mapping))


async def send_msgpack(request: web.Request, doc: dict[str, Any], headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """``doc`` (wire tensors under "outputs") as msgpack, with ``headers``; streamed when large."""
    if tensor_bytes(doc.get("outputs")) < SMALL_BYTES:
        return web.Response(body=packb(doc), content_type=MSGPACK, headers=headers)
    pieces = list(msgpack_pieces(doc))  # views over the result: no copy of its bytes
    response = web.StreamResponse(headers={**(headers or {}), "Content-Type": MSGPACK})
    response.content_length = sum(len(p) for p in pieces)
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
    await response.write_eof()
    return response


async def send_json(request: web.Request, doc: dict[str, Any], outputs: Mapping[str, Any] | None,
                    headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """``doc`` plus ``outputs`` (wire tensors) as v2 JSON tensors under "outputs", with ``headers``; streamed when large."""
    if not outputs or tensor_bytes(outputs) < SMALL_BYTES:
        if outputs:
            doc = _with_outputs(doc, v2.tensors_to_json(decode_tensor_map(dict(outputs), what="outputs")))
        return json_response(doc, headers=headers)
    arrays = decode_tensor_map(dict(outputs), what="outputs")
    skeleton = [v2.tensors_to_json({name: np.empty(0, array.dtype)})[0] | {"data": _DATA % i}
                for i, (name, array) in enumerate(arrays.items())]
    for header, array in zip(skeleton, arrays.values()):
        header["shape"] = list(array.shape)
    response = web.StreamResponse(headers={**(headers or {}), "Content-Type": "application/json; charset=utf-8"})
    await response.prepare(request)
    text = json.dumps(_with_outputs(doc, skeleton)) + "\n"
    for i, array in enumerate(arrays.values()):
        head, text = text.split(json.dumps(_DATA % i), 1)
        await response.write(head.encode())
        for piece in json_numbers(array):
            await response.write(piece)
    await response.write(text.encode())
    await response.write_eof()
    return response


def _with_outputs(doc: dict[str, Any], outputs: Any) -> dict[str, Any]:
    """``doc`` with "outputs" where the one-piece document has it: after "attempts"."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out[key] = value
        if key == "attempts":
            out["outputs"] = outputs
    return out


def msgpack_pieces(obj: Any) -> Iterator[bytes | memoryview]:
    """``packb(obj)`` in pieces; raw tensor bytes come as slices of the original buffers."""
    if isinstance(obj, Mapping):
        yield _map_header(len(obj))
        for key, value in obj.items():
            yield packb(key)
            yield from msgpack_pieces(value)
    elif isinstance(obj, (bytes, bytearray, memoryview)) and len(obj) >= SLICE_BYTES:
        view = memoryview(obj).cast("B")
        yield _bin_header(len(view))
        for start in range(0, len(view), SLICE_BYTES):
            yield view[start:start + SLICE_BYTES]
    else:
        yield packb(obj)


def json_numbers(array: np.ndarray) -> Iterator[bytes]:
    """``json.dumps(array.reshape(-1).tolist())`` in pieces."""
    flat = array.reshape(-1)
    yield b"["
    for start in range(0, len(flat), SLICE_ITEMS):
        part = json.dumps(flat[start:start + SLICE_ITEMS].tolist())[1:-1]
        yield (part if start == 0 else ", " + part).encode()
    yield b"]"


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 65536 else b"\xdf" + struct.pack(">I", n)


def _bin_header(n: int) -> bytes:
    if n < 256:
        return b"\xc4" + bytes([n])
    return b"\xc5" + struct.pack(">H", n) if n < 65536 else b"\xc6" + struct.pack(">I", n)
