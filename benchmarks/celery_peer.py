"""The Celery 5 baseline: a prefork worker on the same RabbitMQ, started and stopped by the harness."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from inferq.benchmarks.procs import Children, python_argv


def available() -> str | None:
    """Celery's version, or None if it is not installed (``pip install 'celery>=5.3'``)."""
    try:
        import celery
    except ImportError:
        return None
    return celery.__version__


def celery_broker_url(amqp_url: str) -> str:
    """Celery wants the vhost spelled out: ``amqp://u:p@h:5672/`` -> ``.../`` + ``/``."""
    from urllib.parse import urlsplit

    parts = urlsplit(amqp_url)
    return amqp_url + "/" if parts.path in ("", "/") and not amqp_url.endswith("//") else amqp_url


class CeleryPeer:
    """One ``celery worker -P prefork`` on a queue of its own, serving ``model_path``."""

    def __init__(self, children: Children, broker_url: str, queue: str, logs: Path, durable: bool = False) -> None:
        self.durable = durable  # quorum queue, confirms, late acks (see celery_app)
        self.children = children
        self.broker_url = broker_url
        self.queue = queue
        self.logs = logs
        self.proc: subprocess.Popen[Any] | None = None

    def env(self, model_path: Path, threads: int) -> dict[str, str]:
        return {
            "BENCH_CELERY_BROKER": self.broker_url,
            "BENCH_CELERY_QUEUE": self.queue,
            "BENCH_MODEL_PATH": str(model_path),
            "BENCH_ORT_THREADS": str(threads),
            "BENCH_CELERY_DURABLE": "1" if self.durable else "0",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, model: str, model_path: Path, concurrency: int, threads: int, timeout: float = 60.0) -> None:
        args = python_argv(
            "-m", "celery", "-A", "benchmarks.celery_app", "worker", "-P", "prefork", "-c", str(concurrency),
            "-Q", self.queue, "-n", f"{self.queue}-{model}@%h", "-l", "warning",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
        )
        self.proc = self.children.start(f"celery {model}", args, self.env(model_path, threads), self.logs / f"{self.queue}-{model}.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.proc.returncode}: "
                                   f"{(self.logs / f'{self.queue}-{model}.log').read_text(errors='replace')[-2000:]}")
            if self._consumers() > 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"celery worker did not start consuming in {timeout}s; see {self.logs}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the worker consumes its queue again (Celery reconnects after a broker restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("the celery worker exited")
            if self._consumers() > 0:
                time.sleep(1.0)
                return
            time.sleep(0.5)
        raise RuntimeError(f"the celery worker did not consume again in {timeout}s")

    def _consumers(self) -> int:
        import amqp

        try:
            with _connection(self.broker_url) as conn:
                channel = conn.channel()
                _, _, consumers = channel.queue_declare(self.queue, passive=True)
                return consumers
        except (amqp.exceptions.NotFound, OSError):
            return 0

    def stop(self) -> None:
        if self.proc is not None:
            self.children.stop(self.proc, grace_s=10)
            self.proc = None

    def cleanup(self) -> None:
        """Delete the run's queue and its exchange (Celery declares both under the queue's name), and for the
        durable configuration Celery's delayed-delivery queues and exchanges."""
        import amqp

        try:
            with _connection(self.broker_url) as conn:
                channel = conn.channel()
                channel.queue_delete(self.queue)
                channel.exchange_delete(self.queue)
        except (amqp.exceptions.AMQPError, OSError):
            pass
        if self.durable:
            delete_delayed_delivery(self.broker_url)


# Celery 5.5+ with a quorum queue declares native delayed delivery (for countdown/ETA): 28 quorum queues
# ``celery_delayed_0..27`` and their exchanges, under names of no prefix (Celery passes none to kombu).
DELAYED_LEVELS = 28


def delete_delayed_delivery(broker_url: str) -> None:
    """Delete those queues and exchanges again, each only while empty and unused (the broker may be shared)."""
    import amqp

    deleted = 0
    for level in range(DELAYED_LEVELS):
        try:
            with _connection(broker_url) as conn:  # a refused delete closes the channel: one connection per level
                channel = conn.channel()
                # quorum queues refuse if_unused (and if_empty): check by a passive declare instead
                _, messages, consumers = channel.queue_declare(f"celery_delayed_{level}", passive=True)
                if messages or consumers:
                    continue
                channel.queue_delete(f"celery_delayed_{level}")
                channel.exchange_delete(f"celery_delayed_{level}")  # only once its queue is gone
                deleted += 1
        except (amqp.exceptions.AMQPError, OSError):
            pass
    if deleted < DELAYED_LEVELS:
        return  # someone else's delayed tasks: leave the delivery exchange alone
    try:
        with _connection(broker_url) as conn:
            conn.channel().exchange_delete("celery_delayed_delivery")
    except (amqp.exceptions.AMQPError, OSError):
        pass


def _connection(url: str) -> Any:
    """A plain py-amqp connection (Celery's own transport library) for queue housekeeping."""
    from urllib.parse import unquote, urlsplit

    import amqp

    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    conn = amqp.Connection(host=f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}", userid=unquote(parts.username or "guest"),
                           password=unquote(parts.password or "guest"), virtual_host=vhost or "/", connect_timeout=5)
    conn.connect()
    return conn

