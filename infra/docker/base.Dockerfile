# syntax=docker/dockerfile:1.7
#
# Encore base image: Python 3.11, the pinned dependencies installed by infra/install.sh into /opt/encore,
# and the Encore source in /app. It is a complete `encore` CLI image on its own (the ingest worker and the
# MLflow server run from it); the role images (dagster, serving, trainer) build FROM it.
#
#   docker build -f infra/docker/base.Dockerfile -t encore/base:dev .                  # CPU torch
#   docker build -f infra/docker/base.Dockerfile --build-arg TORCH_FLAVOUR=gpu -t encore/base:gpu .
#
# Build context: the repository root (see .dockerignore: no .venv, .encore or data sets go in).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu: torch's CPU wheel and fbgemm-gpu-cpu, the same stack as a developer's .venv (~1 GB smaller).
# gpu: torch's default PyPI wheel, which bundles the CUDA runtime as nvidia-* wheels, plus fbgemm-gpu. No CUDA
# base image is needed: the host's driver is mounted by the NVIDIA container toolkit at run time.
ARG TORCH_FLAVOUR=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV VENV=/opt/encore \
    PATH=/opt/encore/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    ENCORE_DATA_DIR=/var/lib/encore \
    ENCORE_PROFILE=production

# tini: PID 1 that forwards SIGTERM and reaps the subprocesses Dagster and torchrun start.
# libgomp1: OpenMP runtime that faiss and the FBGEMM CPU kernels load.
# Not version-pinned: Debian's security updates replace the pinned versions, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid so that volumes and Kubernetes' runAsUser/fsGroup can be set to match (10001).
# USER is numeric below, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 encore \
 && useradd --system --uid 10001 --gid encore --home-dir /home/encore --create-home --shell /usr/sbin/nologin encore \
 && install -d -o encore -g encore /var/lib/encore

WORKDIR /app

# Dependencies first, from only the files that decide them, so that a code change reuses this layer.
# install.sh reuses an existing venv: it is created here with a setuptools new enough for pyproject.toml
# (install.sh installs Encore itself with --no-build-isolation). The pip cache mount makes a rebuild after a
# lock change download only what changed. install.sh picks FBGEMM by running nvidia-smi, and a build has no
# GPU: for the gpu flavour the CPU kernels are swapped for the CUDA ones afterwards.
COPY pyproject.toml README.md ./
COPY infra/install.sh infra/requirements.lock infra/
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eux; \
    python3 -m venv "$VENV"; \
    "$VENV/bin/pip" install -q "setuptools>=68"; \
    if [ "$TORCH_FLAVOUR" = cpu ]; then export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX"; fi; \
    VENV="$VENV" PYTHON=python3 bash infra/install.sh; \
    if [ "$TORCH_FLAVOUR" = gpu ]; then \
      "$VENV/bin/pip" uninstall -y -q fbgemm-gpu-cpu; \
      "$VENV/bin/pip" install -q "fbgemm-gpu==1.8.0"; \
    fi

# The source. Installed editable from /app like a developer checkout, so models/configs, bench/ and the
# package data resolve exactly as they do in .venv. Files stay root-owned: the app cannot rewrite its code.
COPY . .
RUN "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . \
 && encore --help > /dev/null

USER 10001:10001
ENV HOME=/home/encore
ENTRYPOINT ["tini", "--"]
CMD ["encore", "--help"]
