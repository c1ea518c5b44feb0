# syntax=docker/dockerfile:1
# One image for every app service in compose.yaml: migrate, the workers, the sweeper, Flower and the sim.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A non-root user whose home is the working directory (cascade.yaml is mounted there read-only; the
# settings' data_dir, .cascade, is created there when needed).
RUN useradd --system --uid 10001 --user-group --no-log-init --create-home --home-dir /app cascade

WORKDIR /src
# README.md* matches nothing until the README exists; pyproject.toml names it as the long description.
COPY pyproject.toml README.md* ./
COPY cascade ./cascade
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . && rm -rf /src/build /src/*.egg-info

USER cascade
WORKDIR /app
CMD ["cascade", "--help"]
