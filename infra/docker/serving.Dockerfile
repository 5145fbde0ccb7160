# syntax=docker/dockerfile:1.7
#
# Serving image: `encore serve`, the FastAPI recommendation service (POST /v1/recommendations, /healthz,
# /readyz, /metrics, /admin). Stateless apart from the shared experiment store under ENCORE_DATA_DIR, so it
# runs as N replicas behind a proxy (compose: nginx; Kubernetes: a Service and an Ingress).
#
#   docker build -f infra/docker/serving.Dockerfile --build-arg BASE_IMAGE=encore/base:dev -t encore/serving:dev .

# encore-base is resolved from a named build context in compose (additional_contexts: service:...);
# plain `docker build` passes --build-arg BASE_IMAGE=encore/base:<tag>.
ARG BASE_IMAGE=encore-base
FROM ${BASE_IMAGE}

# Listen on every interface inside the container; the port is fixed so probes and the proxy agree on it.
ENV ENCORE_SERVE__HOST=0.0.0.0 \
    ENCORE_SERVE__PORT=8000
EXPOSE 8000

# Liveness only (/healthz answers while the process serves HTTP). /readyz, which also needs the champion
# model loaded, is the Kubernetes readiness probe; Docker has no readiness, and a replica without a model
# must not be reported as broken and restarted.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ENCORE_SERVE__PORT', '8000'), timeout=2)"]

# --experiment store: serve the experiments in the shared store as they are. Experiments are created and
# ramped through `encore ab` or the /admin API; replicas starting together must not each seed one.
CMD ["encore", "serve", "--experiment", "store"]
