"""`adloop settings`: every ADLOOP_* setting with its default and meaning (the README's table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adloop.cli.app import app, console
from adloop.settings import PROJECT_ROOT, settings_table

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


@app.command("settings")
def settings(
    check: Annotated[
        Path | None, typer.Option(help="Do not print: fail if this file's settings table is out of date.")
    ] = None,
    write: Annotated[Path | None, typer.Option(help="Rewrite the settings table in this file.")] = None,
) -> None:
    """Print the settings (ADLOOP_* variables or .env) as a Markdown table."""
    table = settings_table()
    target = check or write
    if target is None:
        typer.echo(table, nl=False)
        return
    text = target.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        console.print(f"[red]{target} has no {BEGIN} ... {END} block[/red]")
        raise typer.Exit(1)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    wanted = f"{head}{BEGIN}\n{table}{END}{tail}"
    if check is not None:
        if wanted != text:
            console.print(f"[red]{target.relative_to(PROJECT_ROOT) if target.is_relative_to(PROJECT_ROOT) else target}"
                          " is out of date:[/red] run `adloop settings --write README.md`")  # fmt: skip
            raise typer.Exit(1)
        console.print(f"{target} is up to date")
        return
    target.write_text(wanted, encoding="utf-8")
    console.print(f"wrote the settings table into {target}")
