"""The ``bench`` subcommand. ``inferq/cli.py`` calls :func:`add_parser`; ``python -m benchmarks`` works too."""

from __future__ import annotations

import argparse

from inferq.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``bench`` on the ``inferq`` command's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmark inferq against raw ONNX Runtime and Celery (see benchmarks/README.md)",
        description="Raw ORT ceiling, inferq end to end over HTTP and AMQP, and a Celery 5 baseline, in one run. "
                    "Writes benchmarks/results/<run>.json and prints a summary table.",
    )
    bench.add_argument("--models", default="mlp,cnn", help="comma-separated demo models (mlp, cnn, transformer) or 'all' (default: mlp,cnn)")
    bench.add_argument("--jobs", type=int, default=0, help="jobs per loaded phase (default 2000; 300 with --quick; transformer runs 1/8)")
    bench.add_argument("--low-jobs", type=int, default=0, help="jobs per low-load phase, one in flight (default 300; 60 with --quick)")
    bench.add_argument("--concurrency", type=int, default=64, help="jobs in flight under load, closed loop (default 64)")
    bench.add_argument("--rate", type=float, default=None, help="open loop instead: jobs/s arriving (concurrency caps in-flight jobs)")
    bench.add_argument("--warmup", type=int, default=None, help="warm-up jobs before each loaded phase (default 200; 30 with --quick)")
    bench.add_argument("--edge-processes", default="1",
                       help="edge process counts, comma-separated (e.g. 1,2): the first serves every inferq phase, each "
                            "further count adds an HTTP system of its own with that many edge processes (default 1)")
    bench.add_argument("--paths", default="http,amqp", help="inferq submit paths: http, amqp or both (default); empty skips inferq")
    bench.add_argument("--skip-celery", action="store_true", help="no Celery baselines (default and durable)")
    bench.add_argument("--skip-raw", action="store_true", help="no raw ORT measurement")
    bench.add_argument("--intra-op-threads", type=int, default=None,
                       help="set intra_op_threads in each model's config (worker and raw ORT alike; default: the demo config's, 0 = ORT's choice)")
    bench.add_argument("--rounds", type=int, default=0,
                       help="rounds of every configuration, interleaved; median and min-max reported (default 3; 1 with --quick)")
    bench.add_argument("--peers", default="bentoml,bentoml_task,ray",
                       help="HTTP peers from their own virtualenvs (.venv-bench-*): bentoml, bentoml_task, ray; empty for none")
    bench.add_argument("--celery-concurrency", type=int, default=0, help="Celery prefork processes (default: CPU count)")
    bench.add_argument("--celery-threads", type=int, default=1, help="ORT intra-op threads per Celery process (default 1)")
    bench.add_argument("--raw-seconds", type=float, default=0.0, help="seconds per batch size in the raw sweep (default 0.6; 0.2 with --quick)")
    bench.add_argument("--phase-timeout", type=float, default=300.0, help="give up on a phase after this many seconds (default 300)")
    bench.add_argument("--quick", action="store_true", help="small counts: a smoke run in well under a minute per model")
    bench.add_argument("--output", help="result file (default benchmarks/results/<run-id>.json)")
    bench.add_argument("--profile", metavar="DIR", help="py-spy the edge and worker during loaded inferq phases; raw profiles go to DIR")
    bench.add_argument("--keep", action="store_true", help="keep the temporary model repository and process logs")
    bench.add_argument("--scaling", action="store_true",
                       help="instead: the autoscaler's cold start (zero workers to first result) and scale-up reaction times")
    bench.add_argument("--scaling-rounds", type=int, default=3, help="rounds of the --scaling measurement (default 3)")
    bench.add_argument("--scaling-interval", type=float, default=0.5, help="autoscaler interval_s during --scaling (default 0.5)")
    bench.add_argument("--pipeline", action="store_true",
                       help="instead: the transformer demo split in 2 stages on 2 workers vs the whole model on 1 and 2")
    bench.add_argument("--priority", action="store_true",
                       help="instead: how long high (and normal) HTTP jobs wait behind a backlog of --jobs (default 3000) "
                            "bulk AMQP jobs")
    bench.add_argument("--large", action="store_true",
                       help="instead: edge memory and ledger disk over --jobs (default 2000) jobs of a large-output model")
    bench.add_argument("--large-width", type=int, default=1_000_000,
                       help="--large: floats per result row (default 1000000: 4 MB a job, as in issue 19)")
    bench.add_argument("--own-broker", action="store_true", help="--large: run on a RabbitMQ node of its own, on free ports")
    bench.set_defaults(func=run_bench)


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """Run the benchmark with the broker and etcd of ``settings`` in a namespace of its own."""
    if args.scaling:
        return _run_scaling(settings, args)
    if args.pipeline:
        return _run_pipeline(settings, args)
    if args.priority:
        return _run_priority(settings, args)
    if args.large:
        from inferq.benchmarks.large import run_large

        return run_large(settings, args)
    from inferq.benchmarks.harness import run

    return run(settings, args)


def _run_scaling(settings: Settings, args: argparse.Namespace) -> int:
    import datetime
    import json
    import tempfile
    from pathlib import Path

    from inferq.benchmarks.harness import RESULTS_DIR
    from inferq.benchmarks.scaling import run_scaling

    print(f"scaling: {args.scaling_rounds} rounds, autoscaler interval {args.scaling_interval} s, local launcher, demo mlp", flush=True)
    result = run_scaling(settings, Path(tempfile.mkdtemp(prefix="inferq-scaling-")), args.scaling_interval, args.scaling_rounds)
    path = Path(args.output) if args.output else RESULTS_DIR / f"scaling-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"cold start (0 workers -> first result): median {result['cold_start_s_median']} s  {result['cold_start_s']}")
    print(f"backlog -> second worker consuming:      median {result['scale_up_s_median']} s  {result['scale_up_s']}")
    print(f"goal: both under 3 s. Written to {path}")
    return 0


def _run_priority(settings: Settings, args: argparse.Namespace) -> int:
    import datetime
    import json
    import tempfile
    from pathlib import Path

    from inferq.benchmarks.harness import RESULTS_DIR
    from inferq.benchmarks.priority import run_priority

    jobs = args.jobs or (300 if args.quick else 3000)
    print(f"priority: {jobs} bulk jobs over AMQP, then 5 probes over HTTP, high and then normal", flush=True)
    result = run_priority(settings, Path(tempfile.mkdtemp(prefix="inferq-priority-")), jobs, 5)
    path = Path(args.output) if args.output else RESULTS_DIR / f"priority-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"goal: at most 10% of the waiting normal jobs start before a high one. Written to {path}")
    return 0


def _run_pipeline(settings: Settings, args: argparse.Namespace) -> int:
    import datetime
    import json
    import tempfile
    from pathlib import Path

    from inferq.benchmarks.harness import RESULTS_DIR
    from inferq.benchmarks.pipeline import run_pipeline

    jobs = args.jobs or (100 if args.quick else 400)
    print(f"pipeline: {jobs} jobs per row, {args.concurrency if args.concurrency != 64 else 8} in flight, HTTP ?wait=", flush=True)
    result = run_pipeline(settings, Path(tempfile.mkdtemp(prefix="inferq-pipeline-")), jobs,
                          args.concurrency if args.concurrency != 64 else 8)
    path = Path(args.output) if args.output else RESULTS_DIR / f"pipeline-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"Written to {path}")
    return 0
