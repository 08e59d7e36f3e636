"""The `adloop` command: a thin layer, one module per command group, that parses options and calls plain
functions of the stages."""

from adloop.cli import collect, demo, learn, observe, serve, settings, stack, users  # noqa: F401  (each registers its commands)
from adloop.cli.app import app

__all__ = ["app"]
