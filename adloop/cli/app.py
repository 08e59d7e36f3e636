"""The `adloop` Typer app, its command groups and the console every command prints to."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

app = typer.Typer(help="adloop: real-time ad targeting (collect -> predict -> act).", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: real Kafka (KRaft) and Redis on loopback.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
events_app = typer.Typer(help="The event contract (schema_version 1).", no_args_is_help=True)
app.add_typer(events_app, name="events")
models_app = typer.Typer(help="The model registry: list, promote, roll back versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
features_app = typer.Typer(help="The Feast feature repo: apply it, read a user's features.", no_args_is_help=True)
app.add_typer(features_app, name="features")
console = Console()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("kafka", "httpx", "matplotlib", "feast", "dask", "urllib3", "faiss"):  # their INFO is not ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
