"""What the people-facing CLI commands do (``inferq submit``, ``inferq jobs ...``, ``inferq models list``).

``inferq/cli.py`` parses the arguments and imports this module only when one
of these commands runs, so they work where only the client is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from inferq.client.document import JobDocument, JobStatus
from inferq.client.files import input_files, load_inputs, output_path, parse_input_args, write_arrays, write_outputs
from inferq.client.http import AsyncClient
from inferq.client.ordered import ordered_map
from inferq.errors import CodecError, ConfigError, InvalidInput, JobFailed, UnknownModel

log = logging.getLogger("inferq.cli")

# Errors that belong to one input file; anything else (edge gone, bad key) stops the run.
PER_FILE_ERRORS = (JobFailed, InvalidInput, CodecError)


async def submit(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq submit``: one job from ``--input`` files, or one job per file of ``--inputs-dir``."""
    if args.inputs_dir:
        return await submit_directory(client, args)
    bare_npy = any("=" not in spec and spec.endswith(".npy") for spec in args.input)
    single = await single_input_name(client, args.model, args.version) if bare_npy else None
    inputs = parse_input_args(args.input, single)
    job = await client.submit(args.model, inputs, version=args.version, ttl=args.ttl)
    if not (args.wait or args.output):
        print(job.id)
        return 0
    return _report(await job.wait(args.timeout), args.output)


async def submit_directory(client: AsyncClient, args: argparse.Namespace) -> int:
    """Every ``.npy``/``.npz`` of a directory as a job, outputs written beside each as ``<name>.out.npz``."""
    from tqdm import tqdm

    directory = Path(args.inputs_dir)
    files = input_files(directory)
    if not files:
        raise ConfigError(f"no .npy or .npz files in {directory}")
    single = await single_input_name(client, args.model, args.version) if any(f.suffix == ".npy" for f in files) else None

    async def one(path: Path) -> Path | Exception:
        try:
            outputs = await client.infer(args.model, load_inputs(path, single), version=args.version, ttl=args.ttl,
                                         timeout=args.timeout)
            return write_outputs(output_path(path), outputs)
        except PER_FILE_ERRORS as exc:
            return exc

    failed, started = 0, time.monotonic()
    with tqdm(total=len(files), unit="jobs", desc=args.model, file=sys.stderr, mininterval=0.2, dynamic_ncols=True) as bar:
        bar.set_postfix(failed=0)
        async with contextlib.aclosing(ordered_map(one, files, args.concurrency)) as results:
            index = 0
            async for result in results:
                if isinstance(result, Exception):
                    failed += 1
                    bar.write(f"{files[index].name}: {result}", file=sys.stderr)
                    bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)
                index += 1
    elapsed = time.monotonic() - started
    print(f"{len(files)} jobs: {len(files) - failed} succeeded, {failed} failed in {elapsed:.1f}s "
          f"({len(files) / elapsed:.1f} jobs/s); outputs in {directory}/*.out.npz", file=sys.stderr)
    return 1 if failed else 0


async def single_input_name(client: AsyncClient, model: str, version: str | None) -> str | None:
    """The model's input name when it has exactly one (what a bare ``.npy`` file is for)."""
    record = await client.model(model)
    version = version or record.get("default_version")
    try:
        inputs = record["versions"][version]["inputs"]
    except (KeyError, TypeError):
        raise UnknownModel(f"model {model!r} has no version {version!r}") from None
    return inputs[0]["name"] if len(inputs) == 1 else None


async def jobs_get(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq jobs get ID``: the job's document now."""
    document = await client.get_job(args.job_id)
    _report(document, args.output)
    return 0


async def jobs_wait(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq jobs wait ID``: the job's final document (exit 1 unless it succeeded); a sharded job shows a progress bar."""
    first = await client.get_job(args.job_id)
    if first.progress is None or first.final:
        return _report(first if first.final else await client.poll_final(args.job_id, args.timeout), args.output)
    from tqdm import tqdm

    with tqdm(total=first.progress["total"], unit="chunks", desc=args.job_id[:12], file=sys.stderr, mininterval=0.2,
              dynamic_ncols=True) as bar:
        def show(document: Any) -> None:
            if document.progress is not None:
                bar.update(document.progress["done"] - bar.n)

        show(first)
        document = await client.poll_final(args.job_id, args.timeout, on_progress=show)
    return _report(document, args.output)


async def jobs_watch(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq jobs watch ID``: one line per change (time, status, attempts), then the final document."""
    last = None
    async for document in client.job(args.job_id).events():
        print(f"{time.strftime('%H:%M:%S')} {document.status.value:9} attempts={document.attempts}", flush=True)
        last = document
    return _report(last, None) if last is not None else 1


async def jobs_list(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq jobs list``: the caller's jobs newest first, or with ``--stats`` their counts by status."""
    if args.stats:
        print(json.dumps(await client.job_stats(args.model, args.version), indent=2))
        return 0
    left, after = args.limit, None
    print(f"{'JOB':32}  {'MODEL':16} {'VERSION':7} {'STATUS':9} CREATED")
    while left > 0:
        jobs, after = await client.list_jobs(args.model, version=args.version, status=args.status,
                                             limit=min(left, 1000), after=after)
        for job in jobs:
            print(f"{job['job_id']:32}  {job['model']:16} {job['version']:7} {job['status']:9} {job['created_at']}")
        left -= len(jobs)
        if after is None:
            break
    return 0


async def jobs_cancel(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq jobs cancel ID``: cancel a queued job; prints what it became."""
    _report(await client.cancel_job(args.job_id), None)
    return 0


async def models_list(client: AsyncClient, args: argparse.Namespace) -> int:
    """``inferq models list``: every model with its versions, inputs, workers and queue depth."""
    rows = [("MODEL", "DEFAULT", "VERSIONS", "INPUTS", "WORKERS", "QUEUED")]
    for model in await client.models():
        versions = model.get("versions") or {}
        default = model.get("default_version") or ""
        inputs = (versions.get(default) or {}).get("inputs") or []
        rows.append((
            str(model.get("name")), str(default), ",".join(sorted(versions)),
            " ".join(_spec(s) for s in inputs), str(len(model.get("workers") or [])),
            str(sum(d for d in (model.get("queue_depth") or {}).values() if isinstance(d, int))),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _spec(spec: dict[str, Any]) -> str:
    dims = ",".join("?" if d is None or d == -1 else str(d) for d in spec.get("shape") or [])
    return f"{spec.get('name')}:{spec.get('dtype')}[{dims}]"


def _report(document: JobDocument, output: str | None) -> int:
    print(json.dumps(document.to_json(), indent=2))
    if output and document.outputs:
        for path in write_arrays(Path(output), document.outputs):
            log.info("wrote %s", path)
    return 0 if document.status is JobStatus.SUCCEEDED else 1
