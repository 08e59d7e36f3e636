"""Serving fixtures: a small catalog on disk, an in-memory feature reader, a projection model, an app factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adloop.settings import Settings
from models.testing import ProjectionBundle, StaticRegistry
from serving.catalog import generate_catalog, write_catalog
from tests.support.serving import MemoryReader, NoKafka


@pytest.fixture
def catalog_rows() -> list[dict[str, str]]:
    return generate_catalog(300, seed=7)


@pytest.fixture
def catalog_file(tmp_path: Path, catalog_rows) -> Path:
    path = tmp_path / "ads.csv"
    write_catalog(catalog_rows, path)
    return path


@pytest.fixture
def bundle(catalog_rows) -> ProjectionBundle:
    return ProjectionBundle(catalog_rows)


@pytest.fixture
def make_app(catalog_file: Path, bundle) -> Callable[..., Any]:
    """make_app(reader=..., registry=..., producer_factory=..., **settings) -> (app, settings)."""
    from serving.app import create_app

    def build(*, reader="memory", registry="model", producer_factory=None, **overrides):
        values = {
            "catalog_path": catalog_file,
            "admin_token": "secret",
            "url_signing_secret": "test-signing-secret",
            "catalog_poll_s": 0,
            "ad_stats_refresh_s": 3600,
            "events_topic": "adloop.test.unused",
            "control_share": 0.0,
            **overrides,
        }
        settings = Settings(**values)
        if registry == "model":
            registry = StaticRegistry({bundle.version: bundle}, bundle.version)
        app = create_app(
            settings,
            feature_reader=MemoryReader() if reader == "memory" else reader,
            registry=registry,
            producer_factory=producer_factory or NoKafka(),
        )
        return app, settings

    return build
