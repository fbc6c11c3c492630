"""Execution providers proven by running a model, not taken from ``get_available_providers()``.

That list is what onnxruntime was compiled with: a wheel built without the device's
CUDA arch (sm_87 on Orin) lists ``CUDAExecutionProvider`` and then fails with
``cudaErrorNoKernelImageForDevice``, or falls back to the CPU without a word. So each
claimed provider runs a tiny model built here (fixed seed), its session must really
use that provider, and its output must match the CPU's; only those are advertised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferq.runtime.session import PROVIDER_NAMES

log = logging.getLogger("inferq.proof")

ORDER = ("tensorrt", "cuda", "cpu")


@dataclass(frozen=True)
class ProviderProof:
    """The outcome of one provider's run: proven or not, and why not."""

    provider: str
    proven: bool
    detail: str = ""


def tiny_model() -> bytes:
    """A 16x8 MatMul + Add + Relu, serialized (fixed seed: every node runs the same bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(12)
    weight = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])],
        "proof", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by the onnxruntime of JetPack 5 too
    return model.SerializeToString()


def prove(claimed: tuple[str, ...] = (), trt_cache: Path | None = None) -> list[ProviderProof]:
    """Run the tiny model on each claimed provider (default: every one onnxruntime lists); blocking."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = [p for p in ORDER if p in (claimed or ORDER)]
    model, x = tiny_model(), np.random.default_rng(13).standard_normal((4, 16)).astype(np.float32)
    expected = _run(ort, model, x, "cpu", None)
    proofs = []
    for short in wanted:
        if PROVIDER_NAMES[short] not in available:
            proofs.append(ProviderProof(short, False, "not in this onnxruntime build"))
            continue
        proofs.append(_check(ort, model, x, short, expected, trt_cache))
    for proof in proofs:
        log.info("provider %s: %s%s", proof.provider, "proven" if proof.proven else "not proven",
                 f" ({proof.detail})" if proof.detail else "")
    return proofs


def _check(ort: object, model: bytes, x: np.ndarray, short: str, expected: np.ndarray, trt_cache: Path | None) -> ProviderProof:
    try:
        got = _run(ort, model, x, short, trt_cache)
    except Exception as exc:  # any failure of a provider's session is "not proven", never the agent's end
        return ProviderProof(short, False, f"{type(exc).__name__}: {str(exc)[:200]}")
    if not np.allclose(got, expected, rtol=1e-2, atol=1e-3):
        return ProviderProof(short, False, f"output differs from the CPU's by up to {float(np.abs(got - expected).max()):g}")
    return ProviderProof(short, True)


def _run(ort: object, model: bytes, x: np.ndarray, short: str, trt_cache: Path | None) -> np.ndarray:
    name = PROVIDER_NAMES[short]
    options: dict[str, object] = {}
    if short == "tensorrt" and trt_cache is not None:
        trt_cache.mkdir(parents=True, exist_ok=True)
        options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache)}
    session = ort.InferenceSession(model, providers=[(name, options)])  # type: ignore[attr-defined]
    used = session.get_providers()
    if not used or used[0] != name:  # onnxruntime fell back to another provider without raising
        raise RuntimeError(f"the session runs on {used}, not {name}")
    return session.run(None, {"x": x})[0]


def proven(proofs: list[ProviderProof]) -> tuple[str, ...]:
    """The short names of the proven providers, best first."""
    return tuple(p.provider for p in proofs if p.proven)
