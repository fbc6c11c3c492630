"""msgpack on the wire, with tensors as ``{"dtype", "shape", "data"}``.

``data`` is the raw little-endian bytes of a C-ordered array. Unpacking is
bounded (sizes, counts, nesting), accepts string map keys only and no msgpack
extension types, and allows numeric and bool dtypes only: no object arrays,
no pickle, ever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from inferq.errors import CodecError, MessageTooLarge

# numpy refuses shapes whose non-zero dims multiply past its index range, even
# for empty arrays; a real tensor is smaller than the message that carries it.
MAX_SHAPE_SPAN = 2**40
DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()
)
MAX_RANK = 8


@dataclass(frozen=True)
class Limits:
    """Bounds applied while unpacking untrusted bytes."""

    max_message_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 64
    max_str_len: int = 64 * 1024
    max_array_len: int = 1024 * 1024
    max_map_len: int = 4096


DEFAULT_LIMITS = Limits()


def _no_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not allowed")


def packb(obj: Any) -> bytes:
    """Serialise ``obj`` (maps, lists, str, bytes, numbers) with msgpack."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Deserialise untrusted msgpack ``data`` within ``limits``."""
    if len(data) > limits.max_message_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes is over the {limits.max_message_bytes} byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_message_bytes,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except CodecError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise CodecError(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from exc


def check_dtype(name: str) -> np.dtype:
    """Return the numpy dtype for a wire dtype name, refusing anything non-numeric."""
    if not isinstance(name, str) or name not in DTYPES:
        raise CodecError(f"dtype {name!r} is not allowed (one of {sorted(DTYPES)})")
    return np.dtype(name).newbyteorder("<")


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """Wire form of ``array``; shares its memory when it is already little-endian and contiguous."""
    if array.dtype.name not in DTYPES:
        raise CodecError(f"dtype {array.dtype} cannot be sent")
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": memoryview(array.reshape(-1).view(np.uint8))}


def decode_tensor(obj: Any, what: str = "tensor") -> np.ndarray:
    """Array view over the bytes of a wire tensor; checks dtype, shape and length agree."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise CodecError(f"{what} must be a map with exactly dtype, shape and data")
    dtype = check_dtype(obj["dtype"])
    shape, data = obj["shape"], obj["data"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise CodecError(f"{what}: shape must be a list of at most {MAX_RANK} dims")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"{what}: shape dims must be non-negative integers")
    if math.prod(d for d in shape if d) > MAX_SHAPE_SPAN:
        raise CodecError(f"{what}: shape {shape} is too large")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"{what}: data must be raw bytes")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(f"{what}: {len(data)} data bytes for shape {shape} of {dtype.name} (expected {expected})")
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # numpy's own limits, whatever they are on this platform
        raise CodecError(f"{what}: shape {shape} cannot be built: {exc}") from exc


def decode_tensor_map(obj: Any, limits: Limits = DEFAULT_LIMITS, what: str = "inputs") -> dict[str, np.ndarray]:
    """Decode ``{name: tensor}``."""
    if not isinstance(obj, dict) or not obj:
        raise CodecError(f"{what} must be a non-empty map of name to tensor")
    if len(obj) > limits.max_tensors:
        raise CodecError(f"{what}: at most {limits.max_tensors} tensors")
    return {name: decode_tensor(t, f"{what}[{name!r}]") for name, t in obj.items()}
