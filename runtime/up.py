"""``inferq up``: the whole stack on one machine for a newcomer."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlsplit

from runtime.demo import write_demo_repository
from runtime.loader import sync_repository
from runtime.process import ChildProcess
from runtime.services import ensure_etcd, ensure_rabbitmq
from runtime.settings import Settings

log = logging.getLogger("inferq.up")


def prepare(settings: Settings) -> None:
    """Start local RabbitMQ/etcd if needed and write the demo models into an empty repository."""
    url = urlsplit(settings.broker.url)
    ensure_rabbitmq(url.hostname or "127.0.0.1", url.port or 5672)
    ensure_etcd(settings.state_dir, settings.etcd.host, settings.etcd.port)
    repo = settings.model_repository
    if not repo.exists() or not any(repo.iterdir()):
        log.info("no models in %s: writing the demo models", repo)
        write_demo_repository(repo)


async def up(settings: Settings, min_workers: int) -> int:
    """Run the edge and the autoscaler (which starts the workers) until Ctrl-C, then stop them in order."""
    models = await sync_repository(settings)
    logs = settings.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {"INFERQ_MODEL_REPOSITORY": str(settings.model_repository.resolve()), "INFERQ_STATE_DIR": str(settings.state_dir.resolve()),
           "INFERQ_AUTOSCALER_MIN_WORKERS": str(min_workers)}
    children: list[ChildProcess] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Workers are the autoscaler's: min_workers per model at once, more under load, drained when it stops.
        children.append(await ChildProcess.start("autoscaler", ["autoscaler", "--launcher", "local"], env, logs / "autoscaler.log"))
        edge_args = ["edge", "--host", settings.edge.host, "--port", str(settings.edge.port)]
        children.append(await ChildProcess.start("edge", edge_args, env, logs / "edge.log"))
        _banner(settings, models, logs)
        exited = [asyncio.ensure_future(c.wait()) for c in children]
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopped, *exited], return_when=asyncio.FIRST_COMPLETED)
        for future in [stopped, *exited]:
            future.cancel()
        failed = [c.name for c in children if c.returncode not in (None, 0)]
        if failed:
            log.error("%s exited; see %s. Stopping everything.", ", ".join(failed), logs)
        return 1 if failed else 0
    finally:
        for child in reversed(children):
            await child.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def _banner(settings: Settings, models: list[str], logs: object) -> None:
    url = f"http://{settings.edge.host}:{settings.edge.port}"
    print(f"\ninferq is up: {url}   (models: {', '.join(models)}; logs in {logs})\n")
    if "mlp" in models:
        print(f"""  curl -s -X POST {url}/v1/models/mlp/jobs -H 'Content-Type: application/json' \\
       -d '{{"inputs":[{{"name":"x","shape":[1,256],"datatype":"FP32","data":'"$(python3 -c 'print([0.1]*256)')"'}}]}}'
  curl -s '{url}/v1/jobs/<job_id>?wait=10'
""")
    print("Ctrl-C stops everything.", flush=True)
