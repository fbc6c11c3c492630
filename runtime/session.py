"""ONNX Runtime sessions: provider choice, thread settings, inference off the event loop (or on it, when tiny).

A run in the session's thread costs a thread wake-up and a loop wake-up, 1-2.6 ms on a
busy 2-core machine, which is 100x what a small MLP computes. :class:`InlineRule` keeps
an EWMA of each session's run time per batch row; a run whose predicted time is below
``inline_run_ms`` (model config) runs on the event loop instead, where it blocks the loop
for less time than the hop would have cost. Everything else, and always the warm-up run
and any run before a time is known, goes to the thread, where ``run_timeout_s`` holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

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


class InlineRule:
    """Whether a run may skip the executor: its predicted time is below ``threshold_s``. Pure: callers pass the times.

    The prediction is an EWMA of past runs' time per batch row, times this run's rows:
    a batch larger than the ones measured is predicted slower, never faster. The first
    observation is the warm-up (one-time allocations, engine builds) and is dropped.
    A threshold of 0 never inlines.
    """

    def __init__(self, threshold_s: float, alpha: float = 0.2) -> None:
        self.threshold_s = threshold_s
        self.alpha = alpha
        self.per_row_s: float | None = None  # None: unknown, so never inline
        self.runs = 0

    def inline(self, rows: int) -> bool:
        """Whether a run of ``rows`` batch rows should run on the loop."""
        if self.threshold_s <= 0 or self.per_row_s is None:
            return False
        return self.per_row_s * max(rows, 1) < self.threshold_s

    def observe(self, elapsed_s: float, rows: int) -> None:
        """Note a run that took ``elapsed_s`` for ``rows`` rows."""
        self.runs += 1
        if self.runs == 1:
            return  # the warm-up run: not what later runs cost
        sample = elapsed_s / max(rows, 1)
        self.per_row_s = sample if self.per_row_s is None else self.per_row_s + self.alpha * (sample - self.per_row_s)


def feed_rows(feed: dict[str, np.ndarray]) -> int:
    """The batch rows of a feed: the first dim of its first input (1 for a scalar or an empty feed)."""
    for array in feed.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


class ModelSession:
    """One loaded model version. Build with :meth:`open`; ``run`` blocks the loop only for runs predicted under ``inline_run_ms``."""

    def __init__(self, version: ModelVersion, session: Any, executor: ThreadPoolExecutor, inline_s: float = 0.0) -> None:
        self.version = version
        self._session = session
        self._executor = executor
        self.providers: list[str] = session.get_providers()
        self.output_names = [o.name for o in version.outputs]
        self.state = "open"
        self.wedged = False
        self.rule = InlineRule(inline_s)
        self.inline_runs = 0  # runs made on the loop (tests and the curious read it)
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
        self = cls(version, session, executor, config.inline_run_ms / 1000)
        log.info("model %s:%s loaded with providers %s (asked %s)", version.model, version.version, self.providers, list(config.providers))
        return self

    async def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Run one (batched) inference; past ``timeout_s`` ORT is told to stop.

        In the session's thread, unless :class:`InlineRule` predicts the run is shorter than
        the hop there (then on the loop, where no timeout is needed for well under a millisecond).
        """
        names = outputs or self.output_names
        rows = feed_rows(feed)
        if self.rule.inline(rows) and not self.wedged:  # a wedged thread still runs: nothing beside it
            self.inline_runs += 1
            results, elapsed_s = self._timed_run(names, feed, None)
        else:
            results, elapsed_s = await self._run_in_thread(names, feed, timeout_s)
        self.rule.observe(elapsed_s, rows)
        return dict(zip(names, results))

    def _timed_run(self, names: list[str], feed: dict[str, np.ndarray], options: Any) -> tuple[list[Any], float]:
        """``session.run`` and how long it took (the compute alone, without any hop)."""
        started = time.perf_counter()
        try:
            results = self._session.run(names, feed, options)
        except Exception as exc:  # onnxruntime's errors carry no useful type
            raise InferenceError(str(exc).strip()[:500]) from exc
        return results, time.perf_counter() - started

    async def _run_in_thread(self, names: list[str], feed: dict[str, np.ndarray], timeout_s: float | None) -> tuple[list[Any], float]:
        loop = asyncio.get_running_loop()
        options = self._ort.RunOptions()
        future = loop.run_in_executor(self._executor, self._timed_run, names, feed, options)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            await self._terminate(future, options, timeout_s)

    async def _terminate(self, future: asyncio.Future[Any], options: Any, timeout_s: float | None) -> NoReturn:
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
