"""HTTP routes: the submit-and-poll API (/v1) and the KServe v2 / Triton protocol (/v2)."""

from __future__ import annotations

import datetime
from typing import Any

from aiohttp import web

from broker.codec import decode_tensor_map, packb
from broker.messages import SUCCEEDED, parse_body
from edge import v2
from edge.auth import Authenticator
from edge.errors import error_response, json_errors
from edge.inventory import Inventory
from edge.jobs import JobService, Submission
from edge.projection import JobState
from runtime.errors import CodecError, UnsupportedMedia
from runtime.settings import EdgeSettings

JSON_TYPES = {"application/json"}
MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack"}
BINARY_HEADER = "Inference-Header-Content-Length"
SERVER_VERSION = "0.1.0"

# Final job errors as a synchronous /v2 infer answers them.
SYNC_STATUS = {"invalid_input": 422, "bad_message": 400, "expired": 504, "cancelled": 409}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_document(state: JobState, binary: bool) -> dict[str, Any]:
    """A job as the poll API shows it; ``binary`` keeps raw tensor bytes (msgpack)."""
    doc: dict[str, Any] = {
        "job_id": state.job_id, "model": state.model, "version": state.version, "status": state.status,
        "created_at": _iso(state.created_at), "started_at": _iso(state.started_at),
        "finished_at": _iso(state.finished_at), "attempts": state.attempts,
    }
    if state.outputs:
        doc["outputs"] = state.outputs if binary else v2.tensors_to_json(decode_tensor_map(state.outputs, what="outputs"))
    if state.error:
        doc["error"] = state.error
    if state.timings:
        doc["timings"] = state.timings
    return doc


class EdgeAPI:
    """The request handlers; all state lives in the JobService and the Inventory."""

    def __init__(self, service: JobService, inventory: Inventory, settings: EdgeSettings, ready: Any, auth: Authenticator) -> None:
        self.service = service
        self.auth = auth
        self.inventory = inventory
        self.settings = settings
        self._ready = ready

    def app(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(middlewares=[json_errors, self.auth.middleware()], client_max_size=self.settings.max_body_bytes)
        r = app.router
        r.add_post("/v1/models/{model}/jobs", self.submit_job)
        r.add_post("/v1/models/{model}/versions/{version}/jobs", self.submit_job)
        r.add_get("/v1/jobs/{job_id}", self.get_job)
        r.add_delete("/v1/jobs/{job_id}", self.cancel_job)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model}", self.describe_model)
        r.add_get("/metrics", self.metrics)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_post(prefix + "/infer", self.infer)
        return app

    def _tenant(self, request: web.Request) -> str | None:
        return request.get("tenant")

    async def _body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.settings.max_body_bytes, actual_size=length)
        return await request.read()

    async def _submission(self, request: web.Request) -> Submission:
        model, version = request.match_info["model"], request.match_info.get("version")
        ctype = request.content_type
        if ctype in MSGPACK_TYPES:
            inputs, outputs, params = parse_body(await self._body(request))
        elif ctype in JSON_TYPES or BINARY_HEADER in request.headers:
            parsed = v2.parse_infer_request(await self._body(request), _header_length(request))
            inputs, params = parsed.inputs, parsed.parameters
            outputs = tuple(o.name for o in parsed.outputs) if parsed.outputs else None
        else:
            raise UnsupportedMedia(f"Content-Type must be application/json or application/msgpack, not {ctype!r}")
        return Submission(
            model, version, inputs, outputs, params, tenant=self._tenant(request),
            idempotency_key=request.headers.get("Idempotency-Key"), ttl_s=_float_query(request, "ttl"),
        )

    async def submit_job(self, request: web.Request) -> web.StreamResponse:
        """POST a job: 202 with its id once the broker confirmed it.

        With ``?wait=S`` the answer waits up to S seconds for the job to finish
        and is then the job document (200), saving the client a poll.
        """
        wait = min(_float_query(request, "wait") or 0.0, self.settings.max_wait_s)
        state, created = await self.service.submit(await self._submission(request))
        location = {"Location": f"/v1/jobs/{state.job_id}"}
        if wait > 0:
            state = await self.service.get(state.job_id, state.tenant, wait)
            if state.terminal:
                response = _document(request, state)
                response.headers.update(location)
                return response
        body = {"job_id": state.job_id, "status": state.status, "model": state.model, "version": state.version}
        return web.json_response(body, status=202, headers=location)

    async def get_job(self, request: web.Request) -> web.Response:
        """GET a job; ``?wait=S`` long-polls until it is final."""
        wait = min(_float_query(request, "wait") or 0.0, self.settings.max_wait_s)
        state = await self.service.get(request.match_info["job_id"], self._tenant(request), wait)
        return _document(request, state)

    async def cancel_job(self, request: web.Request) -> web.Response:
        """DELETE a job: cancels it if still queued."""
        state = await self.service.cancel(request.match_info["job_id"], self._tenant(request))
        return _document(request, state)

    async def list_models(self, request: web.Request) -> web.Response:
        await self.service.directory.refresh()
        models = [await self._model_summary(name) for name in self.service.directory.names()]
        return web.json_response({"models": models})

    async def describe_model(self, request: web.Request) -> web.Response:
        return web.json_response(await self._model_summary(request.match_info["model"]))

    async def _model_summary(self, model: str) -> dict[str, Any]:
        record = dict(await self.service.directory.record(model))
        record["workers"] = await self.inventory.workers(model)
        record["queue_depth"] = {v: await self.inventory.queue_depth(model, v) for v in record["versions"]}
        decisions = await self.inventory.decisions()
        record["autoscaler"] = {v: decisions.get(f"{model}.{v}") for v in record["versions"]}
        return record

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: queue depth, workers, autoscaler decisions, this edge's projection."""
        await self.service.directory.refresh()
        workers, decisions = await self.inventory.workers(), await self.inventory.decisions()
        lines = _metric_headers()
        for model in self.service.directory.names():
            for version in (await self.service.directory.record(model))["versions"]:
                labels = f'model="{model}",version="{version}"'
                depth = await self.inventory.queue_depth(model, version)
                if depth is not None:
                    lines.append(f"inferq_queue_ready{{{labels}}} {depth}")
                mine = [w for w in workers if w.get("model") == model and w.get("version") == version]
                for state in ("ready", "draining"):
                    lines.append(f'inferq_workers{{{labels},state="{state}"}} {sum(1 for w in mine if w.get("state") == state)}')
                lines.append(f"inferq_worker_inflight{{{labels}}} {sum(int(w.get('stats', {}).get('inflight', 0)) for w in mine)}")
                lines.append(f"inferq_worker_jobs_total{{{labels}}} {sum(int(w.get('stats', {}).get('jobs', 0)) for w in mine)}")
                decision = decisions.get(f"{model}.{version}")
                if decision:
                    lines.append(f"inferq_autoscaler_backlog{{{labels}}} {decision['backlog']}")
                    lines.append(f"inferq_autoscaler_desired_workers{{{labels}}} {decision['desired']}")
        lines.append(f"inferq_edge_jobs_in_memory {len(self.service.projection)}")
        lines.append(f"inferq_edge_ledger_events_total {self.service.projection.events_applied}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "inferq", "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if not self._ready():
            return error_response(503, "not_ready", "the edge is starting or has lost the broker")
        return web.json_response({"ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        version = await self.service.directory.version(model, request.match_info.get("version"))
        record = await self.service.directory.record(model)
        return web.json_response({
            "name": model, "versions": list(record["versions"]), "platform": "onnxruntime_onnx",
            "inputs": [_spec_doc(s) for s in version.inputs], "outputs": [_spec_doc(s) for s in version.outputs],
        })

    async def model_ready(self, request: web.Request) -> web.Response:
        await self.service.directory.version(request.match_info["model"], request.match_info.get("version"))
        return web.json_response({"ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        """Synchronous KServe v2 inference: submit, wait, answer (binary extension included)."""
        body = await self._body(request)
        parsed = v2.parse_infer_request(body, _header_length(request))
        outputs = tuple(o.name for o in parsed.outputs) if parsed.outputs else None
        # A synchronous caller gives up after sync_timeout_s: the job must not run after that.
        sub = Submission(request.match_info["model"], request.match_info.get("version"), parsed.inputs, outputs,
                         parsed.parameters, tenant=self._tenant(request),
                         ttl_s=min(self.settings.sync_timeout_s, self.service.default_ttl_s))
        state, _ = await self.service.submit(sub)
        state = await self.service.get(state.job_id, sub.tenant, self.settings.sync_timeout_s)
        if not state.terminal:
            return error_response(504, "timeout", f"job {state.job_id} did not finish within {self.settings.sync_timeout_s:g}s; poll /v1/jobs/{state.job_id}")
        if state.status != SUCCEEDED:
            error = state.error or {"code": state.status, "message": f"job {state.status}"}
            return error_response(SYNC_STATUS.get(error["code"], 500), error["code"], error["message"])
        arrays = decode_tensor_map(state.outputs, what="outputs")
        payload, headers = v2.encode_infer_response(state.model, state.version, parsed.id or state.job_id, arrays, parsed)
        return web.Response(body=payload, headers=headers)


def _document(request: web.Request, state: JobState) -> web.Response:
    if "application/msgpack" in request.headers.get("Accept", ""):
        return web.Response(body=packb(job_document(state, binary=True)), content_type="application/msgpack")
    return web.json_response(job_document(state, binary=False))


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(BINARY_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise CodecError(f"{BINARY_HEADER} must be an integer") from None


def _float_query(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise CodecError(f"query parameter {name!r} must be a number of seconds") from None
    if value != value or value < 0:
        raise CodecError(f"query parameter {name!r} must be a non-negative number")
    return value


def _metric_headers() -> list[str]:
    meta = [
        ("inferq_queue_ready", "gauge", "jobs waiting in a model version's queue"),
        ("inferq_workers", "gauge", "live workers of a model version by state"),
        ("inferq_worker_inflight", "gauge", "jobs prefetched or running at a version's workers"),
        ("inferq_worker_jobs_total", "counter", "jobs succeeded by a version's live workers"),
        ("inferq_autoscaler_backlog", "gauge", "backlog in the autoscaler's last decision"),
        ("inferq_autoscaler_desired_workers", "gauge", "workers the autoscaler last asked for"),
        ("inferq_edge_jobs_in_memory", "gauge", "jobs in this edge's projection"),
        ("inferq_edge_ledger_events_total", "counter", "ledger events this edge has applied"),
    ]
    return [line for name, kind, text in meta for line in (f"# HELP {name} {text}", f"# TYPE {name} {kind}")]


def _spec_doc(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": v2.to_datatype(spec.dtype), "shape": [-1 if d is None else d for d in spec.shape]}
