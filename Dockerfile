# syntax=docker/dockerfile:1.7
#
# ONE image for the whole PACS, with an entry point per service.
# Why one and not seven: the services are members of one locked uv workspace
# (one uv.lock), share libs/common, and differ only in the command they run.
# One image keeps them in lock-step (no mixed versions across a queue hop),
# and means one build, one vulnerability scan, one layer cache.  The command
# picks the service (compose `command:`, Helm `args:`):
#
#   python -m dimse_gateway | ingest_worker | query_service | dicomweb_api
#             | hsm_migrator | prefetch_scheduler | ai_connector
#   pacs migrate            (the database migrations one-shot)
#
# Build:  docker build -t pacs:local .        (from the repository root)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# --- builder: resolve nothing, install exactly what uv.lock says -----------
FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
WORKDIR /src

# Third-party dependencies first: this layer changes only with uv.lock.
COPY uv.lock pyproject.toml ./
COPY libs/common/pyproject.toml libs/common/
COPY services/dimse-gateway/pyproject.toml services/dimse-gateway/
COPY services/ingest-worker/pyproject.toml services/ingest-worker/
COPY services/query-service/pyproject.toml services/query-service/
COPY services/dicomweb-api/pyproject.toml services/dicomweb-api/
COPY services/hsm-migrator/pyproject.toml services/hsm-migrator/
COPY services/prefetch-scheduler/pyproject.toml services/prefetch-scheduler/
COPY services/ai-connector/pyproject.toml services/ai-connector/
COPY services/ai-reference/pyproject.toml services/ai-reference/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace

# Then the workspace itself, installed as wheels (no editable links to /src).
COPY libs/common/src libs/common/src
COPY services services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# --- runtime: the virtual environment and nothing to build with ------------
FROM ${PYTHON_IMAGE} AS runtime
ARG PACS_UID=10001
RUN groupadd --system --gid ${PACS_UID} pacs \
    && useradd --system --uid ${PACS_UID} --gid pacs --home-dir /app --no-create-home pacs \
    && mkdir -p /app/data \
    && chown pacs:pacs /app/data
COPY --from=builder /app/.venv /app/.venv
COPY deploy/docker/healthcheck.py /usr/local/lib/pacs/healthcheck.py
ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PACS_TELEMETRY_LOG_FORMAT=json \
    PACS_STORAGE_HOT_PATH=/app/data/hot \
    PACS_GATEWAY_SPOOL_DIR=/app/data/spool \
    PACS_DICOMWEB_SPOOL_DIR=/app/data/spool \
    PACS_AI_SPOOL_DIR=/app/data/spool
WORKDIR /app
# Numeric, so that Kubernetes runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080 8081 8082 8083 8084 8085 8086 11112
# Each service sets PACS_HEALTHCHECK_URL to its own /health endpoint.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/lib/pacs/healthcheck.py"]
# No ENTRYPOINT: the command is the service (see the top of this file).
CMD ["pacs", "--help"]
