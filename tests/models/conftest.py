"""A small synthetic world replayed through models.mind.Replay: training tests need no shared data."""

from __future__ import annotations

import pandas as pd
import pytest

from models.mind import Replay
from tests.support.models import synthetic_world


@pytest.fixture(scope="session")
def synthetic_frame() -> pd.DataFrame:
    news, impressions = synthetic_world()
    return Replay(news).run(impressions)
