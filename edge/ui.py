"""The live status page at ``/ui``: static files from the package, fed by JSON and server-sent events.

Everything it shows comes from what the edge keeps anyway: the :class:`Overview`
(queues, workers, autoscaler decisions with their reasons, refreshed in the
background) and the ledger projection (job states and recent outcomes, so the page's
history survives an edge restart: the ledger is replayed). The page itself is public;
its data routes go through the API-key middleware like every other route, and a
tenant sees only its own jobs. No build step and nothing fetched from elsewhere: the
HTML, CSS and JS files sit in ``edge/static``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from inferq.broker.messages import check_job_id
from inferq.broker.trace import trace_id
from inferq.edge.overview import Overview, VersionFacts
from inferq.edge.projection import JobProjection, JobState
from inferq.edge.responses import json_response
from inferq.errors import Forbidden, NotFound

log = logging.getLogger("inferq.edge.ui")

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"/ui": ("index.html", "text/html"), "/ui/": ("index.html", "text/html"),
              "/ui/app.js": ("app.js", "application/javascript"), "/ui/app.css": ("app.css", "text/css")}
SSE_HEARTBEAT_S = 15.0


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StatusPage:
    """The ``/ui`` routes."""

    def __init__(self, overview: Overview, projection: JobProjection, ready: Callable[[], bool],
                 drain: Callable[[str], Awaitable[None]] | None = None, auth_enabled: bool = False,
                 cancel: Callable[[str, str | None], Awaitable[JobState]] | None = None) -> None:
        """``drain`` asks a worker to drain (over the control exchange); ``cancel(job_id, tenant)`` cancels a
        queued job as the job service does for its tenant. Both are offered to admin keys only, with auth on."""
        self.overview = overview
        self.projection = projection
        self.ready = ready
        self._drain = drain
        self._cancel = cancel
        self.auth_enabled = auth_enabled
        self._closing = asyncio.Event()

    def register(self, app: web.Application) -> None:
        """Add the page, its state document, its event stream and the job lookup to ``app``."""
        for path in PAGE_FILES:
            app.router.add_get(path, self.page)
        app.router.add_get("/ui/api/state", self.state)
        app.router.add_get("/ui/api/events", self.events)
        app.router.add_get("/ui/api/jobs/{job_id}", self.job)
        app.router.add_post("/ui/api/workers/{worker_id}/drain", self.drain)
        app.router.add_post("/ui/api/jobs/{job_id}/cancel", self.cancel)
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()  # open event streams end at once, so the edge stops without waiting on them

    async def page(self, request: web.Request) -> web.Response:
        name, kind = PAGE_FILES[request.path]
        return web.Response(body=(STATIC / name).read_bytes(), content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def state(self, request: web.Request) -> web.Response:
        """The whole page's data as one JSON document."""
        return json_response(self.document(request))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the state document now, then after every overview refresh."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            while not self._closing.is_set():
                await response.write(f"event: state\ndata: {json.dumps(self.document(request))}\n\n".encode())
                await self._next_refresh()
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        return response

    async def _next_refresh(self) -> None:
        changed, closing = asyncio.ensure_future(self.overview.changed.wait()), asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({changed, closing}, timeout=SSE_HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (changed, closing):
                waiter.cancel()
            await asyncio.gather(changed, closing, return_exceptions=True)

    async def job(self, request: web.Request) -> web.Response:
        """One job's timeline from the ledger projection (a tenant sees only its own jobs)."""
        job_id = check_job_id(request.match_info["job_id"])
        state = self.projection.get(job_id)
        if state is None or (not _sees_all(request) and state.tenant != request.get("tenant")):
            raise NotFound(f"job {job_id} is not known (never submitted, or past its retention)")
        return json_response(job_timeline(state))

    async def drain(self, request: web.Request) -> web.Response:
        """Ask a live worker to drain and exit: an admin key's action; the page is read-only otherwise."""
        if not self._may_act(request):
            raise Forbidden("draining a worker from the status page needs API keys on (edge.auth) and an admin key")
        worker_id = request.match_info["worker_id"]
        if not any(w.worker_id == worker_id for w in self.overview.snapshot.workers):
            raise NotFound(f"no live worker {worker_id!r}")
        await self._drain(worker_id)
        log.info("drain of %s requested from the status page by %s", worker_id, request.get("tenant") or "default")
        return json_response({"worker_id": worker_id, "drain": "requested"}, status=202)

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel a queued job of any tenant: an admin key's action. A running job answers 409, as over the API."""
        if not self._may_cancel(request):
            raise Forbidden("cancelling a job from the status page needs API keys on (edge.auth) and an admin key")
        job_id = check_job_id(request.match_info["job_id"])
        state = self.projection.get(job_id)
        if state is None:
            raise NotFound(f"job {job_id} is not known (never submitted, or past its retention)")
        state = await self._cancel(job_id, state.tenant)  # as its own tenant: the job service checks ownership
        log.info("cancel of job %s requested from the status page by %s: now %s", job_id,
                 request.get("tenant") or "default", state.status.value)
        return json_response(job_timeline(state))

    def _may_act(self, request: web.Request) -> bool:
        principal = request.get("principal")
        return self._drain is not None and self.auth_enabled and getattr(principal, "role", "") == "admin"

    def _may_cancel(self, request: web.Request) -> bool:
        return self._cancel is not None and self._may_act(request)

    def document(self, request: web.Request) -> dict[str, Any]:
        """What the page shows, from the cached overview and the projection."""
        snap, now = self.overview.snapshot, time.time()
        everyone = _sees_all(request)
        principal = request.get("principal")
        return {
            "at": _iso(now), "refreshed_at": _iso(snap.at), "stale": self.overview.stale(now), "errors": snap.errors,
            "edge": {"ready": self.ready(), "jobs_in_memory": len(self.projection),
                     "ledger_events": self.projection.events_applied},
            "viewer": {"tenant": request.get("tenant"), "role": getattr(principal, "role", "admin"),
                       "may_drain": self._may_act(request), "may_cancel": self._may_cancel(request)},
            "models": self._models(snap, now),
            "workers": [_worker(w, now) for w in sorted(snap.workers, key=lambda w: (w.model, w.version, w.worker_id))],
            "nodes": [_node(n, now) for n in snap.nodes],
            "decisions": [_decision(d, now) for d in sorted(snap.decisions.values(), key=lambda d: (d.model, d.version))],
            "jobs": [_job_row(s) for s in self.overview.recent_jobs(50, request.get("tenant"), everyone)],
        }

    def _models(self, snap, now: float) -> list[dict[str, Any]]:
        models: dict[str, dict[str, Any]] = {}
        for (model, version), facts in sorted(snap.versions.items()):
            record = self.overview.directory.cached(model)
            entry = models.setdefault(model, {
                "name": model, "default_version": record.default_version if record else "",
                "aliases": {a: r.version for a, r in (record.aliases.items() if record else ())},
                "traffic": dict(record.traffic) if record else {}, "versions": [], "history": self._history(model)})
            workers = [w for w in snap.workers if w.model == model and w.version == version]
            entry["versions"].append(_version(version, facts, workers))
        # Models with workers or jobs first: an operator looks for what is running.
        busy = lambda m: -sum(v["workers"] + sum(v["states"].values()) for v in m["versions"])  # noqa: E731
        return sorted(models.values(), key=lambda m: (busy(m) == 0, m["name"]))

    def _history(self, model: str) -> dict[str, list[float]]:
        """Jobs finished per second and queue depth over the last refreshes (the page's sparklines)."""
        points = list(self.overview.history)
        rates, queue = [], []
        for (t0, before), (t1, after) in zip(points, points[1:]):
            a, b = before.get(model, (0, 0, 0)), after.get(model, (0, 0, 0))
            done = max(0, (b[0] + b[1]) - (a[0] + a[1]))
            rates.append(round(done / max(t1 - t0, 1e-3), 3))
            queue.append(b[2])
        return {"jobs_per_s": rates, "queue": queue}


def _sees_all(request: web.Request) -> bool:
    principal = request.get("principal")
    return principal is None or getattr(principal, "role", "admin") == "admin"


def _version(version: str, facts: VersionFacts, workers: list) -> dict[str, Any]:
    finished = facts.finished_recently
    return {
        "version": version, "queue_ready": facts.ready, "consumers": facts.consumers,
        "inflight": sum(w.stats.inflight for w in workers), "oldest_queued_s": round(facts.oldest_queued_s, 3),
        "states": facts.states, "workers": len(workers),
        "p50_ms": None if facts.p50_s is None else round(facts.p50_s * 1000, 2),
        "p99_ms": None if facts.p99_s is None else round(facts.p99_s * 1000, 2),
        "failure_rate": round(facts.failed_recently / finished, 4) if finished else 0.0,
    }


def _worker(w, now: float) -> dict[str, Any]:
    return {"worker_id": w.worker_id, "model": w.model, "version": w.version, "node": w.node, "state": w.state.value,
            "variant": w.variant, "providers": list(w.providers), "age_s": round(max(0.0, now - w.started_at), 1) if w.started_at else None,
            "jobs": w.stats.jobs, "failed": w.stats.failed, "batches": w.stats.batches, "mean_batch": w.stats.mean_batch,
            "inflight": w.stats.inflight, "warmed": w.warmed, "metrics": w.metrics}


def _node(n, now: float) -> dict[str, Any]:
    return {"node": n.node, "providers": list(n.providers), "capacity": n.capacity, "workers": n.workers,
            "restarts": n.restarts, "last_exit": n.last_exit,
            "age_s": round(max(0.0, now - n.started_at), 1) if n.started_at else None,
            "device": n.facts.to_dict(), "last_outage": _outage(n, now)}


def _outage(n, now: float) -> dict[str, Any] | None:
    """The node's last loss of the broker or etcd: how long it lasted and how long ago it ended (None: none yet).

    A node cut off now is not listed at all: its lease lapses. So what the page can
    show of connectivity is the outage it came back from.
    """
    if not n.disconnected_since or n.reconnected_at < n.disconnected_since:
        return None
    return {"lasted_s": round(n.reconnected_at - n.disconnected_since, 1), "ago_s": round(max(0.0, now - n.reconnected_at), 1)}


def _decision(d, now: float) -> dict[str, Any]:
    return {"model": d.model, "version": d.version, "backlog": d.backlog, "current": d.current, "desired": d.desired,
            "consumers": d.consumers, "reason": d.reason, "leader": d.leader,
            "age_s": round(max(0.0, now - d.at), 1) if d.at else None}


def _job_row(s: JobState) -> dict[str, Any]:
    return {"job_id": s.job_id, "model": s.model, "version": s.version, "status": s.status.value,
            "error": dict(s.error) if s.error else None, "updated_at": _iso(s.updated_at), "attempts": s.attempts,
            "worker": s.worker, "trace_id": trace_id(s.trace)}


def job_timeline(s: JobState) -> dict[str, Any]:
    """A job's events in order: queued, running, final, with the worker, attempts, timings and trace id."""
    steps = [{"state": "queued", "at": _iso(s.created_at)}]
    if s.started_at:
        steps.append({"state": "running", "at": _iso(s.started_at), "worker": s.worker})
    if s.terminal:
        steps.append({"state": s.status.value, "at": _iso(s.finished_at), "error": dict(s.error) if s.error else None})
    return {**_job_row(s), "timeline": steps, "timings": dict(s.timings or {}), "traceparent": s.trace,
            "alias": s.alias}
