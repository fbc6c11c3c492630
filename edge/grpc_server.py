"""The v2 gRPC endpoint: ``inference.GRPCInferenceService`` on its own port (``edge.grpc_port``).

Served by grpcio's asyncio server on the edge's loop, over the same :class:`Serving` as
``/v2`` over HTTP, so ModelInfer is a job like any other (queue, batching, ledger). inferq
errors become gRPC status codes with the v2 message (``"<code>: <message>"``) as details.
API keys travel as ``authorization: Bearer <key>`` metadata. Shared memory, streaming,
tracing and log settings answer UNIMPLEMENTED with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from inferq import errors as e
from inferq.edge import grpc_codec, triton, v2
from inferq.broker.topology import HIGH
from inferq.edge.auth import priority_for, UNAUTHORIZED, Authenticator, Principal, over_rate
from inferq.edge.proto import grpc_service_pb2 as pb
from inferq.edge.proto import grpc_service_pb2_grpc as pb_grpc
from inferq.edge.proto import model_config_pb2
from inferq.edge.serving import Serving
from inferq.errors import ConfigError

log = logging.getLogger("inferq.edge.grpc")

Code = grpc.StatusCode
# Most specific first, as in the HTTP table (edge/errors.py).
STATUS: list[tuple[type[e.InferqError], grpc.StatusCode]] = [
    (e.MessageTooLarge, Code.RESOURCE_EXHAUSTED),
    (e.CodecError, Code.INVALID_ARGUMENT),
    (e.UnknownModel, Code.NOT_FOUND),
    (e.NotFound, Code.NOT_FOUND),
    (e.InvalidInput, Code.INVALID_ARGUMENT),
    (e.Conflict, Code.FAILED_PRECONDITION),
    (e.Unauthorized, Code.UNAUTHENTICATED),
    (e.Forbidden, Code.PERMISSION_DENIED),
    (e.RateLimited, Code.RESOURCE_EXHAUSTED),
    (e.DeadlineExceeded, Code.DEADLINE_EXCEEDED),
    (e.ModelUnavailable, Code.UNAVAILABLE),
    (e.BrokerRejected, Code.RESOURCE_EXHAUSTED),
    (e.BrokerError, Code.UNAVAILABLE),
    (e.CoordinationError, Code.UNAVAILABLE),
]
JOB_STATUS = {"invalid_input": Code.INVALID_ARGUMENT, "bad_message": Code.INVALID_ARGUMENT,
              "expired": Code.DEADLINE_EXCEEDED, "cancelled": Code.CANCELLED}

SHARED_MEMORY = ("shared memory is not supported: inference runs in worker processes, often on other hosts, "
                 "that cannot map a client's memory; send tensors in raw_input_contents")
UNSUPPORTED = {
    "ModelStreamInfer": "streaming inference is not supported; call ModelInfer",
    "TraceSetting": "tracing is not supported",
    "LogSettings": "log settings are not supported over the protocol; use inferq's --log-level",
}


def status_of(exc: e.InferqError) -> grpc.StatusCode:
    """The gRPC status code for an inferq error."""
    if isinstance(exc, e.JobFailed):
        return JOB_STATUS.get(exc.code, Code.INTERNAL)
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return Code.INTERNAL


Handler = Callable[..., Awaitable[Any]]


def rpc(*, public: bool = False, metered: bool = False, admin: str = "") -> Callable[[Handler], Handler]:
    """Wrap a servicer method: authenticate (unless ``public``), meter, check the admin role, map errors."""

    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        async def call(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                principal = None if public else await self.principal(context, metered)
                if admin:
                    principal.require_admin(admin)
                return await method(self, request, context, principal)
            except e.InferqError as exc:
                await context.abort(status_of(exc), v2.error_message(exc.code, str(exc)))
            except grpc.aio.AbortError:
                raise
            except Exception:  # a bug of ours: log it, answer INTERNAL and keep serving
                log.exception("unhandled error in %s", method.__name__)
                await context.abort(Code.INTERNAL, "internal: internal error; see the edge's log")

        return call

    return wrap


def _version(request: Any) -> str | None:
    return request.version or None


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, each answered by :class:`Serving`."""

    def __init__(self, serving: Serving, auth: Authenticator) -> None:
        self.serving = serving
        self.auth = auth

    async def principal(self, context: grpc.aio.ServicerContext, metered: bool) -> Principal:
        """The caller from its ``authorization`` metadata; Unauthorized without a valid key."""
        metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        principal = await self.auth.authenticate(metadata.get("authorization", ""))
        if principal is None:
            raise e.Unauthorized(UNAUTHORIZED)
        if metered and self.auth.admit(principal) > 0:
            raise e.RateLimited(over_rate(principal))
        return principal

    @rpc(public=True)
    async def ServerLive(self, request: Any, context: Any, principal: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc(public=True)
    async def ServerReady(self, request: Any, context: Any, principal: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.serving.server_ready())

    @rpc()
    async def ServerMetadata(self, request: Any, context: Any, principal: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**triton.server_metadata())

    @rpc()
    async def ModelReady(self, request: Any, context: Any, principal: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.serving.model_ready(request.name, _version(request)))

    @rpc()
    async def ModelMetadata(self, request: Any, context: Any, principal: Any) -> pb.ModelMetadataResponse:
        doc = await self.serving.model_metadata(request.name, _version(request))
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    @rpc()
    async def ModelConfig(self, request: Any, context: Any, principal: Any) -> pb.ModelConfigResponse:
        doc = await self.serving.model_config(request.name, _version(request))
        return pb.ModelConfigResponse(config=json_format.ParseDict(doc, model_config_pb2.ModelConfig()))

    @rpc()
    async def ModelStatistics(self, request: Any, context: Any, principal: Any) -> pb.ModelStatisticsResponse:
        doc = await self.serving.statistics(request.name or None, _version(request))
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    @rpc()
    async def RepositoryIndex(self, request: Any, context: Any, principal: Any) -> pb.RepositoryIndexResponse:
        entries = await self.serving.repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**entry) for entry in entries])

    @rpc(metered=True, admin="loading a model")
    async def RepositoryModelLoad(self, request: Any, context: Any, principal: Any) -> pb.RepositoryModelLoadResponse:
        await self.serving.load(request.model_name, dict(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc(metered=True, admin="unloading a model")
    async def RepositoryModelUnload(self, request: Any, context: Any, principal: Any) -> pb.RepositoryModelUnloadResponse:
        await self.serving.unload(request.model_name, dict(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @rpc(metered=True)
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext, principal: Principal) -> pb.ModelInferResponse:
        parsed = grpc_codec.parse_model_infer(request)
        # A client deadline bounds the wait (and so the job's TTL) below the edge's own limit.
        state, arrays = await self.serving.infer(request.model_name, request.model_version or None, parsed,
                                                 principal.tenant or None, context.time_remaining(),
                                                 priority=priority_for(principal, None, HIGH))
        return grpc_codec.encode_model_infer(state.model, state.version, state.job_id, arrays, parsed)

    async def ModelStreamInfer(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(Code.UNIMPLEMENTED, UNSUPPORTED["ModelStreamInfer"])

    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(Code.UNIMPLEMENTED, UNSUPPORTED["TraceSetting"])

    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(Code.UNIMPLEMENTED, UNSUPPORTED["LogSettings"])

    async def _no_shared_memory(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(Code.UNIMPLEMENTED, SHARED_MEMORY)

    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = _no_shared_memory
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _no_shared_memory


class GrpcEdge:
    """The gRPC server as a resource: :meth:`start` builds and opens it, :meth:`aclose` stops it."""

    def __init__(self, serving: Serving, auth: Authenticator, host: str, port: int, max_message_bytes: int) -> None:
        self._servicer = Servicer(serving, auth)
        self._address = f"{host}:{port}"
        self._max_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self._shared = False
        self.port: int | None = None

    @classmethod
    async def open(cls, serving: Serving, auth: Authenticator, host: str, port: int, max_message_bytes: int,
                   shared: bool = False) -> GrpcEdge:
        """A listening gRPC endpoint; ``shared``: the port is shared with the other members of an edge group."""
        self = cls(serving, auth, host, port, max_message_bytes)
        self._shared = shared
        await self._bind()
        return self

    async def _bind(self) -> None:
        """Bind and start serving; ConfigError if the port cannot be had."""
        options = [
            ("grpc.max_receive_message_length", self._max_bytes),
            ("grpc.max_send_message_length", self._max_bytes),
            # A port another edge holds must fail here, not be shared silently; an edge group's members share theirs.
            ("grpc.so_reuseport", 1 if self._shared else 0),
        ]
        server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        try:
            self.port = server.add_insecure_port(self._address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen for gRPC on {self._address}: {exc}") from exc
        await server.start()
        self._server = server
        log.info("edge gRPC (KServe v2) listening on %s", self._address)

    async def aclose(self) -> None:
        """Stop taking calls, give running ones a few seconds, then stop (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=5.0)
