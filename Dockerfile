# syntax=docker/dockerfile:1
# modcache: one image for every component; the command picks the component:
#   modcache operator [--namespace NS | --all-namespaces]   the kopf operator (one daemon per ModuleCache)
#   modcache consumer                                       the execution consumer
#   modcache sync --once                                    one full sync (the chart's `helm test` hook)
# Build: docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t modcache:0.1.0 .

# checkov:skip=CKV_DOCKER_7: the base image is the ARG below, pinned to a version tag (python:3.12-slim-bookworm); checkov cannot resolve an ARG in FROM
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: resolve and install the package into a self-contained virtualenv --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/modcache
WORKDIR /src
# Metadata first so the dependency layer is reused while only the code changes.
COPY pyproject.toml README.md ./
COPY src ./src
COPY operator ./operator
COPY consumer ./consumer
RUN /opt/modcache/bin/pip install --no-cache-dir . \
 && /opt/modcache/bin/pip uninstall --yes pip setuptools wheel \
 && /opt/modcache/bin/python -m compileall -q /opt/modcache/lib

# ---- runtime: the interpreter, the virtualenv, a fixed non-root user; no compilers, no pip, no caches -------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="modcache" \
      org.opencontainers.image.description="Keeps a Bifrost-compatible Redis module cache converged to PostgreSQL: kopf operator and execution consumer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md#install-on-kubernetes"
# The base image's pip is not needed at run time either.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 10001 modcache \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modcache
COPY --from=build /opt/modcache /opt/modcache
ENV PATH=/opt/modcache/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
# Numeric so Kubernetes can verify runAsNonRoot without resolving names; matches the chart's runAsUser.
USER 10001:10001
EXPOSE 8080 8081 9090 9091
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK: Kubernetes probes each component's /healthz and /readyz (the chart), and the image runs several commands (operator, consumer, sync --once) that no single check fits
ENTRYPOINT ["modcache"]
CMD ["--help"]
