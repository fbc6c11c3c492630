"""The load generator: a separate process that submits single-sample jobs and times each one.

``python -m benchmarks.loadgen SPEC.json OUT.json``. Protocol with the harness
(so CPU is measured around the timed part only): warm up, print ``READY`` on
stdout, wait for a line on stdin, run the bounded load, print ``DONE``, write
the results to OUT.json. Progress goes to stderr about once a second.

Modes (``spec["mode"]``):

* ``http``: POST /v1/models/{m}/jobs?wait=30 (msgpack body; the answer is the finished job),
  polling GET /v1/jobs/{id}?wait=30 only if it was not final in time
  (``Accept: application/msgpack``); latency is submit start -> result read.
* ``amqp``: publish to ``<ns>.requests`` (routing key = model) with ``reply_to``
  an exclusive queue, publisher confirms on; latency is publish start -> reply.
* ``celery``: Celery's own task messages (protocol 2, built by ``app.amqp.as_task_v2`` and serialized
  by kombu, exactly what ``apply_async`` sends) published with aio_pika on asyncio, the same client as
  the ``amqp`` mode; results come back as the rpc:// backend sends them, to an exclusive reply queue
  with the task id as correlation id. Celery has no asyncio client; its synchronous one (``celery_sync``)
  would give Celery a different client from every other system's. With
  ``celery_confirms`` (the durable configuration) every publish waits for the broker's confirm.
* ``celery_sync``: the old client, ``apply_async`` from one thread (for comparison).
* ``bentoml``: POST /infer (JSON) to a BentoML service; ``bentoml_task``: POST /infer_task/submit,
  then GET /infer_task/status until done and GET /infer_task/get.
* ``ray``: POST / (JSON) to a Ray Serve deployment behind its HTTP proxy.

Closed loop (``concurrency`` jobs in flight) unless ``rate`` is set: open loop,
jobs arrive every ``1/rate`` s and latency counts from the scheduled arrival
(no coordinated omission); ``concurrency`` then caps what is in flight.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from inferq.benchmarks.raw import percentiles

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class Recorder:
    """Latencies, per-job timings reported by the system, errors, and progress lines."""

    def __init__(self, label: str, total: int, progress_s: float) -> None:
        self.label = label
        self.total = total
        self.progress_s = progress_s
        self.latencies: list[float] = []
        self.batch_sizes: list[int] = []
        self.inference_ms: list[float] = []
        self.queue_ms: list[float] = []
        self.errors: list[str] = []
        self.first_output: list[float] | None = None
        self.started = time.perf_counter()
        self._last_print = self.started
        self._last_done = 0
        self.measuring = False

    @property
    def done(self) -> int:
        return len(self.latencies) + len(self.errors)

    def ok(self, latency_s: float, timings: dict[str, Any] | None, output: bytes | None, sample: int) -> None:
        self.latencies.append(latency_s * 1000)
        if timings:
            if "batch_size" in timings:
                self.batch_sizes.append(int(timings["batch_size"]))
            if "inference_ms" in timings:
                self.inference_ms.append(float(timings["inference_ms"]))
            if "queue_ms" in timings:
                self.queue_ms.append(float(timings["queue_ms"]))
        if self.first_output is None and sample == 0 and output is not None:
            self.first_output = np.frombuffer(output, dtype=np.float32)[:64].tolist()
        self.tick()

    def fail(self, what: str) -> None:
        self.errors.append(what[:300])
        self.tick()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.measuring and now - self._last_print >= self.progress_s:
            rate = (self.done - self._last_done) / (now - self._last_print)
            print(f"    {self.label}: {self.done}/{self.total} jobs, {rate:,.0f} jobs/s, {len(self.errors)} errors",
                  file=sys.stderr, flush=True)
            self._last_print, self._last_done = now, self.done

    def result(self, duration_s: float) -> dict[str, Any]:
        done = len(self.latencies)
        return {
            "label": self.label,
            "jobs": self.total,
            "ok": done,
            "errors": len(self.errors),
            "error_samples": sorted(set(self.errors))[:5],
            "duration_s": round(duration_s, 4),
            "jobs_per_s": round(done / duration_s, 2) if duration_s > 0 else 0.0,
            "latency_ms": percentiles(self.latencies),
            "mean_batch_size_per_job": round(float(np.mean(self.batch_sizes)), 3) if self.batch_sizes else None,
            "inference_ms_mean": round(float(np.mean(self.inference_ms)), 4) if self.inference_ms else None,
            # timings.queue_ms depends on how precisely the submit time travels in the message: see README
            "worker_queue_ms": percentiles(self.queue_ms) if self.queue_ms else None,
            "first_output": self.first_output,
        }


async def drive(n: int, concurrency: int, rate: float | None, job: Callable[[int, float], Awaitable[None]]) -> None:
    """Run ``job(i, t_arrival)`` for i < n: closed loop, or open loop at ``rate`` capped at ``concurrency``."""
    loop = asyncio.get_running_loop()
    if not rate:
        counter = iter(range(n))

        async def lane() -> None:
            for i in counter:
                await job(i, time.perf_counter())

        await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, n)))))
        return
    cap = asyncio.Semaphore(max(1, concurrency))
    tasks = []
    start = time.perf_counter()

    async def capped(i: int, arrival: float) -> None:
        async with cap:
            await job(i, arrival)

    for i in range(n):
        arrival = start + i / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(capped(i, arrival)))
    await asyncio.gather(*tasks)


async def handshake(spec: dict[str, Any]) -> None:
    """Tell the harness we are warm; wait for its go."""
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("harness went away")


def _bodies(spec: dict[str, Any]) -> tuple[np.ndarray, list[bytes]]:
    x = np.load(spec["inputs_path"])
    bodies = [msgpack.packb({"inputs": {"x": {"dtype": "float32", "shape": [1, *x.shape[1:]], "data": s.tobytes()}}}, use_bin_type=True)
              for s in x]
    return x, bodies


async def run_http(spec: dict[str, Any], out: dict[str, Any]) -> None:
    import aiohttp

    _, bodies = _bodies(spec)
    base = spec["url"].rstrip("/")
    submit_url = f"{base}/v1/models/{spec['model']}/jobs?wait=30"
    submit_headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    poll_headers = {"Accept": "application/msgpack"}
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    job_timeout = float(spec.get("job_timeout_s", 60))
    timeout = aiohttp.ClientTimeout(total=job_timeout + 5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def job(rec: Recorder, i: int, arrival: float) -> None:
            sample = i % len(bodies)
            try:
                # Submit and wait in one request; a job not final in time is polled.
                async with http.post(submit_url, data=bodies[sample], headers=submit_headers) as resp:
                    raw = await resp.read()
                    if resp.status not in (200, 202):
                        rec.fail(f"submit HTTP {resp.status}: {raw[:200]!r}")
                        return
                    finished = resp.status == 200
                doc = msgpack.unpackb(raw, raw=False) if finished else json.loads(raw)
                poll_url = f"{base}/v1/jobs/{doc['job_id']}?wait=30"
                while not finished:
                    if time.perf_counter() - arrival > job_timeout:
                        rec.fail(f"job not final after {job_timeout:g}s")
                        return
                    async with http.get(poll_url, headers=poll_headers) as resp:
                        raw = await resp.read()
                        if resp.status != 200:
                            rec.fail(f"poll HTTP {resp.status}: {raw[:200]!r}")
                            return
                    doc = msgpack.unpackb(raw, raw=False)
                    if doc["status"] in TERMINAL:
                        break
                done = time.perf_counter()
                if doc["status"] != "succeeded":
                    rec.fail(f"job {doc['status']}: {doc.get('error')}")
                    return
                output = next(iter(doc.get("outputs", {}).values()), {}).get("data")
                rec.ok(done - arrival, doc.get("timings"), output, sample)
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
                rec.fail(f"{type(exc).__name__}: {exc}")

        await _phases(spec, out, job)


async def run_amqp(spec: dict[str, Any], out: dict[str, Any]) -> None:
    import aio_pika

    from inferq.broker.messages import JobRequest

    _, bodies = _bodies(spec)
    connection = await aio_pika.connect(spec["broker_url"])
    try:
        rpc = await _Rpc.open(connection, f"{spec['namespace']}.requests", confirms=True)

        async def job(rec: Recorder, i: int, arrival: float) -> None:
            sample = i % len(bodies)
            job_id = uuid.uuid4().hex
            message = JobRequest(job_id, {}, reply_to=rpc.reply_to, correlation_id=job_id).to_message(bodies[sample])
            try:
                result = await rpc.call(job_id, message, spec["model"], float(spec.get("job_timeout_s", 60)), mandatory=True)
            except (aio_pika.exceptions.AMQPError, asyncio.TimeoutError, OSError) as exc:
                rec.fail(f"{type(exc).__name__}: {exc}")
                return
            done = time.perf_counter()
            if result.get("status") != "succeeded":
                rec.fail(f"job {result.get('status')}: {result.get('error')}")
                return
            output = next(iter((result.get("outputs") or {}).values()), {}).get("data")
            rec.ok(done - arrival, result.get("timings"), output, sample)

        await _phases(spec, out, job)
    finally:
        await connection.close()


class _Rpc:
    """A confirmed publisher and an exclusive reply queue: :meth:`call` publishes and awaits the reply to its key.

    Replies are msgpack, matched by correlation id (inferq's worker replies and Celery's rpc:// backend alike).
    """

    def __init__(self, exchange: Any, reply_to: str) -> None:
        self.exchange = exchange
        self.reply_to = reply_to
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @classmethod
    async def open(cls, connection: Any, exchange_name: str, confirms: bool) -> _Rpc:
        publisher = await connection.channel(publisher_confirms=confirms)
        exchange = await publisher.get_exchange(exchange_name, ensure=False)
        queue = await (await connection.channel()).declare_queue(exclusive=True, auto_delete=True)
        self = cls(exchange, queue.name)
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: Any) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(msgpack.unpackb(message.body, raw=False))

    async def call(self, key: str, message: Any, routing_key: str, timeout: float, mandatory: bool = False) -> dict[str, Any]:
        """Publish ``message`` and return the reply whose correlation id is ``key`` (TimeoutError after ``timeout``)."""
        future = self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            await self.exchange.publish(message, routing_key=routing_key, mandatory=mandatory)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(key, None)


async def _phases(spec: dict[str, Any], out: dict[str, Any], job: Callable[..., Awaitable[None]]) -> None:
    warm = Recorder("warm-up", spec["warmup"], spec.get("progress_s", 1.0))
    await drive(spec["warmup"], spec["concurrency"], None, lambda i, t: job(warm, i, t))
    if warm.errors:
        raise SystemExit(f"warm-up failed: {warm.errors[:3]}")
    await handshake(spec)
    rec = Recorder(spec["label"], spec["jobs"], spec.get("progress_s", 1.0))
    rec.measuring = True
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await drive(spec["jobs"], spec["concurrency"], spec.get("rate"), lambda i, t: job(rec, i, t))
    duration = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    print("DONE", flush=True)
    out.update(rec.result(duration))
    out["loadgen_cpu_s"] = round((usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime), 4)


def run_celery(spec: dict[str, Any], out: dict[str, Any]) -> None:
    """Celery's client is synchronous: one thread, results through the rpc:// consumer's callbacks."""
    import socket

    from inferq.benchmarks.celery_app import app, infer

    x = np.load(spec["inputs_path"])
    payloads = [(s[None].tobytes(), [1, *x.shape[1:]]) for s in x]
    consumer = app.backend.result_consumer

    def run(rec: Recorder, n: int, concurrency: int, rate: float | None) -> float:
        done: list[tuple[int, float, Any]] = []
        submitted = inflight = finished = 0
        start = time.perf_counter()
        last_progress = start

        def submit(i: int, arrival: float) -> None:
            result = infer.apply_async(args=payloads[i % len(payloads)])
            result.then(lambda r, i=i, arrival=arrival: done.append((i, arrival, r)))

        while finished < n:
            now = time.perf_counter()
            while submitted < n and inflight < concurrency and (not rate or start + submitted / rate <= now):
                submit(submitted, start + submitted / rate if rate else time.perf_counter())
                submitted += 1
                inflight += 1
            try:
                wait = 1.0 if not rate else max(0.0005, min(1.0, start + submitted / rate - time.perf_counter()))
                consumer.drain_events(timeout=wait)
            except socket.timeout:
                if time.perf_counter() - last_progress > 60:
                    raise SystemExit(f"celery: no result for 60 s ({finished}/{n} done)")
            now = time.perf_counter()
            while done:
                i, arrival, r = done.pop()
                inflight -= 1
                finished += 1
                last_progress = now
                if r.status != "SUCCESS":
                    rec.fail(f"task {r.status}: {r.result!r}")
                else:
                    data, _shape = r.result
                    rec.ok(now - arrival, None, data, i % len(payloads))
        return time.perf_counter() - start

    warm = Recorder("warm-up", spec["warmup"], spec.get("progress_s", 1.0))
    run(warm, spec["warmup"], spec["concurrency"], None)
    if warm.errors:
        raise SystemExit(f"warm-up failed: {warm.errors[:3]}")
    print("READY", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("harness went away")
    rec = Recorder(spec["label"], spec["jobs"], spec.get("progress_s", 1.0))
    rec.measuring = True
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    duration = run(rec, spec["jobs"], spec["concurrency"], spec.get("rate"))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    print("DONE", flush=True)
    out.update(rec.result(duration))
    out["loadgen_cpu_s"] = round((usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime), 4)


async def run_celery_async(spec: dict[str, Any], out: dict[str, Any]) -> None:
    """Celery task messages over aio_pika; results as the rpc:// backend publishes them."""
    import aio_pika
    from kombu.serialization import dumps

    from inferq.benchmarks.celery_app import QUEUE, app

    x = np.load(spec["inputs_path"])
    payloads = [(s[None].tobytes(), [1, *x.shape[1:]]) for s in x]
    connection = await aio_pika.connect(spec["broker_url"])
    try:
        rpc = await _Rpc.open(connection, QUEUE, confirms=bool(spec.get("celery_confirms")))

        async def job(rec: Recorder, i: int, arrival: float) -> None:
            sample = i % len(payloads)
            task_id = str(uuid.uuid4())
            # argsrepr: a short text instead of repr() of 1 KB of bytes, which only feeds Celery's logs
            headers, props, body, _ = app.amqp.as_task_v2(task_id, "bench.infer", args=payloads[sample], kwargs={},
                                                          reply_to=rpc.reply_to, argsrepr="(sample)", kwargsrepr="{}")
            content_type, encoding, data = dumps(body, serializer="msgpack")
            message = aio_pika.Message(data, headers=headers, content_type=content_type, content_encoding=encoding,
                                       correlation_id=props["correlation_id"], reply_to=props["reply_to"],
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=0)
            try:
                result = await rpc.call(task_id, message, QUEUE, float(spec.get("job_timeout_s", 60)))
            except (aio_pika.exceptions.AMQPError, asyncio.TimeoutError, OSError) as exc:
                rec.fail(f"{type(exc).__name__}: {exc}")
                return
            done = time.perf_counter()
            if result.get("status") != "SUCCESS":
                rec.fail(f"task {result.get('status')}: {result.get('result')!r}")
                return
            rec.ok(done - arrival, None, result["result"][0], sample)

        await _phases(spec, out, job)
    finally:
        await connection.close()


def _json_samples(spec: dict[str, Any]) -> list[bytes]:
    x = np.load(spec["inputs_path"])
    return [json.dumps({"x": s[None].tolist()}).encode() for s in x]


def _floats(doc: Any) -> bytes:
    return np.asarray(doc, dtype=np.float32).ravel().tobytes()


async def run_peer_http(spec: dict[str, Any], out: dict[str, Any]) -> None:
    """BentoML (sync API or task API) or Ray Serve over HTTP with JSON, the peers' documented clients' format."""
    import aiohttp

    bodies = _json_samples(spec)
    base = spec["url"].rstrip("/")
    mode = spec["mode"]
    headers = {"Content-Type": "application/json"}
    job_timeout = float(spec.get("job_timeout_s", 60))
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=job_timeout + 5)) as http:

        async def call(method: str, url: str, **kw: Any) -> Any:
            async with http.request(method, url, **kw) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"{method} {url.rsplit('/', 1)[-1]} HTTP {resp.status}: {raw[:200]!r}")
                return json.loads(raw)

        async def task(body: bytes, arrival: float) -> Any:
            tid = (await call("POST", f"{base}/infer_task/submit", data=body, headers=headers))["task_id"]
            while True:  # BentoML's task API has no long-poll: its client polls the status
                status = (await call("GET", f"{base}/infer_task/status", params={"task_id": tid}))["status"]
                if status in ("completed", "success"):
                    return await call("GET", f"{base}/infer_task/get", params={"task_id": tid})
                if status not in ("in_progress", "pending"):
                    raise ValueError(f"task {status}")
                if time.perf_counter() - arrival > job_timeout:
                    raise ValueError(f"task not done after {job_timeout:g}s")
                await asyncio.sleep(0.005)

        async def job(rec: Recorder, i: int, arrival: float) -> None:
            sample = i % len(bodies)
            try:
                if mode == "bentoml_task":
                    doc = await task(bodies[sample], arrival)
                else:
                    doc = await call("POST", f"{base}/infer" if mode == "bentoml" else f"{base}/", data=bodies[sample], headers=headers)
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
                rec.fail(f"{type(exc).__name__}: {exc}")
                return
            rec.ok(time.perf_counter() - arrival, None, _floats(doc), sample)

        await _phases(spec, out, job)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out: dict[str, Any] = {"mode": spec["mode"], "model": spec["model"], "concurrency": spec["concurrency"], "rate": spec.get("rate")}
    if spec["mode"] == "celery_sync":
        run_celery(spec, out)
    else:
        import uvloop

        runners = {"http": run_http, "amqp": run_amqp, "celery": run_celery_async,
                   "bentoml": run_peer_http, "bentoml_task": run_peer_http, "ray": run_peer_http}
        uvloop.run(runners[spec["mode"]](spec, out))
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
