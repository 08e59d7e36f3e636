"""Users: erase one user's data everywhere (`adloop users forget ID`)."""

from __future__ import annotations

import json

import typer

from adloop.cli.app import app, console
from adloop.settings import get_settings
from features.redis_client import redis_client

users_app = typer.Typer(help="Per-user data: erasure.", no_args_is_help=True)
app.add_typer(users_app, name="users")


@users_app.command("forget")
def forget(user_id: str) -> None:
    """Erase a user: online state, feature rows (online and offline), outcome events; write a tombstone."""
    import redis

    from outcomes.erasure import forget_user

    settings = get_settings()
    if not user_id or len(user_id) > 256:
        raise typer.BadParameter("a user id has 1 to 256 characters", param_hint="USER_ID")
    client = redis_client(settings, timeout_s=5.0)
    try:
        report = forget_user(settings, client, user_id)
    except (redis.RedisError, OSError) as error:
        console.print(f"[red]erasure failed, nothing reported as removed:[/red] {type(error).__name__}: {error}")
        raise typer.Exit(1) from None
    console.print_json(json.dumps(report))
