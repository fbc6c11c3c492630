"""The KServe v2 / Triton HTTP inference protocol, with Triton's binary tensor extension.

A pure codec (no I/O) between HTTP bodies and numpy arrays, written to match
what the official ``tritonclient.http`` client sends and expects:

* a request is a JSON header, optionally followed by the raw little-endian
  bytes of the inputs whose ``parameters`` carry ``binary_data_size``, in the
  order the inputs are listed; the ``Inference-Header-Content-Length`` HTTP
  header then gives the JSON length;
* a response is built the same way: outputs asked for in binary carry
  ``parameters.binary_data_size`` and no ``data``, and their bytes follow the
  JSON in output order.

Bodies are untrusted: anything malformed raises ``CodecError`` (HTTP 400) and a
well-formed request this server cannot serve (``BYTES`` tensors, shared memory,
classification) raises ``InvalidInput`` (HTTP 422). Nothing else escapes.

Errors go back as the protocol's ``{"error": "<message>"}`` (:func:`error_body`), the
message led by inferq's stable error code. The tensor checks here serve the gRPC codec too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inferq.broker.codec import DEFAULT_LIMITS, MAX_RANK
from inferq.errors import CodecError, InvalidInput

DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_DATATYPE_OF = {name: datatype for datatype, name in DATATYPES.items()}

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_TENSORS = DEFAULT_LIMITS.max_tensors
# numpy refuses shapes whose non-zero dims multiply past its index range, even
# for empty arrays; a real tensor is smaller than the body that carries it anyway.
MAX_SHAPE_SPAN = 2**40
# Python's bool is an int, so JSON scalars are checked by exact type: true is no
# FP32 value and 1.5 no INT32 value.
_SCALAR_TYPES = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}
_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "classification")


def error_message(code: str, message: str) -> str:
    """A v2 error message: the stable code first, e.g. ``"invalid_input: input 'x' ..."``."""
    return f"{code}: {message}"


def error_body(code: str, message: str) -> dict[str, str]:
    """The v2 protocol's error body, ``{"error": "<message>"}``."""
    return {"error": error_message(code, message)}


def header_length(raw: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int (None when absent); CodecError if not one."""
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise CodecError(f"{HEADER_LENGTH} must be an integer") from None


def to_datatype(dtype_name: str) -> str:
    """KServe datatype of a numpy dtype name (``"float32"`` -> ``"FP32"``); ``InvalidInput`` if none."""
    try:
        return _DATATYPE_OF[dtype_name]
    except (KeyError, TypeError):
        raise InvalidInput(f"dtype {dtype_name!r} has no supported KServe datatype") from None


@dataclass(frozen=True)
class RequestedOutput:
    """An output named in a request, and whether its data goes back as raw bytes."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_output_default: bool
    parameters: dict
    extras: dict = field(default_factory=dict)  # other top-level fields (inferq's /v1 adds priority, ...)


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an inference request body.

    ``header_length`` is the ``Inference-Header-Content-Length`` header as an
    int, or None when the whole body is JSON. Binary inputs are read-only views
    over ``body`` (no copy), except BOOL which is normalised to 0/1.
    """
    doc = _load_header(body, header_length)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise CodecError("request id must be a string")
    parameters = _dict(doc.get("parameters"), "request parameters")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise CodecError("request parameter binary_data_output must be true or false")
    inputs = _decode_inputs(doc.get("inputs"), body, header_length)
    outputs = _parse_outputs(doc.get("outputs"), binary_default)
    extras = {k: v for k, v in doc.items() if k not in ("id", "inputs", "outputs", "parameters")}
    return InferRequest(request_id, inputs, outputs, binary_default, parameters, extras)


def encode_infer_response(
    model: str,
    version: str,
    job_id: str | None,
    outputs: dict[str, np.ndarray],
    request: InferRequest | None,
) -> tuple[bytes, dict[str, str]]:
    """Encode a response body and the HTTP headers that must go with it.

    Only the outputs ``request`` asked for are sent, in its order; ``id`` echoes
    the request id, else ``job_id``. Without a request everything goes as JSON.
    """
    doc: dict[str, Any] = {"model_name": model, "model_version": version}
    response_id = request.id if request is not None and request.id is not None else job_id
    if response_id is not None:
        doc["id"] = response_id
    entries, blobs = [], []
    for name, array, binary in selected_outputs(outputs, request):
        if binary:
            raw = little_endian_bytes(array)
            entries.append(_tensor_header(name, array) | {"parameters": {"binary_data_size": len(raw)}})
            blobs.append(raw)
        else:
            entries.append(_tensor_json(name, array))
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:  # all JSON: end it with a newline like every other JSON answer
        return header + b"\n", {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *blobs]), headers


def tensors_to_json(outputs: dict[str, np.ndarray]) -> list[dict]:
    """Outputs as v2 JSON tensors ``{"name", "datatype", "shape", "data"}`` with flat row-major data."""
    return [_tensor_json(name, array) for name, array in outputs.items()]


# --- requests -----------------------------------------------------------------


def _load_header(body: bytes, header_length: int | None) -> dict:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise CodecError("request body must be bytes")
    if header_length is not None:
        if type(header_length) is not int or not 0 <= header_length <= len(body):
            raise CodecError(
                f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes"
            )
        body = body[:header_length]
    # Name what the client sent: a plain JSON body, or the JSON part of a binary-extension body.
    what = "request body" if header_length is None else f"JSON header of the body (its first {header_length} bytes)"
    try:
        doc = json.loads(bytes(body))
    except RecursionError:
        raise CodecError(f"{what} is nested too deeply") from None
    except ValueError as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers too long to parse.
        raise CodecError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CodecError(f"{what} must be a JSON object")
    return doc


def _decode_inputs(specs: Any, body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    if not isinstance(specs, list) or not specs:
        raise CodecError("request needs a non-empty list of inputs")
    if len(specs) > MAX_TENSORS:
        raise CodecError(f"request has {len(specs)} inputs, at most {MAX_TENSORS} are accepted")
    inputs: dict[str, np.ndarray] = {}
    cursor = header_length  # where the next binary input starts; None: no binary extension
    for index, spec in enumerate(specs):
        name, datatype, shape, size = _input_header(spec, index)
        what = f"input {name!r}"
        if name in inputs:
            raise CodecError(f"{what} is given twice")
        if size is None:
            inputs[name] = _json_tensor(spec.get("data"), datatype, shape, what)
        elif cursor is None:
            raise CodecError(f"{what} has binary_data_size but the request has no {HEADER_LENGTH} header")
        else:
            inputs[name] = _binary_tensor(body, cursor, size, datatype, shape, what)
            cursor += size
    if cursor is not None and cursor != len(body):
        raise CodecError(f"{len(body) - cursor} bytes follow the last binary input; the body must end there")
    return inputs


def _input_header(spec: Any, index: int) -> tuple[str, str, list[int], int | None]:
    """Name, datatype, shape and binary_data_size (None when the data is JSON) of one input."""
    if not isinstance(spec, dict):
        raise CodecError(f"inputs[{index}] must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise CodecError(f"inputs[{index}] needs a non-empty string name")
    what = f"input {name!r}"
    datatype = check_datatype(spec.get("datatype"), what)
    shape = check_shape(spec.get("shape"), what)
    parameters = _dict(spec.get("parameters"), f"{what} parameters")
    refuse_unsupported(parameters, what)
    size = parameters.get("binary_data_size")
    if size is not None and spec.get("data") is not None:
        raise CodecError(f"{what} has both data and binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise CodecError(f"{what}: binary_data_size must be a non-negative integer")
    return name, datatype, shape, size


def check_datatype(datatype: Any, what: str) -> str:
    """``datatype`` if it is a supported KServe datatype name: CodecError if not a string, else InvalidInput."""
    if not isinstance(datatype, str):
        raise CodecError(f"{what} needs a string datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{what}: datatype {datatype!r} is not supported (one of {sorted(DATATYPES)})")
    return datatype


def check_shape(shape: Any, what: str) -> list[int]:
    """``shape`` if it is a list of at most MAX_RANK non-negative ints spanning a sane size; CodecError if not."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise CodecError(f"{what} needs a shape: a list of at most {MAX_RANK} dims")
    if not all(type(dim) is int and dim >= 0 for dim in shape):
        raise CodecError(f"{what}: shape dims must be non-negative integers, got {shape}")
    if math.prod(max(dim, 1) for dim in shape) > MAX_SHAPE_SPAN:
        raise CodecError(f"{what}: shape {shape} is too large")
    return shape


def _json_tensor(data: Any, datatype: str, shape: list[int], what: str) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype])
    flat = _flatten(data, math.prod(shape), shape, what)
    allowed = _SCALAR_TYPES[dtype.kind]
    for value in flat:
        if type(value) not in allowed:
            raise CodecError(f"{what}: {type(value).__name__} value {value!r:.40} in {datatype} data")
    try:
        # over="raise" turns a float that would become inf into an error, as an int out of range already is.
        with np.errstate(over="raise"):
            array = np.asarray(flat, dtype=dtype)
    except (OverflowError, FloatingPointError, ValueError, TypeError) as exc:
        raise CodecError(f"{what}: a value is out of range for {datatype} ({exc})") from None
    return array.reshape(shape)


def _flatten(data: Any, count: int, shape: list[int], what: str) -> list:
    """Row-major elements of flat or rectangular nested ``data``, refused before any list outgrows ``count``."""
    if not isinstance(data, list):
        raise CodecError(f"{what} needs data (a list) or parameters.binary_data_size")
    flat = data
    for _ in range(MAX_RANK):
        if not flat or type(flat[0]) is not list:
            break
        widths = {len(row) if type(row) is list else -1 for row in flat}
        if len(widths) != 1 or -1 in widths:
            raise CodecError(f"{what}: nested data must be rectangular lists of numbers")
        if len(flat) * widths.pop() > count:
            raise CodecError(f"{what}: data has more elements than shape {shape} holds ({count})")
        flat = [value for row in flat for value in row]
    # Lists still left below MAX_RANK levels are caught by the element type check.
    if len(flat) != count:
        raise CodecError(f"{what}: data has {len(flat)} elements, shape {shape} needs {count}")
    return flat


def tensor_from_bytes(raw: bytes, datatype: str, shape: list[int], what: str) -> np.ndarray:
    """A read-only array over the little-endian bytes ``raw`` of a checked datatype and shape."""
    return _binary_tensor(raw, 0, len(raw), datatype, shape, what)


def little_endian_bytes(array: np.ndarray) -> bytes:
    """The raw little-endian, row-major bytes of ``array``, as both binary extensions send them."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _binary_tensor(body: bytes, offset: int, size: int, datatype: str, shape: list[int], what: str) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    count = math.prod(shape)
    if size != count * dtype.itemsize:
        raise CodecError(f"{what}: binary_data_size {size} does not match shape {shape} of {datatype} "
                         f"({count * dtype.itemsize} bytes)")
    if offset + size > len(body):
        raise CodecError(f"{what}: binary data runs past the end of the body")
    if dtype.kind == "b":
        # numpy bools holding bytes other than 0 and 1 compare and sum inconsistently.
        return (np.frombuffer(body, np.uint8, count, offset) != 0).reshape(shape)
    return np.frombuffer(body, dtype, count, offset).reshape(shape)


def _parse_outputs(specs: Any, binary_default: bool) -> tuple[RequestedOutput, ...] | None:
    if specs is None or specs == []:
        return None
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise CodecError(f"request outputs must be a list of at most {MAX_TENSORS} objects")
    outputs: dict[str, RequestedOutput] = {}
    for index, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise CodecError(f"outputs[{index}] must be an object with a non-empty string name")
        if name in outputs:
            raise CodecError(f"output {name!r} is requested twice")
        parameters = _dict(spec.get("parameters"), f"output {name!r} parameters")
        refuse_unsupported(parameters, f"output {name!r}")
        # Triton applies binary_data_output to every output that does not say otherwise.
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise CodecError(f"output {name!r}: binary_data must be true or false")
        outputs[name] = RequestedOutput(name, binary)
    return tuple(outputs.values())


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CodecError(f"{what} must be an object")
    return value


def refuse_unsupported(parameters: dict, what: str) -> None:
    """InvalidInput if ``parameters`` ask for shared memory or classification."""
    for key in _UNSUPPORTED_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"{what}: {key} is not supported by this server")


# --- responses ----------------------------------------------------------------


def selected_outputs(
    outputs: dict[str, np.ndarray], request: InferRequest | None
) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, binary) of the outputs ``request`` asked for, in its order; all of them if it named none."""
    if request is None or request.outputs is None:
        binary = request is not None and request.binary_output_default
        return [(name, np.asarray(array), binary) for name, array in outputs.items()]
    missing = [wanted.name for wanted in request.outputs if wanted.name not in outputs]
    if missing:
        raise InvalidInput(f"requested outputs {missing} are not outputs of the model (it has {sorted(outputs)})")
    return [(wanted.name, np.asarray(outputs[wanted.name]), wanted.binary) for wanted in request.outputs]


def _tensor_header(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": to_datatype(array.dtype.name), "shape": list(array.shape)}


def _tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    array = np.asarray(array)
    # tolist() yields Python scalars: FP16 becomes float, which json can write.
    return _tensor_header(name, array) | {"data": array.reshape(-1).tolist()}

