"""The app schemathesis fuzzes (tests/serving/test_fuzz_api.py): `uvicorn --factory tests.serving.fuzz_app:build`.

A generated catalog under ADLOOP_FUZZ_DIR, the projection model, in-memory features, the local stack's
Kafka (a topic of its own) and Redis (the database in ADLOOP_FUZZ_REDIS: erasures, notices), the
admin token `fuzz-admin`.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from adloop.settings import Settings
from models.testing import ProjectionBundle, StaticRegistry
from serving.app import create_app
from serving.catalog import generate_catalog, write_catalog
from tests.support.serving import MemoryReader

ADMIN_TOKEN = "fuzz-admin"


def build() -> FastAPI:
    folder = Path(os.environ["ADLOOP_FUZZ_DIR"])
    rows = generate_catalog(200, seed=3)
    write_catalog(rows, folder / "ads.csv")
    bundle = ProjectionBundle(rows)
    settings = Settings(
        catalog_path=folder / "ads.csv",
        stack_dir=folder,
        outcomes_path=folder / "outcomes.duckdb",
        feast_data_dir=folder / "feast",
        admin_token=ADMIN_TOKEN,
        url_signing_secret="fuzz-signing",
        catalog_poll_s=0,
        ad_stats_refresh_s=3600,
        pacing_sync_s=0,
        events_topic=os.environ["ADLOOP_FUZZ_TOPIC"],
        redis_url=os.environ["ADLOOP_FUZZ_REDIS"],
    )
    return create_app(
        settings, feature_reader=MemoryReader(), registry=StaticRegistry({bundle.version: bundle}, bundle.version)
    )
