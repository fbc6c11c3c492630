"""The one error hierarchy of inferq.

Third-party errors (aio-pika, aetcd, onnxruntime, msgpack) are translated at the
boundary into one of these, so callers catch inferq errors only::

    InferqError
     +-- ConfigError                 bad settings, model repository or model config
     +-- CodecError                  a message or tensor that cannot be decoded
     |    +-- MessageTooLarge        over a configured size bound
     |    +-- UnsupportedMedia       a content type we do not speak
     +-- InvalidInput                a well-formed request that does not fit the model
     |    +-- UnknownModel           no such model or version
     +-- BrokerError                 RabbitMQ trouble
     |    +-- BrokerUnavailable      cannot reach the broker or publish timed out
     |    +-- BrokerRejected         the broker refused a publish (queue full: back off)
     |    +-- Unroutable             no queue is bound for the routing key
     |    +-- TopologyError          a declaration clashes with what exists
     +-- NotFound                    no such job (or not the caller's)
     +-- Conflict                    the request clashes with the job's state
     +-- CoordinationError           etcd trouble
     +-- InferenceError              ONNX Runtime failed to load or run a model

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


class UnsupportedMedia(CodecError):
    code = "unsupported_media_type"


class NotFound(InferqError):
    code = "not_found"


class Conflict(InferqError):
    code = "conflict"


class InvalidInput(InferqError):
    code = "invalid_input"


class UnknownModel(InvalidInput):
    code = "unknown_model"


class BrokerError(InferqError):
    code = "broker_error"


class BrokerUnavailable(BrokerError):
    code = "broker_unavailable"


class BrokerRejected(BrokerError):
    code = "broker_rejected"


class Unroutable(BrokerError):
    code = "unroutable"


class TopologyError(BrokerError):
    code = "topology_error"


class CoordinationError(InferqError):
    code = "coordination_error"


class InferenceError(InferqError):
    code = "inference_error"
