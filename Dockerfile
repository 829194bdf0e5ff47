# syntax=docker/dockerfile:1
# Two images from one file (infra/README.md has the build commands):
#
#   docker build --target serve -t polytask/serve:0.1.0 .   # the BentoML service: `.[serve]` only, no torch
#   docker build --target train -t polytask/train:0.1.0 .   # Ray head/workers and the retraining job (CUDA)
#
# The install steps follow the Makefile's `install` target: upgrade pip, then (train only) torch
# pinned first, then the project with its extras. Keep the torch pin equal to the Makefile's
# (tests/test_infra.py checks it).

# --------------------------------------------------------------------------- serve
# Small: python slim + onnxruntime (CPU) + bentoml + tokenizers. Serving imports neither torch nor
# pipeline/ (README, "Serving"), so only serving/ is copied; pyproject.toml and README.md are
# what `pip install .` needs to build the package (README.md is the project's `readme`).
FROM python:3.11-slim AS serve

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
    && pip install --upgrade pip

WORKDIR /app
COPY pyproject.toml README.md ./
COPY serving/ ./serving/
# Not editable (an image has no checkout to edit); `serve` extra only: no torch, no Ray.
RUN pip install ".[serve]"

# Non-root; the BentoML model store lives under BENTOML_HOME (mount the shared model volume
# there, see infra/k8s/serve.yaml). The service never writes outside it and /tmp.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin polytask \
    && mkdir -p /home/polytask/bentoml \
    && chown -R polytask:polytask /home/polytask
USER 10001
ENV BENTOML_HOME=/home/polytask/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    POLYTASK_MODEL_NAME=polytask-senteval6

EXPOSE 3000
# /livez answers as soon as the server is up (the model loads in the background; /readyz waits
# for it), so the health check does not fail while a model is loading.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/livez', timeout=4).status == 200 else 1)"]
CMD ["bentoml", "serve", "serving.service:Polytask", "--port", "3000"]

# --------------------------------------------------------------------------- train
# Ray head and workers, the retraining job and the CronJob's submitter. torch==2.13.0's Linux
# wheel is built for CUDA 13.0 with cuDNN 9, and onnxruntime-gpu 1.31 for CUDA 13 / cuDNN 9, so
# the base is CUDA 13.0 + cuDNN runtime. Ubuntu 24.04's python3 is 3.12 (>= 3.11 required).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS train

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Same order as the Makefile: pip, then torch pinned (here from PyPI: the CUDA build, which is
# what a GPU node wants), then the project, which torch>=2.13,<2.15 leaves as installed.
# KubeRay starts Ray with `/bin/bash -lc`, and Ubuntu's /etc/profile resets PATH for a login
# shell: put the venv back on it, or `ray start` is not found.
RUN python3 -m venv /opt/venv \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/polytask-venv.sh \
    && pip install --upgrade pip
RUN pip install torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline/ ./pipeline/
COPY serving/ ./serving/
COPY configs/ ./configs/
# `train` (Ray Train, export, the model store) and `gpu` (onnxruntime-gpu for export-time parity
# checks on the GPU). onnxruntime (CPU) also comes in through `train`; both wheels install the
# same `onnxruntime` module, so onnxruntime-gpu is reinstalled last to own it.
RUN pip install ".[train,gpu]" \
    && pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.31"

# Ray's containers run as a non-root user too; KubeRay mounts the shared store at
# /home/polytask/store (infra/k8s/).
RUN useradd --create-home --uid 10001 --shell /bin/bash polytask \
    && chown -R polytask:polytask /app
USER 10001
ENV BENTOML_HOME=/home/polytask/store/bentoml \
    BENTOML_DO_NOT_TRACK=True
CMD ["polytask", "--help"]
