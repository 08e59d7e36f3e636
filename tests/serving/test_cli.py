"""`adloop serve` is a thin call into uvicorn with the app factory."""

from __future__ import annotations

from typer.testing import CliRunner

from adloop import cli


def test_serve_runs_uvicorn_with_the_factory(monkeypatch) -> None:
    calls = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda target, **kwargs: calls.update(target=target, **kwargs))
    result = CliRunner().invoke(cli.app, ["serve", "--host", "127.0.0.1", "--port", "8123", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert calls["target"] == "serving.app:create_app" and calls["factory"] is True
    assert (calls["host"], calls["port"], calls["workers"]) == ("127.0.0.1", 8123, 2)
