"""The KServe v2 codec against the official tritonclient: its requests parse, our responses read back.

Requests are built by ``tritonclient.http`` itself (``InferInput``,
``InferRequestedOutput`` and ``InferenceServerClient.generate_request_body``)
and responses are read by its ``InferResult``, so a drift from what the
client really sends or expects fails here, without a server.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from inferq.edge.v2 import (
    DATATYPES,
    HEADER_LENGTH,
    InferRequest,
    RequestedOutput,
    encode_infer_response,
    parse_infer_request,
    tensors_to_json,
    to_datatype,
)
from inferq.errors import CodecError, InvalidInput


def sample(datatype: str, shape: tuple[int, ...] = (2, 3), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def client_request(
    arrays: dict[str, np.ndarray],
    binary: bool | dict[str, bool] = True,
    outputs: list[triton.InferRequestedOutput] | None = None,
    **kwargs,
) -> tuple[bytes, int | None]:
    """The body and Inference-Header-Content-Length tritonclient would send."""
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), to_datatype(array.dtype.name))
        tensor.set_data_from_numpy(array, binary_data=binary if isinstance(binary, bool) else binary[name])
        inputs.append(tensor)
    return triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kwargs)


def client_result(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    """Read a response the way tritonclient does, from the body and our headers."""
    return triton.InferResult.from_response_body(body, header_length=headers.get(HEADER_LENGTH))


def request_for(outputs: tuple[RequestedOutput, ...] | None = None, binary_default: bool = False, id=None):
    return InferRequest(id=id, inputs={}, outputs=outputs, binary_output_default=binary_default, parameters={})


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert np.array_equal(actual, expected, equal_nan=expected.dtype.kind == "f")


# --- requests from tritonclient ------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_sent_by_tritonclient_parses_bit_exact(datatype: str, binary: bool) -> None:
    array = sample(datatype)
    body, header_length = client_request({"x": array}, binary=binary)
    assert (header_length is None) == (not binary)
    request = parse_infer_request(body, header_length)
    assert_same(request.inputs["x"], array)


def test_binary_and_json_inputs_mixed_in_one_request_keep_their_order() -> None:
    arrays = {"a": sample("FP32", (4,)), "b": sample("INT64", (2, 2)), "c": sample("UINT8", (3,)), "d": sample("BOOL", (5,))}
    body, header_length = client_request(arrays, binary={"a": True, "b": False, "c": True, "d": True})
    request = parse_infer_request(body, header_length)
    assert list(request.inputs) == ["a", "b", "c", "d"]
    for name, array in arrays.items():
        assert_same(request.inputs[name], array)


def test_empty_and_scalar_shaped_inputs_parse() -> None:
    arrays = {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(7, np.int32)}
    for binary in (True, False):
        request = parse_infer_request(*client_request(arrays, binary=binary))
        assert_same(request.inputs["empty"], arrays["empty"])
        assert_same(request.inputs["scalar"], arrays["scalar"])


def test_no_requested_outputs_means_all_outputs_in_binary_as_tritonclient_asks() -> None:
    body, header_length = client_request({"x": sample("FP32")}, request_id="req-1")
    request = parse_infer_request(body, header_length)
    assert request.id == "req-1"
    assert request.outputs is None
    assert request.binary_output_default is True


def test_requested_outputs_keep_their_order_and_binary_flags() -> None:
    outputs = [triton.InferRequestedOutput("probs", binary_data=False), triton.InferRequestedOutput("logits")]
    request = parse_infer_request(*client_request({"x": sample("FP32")}, outputs=outputs))
    assert request.outputs == (RequestedOutput("probs", False), RequestedOutput("logits", True))
    assert request.binary_output_default is False


def test_request_parameters_are_kept() -> None:
    body, header_length = client_request({"x": sample("FP32")}, priority=2, timeout=500, parameters={"tenant": "a"})
    request = parse_infer_request(body, header_length)
    assert request.parameters == {"priority": 2, "timeout": 500, "tenant": "a", "binary_data_output": True}


def test_binary_data_output_is_the_default_for_outputs_that_do_not_say() -> None:
    body = json.dumps({
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
        "outputs": [{"name": "y"}, {"name": "z", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    assert parse_infer_request(body, None).outputs == (RequestedOutput("y", True), RequestedOutput("z", False))


def test_nested_row_major_json_data_is_accepted() -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [[1, 2.5], [3, 4]]}]})
    request = parse_infer_request(body.encode(), None)
    assert_same(request.inputs["x"], np.array([[1, 2.5], [3, 4]]))


def test_json_nan_and_infinity_literals_are_floats() -> None:
    body = b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [NaN, Infinity, -Infinity]}]}'
    assert_same(parse_infer_request(body, None).inputs["x"], np.array([np.nan, np.inf, -np.inf], np.float32))


def test_binary_bool_bytes_other_than_zero_and_one_read_as_true() -> None:
    header = b'{"inputs": [{"name": "x", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}]}'
    request = parse_infer_request(header + b"\x00\x01\x07", len(header))
    assert request.inputs["x"].tolist() == [False, True, True]


# --- refusals -----------------------------------------------------------------


def tensor_body(**tensor) -> bytes:
    """A JSON request with one FP32 input ``x`` of shape [2], fields overridden (None drops one)."""
    spec = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]} | tensor
    return request_body(inputs=[{key: value for key, value in spec.items() if value is not None}])


def request_body(**doc) -> bytes:
    return json.dumps(doc).encode()


def with_binary(header: bytes, payload: bytes) -> tuple[bytes, int]:
    return header + payload, len(header)


def binary_body(sizes: list, payload: bytes) -> tuple[bytes, int]:
    """FP32 inputs of shape [2] (8 bytes each) declaring ``sizes``, followed by ``payload``."""
    inputs = [{"name": f"x{i}", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": size}}
              for i, size in enumerate(sizes)]
    return with_binary(request_body(inputs=inputs), payload)


ONE_INPUT = [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]

# (case, body, Inference-Header-Content-Length, a fragment of the reason given)
GARBAGE: list[tuple[str, bytes, object, str]] = [
    ("empty body", b"", None, "not valid JSON"),
    ("not json", b"{inputs", None, "not valid JSON"),
    ("invalid utf-8", b'{"inputs": "\xff\xfe"}', None, "can't decode byte"),
    ("json array", b"[1, 2]", None, "JSON object"),
    ("json string", b'"inputs"', None, "JSON object"),
    ("deeply nested json", b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    ("integer too long to parse", tensor_body(datatype="INT64", shape=[1], data=[0]).replace(b"[0]", b"[" + b"9" * 5000 + b"]"), None, "not valid JSON"),
    ("no inputs", b"{}", None, "list of inputs"),
    ("empty inputs", request_body(inputs=[]), None, "list of inputs"),
    ("inputs not a list", request_body(inputs={"x": 1}), None, "list of inputs"),
    ("input not an object", request_body(inputs=[1]), None, "inputs[0] must be an object"),
    ("more than 64 inputs", request_body(inputs=[ONE_INPUT[0] | {"name": f"x{i}"} for i in range(65)]), None, "at most 64"),
    ("id not a string", request_body(id=5, inputs=ONE_INPUT), None, "id must be a string"),
    ("request parameters not an object", request_body(parameters=[1], inputs=ONE_INPUT), None, "parameters must be an object"),
    ("binary_data_output not a bool", request_body(parameters={"binary_data_output": "yes"}, inputs=ONE_INPUT), None, "binary_data_output"),
    ("missing name", tensor_body(name=None), None, "string name"),
    ("empty name", tensor_body(name=""), None, "string name"),
    ("name not a string", tensor_body(name=["x"]), None, "string name"),
    ("duplicate input names", request_body(inputs=ONE_INPUT * 2), None, "given twice"),
    ("missing datatype", tensor_body(datatype=None), None, "string datatype"),
    ("datatype not a string", tensor_body(datatype=7), None, "string datatype"),
    ("missing shape", tensor_body(shape=None), None, "needs a shape"),
    ("shape not a list", tensor_body(shape="2"), None, "needs a shape"),
    ("more than 8 dims", tensor_body(shape=[1] * 9, data=[1]), None, "at most 8 dims"),
    ("negative dim", tensor_body(shape=[-2]), None, "non-negative integers"),
    ("float dim", tensor_body(shape=[2.0]), None, "non-negative integers"),
    ("bool dim", tensor_body(shape=[True, 2]), None, "non-negative integers"),
    ("absurd empty shape", tensor_body(shape=[0] + [2**40] * 7, data=[]), None, "too large"),
    ("absurd shape", tensor_body(shape=[2**62, 2**62]), None, "too large"),
    ("input parameters not an object", tensor_body(parameters=[]), None, "parameters must be an object"),
    ("missing data", tensor_body(data=None), None, "needs data"),
    ("null data", tensor_body(data=None).replace(b'"FP32"', b'"FP32", "data": null'), None, "needs data"),
    ("data not a list", tensor_body(data=3), None, "needs data"),
    ("data is a string", tensor_body(data="12"), None, "needs data"),
    ("too few elements", tensor_body(data=[1]), None, "has 1 elements"),
    ("too many elements", tensor_body(data=[1, 2, 3]), None, "has 3 elements"),
    ("too many nested elements", tensor_body(data=[[1, 2], [3, 4]]), None, "more elements than shape"),
    ("ragged nested data", tensor_body(shape=[3], data=[[1, 2], [3]]), None, "rectangular"),
    ("lists mixed with numbers", tensor_body(data=[[1], 2]), None, "rectangular"),
    ("nesting deeper than 8", tensor_body(shape=[1], data=[[[[[[[[[[1]]]]]]]]]]), None, "list value"),
    ("string element", tensor_body(data=[1, "2"]), None, "str value"),
    ("null element", tensor_body(data=[1, None]), None, "NoneType value"),
    ("object element", tensor_body(data=[1, {"v": 2}]), None, "dict value"),
    ("bool in FP32 data", tensor_body(data=[True, 2.0]), None, "bool value"),
    ("float in INT32 data", tensor_body(datatype="INT32", data=[1, 2.5]), None, "float value"),
    ("number in BOOL data", tensor_body(datatype="BOOL", data=[True, 1]), None, "int value"),
    ("UINT8 out of range", tensor_body(datatype="UINT8", data=[1, 256]), None, "out of range for UINT8"),
    ("negative UINT64", tensor_body(datatype="UINT64", data=[1, -1]), None, "out of range for UINT64"),
    ("INT64 out of range", tensor_body(datatype="INT64", data=[1, 2**63]), None, "out of range for INT64"),
    ("FP16 overflow", tensor_body(datatype="FP16", data=[1, 70000.0]), None, "out of range for FP16"),
    ("FP64 int too large for a float", tensor_body(datatype="FP64", data=[1, 10**400]), None, "out of range for FP64"),
    ("binary size without header length", binary_body([8], b"")[0], None, "no Inference-Header-Content-Length"),
    ("binary body without header length", binary_body([8], b"\x00" * 8)[0], None, "not valid JSON"),
    ("binary size with data too", *with_binary(tensor_body(parameters={"binary_data_size": 8}), b"\x00" * 8), "both data and binary_data_size"),
    ("binary size not an int", *binary_body(["8"], b"\x00" * 8), "non-negative integer"),
    ("negative binary size", *binary_body([-8], b""), "non-negative integer"),
    ("binary size not matching shape", *binary_body([4], b"\x00" * 4), "does not match shape"),
    ("binary data truncated", *binary_body([8], b"\x00" * 7), "past the end"),
    ("second binary input truncated", *binary_body([8, 8], b"\x00" * 12), "'x1': binary data runs past the end"),
    ("trailing bytes after binary inputs", *binary_body([8], b"\x00" * 9), "1 bytes follow"),
    ("header length past the body", b'{"inputs": []}', 1000, "does not fit"),
    ("negative header length", b'{"inputs": []}', -1, "does not fit"),
    ("header length as a string", b'{"inputs": []}', "14", "does not fit"),
    ("header length cutting the json", binary_body([8], b"\x00" * 8)[0], binary_body([8], b"")[1] - 3, "not valid JSON"),
    ("outputs not a list", request_body(inputs=ONE_INPUT, outputs={"y": 1}), None, "outputs must be a list"),
    ("output not an object", request_body(inputs=ONE_INPUT, outputs=["y"]), None, "outputs[0] must be an object"),
    ("output without name", request_body(inputs=ONE_INPUT, outputs=[{}]), None, "outputs[0] must be an object"),
    ("duplicate outputs", request_body(inputs=ONE_INPUT, outputs=[{"name": "y"}] * 2), None, "requested twice"),
    ("binary_data not a bool", request_body(inputs=ONE_INPUT, outputs=[{"name": "y", "parameters": {"binary_data": 1}}]), None, "binary_data must be"),
]


@pytest.mark.parametrize("body, header_length, reason", [case[1:] for case in GARBAGE], ids=[case[0] for case in GARBAGE])
def test_garbage_bodies_are_refused_with_a_codec_error_and_nothing_else(body: bytes, header_length, reason: str) -> None:
    with pytest.raises(CodecError) as caught:
        parse_infer_request(body, header_length)
    assert reason in str(caught.value)


def test_random_corruptions_of_a_valid_body_raise_only_inferq_errors() -> None:
    arrays = {"a": sample("FP32", (3, 2)), "b": sample("INT8", (4,))}
    body, header_length = client_request(arrays, binary={"a": True, "b": False})
    rng = np.random.default_rng(7)
    for _ in range(2000):
        corrupt = bytearray(body)
        for position in rng.integers(0, len(body), rng.integers(1, 4)):
            corrupt[position] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(body) - 10, len(body) + 1))
        try:
            parse_infer_request(bytes(corrupt[:cut]), header_length)
        except (CodecError, InvalidInput):
            pass


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_tensors_from_tritonclient_are_unsupported_not_malformed(binary: bool) -> None:
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"ab", b"c"], dtype=np.object_), binary_data=binary)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    with pytest.raises(InvalidInput, match="BYTES"):
        parse_infer_request(body, header_length)


@pytest.mark.parametrize("datatype", ["BF16", "STRING", "fp32", ""])
def test_unknown_datatypes_are_unsupported(datatype: str) -> None:
    with pytest.raises(InvalidInput, match="not supported"):
        parse_infer_request(tensor_body(datatype=datatype), None)


@pytest.mark.parametrize("where", ["input", "output"])
def test_shared_memory_is_unsupported(where: str) -> None:
    if where == "input":
        tensor = triton.InferInput("x", [4], "FP32")
        tensor.set_shared_memory("region", 16)
        outputs = None
    else:
        tensor = triton.InferInput("x", [4], "FP32").set_data_from_numpy(sample("FP32", (4,)))
        outputs = [triton.InferRequestedOutput("y")]
        outputs[0].set_shared_memory("region", 16)
    with pytest.raises(InvalidInput, match="shared_memory"):
        parse_infer_request(*triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs))


def test_classification_outputs_are_unsupported() -> None:
    outputs = [triton.InferRequestedOutput("y", class_count=3)]
    with pytest.raises(InvalidInput, match="classification"):
        parse_infer_request(*client_request({"x": sample("FP32")}, outputs=outputs))


def test_to_datatype_maps_numpy_names_and_refuses_the_rest() -> None:
    assert {to_datatype(name) for name in DATATYPES.values()} == set(DATATYPES)
    assert to_datatype("float16") == "FP16" and to_datatype("bool") == "BOOL"
    for name in ("object", "complex64", "str", "bfloat16"):
        with pytest.raises(InvalidInput):
            to_datatype(name)


# --- responses read by tritonclient ---------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_binary_response_of_every_datatype_reads_back_bit_exact_in_tritonclient(datatype: str) -> None:
    outputs = {"y": sample(datatype, (3, 2), seed=1), "z": sample(datatype, (4,), seed=2)}
    request = parse_infer_request(*client_request({"x": sample("FP32")}))
    body, headers = encode_infer_response("mlp", "1", "job-9", outputs, request)
    assert headers["Content-Type"] == "application/octet-stream"
    assert int(headers[HEADER_LENGTH]) < len(body)
    result = client_result(body, headers)
    for name, array in outputs.items():
        assert_same(result.as_numpy(name), array)
    assert result.get_response()["id"] == "job-9"


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_json_response_of_every_datatype_reads_back_exact_in_tritonclient(datatype: str) -> None:
    outputs = {"y": sample(datatype, (3, 2), seed=1)}
    body, headers = encode_infer_response("mlp", "1", None, outputs, None)
    assert headers == {"Content-Type": "application/json"}
    assert_same(client_result(body, headers).as_numpy("y"), outputs["y"])


def test_requested_outputs_come_back_alone_in_requested_order_with_their_own_encoding() -> None:
    model_outputs = {"a": sample("FP32", (2,)), "b": sample("INT32", (2, 2)), "c": sample("FP16", (3,))}
    requested = [triton.InferRequestedOutput("c", binary_data=False), triton.InferRequestedOutput("a")]
    request = parse_infer_request(*client_request({"x": sample("FP32")}, outputs=requested, request_id="r-7"))
    body, headers = encode_infer_response("cnn", "3", "job-1", model_outputs, request)
    result = client_result(body, headers)
    response = result.get_response()
    assert [output["name"] for output in response["outputs"]] == ["c", "a"]
    assert "data" in response["outputs"][0] and "data" not in response["outputs"][1]
    assert response["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert (response["model_name"], response["model_version"], response["id"]) == ("cnn", "3", "r-7")
    assert_same(result.as_numpy("c"), model_outputs["c"])
    assert_same(result.as_numpy("a"), model_outputs["a"])
    assert result.as_numpy("b") is None


def test_all_json_requested_outputs_make_a_plain_json_response() -> None:
    requested = (RequestedOutput("y", False),)
    body, headers = encode_infer_response("m", "1", None, {"y": sample("FP64"), "z": sample("FP64")}, request_for(requested))
    assert headers == {"Content-Type": "application/json"}
    assert [output["name"] for output in json.loads(body)["outputs"]] == ["y"]


def test_requesting_an_output_the_model_lacks_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="nope"):
        encode_infer_response("m", "1", None, {"y": sample("FP32")}, request_for((RequestedOutput("nope", True),)))


def test_empty_binary_outputs_read_back() -> None:
    outputs = {"y": np.zeros((0, 4), np.float32)}
    body, headers = encode_infer_response("m", "1", None, outputs, request_for(binary_default=True))
    assert_same(client_result(body, headers).as_numpy("y"), outputs["y"])


def test_big_endian_and_strided_outputs_are_sent_little_endian_row_major() -> None:
    array = np.arange(12, dtype=">f4").reshape(3, 4).T
    body, headers = encode_infer_response("m", "1", None, {"y": array}, request_for(binary_default=True))
    back = client_result(body, headers).as_numpy("y")
    assert np.array_equal(back, array) and back.shape == (4, 3)


def test_fp16_json_data_is_written_as_floats_and_nan_survives() -> None:
    array = np.array([0.5, -1.25, np.nan, np.inf], np.float16)
    body, headers = encode_infer_response("m", "1", None, {"y": array}, None)
    assert json.loads(body)["outputs"][0]["data"][:2] == [0.5, -1.25]
    assert_same(client_result(body, headers).as_numpy("y"), array)


def test_response_id_is_the_request_id_else_the_job_id_else_absent() -> None:
    outputs = {"y": sample("FP32")}
    assert json.loads(encode_infer_response("m", "1", "job", outputs, request_for(id="req"))[0])["id"] == "req"
    assert json.loads(encode_infer_response("m", "1", "job", outputs, request_for())[0])["id"] == "job"
    assert "id" not in json.loads(encode_infer_response("m", "1", None, outputs, None)[0])


def test_outputs_of_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(InvalidInput):
        encode_infer_response("m", "1", None, {"y": np.array([1 + 2j])}, None)


def test_tensors_to_json_lists_flat_row_major_data() -> None:
    outputs = {"y": np.array([[1, 2], [3, 4]], np.int32), "z": np.array([True, False])}
    assert tensors_to_json(outputs) == [
        {"name": "y", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]},
        {"name": "z", "datatype": "BOOL", "shape": [2], "data": [True, False]},
    ]
    json.dumps(tensors_to_json({"h": np.array([1.5], np.float16)}))
