"""`adloop serve`: the ad-serving API under uvicorn."""

from __future__ import annotations

import os
import socket

import typer

from adloop.cli.app import app
from adloop.settings import get_settings

WORKER_HEALTHCHECK_S = 60


@app.command("serve")
def serve(
    host: str = typer.Option(None, help="Bind address (default: ADLOOP_API_HOST)."),
    port: int = typer.Option(None, help="Port (default: ADLOOP_API_PORT)."),
    workers: int = typer.Option(
        1, min=1, help="Worker processes (they share budget spend through Redis: serving/pacing.py)."
    ),
) -> None:
    """Run the ad-serving API (uvicorn)."""
    import shutil

    import uvicorn

    settings = get_settings()
    port = port or settings.api_port
    if workers > 1:  # each worker counts in files there and /metrics sums them (serving/metrics.py)
        # Per host too: replicas sharing one stack folder (docker compose --scale api=N on one volume) listen on
        # the same port, and each would empty the others' folder at start.
        folder = settings.stack_dir / f"prometheus-{socket.gethostname()}-{port}"
        shutil.rmtree(folder, ignore_errors=True)  # an earlier run's counts would add to this one's
        folder.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["ADLOOP_METRICS_DIR"] = str(folder)
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=_log_config(),
        access_log=False,  # one canonical line per request belongs in the app, not per-hit access logs
        # uvicorn kills a worker that leaves its health ping unanswered this long (default 5 s): a worker busy
        # importing torch at start-up or loading a promoted model on a loaded machine is not hung.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
    )


def _log_config() -> dict:
    """uvicorn's logging plus the root logger at INFO: the workers are fresh processes (spawned), and
    adloop's own lines (a model swapped or failed to load, a reader rebuilt) must reach their stderr."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["adloop"] = {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}
    config["handlers"]["adloop"] = {"formatter": "adloop", "class": "logging.StreamHandler",
                                    "stream": "ext://sys.stderr"}  # fmt: skip
    config["root"] = {"handlers": ["adloop"], "level": "INFO"}
    config["loggers"]["kafka"] = {"level": "WARNING"}
    return config
