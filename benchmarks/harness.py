"""One bench run: raw ORT ceiling, inferq end to end (HTTP and AMQP-direct), the peers; JSON + table.

The peers: Celery twice (its defaults, and with inferq's durability: quorum queue, publisher confirms,
late acks; see celery_app), BentoML's sync API and task API, and Ray Serve (see http_peers). Every
system is driven by the same kind of client: an asyncio load generator in a process of its own, whose
CPU is reported as ``loadgen`` and not charged to the system. For Celery that client publishes Celery's
own task messages with aio_pika and reads the rpc:// results (see loadgen)(Celery has no asyncio client;
its synchronous ``apply_async`` loop is kept as loadgen mode ``celery_sync`` but not run). Each configuration runs
``--rounds`` times (default 3), interleaved, and reports its median round with min-max.

Everything the run starts (edge, workers, Celery, load generators) is a child
process in its own session and is stopped in ``finally``, also on Ctrl-C or
SIGTERM; the run's queues and etcd keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inferq.benchmarks import raw
from inferq.benchmarks import http_peers
from inferq.benchmarks.celery_peer import CeleryPeer, available, celery_broker_url
from inferq.benchmarks.procs import ROOT, Children, CpuWatch, broker_pid, per_job_ms, python_argv, wait_quiet
from inferq.benchmarks.profiling import Profiler
from inferq.benchmarks.report import compact, median_round, summarize, table
from inferq.benchmarks.stack import BrokerWatch, Stack
from inferq.settings import Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("mlp", "cnn", "transformer")
# The transformer is ~100x the MLP's work per sample: fewer jobs keep a run short.
JOB_SCALE = {"mlp": 1.0, "cnn": 1.0, "transformer": 0.125}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Options:
    models: list[str]
    paths: list[str]
    jobs: int
    low_jobs: int
    concurrency: int
    rate: float | None
    warmup: int
    skip_celery: bool
    skip_raw: bool
    celery_concurrency: int
    celery_threads: int
    raw_seconds: float
    latency_runs: int
    phase_timeout: float
    output: Path | None
    keep: bool
    profile: Path | None
    intra_op_threads: int | None
    rounds: int = 3
    peers: list[str] = field(default_factory=list)
    peer_threads: int = 1
    edge_processes: list[int] = field(default_factory=lambda: [1])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        models = ALL_MODELS if args.models == "all" else tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = set(models) - set(ALL_MODELS)
        if unknown:
            raise SystemExit(f"unknown model(s) {sorted(unknown)}; choose from {ALL_MODELS} or 'all'")
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        if set(paths) - {"http", "amqp"}:
            raise SystemExit("--paths takes http and/or amqp")
        quick = args.quick
        return cls(
            models=list(models), paths=paths,
            jobs=args.jobs or (300 if quick else 2000),
            low_jobs=args.low_jobs or (60 if quick else 300),
            concurrency=args.concurrency, rate=args.rate,
            warmup=args.warmup if args.warmup is not None else (30 if quick else 200),
            skip_celery=args.skip_celery, skip_raw=args.skip_raw,
            celery_concurrency=args.celery_concurrency or (os.cpu_count() or 1),
            celery_threads=args.celery_threads,
            raw_seconds=args.raw_seconds or (0.2 if quick else 0.6),
            latency_runs=100 if quick else 300,
            phase_timeout=args.phase_timeout,
            output=Path(args.output) if args.output else None,
            keep=args.keep,
            profile=Path(args.profile) if args.profile else None,
            intra_op_threads=args.intra_op_threads,
            rounds=args.rounds or (1 if quick else 3),
            peers=_peer_list(args.peers),
            peer_threads=args.celery_threads,
            edge_processes=_counts(getattr(args, "edge_processes", "1")),
        )

    def jobs_for(self, model: str, low: bool) -> int:
        n = self.low_jobs if low else self.jobs
        return max(20, int(n * JOB_SCALE[model]))


def _counts(text: str) -> list[int]:
    """``--edge-processes``: distinct whole counts of at least 1, in the order given."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--edge-processes takes counts like 1,2, not {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SystemExit(f"--edge-processes takes distinct counts of at least 1, like 1,2, not {text!r}")
    return counts


PEER_KINDS = ("bentoml", "bentoml_task", "ray")


def _peer_list(text: str) -> list[str]:
    peers = [p.strip() for p in (text or "").split(",") if p.strip()]
    if set(peers) - set(PEER_KINDS):
        raise SystemExit(f"--peers takes {', '.join(PEER_KINDS)}")
    return peers


@dataclass
class Peers:
    """The peers of this run that could be set up."""

    celery: CeleryPeer | None = None
    celery_durable: CeleryPeer | None = None
    http: dict[str, http_peers.HttpPeer] = field(default_factory=dict)

    def cleanup(self) -> None:
        for peer in (self.celery, self.celery_durable):
            if peer is not None:
                peer.cleanup()
        for peer in self.http.values():
            peer.stop()


def _peer_versions(opts: Options) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    if any(p.startswith("bentoml") for p in opts.peers):
        versions["bentoml"] = http_peers.version("bentoml", "bentoml")
    if "ray" in opts.peers:
        versions["ray"] = http_peers.version("ray", "ray")
    for name, v in versions.items():
        if v is None:
            say(f"{name} is not installed in .venv-bench-{name} (make bench creates it): skipping it")
    return versions


class Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, args: argparse.Namespace) -> int:
    """The whole run; returns 0 when every phase completed (targets are reported, not enforced)."""
    opts = Options.from_args(args)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    namespace = f"bench{uuid.uuid4().hex[:10]}"
    workdir = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    children = Children()
    celery_version = None if opts.skip_celery else available()
    if not opts.skip_celery and celery_version is None:
        say("celery is not installed (pip install 'celery>=5.3', or the 'bench' extra): skipping the Celery baseline")
    celery_queue = f"inferq-bench-celery-{namespace}"
    peer_versions = _peer_versions(opts)
    result: dict[str, Any] = {"run_id": run_id, "status": "running",
                              "meta": {**_meta(settings, opts, namespace, celery_version), "peers": peer_versions},
                              "models": {}, "summary": {}}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    stack: Stack | None = None
    peers = Peers()
    broker_watch = BrokerWatch(settings.broker.addresses[0]).start()
    code = 0
    say(f"inferq bench {run_id}: models {','.join(opts.models)}, {opts.jobs} jobs at {opts.concurrency} in flight"
        f"{f' (open loop {opts.rate}/s)' if opts.rate else ''}, namespace {namespace}, logs in {workdir / 'logs'}")
    try:
        stack = Stack.create(settings, namespace, workdir, opts.models, children, opts.intra_op_threads)
        say("  syncing the model repository and starting the edge ...")
        stack.sync()
        stack.start_edge(opts.edge_processes[0])
        beam = broker_pid()
        if beam is None:
            say("  (no beam.smp process found: broker CPU is not reported)")
        if celery_version:
            url = celery_broker_url(settings.broker.addresses[0])
            peers.celery = CeleryPeer(children, url, celery_queue, stack.logs)
            peers.celery_durable = CeleryPeer(children, url, celery_queue + "-durable", stack.logs, durable=True)
        for kind in opts.peers:
            if peer_versions.get(kind.split("_")[0]):
                peers.http[kind] = http_peers.HttpPeer(kind, children, stack.logs)
        for model in opts.models:
            result["models"][model] = {}
            _bench_model(model, opts, stack, peers, beam, workdir, broker_watch, result["models"][model])
            result["summary"][model] = summarize(result["models"][model])
        result["status"] = "complete"
    except KeyboardInterrupt:
        result["status"] = "interrupted"
        say("interrupted: stopping everything")
        code = 130
    except Exception as exc:  # noqa: BLE001 - the run records what failed and still cleans up
        result["status"] = f"failed: {type(exc).__name__}: {exc}"
        say(f"bench failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        children.stop_all()
        broker_watch.stop()
        result["broker_restarts_seen"] = len(broker_watch.losses)
        result["peer_processes_left_after_stop"] = {k: len(p.leftovers) for k, p in peers.http.items()}
        for cleanup in (peers.cleanup, (stack.remove_namespace if stack else None)):
            if cleanup is None:
                continue
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - best effort, reported
                say(f"  cleanup: {type(exc).__name__}: {exc}")
        signal.signal(signal.SIGTERM, previous)
        for model, data in result["models"].items():
            result["summary"].setdefault(model, summarize(data))
        out = _write(result, opts)
        print(table(result))
        say(f"results: {out}")
        if opts.keep or code:
            say(f"logs kept in {workdir / 'logs'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


def _bench_model(model: str, opts: Options, stack: Stack, peers: Peers, beam: int | None, workdir: Path,
                 watch: BrokerWatch, out: dict[str, Any]) -> None:
    """Every phase of one model, recorded into ``out`` as it completes (so an interrupted run keeps them)."""
    from inferq.runtime.repository import load_model

    path = stack.model_path(model)
    entry = load_model(stack.settings.model_repository, model)
    threads = entry.config.intra_op_threads
    out.update({"model_path_bytes": path.stat().st_size,
                "batching": {"max_batch_size": entry.config.batching.max_batch_size,
                             "max_queue_delay_ms": entry.config.batching.max_queue_delay_ms},
                "intra_op_threads": threads, "phases": {}})
    inputs = raw.samples(model, 16, seed=7)
    inputs_path = workdir / f"{model}-inputs.npy"
    np.save(inputs_path, inputs)
    reference = raw.reference(path, inputs[:1]).ravel()[:64]

    if not opts.skip_raw:
        say(f"[{model}] raw ONNX Runtime in-process (intra_op_threads={threads or 'default'}, inter_op_threads=1)")
        quiet = wait_quiet()
        out["raw"] = raw.measure(path, model, threads, opts.raw_seconds, opts.latency_runs, progress=say)
        out["raw"]["machine_before"] = quiet
        lat = out["raw"]["single_latency_ms"]
        say(f"  best {out['raw']['best_samples_per_s']:,.0f} samples/s at batch {out['raw']['best_batch']}; "
            f"batch-1 latency p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms")

    base = {"model": model, "inputs_path": str(inputs_path), "url": stack.url, "namespace": stack.settings.namespace,
            "broker_url": stack.settings.broker.addresses[0], "progress_s": 1.0}
    systems = _systems(model, opts, stack, peers, path, beam)
    _run_rounds(systems, model, opts, base, workdir, watch, stack, reference, out)


@dataclass
class System:
    """One configuration under test: how it starts and stops, which processes it runs, and its phases.

    ``phases`` are (phase name prefix, spec fields) pairs; each runs a low-load and a loaded phase.
    """

    name: str
    start: Callable[[], None]
    stop: Callable[[], None]
    pids: Callable[[], dict[str, int]]
    phases: list[tuple[str, dict[str, Any]]]
    env: dict[str, str] | None = None
    url: Callable[[], str] | None = None
    recover: Callable[[], None] | None = None
    inferq: bool = False


def _systems(model: str, opts: Options, stack: Stack, peers: Peers, path: Path, beam: int | None) -> list[System]:
    """Every configuration of this run, in the order each round runs them."""
    broker = {"broker": beam} if beam else {}
    systems = []
    if opts.paths:
        systems += _inferq_systems(model, opts, stack, broker)
    for prefix, peer in (("celery", peers.celery), ("celery_durable", peers.celery_durable)):
        if peer is None:
            continue
        systems.append(System(
            prefix, lambda peer=peer: peer.start(model, path, opts.celery_concurrency, opts.celery_threads),
            lambda peer=peer: (peer.stop(), peer.cleanup()),
            lambda peer=peer: {"worker": peer.proc.pid, **broker},
            # the durable Celery's client waits for publisher confirms, as inferq's 202 and AMQP confirm do
            [(prefix, {"mode": "celery", "celery_confirms": peer.durable})], env=peer.env(path, opts.celery_threads)))
    for kind, peer in peers.http.items():
        systems.append(System(
            kind, lambda peer=peer: peer.start(path, opts.peer_threads), peer.stop, peer.pids,
            [(kind, {"mode": kind})], url=lambda peer=peer: peer.url))
    return systems


def _inferq_systems(model: str, opts: Options, stack: Stack, broker: dict[str, int]) -> list[System]:
    """inferq with the first edge count on every path, then an HTTP-only system per further count.

    The edge of a further count is started for its turn and the first count's edge is
    back afterwards; CPU is counted over the edge and all its processes.
    """
    first = opts.edge_processes[0]

    def recover(processes: int) -> None:  # a fresh edge and worker: nothing carried over from a disturbed attempt
        say(f"  restarting the edge ({processes} processes) and the {model} worker")
        stack.stop()
        stack.start_edge(processes)
        stack.start_worker(model)

    def turn(processes: int) -> None:
        stack.restart_edge(processes)
        stack.start_worker(model)

    def pids() -> dict[str, int]:
        return {"edge": stack.edge.pid, "worker": stack.workers[model].pid, **broker}

    systems = [System("inferq", lambda: stack.start_worker(model), lambda: stack.stop_worker(model), pids,
                      [(f"inferq_{p}", {"mode": p}) for p in opts.paths], recover=lambda: recover(first), inferq=True)]
    if "http" in opts.paths:
        for n in opts.edge_processes[1:]:
            systems.append(System(
                f"inferq, {n} edge processes", lambda n=n: turn(n),
                lambda: (stack.stop_worker(model), stack.restart_edge(first)), pids,
                [(f"inferq_http_e{n}", {"mode": "http"})], recover=lambda n=n: recover(n), inferq=True))
    return systems


def _run_rounds(systems: list[System], model: str, opts: Options, base: dict[str, Any], workdir: Path, watch: BrokerWatch,
                stack: Stack, reference: np.ndarray, out: dict[str, Any]) -> None:
    """``opts.rounds`` rounds, each running every system in turn (interleaved, so a slow spell of the machine
    hits all of them alike); a phase's figures are those of its median round, with the spread beside them."""
    rounds: dict[str, list[dict[str, Any]]] = out.setdefault("rounds", {})
    for r in range(1, opts.rounds + 1):
        for system in systems:
            say(f"[{model}] round {r}/{opts.rounds}: {system.name}: starting")
            try:
                system.start()
            except Exception as exc:  # noqa: BLE001 - a peer that cannot start is recorded, the others still run
                say(f"  {system.name} did not start: {type(exc).__name__}: {exc}")
                out.setdefault("start_failures", []).append(f"round {r} {system.name}: {type(exc).__name__}: {str(exc)[:300]}")
                system.stop()
                continue
            try:
                for prefix, fields in system.phases:
                    for low in (True, False):
                        name = f"{prefix}_{'low' if low else 'load'}"
                        res = _system_phase(system, prefix, fields, low, r, model, opts, base, workdir, watch, stack)
                        _check_output(res, reference)
                        res["round"] = r
                        rounds.setdefault(name, []).append(res)
                        out["phases"][name] = median_round(rounds[name], "p50" if low else "jobs_per_s")
            finally:
                system.stop()
    for name, results in rounds.items():
        rounds[name] = [compact(res) for res in results]


def _system_phase(system: System, prefix: str, fields: dict[str, Any], low: bool, r: int, model: str, opts: Options,
                  base: dict[str, Any], workdir: Path, watch: BrokerWatch, stack: Stack) -> dict[str, Any]:
    spec = dict(base, **fields, **_load_shape(model, opts, low),
                label=f"[{model}] {prefix.replace('_', ' ')} r{r} {_shape_text(opts, low)}")
    def attempt() -> dict[str, Any]:  # a restarted peer listens on a new port
        now = dict(spec, url=system.url()) if system.url is not None else spec
        return _phase(now, system.pids(), workdir, opts, watch, env=system.env,
                      stack=stack if system.inferq else None, model=model if system.inferq else None,
                      profile=None if (low or not system.inferq) else f"{model}-{prefix}")

    def recover() -> None:
        if system.recover is not None:
            system.recover()
            return
        say(f"  restarting {system.name}")
        system.stop()
        system.start()

    return _retrying(attempt, recover, spec["label"])


def _retrying(phase: Any, recover: Any, label: str, attempts: int = 4) -> dict[str, Any]:
    """Run a phase again (up to ``attempts`` times, after ``recover()``) if it failed, had job errors, or
    the broker restarted meanwhile (a shared RabbitMQ); the failed attempts are listed in the result."""
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        try:
            res = phase()
        except RuntimeError as exc:
            failures.append(str(exc))
        else:
            if not res["errors"] or attempt == attempts:
                res["attempts"] = attempt
                res["failed_attempts"] = failures
                return res
            failures.append(f"{res['errors']} job errors: {res['error_samples'][:2]}")
        if attempt < attempts:
            say(f"  {label}: attempt {attempt} failed ({failures[-1][:200]}); again")
            for tries in range(3):
                try:
                    recover()
                    break
                except Exception as exc:  # noqa: BLE001 - broker/etcd restarting under us: give it a moment
                    say(f"  recovery failed ({type(exc).__name__}: {exc}); retrying in 5 s")
                    time.sleep(5)
    raise RuntimeError(f"{label}: failed {attempts} times: {failures[-1]}")


def _load_shape(model: str, opts: Options, low: bool) -> dict[str, Any]:
    if low:
        return {"jobs": opts.jobs_for(model, True), "concurrency": 1, "rate": None, "warmup": 20}
    return {"jobs": opts.jobs_for(model, False), "concurrency": opts.concurrency, "rate": opts.rate,
            "warmup": max(20, int(opts.warmup * JOB_SCALE[model]))}


def _shape_text(opts: Options, low: bool) -> str:
    if low:
        return "low load (1 in flight)"
    return f"open loop {opts.rate}/s (max {opts.concurrency} in flight)" if opts.rate else f"{opts.concurrency} in flight"


def _phase(spec: dict[str, Any], pids: dict[str, int], workdir: Path, opts: Options, watch: BrokerWatch, env: dict[str, str] | None = None,
           stack: Stack | None = None, model: str | None = None, profile: str | None = None) -> dict[str, Any]:
    """Run one load generator process; measure CPU of ``pids`` (and the generator) around its timed part.

    With ``--profile``, ``profile`` names the py-spy recordings of the edge and worker taken meanwhile.
    """
    tag = uuid.uuid4().hex[:8]
    spec_path, out_path = workdir / f"spec-{tag}.json", workdir / f"out-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    say(f"  {spec['label']}: warming up ({spec['warmup']} jobs), then {spec['jobs']} jobs")
    started = time.monotonic()
    children = Children()
    proc = children.start("loadgen", python_argv("-m", "benchmarks.loadgen", str(spec_path), str(out_path)), env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
    try:
        _expect(proc, "READY", opts.phase_timeout, spec["label"])
        stats0 = _settled_stats(stack, model)
        quiet = wait_quiet()
        profiler = Profiler(opts.profile) if opts.profile and profile else None
        if profiler is not None:
            profiler.start(profile, {k: v for k, v in pids.items() if k in ("edge", "worker")})
        cpu_watch = CpuWatch({**pids, "loadgen": proc.pid}).start()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        _expect(proc, "DONE", opts.phase_timeout, spec["label"])
        cpu = cpu_watch.stop()
        profiles = profiler.stop() if profiler is not None else None
        proc.wait(30)
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['label']}: load generator exited with {proc.returncode}")
        res = json.loads(out_path.read_text())
    finally:
        children.stop_all(grace_s=5)
    if watch.restarts_since(started):
        raise RuntimeError(f"{spec['label']}: the broker restarted during the phase (shared RabbitMQ); figures discarded")
    res["cpu"] = cpu
    res["machine_before"] = quiet
    res["cpu_ms_per_job"] = per_job_ms(cpu, res["ok"])
    if profiles is not None:
        res["profile"] = profiles
        for name, prof in profiles.items():
            top = ", ".join(f"{f} {p}%" for f, p in prof.get("own_top", [])[:5])
            say(f"    profile {name} ({prof.get('samples', 0)} samples): {top}")
    stats1 = _settled_stats(stack, model)
    if stats0 is not None and stats1 is not None:
        batches = stats1.get("batches", 0) - stats0.get("batches", 0)
        jobs = stats1.get("jobs", 0) - stats0.get("jobs", 0)
        res["worker_stats"] = {"batches": batches, "jobs": jobs, "mean_batch_per_batch": round(jobs / batches, 3) if batches else None,
                               "max_batch": stats1.get("max_batch")}
    lat = res.get("latency_ms", {})
    batch = res.get("mean_batch_size_per_job")
    say(f"    -> {res['ok']} ok, {res['errors']} errors, {res['jobs_per_s']:,.1f} jobs/s, latency p50 {lat.get('p50', float('nan')):.2f} "
        f"p95 {lat.get('p95', float('nan')):.2f} p99 {lat.get('p99', float('nan')):.2f} ms"
        + (f", batch {batch:.2f}/job" if batch else "")
        + f", machine busy {cpu['machine_busy_pct']}% (others {cpu['foreign_busy_pct']}%)")
    if res["errors"]:
        say(f"    errors: {res['error_samples']}")
    return res


def _settled_stats(stack: Stack | None, model: str | None) -> dict[str, Any] | None:
    """The worker's counters once its 1 s stats report has caught up (the worker is idle here)."""
    if stack is None or model is None:
        return None
    time.sleep(1.3)
    try:
        return stack.worker_stats(model)
    except Exception:  # noqa: BLE001 - stats are best effort (etcd hiccup)
        return None


def _expect(proc: subprocess.Popen[Any], word: str, timeout: float, label: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{label}: no {word} from the load generator within {timeout:.0f}s")
        ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 1.0))
        if not ready:
            if proc.poll() is not None:
                raise RuntimeError(f"{label}: load generator exited with {proc.returncode} before {word}")
            continue
        line = proc.stdout.readline()
        if not line:
            proc.wait(5)
            raise RuntimeError(f"{label}: load generator exited with {proc.returncode} before {word}")
        if line.decode(errors="replace").strip() == word:
            return


def _check_output(phase: dict[str, Any], reference: np.ndarray) -> None:
    got = phase.get("first_output")
    if got is None:
        phase["output_matches_reference"] = None
        return
    got_a = np.asarray(got, dtype=np.float32)
    phase["output_matches_reference"] = bool(np.allclose(got_a, reference[: got_a.size], rtol=1e-3, atol=1e-4))
    if not phase["output_matches_reference"]:
        say(f"    WARNING: {phase['label']}: outputs differ from in-process ORT")


def _meta(settings: Settings, opts: Options, namespace: str, celery_version: str | None) -> dict[str, Any]:
    import aio_pika
    import aiohttp
    import onnxruntime

    cpu_model = ""
    try:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu_model, "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        "aiohttp": aiohttp.__version__, "aio_pika": aio_pika.__version__, "celery": celery_version,
        "git": _git_rev(), "namespace": namespace, "broker": settings.broker.__repr__(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()},
    }


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "") if rev else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _write(result: dict[str, Any], opts: Options) -> Path:
    path = opts.output or RESULTS_DIR / f"{result['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
