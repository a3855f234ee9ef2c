# syntax=docker/dockerfile:1.7
# The Flywheel operator: kopf + the flywheel package with its base dependencies only (no torch).
# Build from the repository root (see images/README.md):
#   docker build -f images/operator.Dockerfile -t ghcr.io/flywheel-dev/flywheel-operator:0.1.0 .
#
# Base image pinned by full tag. In CI, pin the digest too:
#   docker buildx imagetools inspect python:3.11.14-slim-trixie   # -> PYTHON_IMAGE=...@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

# --- builder: the project wheel, then a venv with it and its locked dependencies -----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY operator/flywheel_operator/ operator/flywheel_operator/
COPY trainer/flywheel_trainer/ trainer/flywheel_trainer/
# requirements.lock pins the whole set (trainer and dev extras included); as constraints it pins
# whatever is installed, here only the base dependencies, and setuptools in the build env.
RUN PIP_CONSTRAINT=requirements.lock pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/flywheel \
 && /opt/flywheel/bin/pip install --only-binary=:all: -c requirements.lock /wheels/*.whl \
 && /opt/flywheel/bin/python -c "import flywheel_operator.handlers" \
 && ! /opt/flywheel/bin/python -c "import torch" 2>/dev/null

# --- final: the venv only, as a non-root user ----------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="flywheel-operator" \
      org.opencontainers.image.description="Flywheel: Kubernetes-native fine-tuning operator" \
      org.opencontainers.image.source="https://github.com/flywheel-dev/flywheel"
RUN groupadd --gid 10001 flywheel \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin flywheel
COPY --from=builder /opt/flywheel /opt/flywheel
ENV PATH=/opt/flywheel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# One allocator without per-thread caches: Python's small objects on glibc's malloc, glibc's
# per-thread cache off, so the operator's minutely malloc_trim returns what waves of runs freed
# on any of its threads (docs/operations.md, "Memory"; bench/RESULTS.md, "Soak").
ENV PYTHONMALLOC=malloc \
    GLIBC_TUNABLES=glibc.malloc.tcache_count=0
# The chart runs it with a read-only root filesystem and an emptyDir on /tmp.
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "flywheel_operator"]
CMD ["--all-namespaces"]
