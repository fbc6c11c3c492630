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


def write_mlp(directory: Path, seed: int, broken: bool = False) -> Path:
    """The demo MLP (x float32[N,256] -> probs float32[N,10]) with weights from ``seed``, as ``directory/model.onnx``.

    Two seeds give two versions with the same signature and different outputs. ``broken``
    adds a lookup whose index is ``sum(|x|) * 1e6``: zeros (a warm-up sample) run, any
    real input makes ONNX Runtime fail at run time (index out of bounds).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from inferq.runtime.demo import build_mlp

    model = build_mlp(seed)
    if broken:
        graph = model.graph
        graph.output[0].name = "clean"
        graph.node[-1].output[0] = "clean"
        graph.initializer.extend([numpy_helper.from_array(np.zeros(1, np.float32), "table"),
                                  numpy_helper.from_array(np.array(1e6, np.float32), "scale")])
        graph.node.extend([
            helper.make_node("Abs", ["x"], ["ax"]),
            helper.make_node("ReduceSum", ["ax"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "scale"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["picked"]),
            helper.make_node("Add", ["clean", "picked"], ["probs"]),
        ])
        graph.output[0].name = "probs"
        onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    return directory / "model.onnx"



def write_wide_model(root: Path, name: str, width: int, config: str = "") -> None:
    """Issue 19's large-output model (``x float32[N,4] -> y float32[N,width]``), from inferq.runtime.demo."""
    from inferq.runtime.demo import write_wide_model as write

    write(root, name, width, config)
