"""Test-only models, generated deterministically like the demo ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_slow_model(root: Path, name: str, layers: int = 600, config: str = "") -> None:
    """x float32[N,256] -> y float32[N,256] through ``layers`` tanh(x @ W) steps sharing one W.

    Several milliseconds of real compute per sample with a tiny file: workers
    really are busy mid-batch when a test kills or drains them.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(7).standard_normal((256, 256)) / 16).astype(np.float32)
    nodes, last = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        last = f"t{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (root / name / "config.toml").write_text("intra_op_threads = 1\n[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 1.0\n" + config)


def write_reshape_model(root: Path, name: str, config: str = "") -> None:
    """x float32[N,4], shape int64[2] -> Reshape(x, shape): a shape that does not fit makes ONNX Runtime raise."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (root / name / "config.toml").write_text(config)
