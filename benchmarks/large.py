"""``inferq bench --large``: edge memory and ledger disk with large results (issue 19's table).

Jobs of the wide model (``x float32[1,4] -> y float32[1,width]``, 4 MB a job at the default width)
go one at a time over HTTP with msgpack, ``POST ...?wait=30`` answering the finished document (so
the edge reads each result back from the ledger and streams it). Every tenth of the run it records
the edge's RSS (``/proc/<pid>/status``), what its projection counts
(``inferq_edge_projection_bytes``) and the ledger stream's files on the broker's disk; at the end
the edge is restarted and its RSS measured again once it has replayed the ledger. One result is
checked against ONNX Runtime in process. ``--own-broker`` runs everything on a RabbitMQ node of its
own (so its disk is measured exactly and the shared one is left alone).
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inferq.benchmarks.procs import Children
from inferq.benchmarks.stack import Stack
from inferq.settings import BrokerSettings, Settings

SHARED_STREAMS = Path("/var/lib/rabbitmq/mnesia")  # the machine's broker (inferq services): <node>/stream/__<ns>_jobs_*
MB = 1e6


def run_large(settings: Settings, args: argparse.Namespace) -> int:
    """Run the profile; print the table and write the JSON (and a PNG when matplotlib is installed)."""
    from inferq.benchmarks.harness import RESULTS_DIR

    workdir = Path(tempfile.mkdtemp(prefix="inferq-large-"))
    children, node = Children(), None
    try:
        if args.own_broker:
            node = _own_broker(workdir)
            settings = replace(settings, broker=BrokerSettings(url=node.url))
        streams = node.root if node is not None else SHARED_STREAMS
        result = _profile(settings, workdir, children, args.jobs or 2000, args.large_width, streams)
    finally:
        children.stop_all()
        if node is not None:
            node.stop()
    path = Path(args.output) if args.output else RESULTS_DIR / f"large-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    _print(result)
    print(f"written to {path}" + (f" and {_plot(result, path.with_suffix('.png'))}" if _has_matplotlib() else
                                  " (pip install matplotlib for a PNG plot)"))
    return 0


def _own_broker(workdir: Path) -> Any:
    from inferq.runtime.rabbitnode import NodeSpec, RabbitNode

    node = RabbitNode(NodeSpec.ephemeral("inferq-large"), workdir / "rabbit")
    node.start()
    return node


def _profile(settings: Settings, workdir: Path, children: Children, jobs: int, width: int, streams: Path) -> dict[str, Any]:
    from inferq.runtime.demo import write_wide_model

    repo = workdir / "models"
    write_wide_model(repo, "wide", width)
    settings = replace(settings, namespace=f"bench{secrets.token_hex(4)}", model_repository=repo, state_dir=workdir / "state",
                       edge=replace(settings.edge, host="127.0.0.1"))
    stack = Stack(settings, workdir, children)
    try:
        stack.sync()
        stack.start_worker("wide")
        stack.start_edge()
        samples, job_ids = [_sample(stack, 0, streams)], []
        started = time.monotonic()
        for i in range(jobs):
            doc = _submit(stack.url, np.full((1, 4), i % 97, np.float32))
            job_ids.append(doc["job_id"])
            if i == 0:
                _check(doc, repo, width)
            if (i + 1) % max(1, jobs // 10) == 0 or i + 1 == jobs:
                samples.append(_sample(stack, i + 1, streams))
        elapsed = time.monotonic() - started
        readback = _readback_ms(stack.url, job_ids)  # the oldest still kept: long out of the cache, read from the stream
        stack.children.stop(stack.edge, grace_s=10)
        stack.start_edge(timeout=300)  # ready once it has replayed the ledger's retention window
        restarted = _sample(stack, jobs, streams)
        return {"jobs": jobs, "width": width, "result_bytes": width * 4, "seconds": round(elapsed, 1),
                "settings": {"edge.max_projection_bytes": settings.edge.max_projection_bytes,
                             "edge.result_cache_bytes": settings.edge.result_cache_bytes,
                             "edge.ledger_prefetch": settings.edge.ledger_prefetch,
                             "jobs.inline_result_bytes": settings.jobs.inline_result_bytes,
                             "jobs.ledger_max_bytes": settings.jobs.ledger_max_bytes,
                             "jobs.ledger_segment_bytes": settings.jobs.ledger_segment_bytes},
                "samples": samples, "after_restart": restarted, "readback_ms": readback}
    finally:
        stack.stop()
        stack.remove_namespace()


def _submit(url: str, x: np.ndarray) -> dict[str, Any]:
    import msgpack

    from inferq.broker.codec import encode_tensor, packb

    body = packb({"inputs": {"x": encode_tensor(x)}})
    request = urllib.request.Request(f"{url}/v1/models/wide/jobs?wait=30", data=body, method="POST",
                                     headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        doc = msgpack.unpackb(resp.read())
    if doc.get("status") != "succeeded":
        raise RuntimeError(f"a job did not succeed: {doc.get('status')} {doc.get('error')}")
    return doc


def _readback_ms(url: str, job_ids: list[str], reads: int = 20) -> dict[str, float]:
    """How long a GET of a result the edge no longer caches takes (read back from the ledger stream, streamed out).

    Oldest first: those the ledger's byte retention already dropped answer 410 ``result_expired``
    and are counted (``expired``) until ``reads`` results have been read back.
    """
    times, expired = [], 0
    for job_id in job_ids:
        if len(times) >= reads:
            break
        started = time.perf_counter()
        request = urllib.request.Request(f"{url}/v1/jobs/{job_id}", headers={"Accept": "application/msgpack"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 410 or times:  # past retention is the oldest results only, never one after a kept one
                raise
            expired += 1
            continue
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    figures = {"p50": round(times[len(times) // 2], 1), "max": round(times[-1], 1)} if times else {}
    return {**figures, "expired": expired}


def _check(doc: dict[str, Any], repo: Path, width: int) -> None:
    import onnxruntime as ort

    from inferq.broker.codec import decode_tensor_map

    x = np.zeros((1, 4), np.float32)
    expected = ort.InferenceSession(str(repo / "wide" / "1" / "model.onnx")).run(None, {"x": x})[0]
    got = decode_tensor_map(doc["outputs"])["y"]
    if got.shape != (1, width) or not np.array_equal(got, expected):
        raise RuntimeError("the edge's result differs from ONNX Runtime's")


def _sample(stack: Stack, jobs: int, streams: Path) -> dict[str, Any]:
    metrics = _metrics(stack.url)
    return {"jobs": jobs, "t": round(time.time(), 1), "edge_rss_mb": round(_rss(stack.edge.pid) / MB, 1),
            "projection_mb": round(metrics.get("inferq_edge_projection_bytes", 0) / MB, 3),
            "jobs_in_memory": int(metrics.get("inferq_edge_jobs_in_memory", 0)),
            "ledger_disk_mb": round(_ledger_bytes(streams, stack.settings.namespace) / MB, 1)}


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return {p[0]: float(p[1]) for p in (line.split() for line in lines if line and not line.startswith("#")) if len(p) == 2}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _ledger_bytes(root: Path, namespace: str) -> int:
    """Bytes of the namespace's ledger stream files under ``root`` (0 where they cannot be read)."""
    try:
        dirs = list(root.glob(f"**/stream/__{namespace}_jobs_*"))
        return sum(f.stat().st_size for d in dirs for f in d.iterdir() if f.is_file())
    except OSError:
        return 0


def _print(result: dict[str, Any]) -> None:
    print(f"{result['jobs']} jobs of {result['result_bytes'] / MB:.1f} MB each in {result['seconds']} s, one at a time, msgpack")
    print(f"{'after':>12} | {'edge RSS':>9} | {'projection':>10} | {'jobs held':>9} | {'ledger on disk':>14}")
    rows = [(f"{s['jobs']} jobs", s) for s in result["samples"]] + [("restarted", result["after_restart"])]
    for label, s in rows:
        print(f"{label:>12} | {s['edge_rss_mb']:>6.0f} MB | {s['projection_mb']:>7.2f} MB | {s['jobs_in_memory']:>9} | "
              f"{s['ledger_disk_mb']:>11.0f} MB")
    readback = result.get("readback_ms") or {}
    if readback.get("p50") is not None:
        print(f"GET of a result read back from the ledger: p50 {readback['p50']} ms, max {readback['max']} ms; "
              f"the {readback['expired']} oldest results were past the ledger's retention (410 result_expired)")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    jobs = [s["jobs"] for s in samples]
    figure, ax = plt.subplots(figsize=(7, 4))
    ax.plot(jobs, [s["edge_rss_mb"] for s in samples], marker="o", label="edge RSS (MB)")
    ax.plot(jobs, [s["ledger_disk_mb"] for s in samples], marker="s", label="ledger stream on disk (MB)")
    ax.axhline(result["settings"]["jobs.ledger_max_bytes"] / MB, linestyle="--", color="grey", label="jobs.ledger_max_bytes")
    ax.set_xlabel("jobs finished")
    ax.set_ylabel("MB")
    ax.set_title(f"{result['result_bytes'] / MB:.0f} MB results, one job at a time")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
