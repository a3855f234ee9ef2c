# syntax=docker/dockerfile:1.7
# The Flywheel trainer: torch (CUDA build from PyPI, which bundles the CUDA runtime, cuDNN and
# NCCL as nvidia-* wheels), transformers and comet-ml. Nodes need only the NVIDIA driver and
# the container toolkit / device plugin. Build from the repository root (see images/README.md):
#   docker build -f images/trainer.Dockerfile -t ghcr.io/flywheel-dev/flywheel-trainer:0.1.0 .
#
# Base image pinned by full tag. In CI, pin the digest too:
#   docker buildx imagetools inspect python:3.11.14-slim-trixie   # -> PYTHON_IMAGE=...@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

# --- builder: the project wheel, then a venv with it and the locked trainer dependencies ---------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY operator/flywheel_operator/ operator/flywheel_operator/
COPY trainer/flywheel_trainer/ trainer/flywheel_trainer/
# requirements.lock (compiled for x86_64 Linux) pins torch, the nvidia-* CUDA wheels, triton,
# transformers, comet-ml and everything under them; only binary wheels are accepted.
RUN PIP_CONSTRAINT=requirements.lock pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/flywheel \
 && /opt/flywheel/bin/pip install --only-binary=:all: -c requirements.lock \
      "$(ls /wheels/*.whl)[trainer]" \
 && /opt/flywheel/bin/python -c "import torch, transformers, comet_ml, s3fs, gcsfs, flywheel_trainer.train" \
 && test -x /opt/flywheel/bin/torchrun

# --- final: the venv, RDMA user-space libraries for NCCL, a non-root user -----------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="flywheel-trainer" \
      org.opencontainers.image.description="Flywheel FSDP2 trainer (torch CUDA, transformers, comet-ml)" \
      org.opencontainers.image.source="https://github.com/flywheel-dev/flywheel"
# libibverbs/librdmacm let NCCL use InfiniBand / RoCE between H200 nodes (without them it falls
# back to TCP sockets). Debian's trixie packages; the apt snapshot is fixed by the base tag.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends libibverbs1 ibverbs-providers librdmacm1 \
 && rm -rf /var/lib/apt/lists/*
# uid/gid 1000: the operator runs trainer pods with runAsUser/runAsGroup/fsGroup 1000.
RUN groupadd --gid 1000 flywheel \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/flywheel --shell /bin/bash flywheel
COPY --from=builder /opt/flywheel /opt/flywheel
ENV PATH=/opt/flywheel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/flywheel \
    HF_HOME=/home/flywheel/.cache/huggingface
USER 1000:1000
WORKDIR /home/flywheel
# No ENTRYPOINT: the operator gives each pod its command (torchrun ... -m flywheel_trainer, or
# python -m flywheel_trainer --preflight).
CMD ["python", "-m", "flywheel_trainer", "--help"]
