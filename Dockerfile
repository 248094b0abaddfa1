# DenseAlign: one image for every service (migrate, app, worker, trainer); the command picks the role.
#
# GPU (default): CUDA runtime base + the CUDA build of torch 2.13.0.
#   docker build -t densealign:gpu .
# CPU: python:3.11-slim + the CPU build of torch 2.13.0 (docker-compose.cpu.yml passes these args).
#   docker build -t densealign:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The CUDA version of BASE_IMAGE and of TORCH_INDEX_URL (cuXYZ) must agree; change both together.
#
# Behind a private index or proxy: --build-arg PIP_INDEX_URL=https://pypi.example/simple (and
# PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST) for every package but torch, whose index is TORCH_INDEX_URL.
# Unset or empty, pip behaves as it does without them (PyPI, or what a pip.conf in the base image
# says): pip ignores a PIP_* variable whose value is empty. A credential in these URLs stays in the
# image's history (`docker history`); prefer a proxy that needs none.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# --- base: Python 3.11 and an empty virtual environment ------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python:3.11-slim already has python3.11; the Ubuntu 22.04 CUDA images get it from deadsnakes.
RUN set -eux; \
    if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common; \
        add-apt-repository -y ppa:deadsnakes/ppa; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
        apt-get purge -y --auto-remove software-properties-common gpg-agent; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3.11 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# --- deps: torch first and pinned, then the rest of the project's pinned dependencies -------------
FROM base AS deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
# Only the torch wheel comes from the PyTorch index (no extra index here, so no other build of
# torch can win); torchvision is never installed (nothing needs it).
RUN PIP_EXTRA_INDEX_URL= pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
# Dependencies change less often than the code: install them from pyproject.toml alone so that a code
# change does not re-download them. The constraint keeps the torch build installed above.
COPY pyproject.toml /tmp/pyproject.toml
RUN set -eux; \
    python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['ml']))" > /tmp/requirements.txt; \
    echo "torch==2.13.0" > /tmp/constraints.txt; \
    pip install -c /tmp/constraints.txt -r /tmp/requirements.txt; \
    if pip show torchvision >/dev/null 2>&1; then echo "torchvision must not be installed" >&2; exit 1; fi

# --- runtime ----------------------------------------------------------------------------------------
FROM base AS runtime
ARG HF_HUB_OFFLINE=0
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY . /app
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
# Editable install: `densealign migrate` reads alembic.ini and migrations/ from this checkout (/app),
# and the shipped base model lives in /app/models. Its build backend (setuptools) comes from the
# index, so the index arguments apply here too.
RUN set -eux; \
    pip install --no-deps -e /app; \
    python -c "import torch, diffusers, densealign.cli; print('torch', torch.__version__)"; \
    groupadd --system --gid 10001 densealign; \
    useradd --system --uid 10001 --gid densealign --create-home --home-dir /home/densealign densealign; \
    mkdir -p /data/blobs /cache/huggingface; \
    chown -R densealign:densealign /data /cache
ENV DENSEALIGN_HOST=0.0.0.0 \
    DENSEALIGN_PORT=8000 \
    DENSEALIGN_BLOB_DIR=/data/blobs \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=${HF_HUB_OFFLINE} \
    HF_HUB_DISABLE_TELEMETRY=1
# Compose mounts named volumes at /data/blobs and /cache/huggingface; a fresh named volume takes the
# ownership of the directory here (densealign), so the non-root user can write to it.
USER densealign
EXPOSE 8000
# The app's health. Worker and trainer serve no HTTP: compose gives them `densealign health --role ...`
# (a recent heartbeat in the database) instead, and turns this off for the one-shot migrate.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/health' % os.environ.get('DENSEALIGN_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["densealign"]
CMD ["serve"]
