"""Deterministic demo models (fixed seed, built with onnx.helper, nothing downloaded).

* ``mlp``: x float32[N,256] -> probs float32[N,10]
* ``cnn``: x float32[N,3,64,64] -> logits float32[N,10]
* ``transformer``: x float32[N,128,256] -> y float32[N,128,256] (one pre-norm encoder block)
* a wide model (:func:`write_wide_model`): x float32[N,4] -> y float32[N,width], large results from a tiny file
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

TRANSFORMER_CONFIG = """\
[batching]
max_batch_size = 8
max_queue_delay_ms = 4.0
"""

SEQ_LEN = 128
D_MODEL = 256
N_HEADS = 4
D_FF = 1024


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


def build_transformer(seed: int = SEED):
    """One pre-norm transformer encoder block: 4-head self-attention and a GELU MLP, each with a residual.

    ``y = h + MLP(LN(h))`` with ``h = x + Attention(LN(x))``; sequence 128, width 256.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed + 2)
    d, heads, head_dim, ff = D_MODEL, N_HEADS, D_MODEL // N_HEADS, D_FF

    def const(name: str, values: np.ndarray):
        return numpy_helper.from_array(values, name)

    # Weights are stored [in, out] for MatMul, scaled by 1/sqrt(fan-in); biases start at zero.
    def dense(name: str, n_in: int, n_out: int) -> list:
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        return [const(f"{name}_w", w), const(f"{name}_b", np.zeros(n_out, np.float32))]

    inits = [
        const("ln1_g", np.ones(d, np.float32)), const("ln1_b", np.zeros(d, np.float32)),
        const("ln2_g", np.ones(d, np.float32)), const("ln2_b", np.zeros(d, np.float32)),
        *dense("qkv", d, 3 * d), *dense("proj", d, d), *dense("ff1", d, ff), *dense("ff2", ff, d),
        const("heads_shape", np.array([0, SEQ_LEN, 3, heads, head_dim], np.int64)),
        const("merge_shape", np.array([0, SEQ_LEN, d], np.int64)),
        const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32)),
        const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32)),
        const("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), np.float32)),
    ]
    nodes = [
        # attention
        helper.make_node("LayerNormalization", ["x", "ln1_g", "ln1_b"], ["n1"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n1", "qkv_w"], ["qkv_m"]),
        helper.make_node("Add", ["qkv_m", "qkv_b"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "heads_shape"], ["qkv_h"]),           # [N,S,3,H,Dh]
        helper.make_node("Transpose", ["qkv_h"], ["qkv_t"], perm=[2, 0, 3, 1, 4]),  # [3,N,H,S,Dh]
        helper.make_node("Split", ["qkv_t"], ["q3", "k3", "v3"], axis=0),
        helper.make_node("Squeeze", ["q3", "zero_axis"], ["q"]),
        helper.make_node("Squeeze", ["k3", "zero_axis"], ["k"]),
        helper.make_node("Squeeze", ["v3", "zero_axis"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),            # [N,H,Dh,S]
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"]),                   # [N,H,S,S]
        helper.make_node("Mul", ["scores_raw", "scale"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"]),                        # [N,H,S,Dh]
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),       # [N,S,H,Dh]
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"]),
        helper.make_node("MatMul", ["ctx_m", "proj_w"], ["o_m"]),
        helper.make_node("Add", ["o_m", "proj_b"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["h"]),
        # MLP with the exact (erf) GELU
        helper.make_node("LayerNormalization", ["h", "ln2_g", "ln2_b"], ["n2"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n2", "ff1_w"], ["f1_m"]),
        helper.make_node("Add", ["f1_m", "ff1_b"], ["f1"]),
        helper.make_node("Mul", ["f1", "inv_sqrt2"], ["g_s"]),
        helper.make_node("Erf", ["g_s"], ["g_e"]),
        helper.make_node("Add", ["g_e", "one"], ["g_p"]),
        helper.make_node("Mul", ["f1", "g_p"], ["g_m"]),
        helper.make_node("Mul", ["g_m", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "ff2_w"], ["f2_m"]),
        helper.make_node("Add", ["f2_m", "ff2_b"], ["f2"]),
        helper.make_node("Add", ["h", "f2"], ["y"]),
    ]
    inits.append(const("zero_axis", np.array([0], np.int64)))
    graph = helper.make_graph(
        nodes, "transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ_LEN, D_MODEL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ_LEN, D_MODEL])],
        inits,
    )
    return _model(graph)


def _model(graph):
    from onnx import checker, helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferq-demo")
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model


DEMO_MODELS: dict[str, tuple[Callable, str]] = {
    "mlp": (build_mlp, MLP_CONFIG),
    "cnn": (build_cnn, CNN_CONFIG),
    "transformer": (build_transformer, TRANSFORMER_CONFIG),
}


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


def write_wide_model(root: Path, name: str, width: int, config: str = "") -> None:
    """x float32[N,4] -> y float32[N,width]: large outputs from a tiny file (issue 19's model, at any width).

    ``y[n, k] = x[n, k % 4] * w[k % 4] + k / width``, with ``w`` drawn from a fixed seed: every
    element depends on the input, so a result read back wrong cannot look right.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if width % 4:
        raise ValueError("width must be a multiple of 4")
    w = np.random.default_rng(SEED).standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "w"], ["xw"]),
            helper.make_node("Tile", ["xw", "repeats"], ["tiled"]),
            helper.make_node("Range", ["start", "limit", "delta"], ["steps"]),  # whole numbers: an exact count
            helper.make_node("Mul", ["steps", "inverse"], ["ramp"]),
            helper.make_node("Add", ["tiled", "ramp"], ["y"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, width // 4], np.int64), "repeats"),
         numpy_helper.from_array(np.array(0, np.float32), "start"), numpy_helper.from_array(np.array(width, np.float32), "limit"),
         numpy_helper.from_array(np.array(1, np.float32), "delta"), numpy_helper.from_array(np.array(1 / width, np.float32), "inverse")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (root / name / "config.toml").write_text("intra_op_threads = 1\n[batching]\nmax_batch_size = 4\nmax_queue_delay_ms = 1.0\n" + config)
