"""HTTP routes of the submit-and-poll API (/v1) and /metrics; /v2 lives in ``v2_routes``."""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from inferq.broker.codec import decode_tensor_map
from inferq.broker.messages import parse_submission
from inferq.broker.topology import HIGH, NORMAL
from inferq.broker.trace import TRACEPARENT_HEADER, new_traceparent, parse_traceparent, trace_id
from inferq.edge import download, eventstream, listing, v2, webhook_url
from inferq.edge.agent_api import AgentAPI
from inferq.edge.auth import Authenticator, priority_for
from inferq.edge.bodies import BodyParser
from inferq.edge.errors import json_errors
from inferq.edge.inventory import Inventory
from inferq.edge.jobs import JobService, Submission
from inferq.edge.metrics import EdgeMetrics
from inferq.edge.overview import Overview
from inferq.edge.projection import JobState
from inferq.edge.registry_api import RegistryAPI
from inferq.edge.responses import json_response
from inferq.edge.webhooks import webhook_spec, webhook_view
from inferq.errors import CodecError, InvalidInput, NotFound, UnknownModel, UnsupportedMedia
from inferq.runtime.metrics import exposition
from inferq.runtime.records import Decision, WorkerRecord
from inferq.settings import EdgeSettings, WebhookSettings

ROUTE_KEY_HEADER = "X-Inferq-Route-Key"  # the sticky key of a traffic split
JSON_TYPES = {"application/json"}
MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack"}
BINARY_HEADER = v2.HEADER_LENGTH
SUBMIT_FIELDS = ("priority", "webhook", "webhook_events_filter")  # top-level fields beside inputs, in JSON and msgpack bodies alike


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_document(state: JobState, binary: bool, outputs: dict[str, Any] | None = None,
                 summary: bool = False) -> dict[str, Any]:
    """A job as the poll API shows it; ``binary`` keeps raw tensor bytes (msgpack); a ``summary`` has no outputs.

    ``outputs`` stands in for ``state.outputs`` when the projection does not hold them (a large result).
    """
    outputs = None if summary else state.outputs if outputs is None else outputs
    doc: dict[str, Any] = {
        "job_id": state.job_id, "model": state.model, "version": state.version, "status": state.status,
        "created_at": _iso(state.created_at), "started_at": _iso(state.started_at),
        "finished_at": _iso(state.finished_at), "attempts": state.attempts,
    }
    if state.webhook is not None:
        doc["webhook"] = webhook_view(state)
    if outputs:
        doc["outputs"] = outputs if binary else v2.tensors_to_json(decode_tensor_map(outputs, what="outputs"))
    if state.error:
        doc["error"] = state.error
    if state.timings:
        doc["timings"] = state.timings
    if state.alias:
        doc["alias"] = state.alias
    if state.shadow_of:
        doc["shadow_of"] = state.shadow_of
    if state.chunks:
        doc["progress"] = state.progress or {"done": 0, "total": state.chunks}
    if state.stage:
        doc["stage"] = state.stage
        doc["stages"] = [{"stage": name, **{k: v for k, v in st.items() if k != "at"}}
                         for name, st in sorted(state.stages.items(), key=lambda kv: kv[1]["at"])]
    if state.worker:
        doc["worker"] = state.worker
    if state.trace:
        doc["traceparent"] = state.trace
        doc["trace_id"] = trace_id(state.trace)
    return doc


def webhook_body(state: JobState, max_bytes: int) -> str:
    """A webhook's JSON body: the job document; above ``max_bytes`` without outputs, and ``outputs_omitted``."""
    doc = job_document(state, binary=False)
    body = json.dumps(doc, separators=(",", ":"))
    if (len(body) > max_bytes and "outputs" in doc) or state.held_out:  # a large result: the receiver GETs it
        doc = {**job_document(state, binary=False, summary=True), "outputs_omitted": True}
        body = json.dumps(doc, separators=(",", ":"))
    return body


class EdgeAPI:
    """The request handlers; all state lives in the JobService and the Inventory."""

    def __init__(self, service: JobService, inventory: Inventory, settings: EdgeSettings, auth: Authenticator,
                 registry: RegistryAPI | None = None, agents: AgentAPI | None = None, edge_metrics: EdgeMetrics | None = None,
                 overview: Overview | None = None, webhooks: WebhookSettings | None = None,
                 webhook_secrets: Callable[[str | None], Awaitable[list[str]]] | None = None,
                 bodies: BodyParser | None = None) -> None:
        self.service = service
        self.webhooks = webhooks or WebhookSettings()
        self._webhook_secrets = webhook_secrets or _deployment_secret(self.webhooks)
        self._allow = webhook_url.AllowList.parse(self.webhooks.allow_hosts)
        self.auth = auth
        self.inventory = inventory
        self.settings = settings
        self.registry = registry
        self.agents = agents
        self.edge_metrics = edge_metrics or EdgeMetrics()
        self.overview = overview
        self.bodies = bodies or BodyParser()

    def app(self) -> web.Application:
        """The aiohttp application with the /v1 and /metrics routes (``V2Routes.register`` adds /v2)."""
        app = web.Application(middlewares=[json_errors, self.auth.middleware()], client_max_size=self.settings.max_body_bytes)
        r = app.router
        r.add_post("/v1/models/{model}/jobs", self.submit_job)
        r.add_post("/v1/models/{model}/versions/{version}/jobs", self.submit_job)
        r.add_post("/v1/models/{model}/aliases/{alias}/jobs", self.submit_job)
        # Before /v1/jobs/{job_id}: "stats" would be captured as a job id.
        r.add_get("/v1/jobs", self.list_jobs)
        r.add_get("/v1/jobs/stats", self.job_stats)
        r.add_get("/v1/jobs/{job_id}/events", self.job_events)
        r.add_get("/v1/jobs/{job_id}", self.get_job)
        r.add_delete("/v1/jobs/{job_id}", self.cancel_job)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model}", self.describe_model)
        r.add_get("/v1/models/{model}/scaling", self.model_scaling)
        r.add_get("/metrics", self.metrics)
        if self.overview is not None:
            r.add_get("/v1/metrics/targets", self.metrics_targets)
        if self.registry is not None:
            self.registry.register(app)
        if self.agents is not None:
            self.agents.register(app)
        return app

    def _tenant(self, request: web.Request) -> str | None:
        return request.get("tenant")

    async def _body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.settings.max_body_bytes, actual_size=length)
        return await request.read()

    async def _submission(self, request: web.Request) -> Submission:
        model, version, alias = request.match_info["model"], request.match_info.get("version"), request.match_info.get("alias")
        ctype = request.content_type
        if ctype in MSGPACK_TYPES:
            inputs, outputs, params, extras = await self.bodies.parse(parse_submission, await self._body(request), SUBMIT_FIELDS)
        elif ctype in JSON_TYPES or BINARY_HEADER in request.headers:
            parsed = await self.bodies.parse(v2.parse_infer_request, await self._body(request),
                                             v2.header_length(request.headers.get(BINARY_HEADER)))
            inputs, params, extras = parsed.inputs, parsed.parameters, parsed.extras
            outputs = tuple(o.name for o in parsed.outputs) if parsed.outputs else None
        else:
            raise UnsupportedMedia(f"Content-Type must be application/json or application/msgpack, not {ctype!r}")
        # A caller waiting on the answer is interactive: it goes ahead of bulk work unless it says otherwise.
        default = HIGH if _float_query(request, "wait") else NORMAL
        return Submission(
            model, version, inputs, outputs, params, tenant=self._tenant(request),
            idempotency_key=request.headers.get("Idempotency-Key"), ttl_s=_float_query(request, "ttl"),
            priority=priority_for(request.get("principal"), extras.get("priority"), default),
            alias=alias, route_key=request.headers.get(ROUTE_KEY_HEADER) or None, shard=_int_query(request, "shard"),
            # The edge's span of this job: a child of the caller's trace, or the root of a new one.
            traceparent=new_traceparent(parse_traceparent(request.headers.get(TRACEPARENT_HEADER))),
            webhook=await self._webhook(extras, self._tenant(request)),
        )

    async def _webhook(self, extras: dict[str, Any], tenant: str | None) -> dict[str, Any] | None:
        """The submit's webhook, its URL through the SSRF guard (422 ``webhook_not_allowed``)."""
        url = extras.get("webhook")
        if url is None:
            return webhook_spec(None, extras.get("webhook_events_filter"))
        url = await webhook_url.check(url, self._allow)
        if not await self._webhook_secrets(tenant):
            raise InvalidInput("webhooks need a signing secret: set webhooks.secret, or give the tenant one "
                               "(inferq tenant webhook-secret NAME)")
        return webhook_spec(url, extras.get("webhook_events_filter"))

    async def submit_job(self, request: web.Request) -> web.StreamResponse:
        """POST a job: 202 with its id once the broker confirmed it.

        With ``?wait=S`` the answer waits up to S seconds for the job to finish
        and is then the job document (200), saving the client a poll.
        """
        wait = min(_float_query(request, "wait") or 0.0, self.settings.max_wait_s)
        submission = await self._submission(request)
        state, created = await self.service.submit(submission, wait)
        location = {"Location": f"/v1/jobs/{state.job_id}", TRACEPARENT_HEADER: state.trace or submission.traceparent}
        if wait > 0 and state.terminal:
            return await self._document(request, state, location)
        body = {"job_id": state.job_id, "status": state.status, "model": state.model, "version": state.version}
        if state.alias:
            body["alias"] = state.alias
        return json_response(body, status=202, headers=location)

    async def get_job(self, request: web.Request) -> web.Response:
        """GET a job; ``?wait=S`` long-polls until it is final."""
        wait = min(_float_query(request, "wait") or 0.0, self.settings.max_wait_s)
        state = await self.service.get(request.match_info["job_id"], self._tenant(request), wait)
        return await self._document(request, state)

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """GET a job's event stream (text/event-stream) until its final state."""
        return await eventstream.stream(request, self.service, self._tenant(request),
                                        _event_document, self.settings.events_heartbeat_s)

    async def list_jobs(self, request: web.Request) -> web.Response:
        """GET the caller's jobs, newest first: ``{"jobs": [summaries], "next": cursor | null}``."""
        wanted = listing.JobFilter.from_query(self._tenant(request), request.query)
        limit = listing.parse_limit(request.query.get("limit"))
        found, after = listing.page(self.service.projection.jobs(), wanted, limit, request.query.get("after") or None)
        return json_response({"jobs": [job_document(s, binary=False, summary=True) for s in found], "next": after})

    async def job_stats(self, request: web.Request) -> web.Response:
        """GET the caller's jobs counted by status (``?model=``, ``?version=``)."""
        wanted = listing.JobFilter.from_query(self._tenant(request), {k: v for k, v in request.query.items() if k != "status"})
        return json_response({"model": wanted.model, "version": wanted.version,
                              "counts": listing.counts(self.service.projection.jobs(), wanted)})

    async def cancel_job(self, request: web.Request) -> web.Response:
        """DELETE a job: cancels it if still queued."""
        state = await self.service.cancel(request.match_info["job_id"], self._tenant(request))
        return await self._document(request, state)

    async def _document(self, request: web.Request, state: JobState,
                        headers: dict[str, str] | None = None) -> web.StreamResponse:
        """The job document, its outputs read back from the ledger if large, streamed if large (edge/download.py)."""
        outputs = await self.service.outputs(state)
        if "application/msgpack" in request.headers.get("Accept", ""):
            return await download.send_msgpack(request, job_document(state, binary=True, outputs=outputs), headers)
        # outputs={}: the skeleton without them; send_json puts them in place, a slice at a time when large.
        return await download.send_json(request, job_document(state, binary=False, outputs={}), outputs, headers)

    async def list_models(self, request: web.Request) -> web.Response:
        await self.service.directory.refresh()
        models = [await self._model_summary(name) for name in self.service.directory.names()]
        return json_response({"models": models})

    async def describe_model(self, request: web.Request) -> web.Response:
        return json_response(await self._model_summary(request.match_info["model"]))

    async def model_scaling(self, request: web.Request) -> web.Response:
        """The autoscaler's desired workers for a model version (``?version=``, default: the default one).

        The shape KEDA's ``metrics-api`` scaler reads (``valueLocation:
        desired_workers``, see deploy/kubernetes/components/keda): the number
        counts jobs in flight at busy workers, not only those waiting. 404 when
        no autoscaler has decided yet; 503 while etcd does not answer, so KEDA
        keeps the replicas it has (as the paused autoscaler does).
        """
        model = request.match_info["model"]
        record = await self.service.directory.record(model)
        version = request.query.get("version") or record.default_version
        if version not in record.versions:
            raise UnknownModel(f"model {model!r} has no version {version!r} (has {list(record.versions)})")
        decision = await self.inventory.decision(model, version)
        if decision is None:
            raise NotFound(f"no scaling decision for {model}:{version} yet: is an autoscaler running with {model} "
                           "in autoscaler.models (launcher none for KEDA)?")
        return json_response(scaling_document(decision, time.time()))

    async def _model_summary(self, model: str) -> dict[str, Any]:
        record = await self.service.directory.record(model)
        summary = json.loads(record.to_json())
        now = time.time()
        summary["workers"] = [_worker_document(w, now) for w in await self.inventory.workers(model)]
        summary["queue_depth"] = {v: await self.inventory.queue_depth(model, v) for v in record.versions}
        decisions = await self.inventory.decisions()
        summary["autoscaler"] = {v: _with_iso(_asdict(decisions.get(f"{model}.{v}")), "at") for v in record.versions}
        if self.registry is not None:
            await self.registry.describe(model, summary)
        return summary

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text from the edge's registry: no etcd read or queue declare here (see edge/overview.py)."""
        return exposition(self.edge_metrics.registry)

    async def metrics_targets(self, request: web.Request) -> web.Response:
        """Prometheus HTTP service discovery: every worker (model, version, node) and agent (node) that serves /metrics."""
        snap = self.overview.snapshot
        groups = [{"targets": [w.metrics], "labels": {"job": "inferq-worker", "model": w.model, "version": w.version,
                                                       "node": w.node, "worker": w.worker_id}}
                  for w in sorted(snap.workers, key=lambda w: w.worker_id) if w.metrics]
        groups += [{"targets": [n.metrics], "labels": {"job": "inferq-agent", "node": n.node}} for n in snap.nodes if n.metrics]
        return json_response(groups)


def _event_document(state: JobState) -> dict[str, Any]:
    # An event carries the outputs the projection holds; a large result is fetched with a GET instead.
    doc = job_document(state, binary=False)
    return {**doc, "outputs_omitted": True} if state.held_out else doc


def _deployment_secret(settings: WebhookSettings) -> Callable[[str | None], Awaitable[list[str]]]:
    async def secrets(tenant: str | None) -> list[str]:
        return [settings.secret] if settings.secret else []
    return secrets


def scaling_document(decision: Decision, now: float) -> dict[str, Any]:
    """A decision as ``/v1/models/{m}/scaling`` shows it; ``desired_workers`` is KEDA's value."""
    return {
        "model": decision.model, "version": decision.version,
        "desired_workers": decision.desired, "current_workers": decision.current,
        "backlog": decision.backlog, "consumers": decision.consumers, "reason": decision.reason,
        "decided_by": decision.leader, "decided_at": _iso(decision.at) if decision.at else None,
        "age_s": round(max(0.0, now - decision.at), 3) if decision.at else None,
    }


def _asdict(record: Any) -> dict[str, Any] | None:
    return None if record is None else dataclasses.asdict(record)


def _worker_document(worker: WorkerRecord, now: float) -> dict[str, Any]:
    """A worker in a model's listing; a warming one says for how long (``warming_s``) and since when."""
    doc = _with_iso(_with_iso(json.loads(worker.to_json()), "started_at"), "warming_since")
    warming = worker.warming_s(now)
    if warming is not None:
        doc["warming_s"] = warming
    return doc


def _with_iso(doc: dict[str, Any] | None, field: str) -> dict[str, Any] | None:
    """``doc`` with its unix-seconds ``field`` as ISO 8601, like every time in an HTTP answer.

    etcd records keep unix seconds (what their writers compare); only the HTTP view changes.
    """
    if doc is not None and isinstance(doc.get(field), (int, float)):
        doc[field] = _iso(doc[field]) if doc[field] else None
    return doc


def _int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise CodecError(f"query parameter {name!r} must be a whole number")
    return int(raw)


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
