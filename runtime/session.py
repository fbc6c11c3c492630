"""ONNX Runtime sessions: provider choice, thread settings, inference off the event loop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from inferq.errors import ConfigError, InferenceError
from inferq.runtime.repository import ModelConfig, ModelVersion

log = logging.getLogger("inferq.session")

TERMINATE_GRACE_S = 10.0
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def choose_providers(wanted: tuple[str, ...], options: dict[str, dict[str, Any]], available: list[str], cache_dir: Path | None) -> list[Any]:
    """Providers in priority order, keeping only those this onnxruntime build has.

    CPU is always last, so a GPU box with broken drivers still serves.
    """
    chosen: list[Any] = []
    for short in wanted:
        if short not in PROVIDER_NAMES:
            raise ConfigError(f"unknown provider {short!r} (one of {sorted(PROVIDER_NAMES)})")
        name = PROVIDER_NAMES[short]
        if name not in available:
            continue
        opts = dict(options.get(short, {}))
        if short == "tensorrt" and cache_dir is not None:
            opts.setdefault("trt_engine_cache_enable", True)
            opts.setdefault("trt_engine_cache_path", str(cache_dir))
        chosen.append((name, opts) if opts else name)
    if "CPUExecutionProvider" not in [c if isinstance(c, str) else c[0] for c in chosen]:
        chosen.append("CPUExecutionProvider")
    return chosen


class ModelSession:
    """One loaded model version. Build with :meth:`open`; ``run`` never blocks the loop."""

    def __init__(self, version: ModelVersion, session: Any, executor: ThreadPoolExecutor) -> None:
        self.version = version
        self._session = session
        self._executor = executor
        self.providers: list[str] = session.get_providers()
        self.output_names = [o.name for o in version.outputs]
        self.state = "open"
        self.wedged = False
        import onnxruntime

        self._ort = onnxruntime

    @classmethod
    async def open(cls, version: ModelVersion, config: ModelConfig, cache_dir: Path | None = None) -> ModelSession:
        """Load ``version`` in a worker thread and report which providers it really got."""
        import onnxruntime as ort

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{version.model}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = 1
        if not config.allow_spinning:
            # Idle ORT threads otherwise spin for a while after every run, taking the CPU
            # the event loop, the edge and the broker need between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = choose_providers(config.providers, config.provider_options, ort.get_available_providers(), cache_dir)
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(
                executor, lambda: ort.InferenceSession(str(version.path), options, providers=providers)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
            executor.shutdown(wait=False)
            raise InferenceError(f"cannot load {version.path}: {exc}") from exc
        self = cls(version, session, executor)
        log.info("model %s:%s loaded with providers %s (asked %s)", version.model, version.version, self.providers, list(config.providers))
        return self

    async def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Run one (batched) inference in the session's thread; past ``timeout_s`` ORT is told to stop."""
        names = outputs or self.output_names
        loop = asyncio.get_running_loop()
        options = self._ort.RunOptions()
        future = loop.run_in_executor(self._executor, self._session.run, names, feed, options)
        try:
            results = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            await self._terminate(future, options, timeout_s)
        except Exception as exc:  # onnxruntime's errors carry no useful type
            raise InferenceError(str(exc).strip()[:500]) from exc
        return dict(zip(names, results))

    async def _terminate(self, future: asyncio.Future[Any], options: Any, timeout_s: float | None) -> None:
        options.terminate = True  # ORT checks this between kernels and raises
        try:
            await asyncio.wait_for(asyncio.shield(future), TERMINATE_GRACE_S)
        except TimeoutError:
            self.wedged = True  # the session thread is still busy: this worker must be replaced
            raise InferenceError(f"inference did not finish within {timeout_s:g}s and did not stop when told to") from None
        except Exception:
            pass
        raise InferenceError(f"inference did not finish within {timeout_s:g}s (stopped)")

    async def __aenter__(self) -> ModelSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the session; idempotent."""
        if self.state == "closed":
            return
        self.state = "closed"
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self._session = None
