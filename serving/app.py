"""The FastAPI app: `create_app(settings)` builds it; `lifespan` loads catalog, model, Redis pool and the
Kafka impression logger once onto `app.state.runtime`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adloop.settings import Settings, get_settings
from serving import metrics
from serving.routes import admin, catalog, conversions, dashboard, ops, outcomes, rtb, select, track, users
from serving.runtime import Runtime, freeze_heap


def create_app(settings: Settings | None = None, **overrides) -> FastAPI:
    """`overrides` (tests, the benchmark): feature_reader, registry, producer_factory."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, **overrides)
        runtime.start()
        freeze_heap()
        metrics.watch_gc()  # after the start-up collection: pauses while serving (a reload's included)
        app.state.runtime = runtime
        yield
        runtime.stop()

    app = FastAPI(
        title="adloop serving",
        version="0.1.0",
        lifespan=lifespan,
        description="Ad selection (JSON and OpenRTB 2.6), catalog, features, outcomes and dashboard, operations.",
    )
    app.state.settings = settings
    for module in (select, track, conversions, rtb, catalog, users, admin, ops, outcomes, dashboard):
        app.include_router(module.router)
    return app
