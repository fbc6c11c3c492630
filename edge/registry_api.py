"""The registry's HTTP API (/v1): push, aliases, traffic, shadow, removal, artifacts, and the model document.

Changes need the ``admin`` role when API keys are on; with them off (``edge.auth =
false``) they are allowed from this host only (a loopback peer), so an edge bound to
a public address with auth off cannot be re-pointed by anyone who reaches it.
Artifacts need the ``node`` or ``admin`` role (anyone when auth is off). Every
refusal is a 4xx with ``{"error": {"code", "message"}}``; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from prometheus_client.metrics_core import Metric

from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import Topology, check_model_name
from inferq.edge.artifacts import serve_blob
from inferq.edge.auth import Principal
from inferq.edge.health import VersionHealth
from inferq.edge.models import ModelDirectory
from inferq.edge.responses import json_response
from inferq.edge.shadow import ShadowTracker
from inferq.errors import CodecError, ConfigError, Forbidden, InvalidInput, NotFound, UnknownModel
from inferq.runtime.artifacts import CHUNK, MODEL_FILE, Blob
from inferq.runtime.loader import queue_limits, unpinned_target
from inferq.runtime.metrics import gauge
from inferq.runtime.records import ModelRecord
from inferq.runtime.plans import KEEP, parse_rule_or_none
from inferq.runtime.registry import Registry
from inferq.runtime.versions import dematerialize, describe_blobs, file_map, materialize
from inferq.runtime.repository import ModelConfig
from inferq.runtime.routing import alias_version, split
from inferq.runtime.split import split_into_registry
from inferq.settings import Settings

HISTORY_SHOWN = 20
FILE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class RegistryAPI:
    """Handlers of the registry routes, and the registry's part of ``GET /v1/models/{m}`` and ``/metrics``."""

    def __init__(self, registry: Registry, directory: ModelDirectory, health: VersionHealth, shadows: ShadowTracker,
                 connection: BrokerConnection, topology: Topology, settings: Settings, auth_enabled: bool) -> None:
        self.registry = registry
        self.store = registry.store
        self.directory = directory
        self.health = health
        self.shadows = shadows
        self.connection = connection
        self.topology = topology
        self.settings = settings
        self.auth_enabled = auth_enabled

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/models/{model}/versions", self.push)
        r.add_delete("/v1/models/{model}/versions/{version}", self.remove_version)
        r.add_get("/v1/models/{model}/versions/{version}/artifact", self.artifact)
        r.add_delete("/v1/models/{model}", self.remove_model)
        r.add_put("/v1/models/{model}/aliases/{alias}", self.set_alias)
        r.add_delete("/v1/models/{model}/aliases/{alias}", self.unalias)
        r.add_post("/v1/models/{model}/aliases/{alias}/rollback", self.rollback)
        r.add_put("/v1/models/{model}/traffic", self.set_traffic)
        r.add_put("/v1/models/{model}/shadow", self.set_shadow)
        r.add_delete("/v1/models/{model}/shadow", self.clear_shadow)
        r.add_get("/v1/models/{model}/shadow", self.shadow_report)
        r.add_get("/v1/models/{model}/history", self.history)
        r.add_post("/v1/models/{model}/split", self.split_model)

    # --- who may ---------------------------------------------------------------------------------------------

    def _admin(self, request: web.Request, what: str) -> str:
        """The caller's name for the history, if it may change the registry; else Forbidden."""
        principal: Principal | None = request.get("principal")
        if self.auth_enabled:
            if principal is None:
                raise Forbidden(f"{what} needs an API key with the admin role")
            principal.require_admin(what)
            return f"{principal.tenant or 'default'} ({principal.role})"
        if not _loopback(request.remote):
            raise Forbidden(f"{what} is allowed only from the edge's own host while API keys are off (edge.auth = false)")
        return f"local ({request.remote})"

    # --- versions ----------------------------------------------------------------------------------------------

    async def push(self, request: web.Request) -> web.Response:
        """``POST /v1/models/{m}/versions``: multipart with ``model.onnx`` (+ external data files), ``version``, ``config``, ``reason``."""
        model = _model_name(request)
        who = self._admin(request, "pushing a model version")
        fields, files = await self._receive(request)
        if MODEL_FILE not in files:
            raise InvalidInput("the upload needs a file part named model.onnx")
        try:
            config = ModelConfig.parse(fields["config"], "pushed config.toml") if "config" in fields else None
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from exc
        known = await self.registry.get(model)
        variants_from = config or (ModelConfig.from_dict(dict(known.config)) if known is not None and known.config else None)
        pushed = await describe_blobs(self.store, model, files, who, variants_from)  # variants as the config names them
        result = await self.registry.register(model, fields.get("version") or None, pushed, config, who, fields.get("reason", ""))
        record = await self.registry.get(model)
        await materialize(self.store, self.settings.model_repository, model, result.version,
                          {n: b.sha256 for n, b in files.items()}, fields.get("config"))
        await self.topology.declare_model(self.connection.publisher, model, list(record.versions), queue_limits(record),
                                          unpinned_target(record) if len(record.versions) == 1 else None)
        await self.directory.refresh()
        body = {"model": model, "version": result.version, "created": result.created, "sha256": result.sha256}
        return _json(body, 201 if result.created else 200)

    async def _receive(self, request: web.Request) -> tuple[dict[str, str], dict[str, Blob]]:
        """Stream every file part into the store (hashing it) and read the small text fields."""
        if self.store is None:
            raise InvalidInput("this edge has no artifact store")
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError) as exc:  # aiohttp asserts on a non-multipart body
            raise CodecError(f"a push is a multipart/form-data upload: {exc}") from None
        fields: dict[str, str] = {}
        files: dict[str, Blob] = {}
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise CodecError("nested multipart bodies are not supported")
            if part.filename:
                name = _file_name(part.filename)
                files[name] = await self.store.put_stream(_chunks(part), self.settings.registry.max_artifact_bytes)
            elif part.name and part.name in ("version", "config", "reason"):
                fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")[:1_000_000].strip()
            else:
                raise CodecError(f"unknown form field {part.name!r} (expected files, version, config, reason)")
        return fields, files

    async def split_model(self, request: web.Request) -> web.Response:
        """``POST /v1/models/{m}/split`` ``{"stages": K} | {"cut": [tensor, ...]}, "version"?, "as"?, "reason"?``: a pipeline."""
        model = _model_name(request)
        who = self._admin(request, "splitting a model into pipeline stages")
        if self.store is None:
            raise InvalidInput("this edge has no artifact store")
        body = await _body(request)
        stages, cut, new = body.get("stages"), body.get("cut") or [], body.get("as")
        if (stages is None) == (not cut) or (stages is not None and (not isinstance(stages, int) or isinstance(stages, bool))) \
                or not isinstance(cut, list) or not all(isinstance(t, str) for t in cut):
            raise InvalidInput('a split needs {"stages": K} (a whole number) or {"cut": ["tensor", ...]}, not both')
        if new is not None:
            try:
                check_model_name(new)
            except ConfigError as exc:
                raise InvalidInput(str(exc)) from exc
        version = body.get("version")
        result = await split_into_registry(self.registry, self.settings.model_repository, model,
                                           str(version) if version is not None else None, stages, cut, new, who, _reason(body))
        for name in [st["model"] for st in result["stages"]]:
            record = await self.registry.get(name)
            await self.topology.declare_model(self.connection.publisher, name, list(record.versions), queue_limits(record),
                                              unpinned_target(record))
        pipeline = await self.registry.get(result["pipeline"])
        await self.topology.declare_pipeline(self.connection.publisher, pipeline.name, queue_limits(pipeline))
        await self.directory.refresh()
        return _json(result, 201)

    async def remove_version(self, request: web.Request) -> web.Response:
        """``DELETE /v1/models/{m}/versions/{v}``: refused while anything points at it; its queued jobs then fail."""
        model, version = _model_name(request), request.match_info["version"]
        who = self._admin(request, "removing a model version")
        await self.registry.remove_version(model, version, who, request.query.get("reason", ""))
        await dematerialize(self.store, self.settings.model_repository, model, version)
        await self.directory.refresh()
        return _json({"model": model, "version": version, "removed": True,
                      "queued_jobs": "end failed with version_removed once the autoscaler retires the queues"}, 202)

    async def remove_model(self, request: web.Request) -> web.Response:
        """``DELETE /v1/models/{m}``: the model, its versions and aliases; every queued job of it fails."""
        model = _model_name(request)
        who = self._admin(request, "removing a model")
        await self.registry.remove_model(model, who, request.query.get("reason", ""))
        await dematerialize(self.store, self.settings.model_repository, model)
        await self.directory.refresh()
        return _json({"model": model, "removed": True,
                      "queued_jobs": "end failed with version_removed once the autoscaler retires the queues"}, 202)

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{m}/versions/{v}/artifact[?variant=V][&file=NAME]``: the bytes, ETag = SHA-256, one Range.

        With ``variant`` the files are that device variant's, its ONNX file served as ``model.onnx``.
        """
        principal: Principal | None = request.get("principal")
        if self.auth_enabled and principal is not None:
            principal.require_role("downloading a model artifact", "node", "admin")
        model, version = _model_name(request), request.match_info["version"]
        record = await self.directory.record(model, version)
        if version not in record.versions:
            raise UnknownModel(f"model {model!r} has no version {version!r}")
        name = request.query.get("file", MODEL_FILE)
        files = file_map(record.versions[version], request.query.get("variant", ""))
        if name not in files or not files[name][0]:
            raise NotFound(f"version {version} of {model!r} has no file {name!r} with a recorded hash (has {sorted(files)})")
        sha256, size = files[name]
        if self.store is None or await self.store.size(sha256) != size:
            raise NotFound(f"{name} of {model}:{version} (sha256 {sha256}) is not in this edge's artifact store")
        return await serve_blob(request, self.store, sha256, size, name)

    # --- aliases, traffic, shadow --------------------------------------------------------------------------------

    async def set_alias(self, request: web.Request) -> web.Response:
        """``PUT /v1/models/{m}/aliases/{a}`` ``{"version", "reason"?, "auto_rollback"?}``."""
        model, alias = _model_name(request), request.match_info["alias"]
        who = self._admin(request, "moving an alias")
        body = await _body(request)
        version = body.get("version")
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise InvalidInput('an alias needs {"version": "<version>"}')
        rule = parse_rule_or_none(body["auto_rollback"]) if "auto_rollback" in body else KEEP
        await self.registry.set_alias(model, alias, str(version), who, _reason(body), rule)
        return await self._document(model)

    async def unalias(self, request: web.Request) -> web.Response:
        model, alias = _model_name(request), request.match_info["alias"]
        await self.registry.unalias(model, alias, self._admin(request, "removing an alias"), request.query.get("reason", ""))
        return await self._document(model)

    async def rollback(self, request: web.Request) -> web.Response:
        """``POST /v1/models/{m}/aliases/{a}/rollback``: back to the alias's previous version, at once."""
        model, alias = _model_name(request), request.match_info["alias"]
        who = self._admin(request, "rolling back an alias")
        body = await _body(request, optional=True)
        await self.registry.rollback(model, alias, who, _reason(body))
        return await self._document(model)

    async def set_traffic(self, request: web.Request) -> web.Response:
        """``PUT /v1/models/{m}/traffic`` ``{"weights": {"stable": 90, "canary": 10}, "reason"?}`` (``{}`` clears)."""
        model = _model_name(request)
        who = self._admin(request, "changing traffic")
        body = await _body(request)
        weights = body.get("weights")
        if not isinstance(weights, dict):
            raise InvalidInput('traffic needs {"weights": {"<alias>": <percent>, ...}}')
        await self.registry.set_traffic(model, weights, who, _reason(body))
        return await self._document(model)

    async def set_shadow(self, request: web.Request) -> web.Response:
        """``PUT /v1/models/{m}/shadow`` ``{"version", "percent", "reason"?}``."""
        model = _model_name(request)
        who = self._admin(request, "changing the shadow")
        body = await _body(request)
        version, percent = body.get("version"), body.get("percent")
        if not isinstance(version, (str, int)) or isinstance(version, bool) or isinstance(percent, bool) \
                or not isinstance(percent, (int, float)):
            raise InvalidInput('a shadow needs {"version": "<version>", "percent": <0-100>}')
        await self.registry.set_shadow(model, str(version), float(percent), who, _reason(body))
        return await self._document(model)

    async def clear_shadow(self, request: web.Request) -> web.Response:
        model = _model_name(request)
        await self.registry.set_shadow(model, None, 0, self._admin(request, "changing the shadow"), request.query.get("reason", ""))
        return await self._document(model)

    async def shadow_report(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{m}/shadow``: agreement of shadow and primary outputs, and both latencies."""
        record = await self.directory.record(_model_name(request))
        return _json(self._shadow(record) or {"shadow": None})

    async def history(self, request: web.Request) -> web.Response:
        model = _model_name(request)
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 500)
        except ValueError:
            raise CodecError("limit must be a whole number") from None
        entries = await self.registry.history(model, limit)
        return _json({"model": model, "history": [json.loads(e.to_json()) for e in entries]})

    # --- the model document ------------------------------------------------------------------------------------

    async def _document(self, model: str) -> web.Response:
        await self.directory.refresh()
        summary = json.loads((await self.directory.record(model)).to_json())
        await self.describe(model, summary)
        return _json(summary)

    async def describe(self, model: str, summary: dict[str, Any]) -> None:
        """Add aliases (serving where, held why), traffic (configured, effective, notes), health, shadow, history."""
        record = await self.directory.record(model)
        ready = self.health.ready(model)
        summary["aliases"] = {}
        for name, alias in record.aliases.items():
            serving, held = alias_version(record, name, ready)
            summary["aliases"][name] = {**dataclasses.asdict(alias), "serving": serving, "held": held}
        effective = split(record, ready)
        summary["traffic"] = {"configured": dict(record.traffic), "effective": effective.weights if effective else {},
                              "versions": effective.versions if effective else {}, "notes": effective.notes if effective else []}
        summary["health"] = {v: self._health(record, v, effective) for v in record.versions}
        summary["shadow"] = self._shadow(record)
        summary["history"] = [json.loads(e.to_json()) for e in await self.registry.history(model, HISTORY_SHOWN)]
        summary["removals"] = [json.loads(r.to_json()) for r in (await self.registry.removals()).values() if r.model == model]

    def _health(self, record: ModelRecord, version: str, effective: Any) -> dict[str, Any]:
        doc = self.health.describe(record.name, version)
        share = sum(w for a, w in (effective.weights.items() if effective else []) if effective.versions.get(a) == version)
        wanted = any(w for a, w in record.traffic.items() if a in record.aliases and record.aliases[a].version == version)
        doc["traffic_percent"] = share
        if wanted and not share and not doc["ready"]:
            doc["why"] = "its traffic is held at 0: no worker of it holds a lease and has finished warm-up"
        return doc

    def _shadow(self, record: ModelRecord) -> dict[str, Any] | None:
        if record.shadow is None:
            return None
        return {"version": record.shadow.version, "percent": record.shadow.percent,
                **self.shadows.report(record.name, record.shadow.version)}

    def collect(self) -> Iterator[Metric]:
        """The registry's metric families (a prometheus-client collector): traffic weights, readiness,
        auto-rollbacks, shadow agreement, all from what the edge already caches."""
        found: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name, _, _ in _METRICS}
        for model in self.directory.names():
            record = self.directory.cached(model)
            if record is None:
                continue
            ready = self.health.ready(model)
            effective = split(record, ready)
            for alias, weight in record.traffic.items():
                found["inferq_traffic_weight"].append(({"model": model, "alias": alias}, weight))
                found["inferq_traffic_effective_weight"].append(
                    ({"model": model, "alias": alias}, effective.weights.get(alias, 0) if effective else 0))
            for alias, record_alias in record.aliases.items():
                found["inferq_auto_rollbacks"].append(({"model": model, "alias": alias}, record_alias.auto_rollbacks))
            for version in record.versions:
                found["inferq_version_ready"].append(({"model": model, "version": version}, int(version in ready)))
            if record.shadow is not None:
                report = self.shadows.report(model, record.shadow.version)
                labels = {"model": model, "version": record.shadow.version}
                found["inferq_shadow_pairs"].append((labels, report["pairs"]))
                found["inferq_shadow_agreements"].append((labels, report["agree"]))
        for name, kind, text in _METRICS:
            yield gauge(name, text, found[name], kind)


_METRICS = [
    ("inferq_traffic_weight", "gauge", "configured percent of a model's unpinned jobs per alias"),
    ("inferq_traffic_effective_weight", "gauge", "percent an alias gets now (held at 0 while its version is not ready)"),
    ("inferq_auto_rollbacks", "counter", "times an alias's auto-rollback rule took its traffic away"),
    ("inferq_version_ready", "gauge", "1 when a version has a ready, warmed-up worker"),
    ("inferq_shadow_pairs", "counter", "shadow jobs compared with their primary (this edge's view of the ledger)"),
    ("inferq_shadow_agreements", "counter", "shadow jobs whose outputs agreed with their primary's"),
]


def _model_name(request: web.Request) -> str:
    try:
        return check_model_name(request.match_info["model"])
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from None


def _file_name(name: str) -> str:
    base = Path(name).name
    if not base or base.startswith(".") or not set(base) <= FILE_NAME_CHARS:
        raise CodecError(f"file name {name!r} must be letters, digits and ._- (no directories)")
    return base


async def _chunks(part: Any) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


async def _body(request: web.Request, optional: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw and optional:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise CodecError(f"the body must be a JSON object: {exc}") from None
    if not isinstance(body, dict):
        raise CodecError("the body must be a JSON object")
    return body


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    return reason[:500] if isinstance(reason, str) else ""


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return remote == "unix"


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return json_response(body, status=status)
