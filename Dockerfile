# syntax=docker/dockerfile:1
# ATP ext_proc sidecar image.
#
#   docker build -t atp-extproc:0.1.0 .
#   docker run --rm --network host atp-extproc:0.1.0            # serves /etc/atp/atp.yaml
#
# Two stages: `build` installs the project into a virtualenv exactly as `make install` does
# (venv, upgrade pip, pip install of the project from pyproject.toml) but non-editable and
# without the `dev` extra; `runtime` copies only that virtualenv onto a clean slim base, so
# the image holds the runtime dependencies of [project] dependencies and nothing else.
# tests/test_deployment.py keeps these steps in line with the Makefile.

# Same minor as requires-python in pyproject.toml (>=3.11) and ruff's target-version.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Metadata first (readme is part of it), then the package: the source layer changes most.
COPY pyproject.toml README.md ./
COPY atp_extproc ./atp_extproc
RUN python -m venv /opt/atp \
 && /opt/atp/bin/python -m pip install --quiet --upgrade pip \
 && /opt/atp/bin/python -m pip install --quiet . \
 && /opt/atp/bin/atp-extproc --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="atp-extproc" \
      org.opencontainers.image.description="Envoy external-processing sidecar for LLM API traffic" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, non-root uid/gid: the Kubernetes manifests (deploy/k8s) run Envoy with the same
# ids so both can use ATP's Unix socket in the shared emptyDir.
#
# /var/lib/atp is ATP's writable data directory (the cost ledger); compose mounts a named
# volume there, Kubernetes an emptyDir. /etc/.run links to it because the shipped config's
# `ledger.path: ../.run/atp-ledger.sqlite3` is relative to the config file: from
# /etc/atp/atp.yaml that is /etc/.run/atp-ledger.sqlite3, i.e. /var/lib/atp. (`make run`
# serves the same file from the repository, where it is .run/ in the checkout.)
RUN groupadd --system --gid 10001 atp \
 && useradd --system --uid 10001 --gid atp --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin atp \
 && mkdir -p /etc/atp /var/run/atp /var/lib/atp \
 && chown atp:atp /var/run/atp /var/lib/atp \
 && ln -s /var/lib/atp /etc/.run
COPY --from=build /opt/atp /opt/atp
# The example config and the policy files its `policy.include: [policies/*.yaml]` names
# (relative to the config file): without them ATP refuses to start. .dockerignore must
# let both through.
COPY examples/atp.yaml /etc/atp/atp.yaml
COPY examples/policies /etc/atp/policies
# ATP_CONFIG: the atp.yaml to serve. Optional, unset by default: ATP_LOG_LEVEL
# (DEBUG|INFO|WARNING|ERROR) and ATP_LISTEN (host:port or unix:/path) override
# server.log_level and server.listen of that file.
ENV PATH=/opt/atp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ATP_CONFIG=/etc/atp/atp.yaml
USER 10001:10001
EXPOSE 50051
# Asks ATP's own gRPC health service (the one Envoy's health check uses) at the address
# ATP listens on: ATP_LISTEN if set, else server.listen from the config.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os,sys,grpc,yaml; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; t=os.environ.get('ATP_LISTEN') or ((yaml.safe_load(open(os.environ['ATP_CONFIG'])) or {}).get('server') or {}).get('listen','127.0.0.1:50051'); t=t.replace('0.0.0.0:','127.0.0.1:').replace('[::]:','[::1]:'); r=hg.HealthStub(grpc.insecure_channel(t)).Check(h.HealthCheckRequest(service='envoy.service.ext_proc.v3.ExternalProcessor'),timeout=2); sys.exit(0 if r.status==h.HealthCheckResponse.SERVING else 1)"
CMD ["/bin/sh", "-c", "exec atp-extproc serve --config \"$ATP_CONFIG\" ${ATP_LOG_LEVEL:+--log-level \"$ATP_LOG_LEVEL\"} ${ATP_LISTEN:+--listen \"$ATP_LISTEN\"}"]
