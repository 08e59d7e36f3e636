"""`python -m adloop.cli`: the `adloop` command."""

from adloop.cli import app

app()
