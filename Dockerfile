# syntax=docker/dockerfile:1
#
# brainage-xai BIDS-App image.
#
#   make docker                                      # CUDA-capable, tagged with the version
#   make docker DOCKER_ARGS="--build-arg TORCH_VARIANT=cpu" DOCKER_TAG_SUFFIX=-cpu
#   docker run --rm -v /data/ds:/data:ro -v /data/out:/out \
#       brainage-xai/brainage-xai:<version> /data /out participant
#
# VERSION has no default: the package's brainage_xai/_version.py is the one source of
# the version, `make docker` passes it, and the build fails when it is missing or
# differs from the installed package's.
#
# Two stages: the Python environment with the app, its BIDS validator (PyPI
# bids-validator-deno) and the TemplateFlow templates (the only stage that goes online),
# and the slim run-time image that copies it. See docs/containers.md.

# Exact tags, so that a rebuild starts from the same system; pin by digest for a
# byte-identical base (--build-arg PYTHON_IMAGE=python@sha256:...).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ------------------------------------------------------------------------ builder ----
FROM ${PYTHON_IMAGE} AS builder
# cuda: PyPI's torch build (CUDA 12 runtime bundled, runs on CPU too); cpu: a CPU-only
# build (about 4 GB smaller); cu126, cu128, ...: that PyTorch index.
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
# Optional extras of the package: tune (--tune, optuna), dask (--dask-scheduler).
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

COPY pyproject.toml README.md LICENSE /src/
COPY docker /src/docker
COPY brainage_xai /src/brainage_xai
RUN sh /src/docker/install.sh /opt/venv /src

# Templates are fetched now: compute nodes have no internet, and the app never fetches.
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0
RUN /opt/venv/bin/python /src/docker/fetch_templates.py \
    && chmod -R a+rX,go-w /opt/templateflow

# ------------------------------------------------------------------------ runtime ----
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION
ARG IMAGE_NAME=brainage-xai/brainage-xai
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
ARG TORCH_VARIANT=cuda

LABEL org.opencontainers.image.title="brainage-xai" \
      org.opencontainers.image.description="BIDS-App: brain-age prediction with a 3D ResNet, explained at dataset level by constrained non-negative Tucker decomposition" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/brainage-xai/brainage-xai" \
      org.opencontainers.image.url="https://github.com/brainage-xai/brainage-xai" \
      org.opencontainers.image.documentation="https://github.com/brainage-xai/brainage-xai/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="brainage-xai developers" \
      org.opencontainers.image.ref.name="${IMAGE_NAME}:${VERSION}" \
      org.brainage-xai.torch-variant="${TORCH_VARIANT}"

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/templateflow /opt/templateflow

# A non-root user. Runs as another uid (docker -u, Singularity) find this HOME
# unwritable or absent: the app then puts its caches in the work dir (utils/env.py).
# The installed package must be the version the image is labelled with.
RUN useradd --create-home --home-dir /home/brainage --uid 1000 --user-group \
        --shell /usr/sbin/nologin brainage \
    && /opt/venv/bin/bids-validator-deno --version \
    && installed="$(/opt/venv/bin/brainage-xai --version)" \
    && if [ "${installed}" != "brainage-xai ${VERSION}" ]; then \
        echo "VERSION='${VERSION}' but the package says '${installed}': build with make docker" >&2; \
        exit 1; \
    fi

# BRAINAGE_XAI_CONTAINER and DOCKER_IMAGE fill GeneratedBy.Container in
# dataset_description.json. Cache variables (MPLCONFIGDIR, XDG_CACHE_HOME, TORCH_HOME)
# are left unset on purpose: the app chooses writable places at run time.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/brainage \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    MPLBACKEND=Agg \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRAINAGE_XAI_CONTAINER=docker \
    DOCKER_IMAGE=${IMAGE_NAME}:${VERSION}

# Numeric, so that runtimes that enforce non-root (Kubernetes runAsNonRoot) can check it.
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["brainage-xai"]
CMD ["--help"]
