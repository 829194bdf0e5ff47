# syntax=docker/dockerfile:1
# Two images from one file (infra/README.md, "Build the images", has the details):
#
#   docker build --target serve -t polytask/serve:0.1.0 .   # the BentoML service: `.[serve]` only, no torch
#   docker build --target train -t polytask/train:0.1.0 .   # Ray head/workers and the retraining job (CUDA)
#
# The bases are build arguments: the defaults below are what the images are built on with Docker
# and a registry. Without a registry, `make images` (infra/images/build.sh) builds a Debian
# bookworm base with mmdebstrap and passes it as both SERVE_BASE and TRAIN_BASE (any Debian or
# Ubuntu with python3 >= 3.11 works), and builds both targets with buildah.
#
# The install steps follow the Makefile's `install` target: upgrade pip, then (train only) torch
# pinned first, then the project with its extras. Keep the torch pin equal to the Makefile's
# (tests/test_infra.py checks it).
ARG SERVE_BASE=python:3.11-slim
ARG TRAIN_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# --------------------------------------------------------------------------- serve
# Small: python + onnxruntime (CPU) + bentoml + tokenizers. Serving imports neither torch nor
# pipeline/ (README, "Serving"), so only serving/ is copied; pyproject.toml and README.md are
# what `pip install .` needs to build the package (README.md is the project's `readme`).
FROM ${SERVE_BASE} AS serve

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# PIP_CERT: a CA bundle for pip's HTTPS during the build only (e.g. behind a TLS-inspecting
# proxy); infra/images/build.sh mounts the host's. Unset, pip trusts its own bundle.
ARG PIP_CERT

RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip

# Built in /tmp and removed: the installed package in the venv is the only copy.
COPY pyproject.toml README.md /tmp/polytask/
COPY serving/ /tmp/polytask/serving/
# Not editable (an image has no checkout to edit); `serve` extra only: no torch, no Ray. The
# `polytask` script imports pipeline/, which this image does not hold: it is removed, and
# `polytask-serving serve|predict` (serving/cli.py) is the command here.
RUN pip install "/tmp/polytask[serve]" \
    && rm -rf /tmp/polytask /opt/venv/bin/polytask

# Non-root. The model store is BENTOML_HOME under /home/polytask/store: mount the shared volume
# there (infra/k8s/serve.yaml), as the train image and the Ray pods do. The service writes
# nowhere else but /tmp (BentoML's sockets, each server's own Prometheus files) and ~/.cache
# (onnxruntime): serve.yaml mounts emptyDirs there and makes the root filesystem read-only.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin polytask \
    && mkdir -p /home/polytask/store/bentoml \
    && chown -R polytask:polytask /home/polytask
USER 10001
WORKDIR /home/polytask
ENV BENTOML_HOME=/home/polytask/store/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    POLYTASK_MODEL_NAME=polytask-senteval6

EXPOSE 3000
# /livez answers as soon as the server is up (the model loads in the background; /readyz waits
# for it), so the health check does not fail while a model is loading.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/livez', timeout=4).status == 200 else 1)"]
# BentoML directly, not `polytask-serving serve`: the server starts without a model and keeps
# /readyz at 503 until one is exported (the Deployment's probes rely on it), where `serve` would
# exit. Every interface, explicitly: the CLI's default is loopback. infra/k8s/serve.yaml runs
# the same command (tests/test_manifests.py).
CMD ["bentoml", "serve", "serving.service:Polytask", "--host", "0.0.0.0", "--port", "3000"]

# --------------------------------------------------------------------------- train
# Ray head and workers, the retraining job and the CronJob's submitter. torch==2.13.0's Linux
# wheel is built for CUDA 13.0 with cuDNN 9, and onnxruntime-gpu 1.31 for CUDA 13 / cuDNN 9, so
# the default base is CUDA 13.0 + cuDNN runtime. Ubuntu 24.04's python3 is 3.12 (>= 3.11).
FROM ${TRAIN_BASE} AS train

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
ARG PIP_CERT

# wget: KubeRay's exec health probes of the Ray containers use it where they are not HTTP probes
# (KubeRay before 1.6, older Ray).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
    && rm -rf /var/lib/apt/lists/*

# Same order as the Makefile: pip, then torch pinned, then the project, which torch>=2.13,<2.15
# leaves as installed. From PyPI torch is the CUDA build, which is what a GPU node wants;
# TORCH_FIND_LINKS names a directory of wheels to take torch from first (infra/images/build.sh
# mounts one holding the CPU build for a CPU base).
# KubeRay starts Ray with `/bin/bash -lc`, and /etc/profile resets PATH for a login shell (on
# Ubuntu and Debian): put the venv back on it, or `ray start` is not found.
RUN python3 -m venv /opt/venv \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/polytask-venv.sh \
    && pip install --upgrade pip
ARG TORCH_FIND_LINKS=""
RUN pip install ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline/ ./pipeline/
COPY serving/ ./serving/
COPY configs/ ./configs/
# `train` (Ray Train, export, the model store) and `gpu` (onnxruntime-gpu for export-time parity
# checks on the GPU). onnxruntime (CPU) also comes in through `train`; both wheels install the
# same `onnxruntime` module, so onnxruntime-gpu is reinstalled last to own it (on a machine
# without CUDA it runs on the CPU).
RUN pip install ".[train,gpu]" \
    && pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.31"

# Ray's containers run as a non-root user too; KubeRay mounts the shared store at
# /home/polytask/store (infra/k8s/).
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash polytask \
    && mkdir -p /home/polytask/store \
    && chown -R polytask:polytask /app /home/polytask
USER 10001
ENV BENTOML_HOME=/home/polytask/store/bentoml \
    BENTOML_DO_NOT_TRACK=True
CMD ["polytask", "--help"]
