"""What the client knows about a job: its status and its document, from HTTP (JSON or msgpack) or an AMQP reply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferq.broker.codec import decode_tensor_map, encode_tensor
from inferq.broker.status import JobStatus
from inferq.errors import CodecError, JobFailed

# KServe v2 datatypes <-> numpy, for JSON bodies (msgpack carries numpy names and raw bytes).
V2_DTYPES = {
    "BOOL": "bool", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
NUMPY_DTYPES = {v: k for k, v in V2_DTYPES.items()}


@dataclass(frozen=True)
class JobDocument:
    """One job as seen by the client: the edge's job document, or what an AMQP reply said."""

    job_id: str
    status: JobStatus
    model: str = ""
    version: str = ""
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    outputs: Mapping[str, np.ndarray] | None = None
    error: Mapping[str, str] | None = None
    timings: Mapping[str, Any] | None = None
    progress: Mapping[str, int] | None = None  # a sharded job: {"done", "total"} chunks
    stage: str | None = None  # a pipeline job: the stage it is at

    @property
    def final(self) -> bool:
        return self.status.final

    def outputs_or_raise(self) -> dict[str, np.ndarray]:
        """The outputs of a succeeded job; :class:`~inferq.errors.JobFailed` for any other final status."""
        if self.status is JobStatus.SUCCEEDED:
            return dict(self.outputs or {})
        error = self.error or {}
        reason = str(error.get("code") or self.status.value)
        raise JobFailed(self.job_id, self.status.value, reason, str(error.get("message") or f"job {self.status.value}"))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary: outputs are described by dtype and shape, not listed."""
        doc: dict[str, Any] = {
            "job_id": self.job_id, "model": self.model, "version": self.version, "status": self.status.value,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "attempts": self.attempts,
        }
        if self.outputs:
            doc["outputs"] = {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in self.outputs.items()}
        if self.error:
            doc["error"] = dict(self.error)
        if self.timings:
            doc["timings"] = dict(self.timings)
        if self.progress:
            doc["progress"] = dict(self.progress)
        if self.stage:
            doc["stage"] = self.stage
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> JobDocument:
        """From the edge's JSON job document (outputs as a list of v2 tensors)."""
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        arrays = {t["name"]: _from_v2(t) for t in outputs} if isinstance(outputs, list) else None
        return cls._build(doc, arrays)

    @classmethod
    def from_msgpack(cls, doc: Any) -> JobDocument:
        """From the edge's msgpack job document, or an AMQP reply (outputs as raw tensors)."""
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        arrays = {k: v.copy() for k, v in decode_tensor_map(outputs, what="outputs").items()} if outputs else None
        return cls._build(doc, arrays)

    @classmethod
    def _build(cls, doc: Any, outputs: dict[str, np.ndarray] | None) -> JobDocument:
        if not isinstance(doc, dict) or not isinstance(doc.get("job_id"), str):
            raise CodecError(f"not a job document: {str(doc)[:200]}")
        try:
            status = JobStatus(doc.get("status"))
        except ValueError:
            raise CodecError(f"job {doc['job_id']}: unknown status {doc.get('status')!r}") from None
        return cls(
            job_id=doc["job_id"], status=status, model=str(doc.get("model") or ""), version=str(doc.get("version") or ""),
            created_at=doc.get("created_at"), started_at=doc.get("started_at"), finished_at=doc.get("finished_at"),
            attempts=int(doc.get("attempts") or 0), outputs=outputs, error=doc.get("error") or None,
            timings=doc.get("timings") or None, progress=_progress(doc.get("progress")),
            stage=doc.get("stage") if isinstance(doc.get("stage"), str) else None,
        )


def _progress(value: Any) -> dict[str, int] | None:
    if isinstance(value, dict) and all(isinstance(value.get(k), int) for k in ("done", "total")):
        return {"done": value["done"], "total": value["total"]}
    return None


def _from_v2(tensor: Any) -> np.ndarray:
    try:
        dtype = V2_DTYPES[tensor["datatype"]]
        return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"malformed output tensor in a job document: {exc!r}") from exc


def _checked(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("inputs must be a non-empty dict of input name to numpy array")
    return {name: np.asarray(value) for name, value in inputs.items()}


def msgpack_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The msgpack request body's ``inputs`` map (raw little-endian bytes)."""
    return {name: encode_tensor(array) for name, array in _checked(inputs).items()}


def json_inputs(inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON (KServe v2) request body's ``inputs`` list."""
    body = []
    for name, array in _checked(inputs).items():
        if array.dtype.name not in NUMPY_DTYPES:
            raise CodecError(f"input {name!r}: dtype {array.dtype} cannot be sent")
        body.append({"name": name, "datatype": NUMPY_DTYPES[array.dtype.name], "shape": list(array.shape),
                     "data": array.ravel().tolist()})
    return body
