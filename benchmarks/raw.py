"""The raw ceiling: ONNX Runtime in this process on the same model file with the worker's thread settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Input shapes of the demo models, without the batch dim.
SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {"mlp": (256,), "cnn": (3, 64, 64), "transformer": (128, 256)}
BATCH_SIZES: dict[str, tuple[int, ...]] = {
    "mlp": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "cnn": (1, 2, 4, 8, 16, 32, 64),
    "transformer": (1, 2, 4, 8, 16),
}


def samples(model: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` deterministic single-sample inputs of ``model`` stacked: float32[n, ...]."""
    return np.random.default_rng(seed).standard_normal((n, *SAMPLE_SHAPES[model])).astype(np.float32)


def open_session(path: Path, intra_op_threads: int) -> Any:
    """A CPU session built exactly as the shard worker builds its own (runtime/session.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(path: Path, model: str, intra_op_threads: int, seconds: float, latency_runs: int,
            progress: Callable[[str], None] = print, rounds: int = 3) -> dict[str, Any]:
    """Samples/s for each batch size (best of ``rounds`` windows; best size named), and batch-1 latency percentiles."""
    session = open_session(path, intra_op_threads)
    pool = samples(model, max(BATCH_SIZES[model]), seed=1)
    sweep: dict[str, dict[str, float]] = {}
    for bs in BATCH_SIZES[model]:
        x = np.ascontiguousarray(pool[:bs])
        for _ in range(3):
            session.run(None, {"x": x})
        # Best of a few short windows: the machine is shared, and a ceiling should not count interference.
        best_rate, best_ms = 0.0, 0.0
        for _ in range(rounds):
            runs, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / rounds or runs < 3:
                session.run(None, {"x": x})
                runs += 1
            if runs * bs / elapsed > best_rate:
                best_rate, best_ms = runs * bs / elapsed, 1000 * elapsed / runs
        sweep[str(bs)] = {"samples_per_s": round(best_rate, 1), "ms_per_batch": round(best_ms, 4)}
        progress(f"  batch {bs:>3}: {sweep[str(bs)]['samples_per_s']:>10.0f} samples/s  ({sweep[str(bs)]['ms_per_batch']:.3f} ms/batch)")
    best = max(sweep, key=lambda k: sweep[k]["samples_per_s"])
    x1 = np.ascontiguousarray(pool[:1])
    times = []
    for _ in range(latency_runs):
        t0 = time.perf_counter()
        session.run(None, {"x": x1})
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "intra_op_threads": intra_op_threads,
        "seconds_per_batch_size": seconds,
        "rounds": rounds,
        "sweep": sweep,
        "best_batch": int(best),
        "best_samples_per_s": sweep[best]["samples_per_s"],
        "single_latency_ms": percentiles(times),
    }


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The output of ``x`` on ``path`` (for checking what the systems under test return)."""
    return open_session(path, 1).run(None, {"x": x})[0]


def percentiles(values_ms: list[float] | np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p95, p99, max of a list of milliseconds."""
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        return {}
    p = np.percentile(a, [50, 90, 95, 99])
    return {"mean": round(float(a.mean()), 3), "p50": round(float(p[0]), 3), "p90": round(float(p[1]), 3),
            "p95": round(float(p[2]), 3), "p99": round(float(p[3]), 3), "max": round(float(a.max()), 3)}
