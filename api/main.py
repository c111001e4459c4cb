"""The app factory. Run with:  uvicorn api.main:create_app --factory --host 0.0.0.0 --port 8000

There is deliberately no module-level `app`: settings are read when the app is created, not
when the module is imported (tests and `sdpo up` build apps with their own settings).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api import health
from api.concurrency import ConcurrencyLimit
from api.deps import AppServices
from api.errors import install_error_handlers
from api.files.router import router as files_router
from api.jobs.router import router as jobs_router
from api.jobs.schemas import JobCreate
from api.metrics import install_metrics
from api.models.router import router as models_router
from api.models.schemas import ModelRegister
from api.openapi import install_docs, install_openapi
from api.ui.router import install_ui
from api.webhooks.router import router as webhooks_router
from api.webhooks.schemas import WebhookCreate
from core.db import make_engine, make_session_factory, session_scope
from core.keys import ensure_settings_admin_key
from core.logging import configure_logging
from core.permissions import restrict_umask
from core.queue import make_celery
from core.settings import Settings, get_settings
from core.storage import make_storage

log = logging.getLogger(__name__)

DESCRIPTION = """Stepwise DPO (sDPO) fine-tuning with OpenAI's fine-tuning API shapes: point the
official `openai` SDK at this server's `/v1`. Extensions: the `sdpo` method, `…/steps`,
`…/pause`, `…/resume`, checkpoint download, and `POST /v1/models` (admin)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Owner-only files from this process: uploads, the SQLite database and its -wal/-shm
    # (core/permissions.py).
    restrict_umask()
    configure_logging()
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow)
    services = AppServices(
        settings=settings,
        session_factory=make_session_factory(engine),
        storage=make_storage(settings.storage_dir, settings.storage_url, cache_bytes=settings.storage_cache_bytes),
        celery=make_celery(settings),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.admin_key:
            await run_in_threadpool(_register_admin_key, services)
        else:
            log.warning("SDPO_ADMIN_KEY is not set: only keys made with `sdpo keys create` can log in")
        try:
            yield
        finally:
            engine.dispose()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: off; /docs is served from the package
    # (api/openapi.py), and with the schema only where docs are enabled (off in production by default).
    app = FastAPI(title="sDPO training service", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  openapi_url="/openapi.json" if settings.docs_enabled else None)
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(files_router)
    app.include_router(models_router)
    app.include_router(jobs_router)
    app.include_router(webhooks_router)
    install_metrics(app)
    # Outermost: a request waits for its slot before anything (metrics timing included) starts.
    app.add_middleware(ConcurrencyLimit, limit=settings.api_max_concurrency, queue_seconds=settings.api_queue_seconds)
    install_ui(app)
    install_openapi(app, [JobCreate, ModelRegister, WebhookCreate])
    if settings.docs_enabled:
        install_docs(app)
    return app


def _register_admin_key(services: AppServices) -> None:
    with session_scope(services.session_factory) as session:
        ensure_settings_admin_key(session, services.settings.admin_key)
