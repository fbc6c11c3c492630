"""ModelInfer messages of the v2 gRPC protocol to and from numpy, sharing the HTTP codec's checks.

A request carries each input either in ``raw_input_contents`` (little-endian bytes, one entry
per input in input order, for every input or none, as ``tritonclient.grpc`` sends them) or in
the typed ``contents`` fields. A response always carries ``raw_output_contents``, as Triton's
does. Messages are untrusted: anything malformed raises CodecError, a well-formed request this
server cannot serve raises InvalidInput, nothing else escapes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from inferq.edge import v2
from inferq.edge.proto import grpc_service_pb2 as pb
from inferq.errors import CodecError, InvalidInput

JOB_ID_PARAMETER = "inferq_job_id"

# The typed contents field of each datatype; FP16 has none (raw only, as in Triton).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def parameters_of(entries: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values."""
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in entries.items()
            if value.WhichOneof("parameter_choice")}


def parse_model_infer(request: pb.ModelInferRequest) -> v2.InferRequest:
    """Decode a ModelInferRequest into the codec's InferRequest (outputs always "binary")."""
    if not request.inputs:
        raise CodecError("request needs a non-empty list of inputs")
    if len(request.inputs) > v2.MAX_TENSORS:
        raise CodecError(f"request has {len(request.inputs)} inputs, at most {v2.MAX_TENSORS} are accepted")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise CodecError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                         "give every input raw or none")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name, array = _input(tensor, raw[index] if raw else None)
        if name in inputs:
            raise CodecError(f"input {name!r} is given twice")
        inputs[name] = array
    return v2.InferRequest(request.id or None, inputs, _outputs(request.outputs), True, parameters_of(request.parameters))


def encode_model_infer(model: str, version: str, job_id: str, outputs: dict[str, np.ndarray],
                       request: v2.InferRequest) -> pb.ModelInferResponse:
    """A ModelInferResponse with the requested outputs (all when none were named) as raw contents.

    The job's id rides along as the response parameter ``inferq_job_id`` (pollable on /v1/jobs).
    """
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    response.parameters[JOB_ID_PARAMETER].string_param = job_id
    for name, array, _ in v2.selected_outputs(outputs, request):
        response.outputs.add(name=name, datatype=v2.to_datatype(array.dtype.name), shape=list(array.shape))
        response.raw_output_contents.append(v2.little_endian_bytes(array))
    return response


def _input(tensor: Any, raw: bytes | None) -> tuple[str, np.ndarray]:
    if not tensor.name:
        raise CodecError("every input needs a non-empty name")
    what = f"input {tensor.name!r}"
    v2.refuse_unsupported(parameters_of(tensor.parameters), what)
    datatype = v2.check_datatype(tensor.datatype, what)
    shape = v2.check_shape(list(tensor.shape), what)
    if raw is not None:
        if tensor.HasField("contents"):
            raise CodecError(f"{what} has both contents and raw_input_contents")
        return tensor.name, v2.tensor_from_bytes(raw, datatype, shape, what)
    return tensor.name, _typed(tensor, datatype, shape, what)


def _typed(tensor: Any, datatype: str, shape: list[int], what: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"{what}: {datatype} data must come in raw_input_contents")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise CodecError(f"{what}: contents has {len(values)} elements, shape {shape} needs {count}")
    dtype = np.dtype(v2.DATATYPES[datatype])
    wide = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size and (wide.min() < np.iinfo(dtype).min or wide.max() > np.iinfo(dtype).max):
        raise CodecError(f"{what}: a value is out of range for {datatype}")
    return wide.astype(dtype).reshape(shape)


def _outputs(specs: Any) -> tuple[v2.RequestedOutput, ...] | None:
    if not specs:
        return None
    if len(specs) > v2.MAX_TENSORS:
        raise CodecError(f"request outputs must be at most {v2.MAX_TENSORS}")
    names: dict[str, v2.RequestedOutput] = {}
    for spec in specs:
        if not spec.name:
            raise CodecError("every requested output needs a non-empty name")
        if spec.name in names:
            raise CodecError(f"output {spec.name!r} is requested twice")
        v2.refuse_unsupported(parameters_of(spec.parameters), f"output {spec.name!r}")
        names[spec.name] = v2.RequestedOutput(spec.name, True)
    return tuple(names.values())
