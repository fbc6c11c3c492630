"""The v2 protocol's operations, answered alike over HTTP (``v2_routes``) and gRPC (``grpc_server``).

Inference goes through the JobService like every other job (queue, batching, ledger): a v2
call is a job the edge waits for. Errors are inferq errors; each transport maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from inferq.broker.trace import new_traceparent, parse_traceparent
from inferq.broker.codec import decode_tensor_map
from inferq.broker.messages import SUCCEEDED
from inferq.edge import triton
from inferq.edge.control import ModelControl
from inferq.edge.inventory import Inventory
from inferq.edge.jobs import JobService, Submission
from inferq.edge.projection import JobState
from inferq.edge.stats import InferenceStats
from inferq.edge.v2 import InferRequest
from inferq.errors import DeadlineExceeded, InvalidInput, JobFailed, ModelUnavailable


class Serving:
    """Server and model facts, model control and synchronous inference for the v2 protocol."""

    def __init__(self, service: JobService, inventory: Inventory, control: ModelControl, stats: InferenceStats,
                 sync_timeout_s: float, ready: Callable[[], bool]) -> None:
        self.service = service
        self.inventory = inventory
        self.control = control
        self.stats = stats
        self.sync_timeout_s = sync_timeout_s
        self._ready = ready

    def server_ready(self) -> bool:
        """Replayed the ledger and connected to the broker."""
        return self._ready()

    async def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        """The signature of a version (the default one when ``version`` is None)."""
        resolved = await self.service.directory.version(model, version)
        return triton.model_metadata(await self.service.directory.record(model), resolved.version)

    async def model_ready(self, model: str, version: str | None) -> bool:
        """Whether a known version is served (not unloaded); UnknownModel if there is no such version."""
        await self.service.directory.version(model, version)
        return not await self.control.unloaded(model)

    async def model_config(self, model: str, version: str | None) -> dict[str, Any]:
        """The Triton model configuration of a version."""
        resolved = await self.service.directory.version(model, version)
        record = await self.service.directory.record(model)
        return triton.model_config(record, resolved.version, await self.inventory.workers(model))

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model version and its state, optionally only the READY ones."""
        await self.service.directory.refresh()
        entries = []
        for name in self.service.directory.names():
            unloaded = await self.control.unloaded(name)
            for version in (await self.service.directory.record(name)).versions:
                entries.append(triton.index_entry(name, version, unloaded))
        return [e for e in entries if e["state"] == triton.READY or not ready_only]

    async def statistics(self, model: str | None, version: str | None) -> dict[str, Any]:
        """Triton's statistics of one version, every version of one model, or of every model."""
        if model is None:
            await self.service.directory.refresh()
            names = self.service.directory.names()
        else:
            names = [model]
        stats = []
        for name in names:
            record = await self.service.directory.record(name)
            versions = [(await self.service.directory.version(name, version)).version] if version else list(record.versions)
            stats.extend(triton.model_statistics(name, v, self.stats.get(name, v)) for v in versions)
        return {"model_stats": stats}

    async def load(self, model: str, parameters: Mapping[str, Any]) -> None:
        """Serve ``model`` again and keep a worker for it (UnknownModel if it is not in the repository).

        Triton's load parameters (a config override, model files) are refused: models come from
        the repository through ``inferq models sync``.
        """
        await self.service.directory.record(model)
        _refuse_parameters(parameters, "load", allowed=())
        await self.control.load(model)

    async def unload(self, model: str, parameters: Mapping[str, Any]) -> None:
        """Drain ``model``'s workers and refuse inference for it."""
        await self.service.directory.record(model)
        # tritonclient always sends unload_dependents; there are no ensembles, so nothing depends on a model.
        _refuse_parameters(parameters, "unload", allowed=("unload_dependents",))
        await self.control.unload(model)

    async def infer(self, model: str, version: str | None, request: InferRequest, tenant: str | None,
                    wait_s: float | None = None, priority: str = "high",
                    traceparent: str | None = None) -> tuple[JobState, dict[str, np.ndarray]]:
        """Run ``request`` as a job and wait for it: its final state and output arrays.

        The wait is the edge's ``sync_timeout_s``, shortened by ``wait_s`` (a gRPC deadline) and by
        the request's ``timeout`` parameter (microseconds, as Triton reads it). The job's TTL is
        the wait, so a job its caller gave up on is not run later.
        """
        if await self.control.unloaded(model):
            await self.service.directory.record(model)  # an unknown model stays a 404
            raise ModelUnavailable(f"model {model!r} is unloaded; load it (POST /v2/repository/models/{model}/load)")
        wait = min(self.sync_timeout_s, wait_s if wait_s is not None else self.sync_timeout_s,
                   _timeout_s(request.parameters.get("timeout"), self.sync_timeout_s))
        if wait <= 0:
            raise DeadlineExceeded("the call's deadline has passed before the job could be queued")
        outputs = tuple(o.name for o in request.outputs) if request.outputs else None
        # A synchronous caller is waiting: high priority by default (its tenant may be limited to normal).
        sub = Submission(model, version, request.inputs, outputs, request.parameters, tenant=tenant,
                         ttl_s=min(wait, self.service.default_ttl_s), priority=priority,
                         traceparent=new_traceparent(parse_traceparent(traceparent)))  # the caller's trace, or a new one
        state, _ = await self.service.submit(sub, wait)
        if not state.terminal:
            raise DeadlineExceeded(f"job {state.job_id} did not finish within {wait:g}s; poll /v1/jobs/{state.job_id}")
        if state.status != SUCCEEDED:
            error = state.error or {"code": state.status, "message": f"job {state.status}"}
            raise JobFailed(state.job_id, state.status, error["code"], error["message"])
        return state, decode_tensor_map(await self.service.outputs(state) or {}, what="outputs")



def _refuse_parameters(parameters: Mapping[str, Any], what: str, allowed: tuple[str, ...]) -> None:
    unsupported = sorted(set(parameters) - set(allowed))
    if unsupported:
        raise InvalidInput(f"{what} parameters {unsupported} are not supported: models come from the repository "
                           "(inferq models sync), so a load takes no config or files")


def _timeout_s(timeout_us: Any, default_s: float) -> float:
    """A request's ``timeout`` parameter (microseconds) in seconds; ``default_s`` when absent or 0."""
    if timeout_us is None or timeout_us == 0:
        return default_s
    if type(timeout_us) is not int or timeout_us < 0:
        raise InvalidInput("request parameter timeout must be a non-negative integer of microseconds")
    return timeout_us / 1e6
