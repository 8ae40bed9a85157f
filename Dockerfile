# syntax=docker/dockerfile:1
# One image for the three services: approval-svc, history-svc and replicator are its commands.
#   docker build -t payments-cqrs:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so this layer is reused while only the code changes.
COPY deploy/docker/requirements.lock deploy/docker/build-requirements.lock ./
RUN pip install --no-deps -r requirements.lock -r build-requirements.lock
COPY pyproject.toml README.md ./
COPY payments ./payments
COPY payments_common ./payments_common
COPY approval_svc ./approval_svc
COPY history_svc ./history_svc
COPY replicator ./replicator
# The services need none of the packaging tools: pip goes too, once it has checked the set.
RUN pip install --no-deps --no-build-isolation . \
    && pip uninstall --yes setuptools wheel \
    && pip check \
    && pip uninstall --yes pip \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="payments-cqrs" \
      org.opencontainers.image.source="https://github.com/example/payments-cqrs" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric id, so Kubernetes can verify runAsNonRoot without a name lookup.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in Kubernetes: no bytecode writes, unbuffered logs to stdout.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 50052 50053 9101 9102 9103
CMD ["approval-svc", "serve"]
