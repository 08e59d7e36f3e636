"""kill -9 between a partition's commit and its Feast rows: the next owner rewrites the rows (standalone, cluster)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adloop.settings import Settings
from features.online import features_via_feast
from features.store import USER_VIEW
from tests.streaming.test_consumer import assert_online_equals_batch
from tests.support.events import synthetic_events
from tests.support.stack import adloop_env, applied_events, produce, stop_when_applied

pytestmark = pytest.mark.integration

# `adloop consume` whose process kills itself (SIGKILL) as soon as its first batch's partitions committed,
# before any of their online rows.
_DIES_BETWEEN_THE_WRITES = """
import os, signal, sys
from streaming.consumer import FeatureConsumer
commit = FeatureConsumer._commit
def commit_then_die(self, *args, **kwargs):
    commit(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
FeatureConsumer._commit = commit_then_die
from adloop.cli import app
app(sys.argv[1:])
"""


def test_a_kill_between_the_commit_and_the_rows_changes_no_feature(any_feature_settings: Settings) -> None:
    settings = any_feature_settings
    events = synthetic_events(400, users=200, seed=31)  # 2 events a user: most users are in one batch only
    produce(settings, events)
    env = {**os.environ, **adloop_env(settings)}
    args = ["consume", "--idle-exit", "5", "--metrics-port", "0"]
    victim = subprocess.run([sys.executable, "-c", _DIES_BETWEEN_THE_WRITES, *args], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert victim.returncode == -9, victim.stdout + victim.stderr
    committed = applied_events(settings)
    users = sorted({e.user_id for e in events})
    online = features_via_feast(settings, USER_VIEW, users)
    missing = [u for u in users if online[u]["last_seen_ms"] is None]
    assert committed > 0 and missing, "the kill must land after a commit, before its rows"

    done = subprocess.Popen([sys.executable, "-m", "adloop.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    stop_when_applied([done], settings, len(events))
    assert done.returncode == 0, done.stdout.read()
    assert_online_equals_batch(settings, events)  # the committed batch's users too: their rows were rewritten
