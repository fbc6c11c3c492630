"""The one error hierarchy of inferq.

Third-party errors (aio-pika, aetcd, onnxruntime, msgpack) are translated at the
boundary into one of these, so callers catch inferq errors only::

    InferqError
     +-- ConfigError                 bad settings, model repository or model config
     +-- CodecError                  a message or tensor that cannot be decoded
     |    +-- MessageTooLarge        over a configured size bound
     |    |    +-- EventTooLarge     a job event the ledger cannot carry (fail that job: output_too_large)
     |    +-- UnsupportedMedia       a content type we do not speak
     +-- InvalidInput                a well-formed request that does not fit the model
     |    +-- UnknownModel           no such model or version
     |    +-- IdempotencyMismatch    an Idempotency-Key reused with a different request
     |    +-- WebhookNotAllowed      a webhook URL whose host is internal (loopback, private, metadata...)
     +-- BrokerError                 RabbitMQ trouble
     |    +-- BrokerUnavailable      cannot reach the broker or publish timed out
     |    |    +-- LedgerBehind      this edge has not caught up with the ledger yet (retry)
     |    +-- BrokerRejected         the broker refused a publish (queue full: back off)
     |    +-- Unroutable             no queue is bound for the routing key
     |    +-- TopologyError          a declaration clashes with what exists
     +-- NotFound                    no such job (or not the caller's)
     |    +-- ResultExpired          the job is known but its large result left the ledger's retention (HTTP 410)
     +-- Conflict                    the request clashes with the job's state
     +-- Unauthorized                no valid API key (HTTP 401)
     |    +-- Unauthenticated        an AMQP job whose publisher is no tenant's broker user (auth on)
     +-- Forbidden                   the API key's role may not do this
     +-- RateLimited                 over a tenant's rate or a full queue (.retry_after)
     +-- ModelUnavailable            the model is known but not served (unloaded)
     +-- DeadlineExceeded            a synchronous call whose job did not finish in time
     +-- JobFailed                   a job a caller waited for ended failed, expired or cancelled (.job_id, .status, .reason)
     +-- CoordinationError           etcd trouble
     +-- InferenceError              ONNX Runtime failed to load or run a model
     +-- IntegrityError              an artifact whose bytes are not the ones the registry recorded
     +-- NoCapacity                  no host or node can start the worker asked for
     +-- ServiceError                a local service (RabbitMQ, etcd, a test or cluster node) would not start or stop
     +-- Unavailable                 the edge or broker cannot be reached or answers 503, past the retries
     +-- Timeout (+ TimeoutError)    a request, or a wait for a job's result, ran out of time

The client SDK (``inferq.client``) raises the last two, and maps the edge's error
bodies back onto ``NotFound``, ``InvalidInput``, ``UnknownModel``, ``CodecError``,
``Conflict``, ``Unauthorized``, ``RateLimited`` and ``JobFailed``.

Every error has a stable ``code`` (used in job results and HTTP error bodies).
"""

from __future__ import annotations


class InferqError(Exception):
    """Root of every error inferq raises on purpose."""

    code = "internal"


class ConfigError(InferqError):
    code = "config_error"


class CodecError(InferqError):
    code = "bad_message"


class MessageTooLarge(CodecError):
    code = "too_large"


class EventTooLarge(MessageTooLarge):
    """A job event bigger than one broker message may be; ``job_ids`` names the jobs whose events are."""

    code = "output_too_large"

    def __init__(self, message: str, job_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.job_ids = job_ids


class UnsupportedMedia(CodecError):
    code = "unsupported_media_type"


class NotFound(InferqError):
    code = "not_found"


class ResultExpired(NotFound):
    """A finished job whose result, held in the ledger stream only, was dropped by the stream's retention."""

    code = "result_expired"


class Conflict(InferqError):
    code = "conflict"


class InvalidInput(InferqError):
    code = "invalid_input"


class UnknownModel(InvalidInput):
    code = "unknown_model"


class IdempotencyMismatch(InvalidInput):
    code = "idempotency_mismatch"


class WebhookNotAllowed(InvalidInput):
    code = "webhook_not_allowed"


class BrokerError(InferqError):
    code = "broker_error"


class BrokerUnavailable(BrokerError):
    code = "broker_unavailable"


class LedgerBehind(BrokerUnavailable):
    code = "not_ready"


class BrokerRejected(BrokerError):
    code = "broker_rejected"


class Unroutable(BrokerError):
    code = "unroutable"


class TopologyError(BrokerError):
    code = "topology_error"


class Forbidden(InferqError):
    code = "forbidden"


class ModelUnavailable(InferqError):
    code = "model_unavailable"


class DeadlineExceeded(InferqError):
    code = "timeout"


class CoordinationError(InferqError):
    code = "coordination_error"


class InferenceError(InferqError):
    code = "inference_error"


class IntegrityError(InferqError):
    """Downloaded or stored bytes whose SHA-256 is not the one the registry recorded (they are discarded)."""

    code = "integrity_error"


class NoCapacity(InferqError):
    code = "no_capacity"


class ServiceError(InferqError):
    """A local service could not be started (``inferq services``, ``make run``)."""

    code = "service_error"


class Unauthorized(InferqError):
    code = "unauthorized"


class Unauthenticated(Unauthorized):
    """An AMQP job without a ``user_id``, or from a broker user that belongs to no tenant (with auth on)."""

    code = "unauthenticated"


class RateLimited(InferqError):
    """The edge or broker refused a submission for now; try again after ``retry_after`` seconds."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(InferqError):
    code = "unavailable"


class Timeout(InferqError, TimeoutError):
    code = "timeout"


class JobFailed(InferqError):
    """A job ended without outputs: ``status`` is failed, expired or cancelled; ``reason`` (and ``code``) its error code.

    Raised to a caller that waited for the job: the SDK, and the edge's synchronous v2 calls.
    """

    code = "job_failed"

    def __init__(self, job_id: str, status: str, reason: str, message: str) -> None:
        super().__init__(f"{message} (job {job_id} {status})")
        self.job_id = job_id
        self.status = status
        self.reason = reason
        self.code = reason
        self.message = message
