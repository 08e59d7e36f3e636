"""The `feast` CLI runs on adloop's repo as documented: `eval "$(adloop features env)"`, then `feast ...`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adloop.settings import Settings
from features import store

pytestmark = pytest.mark.integration


def test_feast_cli_lists_the_views_after_adloop_features_env(local_stack: Settings, tmp_path: Path) -> None:
    settings = local_stack.model_copy(update={"feast_data_dir": tmp_path / "feast"})
    store.apply(settings)
    bin_dir = Path(sys.executable).parent
    script = f'eval "$({bin_dir}/adloop features env)" && {bin_dir}/feast feature-views list'
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ADLOOP_FEAST_DATA_DIR": str(settings.feast_data_dir),
           "ADLOOP_REDIS_URL": settings.redis_url, "HOME": str(tmp_path)}  # fmt: skip
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "user_activity" in result.stdout and "ad_performance" in result.stdout
