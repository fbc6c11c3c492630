"""The KServe v2 / Triton HTTP protocol (``/v2``) with Triton's extensions clients call.

Health, server and model metadata, synchronous inference (binary tensors included), and the
Triton extensions ``model_configuration`` (``/config``), ``model_repository`` (index, load,
unload) and ``statistics`` (``/stats``). Errors on ``/v2`` are the protocol's
``{"error": "<code>: <message>"}``, which ``tritonclient.http`` reads into its exception.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from inferq.broker.trace import TRACEPARENT_HEADER
from inferq.broker.topology import HIGH
from inferq.edge import triton, v2
from inferq.edge.auth import Principal, priority_for
from inferq.edge.bodies import BodyParser
from inferq.edge.errors import add_error_style
from inferq.edge.responses import json_response
from inferq.edge.serving import Serving
from inferq.errors import CodecError, ModelUnavailable
from inferq.settings import EdgeSettings

_ANONYMOUS = Principal("", role="admin")  # no auth middleware ran: keys are off


def v2_error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error in the v2 protocol's shape."""
    return json_response(v2.error_body(code, message), status=status, headers=headers)


class V2Routes:
    """The ``/v2`` handlers; :meth:`register` adds them (and the v2 error style) to an app."""

    def __init__(self, serving: Serving, settings: EdgeSettings, bodies: BodyParser | None = None) -> None:
        self.serving = serving
        self.settings = settings
        self.bodies = bodies or BodyParser()

    def register(self, app: web.Application) -> None:
        """Add every /v2 route to ``app`` (before it starts)."""
        add_error_style(app, "/v2", v2_error_response)
        r = app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2/models/stats", self.statistics)  # before /v2/models/{model} would take it
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/config", self.model_config)
            r.add_get(prefix + "/stats", self.statistics)
            r.add_post(prefix + "/infer", self.infer)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(triton.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.serving.server_ready():
            return v2_error_response(503, "not_ready", "the edge is starting or has lost the broker")
        return json_response({"ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, version = _model(request)
        return json_response(await self.serving.model_metadata(model, version))

    async def model_ready(self, request: web.Request) -> web.Response:
        """200 when the model is served; a 4xx says "not ready", as the protocol has it."""
        model, version = _model(request)
        if not await self.serving.model_ready(model, version):
            return v2_error_response(400, ModelUnavailable.code, f"model {model!r} is unloaded")
        return json_response({"name": model, "ready": True})

    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(await self.serving.model_config(*_model(request)))

    async def statistics(self, request: web.Request) -> web.Response:
        model = request.match_info.get("model")
        return json_response(await self.serving.statistics(model, request.match_info.get("version")))

    async def repository_index(self, request: web.Request) -> web.Response:
        """Models, versions and their states; ``{"ready": true}`` keeps only the READY ones."""
        options = await _json_object(request)
        ready = options.get("ready", False)
        if not isinstance(ready, bool):
            raise CodecError("repository index option 'ready' must be true or false")
        return json_response(await self.serving.repository_index(ready))

    async def load(self, request: web.Request) -> web.Response:
        _principal(request).require_admin("loading a model")
        await self.serving.load(request.match_info["model"], await _parameters(request))
        return json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        _principal(request).require_admin("unloading a model")
        await self.serving.unload(request.match_info["model"], await _parameters(request))
        return json_response({})

    async def infer(self, request: web.Request) -> web.Response:
        """Synchronous inference: submit a job, wait, answer (binary extension included)."""
        body = await _read(request, self.settings.max_body_bytes)
        parsed = await self.bodies.parse(v2.parse_infer_request, body, v2.header_length(request.headers.get(v2.HEADER_LENGTH)))
        model, version = _model(request)
        priority = priority_for(request.get("principal"), None, HIGH)
        state, arrays = await self.serving.infer(model, version, parsed, request.get("tenant"), priority=priority,
                                                 traceparent=request.headers.get(TRACEPARENT_HEADER))
        payload, headers = v2.encode_infer_response(state.model, state.version, parsed.id or state.job_id, arrays, parsed)
        return web.Response(body=payload, headers=headers)


def _model(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["model"], request.match_info.get("version")


def _principal(request: web.Request) -> Principal:
    return request.get("principal", _ANONYMOUS)


async def _read(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    return await request.read()


async def _parameters(request: web.Request) -> dict:
    """The ``parameters`` object of an optional JSON body."""
    parameters = (await _json_object(request)).get("parameters", {})
    if not isinstance(parameters, dict):
        raise CodecError("parameters must be a JSON object")
    return parameters


async def _json_object(request: web.Request) -> dict:
    """The request's optional JSON object body ({} when empty)."""
    body = await _read(request, 1 << 20)
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise CodecError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CodecError("request body must be a JSON object")
    return doc
