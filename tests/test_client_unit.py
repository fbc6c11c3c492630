"""The client's rules, without processes: retries, error mapping, ordered map, job documents, lazy imports."""

from __future__ import annotations

import asyncio
import email.utils
import subprocess
import sys
import time

import numpy as np
import pytest

from inferq import errors as e
from inferq.broker.codec import encode_tensor
from inferq.client.document import JobDocument, JobStatus, json_inputs
from inferq.client.ordered import ordered_map
from inferq.client.retry import RetryPolicy, error_for, parse_retry_after


def test_retry_after_is_honoured_and_a_pause_past_the_deadline_is_not_taken() -> None:
    policy = RetryPolicy(max_retries=3, deadline_s=10, backoff_s=0.5, max_backoff_s=1.5)
    now = time.monotonic()
    assert policy.pause(0, 2.0, now) == 2.0
    assert [policy.pause(n, None, now) for n in range(3)] == [0.5, 1.0, 1.5]
    assert policy.pause(3, None, now) is None, "retries are bounded"
    assert policy.pause(0, 11.0, now) is None, "a Retry-After beyond the deadline gives up at once"
    assert policy.pause(0, 1.0, now - 9.5) is None
    assert policy.pause(2, None, now, connection=True) is None, "lost connections get fewer retries"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("nan") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after(later) <= 31
    assert parse_retry_after(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0


@pytest.mark.parametrize("status, code, cls", [
    (404, "unknown_model", e.UnknownModel), (404, "not_found", e.NotFound), (422, "invalid_input", e.InvalidInput),
    (400, "bad_message", e.CodecError), (413, "too_large", e.MessageTooLarge), (409, "conflict", e.Conflict),
    (401, "unauthorized", e.Unauthorized), (503, "broker_unavailable", e.Unavailable), (503, "not_ready", e.Unavailable),
    (504, "timeout", e.Timeout), (418, "teapot", e.InferqError), (422, "something_new", e.InvalidInput),
])
def test_error_bodies_map_to_typed_errors(status: int, code: str, cls: type) -> None:
    error = error_for(status, {"error": {"code": code, "message": "why"}}, None)
    assert type(error) is cls and "why" in str(error)


def test_a_429_is_rate_limited_with_its_retry_after_whatever_the_body() -> None:
    for body in ({"error": {"code": "broker_rejected", "message": "full"}}, "<html>busy</html>"):
        error = error_for(429, body, 2.0)
        assert isinstance(error, e.RateLimited) and error.retry_after == 2.0


def test_the_new_errors_are_inferq_errors() -> None:
    assert issubclass(e.Timeout, TimeoutError) and issubclass(e.ServiceError, e.InferqError)
    failed = e.JobFailed("j1", "failed", "inference_error", "boom")
    assert (failed.job_id, failed.status, failed.reason, failed.code) == ("j1", "failed", "inference_error", "inference_error")
    from inferq.runtime.services import ServiceError
    assert ServiceError is e.ServiceError


async def test_ordered_map_keeps_input_order_and_bounds_the_calls_in_flight() -> None:
    running, most = 0, 0

    async def slow_square(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001 * ((7 * n) % 5))  # finishing out of order
        running -= 1
        return n * n

    assert [r async for r in ordered_map(slow_square, range(50), 4)] == [n * n for n in range(50)]
    assert most == 4


async def test_ordered_map_raises_the_first_error_and_cancels_the_rest() -> None:
    started, cancelled = [], []

    async def job(n: int) -> int:
        started.append(n)
        if n == 2:
            raise ValueError("two")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise
        return n

    results = ordered_map(job, range(1000), 5)
    with pytest.raises(ValueError, match="two"):
        async for _ in results:
            pass
    assert len(started) == 5, "items are read only as room frees up"
    assert sorted(cancelled) == [0, 1, 3, 4]


async def test_ordered_map_can_yield_errors_in_place() -> None:
    async def job(n: int) -> int:
        if n % 3 == 0:
            raise ValueError(n)
        return n

    results = [r async for r in ordered_map(job, range(7), 2, return_exceptions=True)]
    assert [type(r) if isinstance(r, Exception) else r for r in results] == [ValueError, 1, 2, ValueError, 4, 5, ValueError]


def test_job_documents_from_json_and_msgpack_agree() -> None:
    probs = np.arange(10, dtype=np.float32).reshape(1, 10)
    base = {"job_id": "j", "model": "mlp", "version": "1", "status": "succeeded", "attempts": 1,
            "created_at": "2026-01-01T00:00:00.000Z", "started_at": None, "finished_at": None}
    from_json = JobDocument.from_json({**base, "outputs": [{"name": "probs", "datatype": "FP32", "shape": [1, 10],
                                                            "data": probs.ravel().tolist()}]})
    from_msgpack = JobDocument.from_msgpack({**base, "outputs": {"probs": {**encode_tensor(probs), "data": probs.tobytes()}}})
    for document in (from_json, from_msgpack):
        assert document.status is JobStatus.SUCCEEDED and document.final
        np.testing.assert_array_equal(document.outputs_or_raise()["probs"], probs)
    assert from_json.to_json()["outputs"] == {"probs": {"dtype": "float32", "shape": [1, 10]}}


@pytest.mark.parametrize("status, error, reason", [
    ("failed", {"code": "invalid_input", "message": "bad shape"}, "invalid_input"),
    ("expired", {"code": "expired", "message": "ttl"}, "expired"),
    ("cancelled", None, "cancelled"),
])
def test_a_job_that_did_not_succeed_raises_job_failed(status: str, error: dict | None, reason: str) -> None:
    document = JobDocument.from_json({"job_id": "j9", "status": status, "error": error})
    with pytest.raises(e.JobFailed) as failed:
        document.outputs_or_raise()
    assert (failed.value.job_id, failed.value.status, failed.value.reason) == ("j9", status, reason)


def test_malformed_documents_and_inputs_are_refused() -> None:
    with pytest.raises(e.CodecError):
        JobDocument.from_json({"job_id": "j", "status": "lost"})
    with pytest.raises(e.CodecError):
        JobDocument.from_json(["not", "a", "document"])
    with pytest.raises(e.CodecError):
        json_inputs({"x": np.array(["text"])})
    with pytest.raises(TypeError):
        json_inputs({})


def test_server_processes_import_errors_and_settings_without_the_sdk() -> None:
    probe = ("import sys, inferq, inferq.errors, inferq.settings\n"
             "assert not {'aiohttp', 'aio_pika', 'numpy', 'inferq.client'} & set(sys.modules), sorted(sys.modules)\n"
             "from inferq import Client, AsyncClient\n"
             "assert 'aio_pika' not in sys.modules, 'the HTTP client does not load aio-pika'\n"
             "from inferq import AmqpClient, Job, JobStatus\n"
             "print(Client.__module__, AsyncClient.__module__, AmqpClient.__module__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["inferq.client.sync", "inferq.client.http", "inferq.client.amqp"]
    with pytest.raises(AttributeError):
        import inferq
        inferq.NoSuchThing  # noqa: B018
