# The adloop services (API, feature consumer). Kafka and Redis come from their own images (docker-compose.yml).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY adloop adloop
COPY streaming streaming
COPY features features
COPY serving serving
COPY models models
COPY outcomes outcomes
RUN pip install --no-cache-dir . && useradd --create-home adloop && mkdir -p /data && chown adloop /data
USER adloop
CMD ["adloop", "--help"]
