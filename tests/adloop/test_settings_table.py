"""README's settings table is generated from `Settings` and kept up to date."""

from __future__ import annotations

from typer.testing import CliRunner

from adloop.cli import app
from adloop.settings import PROJECT_ROOT, Settings, settings_table


def test_readme_settings_table_is_up_to_date() -> None:
    result = CliRunner().invoke(app, ["settings", "--check", str(PROJECT_ROOT / "README.md")])
    assert result.exit_code == 0, result.output


def test_the_table_lists_every_setting_with_its_default() -> None:
    table = settings_table()
    for name in Settings.model_fields:
        assert f"`ADLOOP_{name.upper()}`" in table
    assert "| `ADLOOP_API_PORT` | `8000` |" in table


def test_a_stale_table_is_reported(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- settings:begin -->\n| old |\n<!-- settings:end -->\n")
    assert CliRunner().invoke(app, ["settings", "--check", str(readme)]).exit_code == 1
    assert CliRunner().invoke(app, ["settings", "--write", str(readme)]).exit_code == 0
    assert CliRunner().invoke(app, ["settings", "--check", str(readme)]).exit_code == 0
