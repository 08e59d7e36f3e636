"""The FastAPI app: `create_app(settings)` builds it; `lifespan` loads catalog, model, Redis pool and the
Kafka impression logger once onto `app.state.runtime`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from adloop.settings import Settings, get_settings
from serving import metrics, signing
from serving.http import validation_error
from serving.notices import NoticeLedger
from serving.openapi import truthful_openapi
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
        app.state.notices = NoticeLedger(runtime.redis)
        yield
        runtime.stop()

    app = FastAPI(
        title="adloop serving",
        version="0.1.0",
        lifespan=lifespan,
        description="Ad selection (JSON and OpenRTB 2.6), catalog, features, outcomes and dashboard, operations.",
        max_body_size=settings.max_body_bytes,  # 413 before parsing (Content-Length first), every route
        exception_handlers={RequestValidationError: validation_error},
    )
    app.state.settings = settings
    app.state.signing_secret = signing.secret_of(settings)
    for module in (select, track, conversions, rtb, catalog, users, admin, ops, outcomes, dashboard):
        app.include_router(module.router)
    app.openapi = lambda: truthful_openapi(app)  # type: ignore[method-assign]
    return app
