"""Deterministic demo models (fixed seed, built with onnx.helper, nothing downloaded).

* ``mlp``: x float32[N,256] -> probs float32[N,10]
* ``cnn``: x float32[N,3,64,64] -> logits float32[N,10]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SEED = 20261121
OPSET = 17
IR_VERSION = 9

MLP_CONFIG = """\
[batching]
max_batch_size = 64
max_queue_delay_ms = 2.0
"""

CNN_CONFIG = """\
[batching]
max_batch_size = 16
max_queue_delay_ms = 4.0
"""


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...]):
    from onnx import numpy_helper

    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    values = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return numpy_helper.from_array(values, name)


def build_mlp(seed: int = SEED):
    """The MLP classifier."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", (128, 256)), _init(rng, "b1", (128,)), _init(rng, "w2", (10, 128)), _init(rng, "b2", (10,))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["z"], transB=1),
        helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _model(graph)


def build_cnn(seed: int = SEED):
    """The small CNN."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed + 1)
    inits = [
        _init(rng, "c1w", (16, 3, 3, 3)), _init(rng, "c1b", (16,)),
        _init(rng, "c2w", (32, 16, 3, 3)), _init(rng, "c2b", (32,)),
        _init(rng, "fw", (10, 32)), _init(rng, "fb", (10,)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _model(graph)


def _model(graph):
    from onnx import checker, helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferq-demo")
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model


DEMO_MODELS: dict[str, tuple[Callable, str]] = {"mlp": (build_mlp, MLP_CONFIG), "cnn": (build_cnn, CNN_CONFIG)}


def write_demo_repository(root: Path, names: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write the demo models as version 1 under ``root``.

    ``names`` maps demo model -> name in the repository (tests use unique names).
    """
    import onnx

    names = names or {k: k for k in DEMO_MODELS}
    for demo, name in names.items():
        build, config = DEMO_MODELS[demo]
        path = root / name / "1" / "model.onnx"
        if path.exists() and not overwrite:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build(), str(path))
        (root / name / "config.toml").write_text(config)
    return root
