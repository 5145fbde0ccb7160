# syntax=docker/dockerfile:1.7
#
# Dagster image: one image, three roles, chosen by the command (compose and Kubernetes set it):
#
#   code location  dagster code-server start -m orchestration.definitions -h 0.0.0.0 -p 4000 --location-name encore
#                  (the default CMD; it also runs the jobs: DefaultRunLauncher starts each run as a
#                  subprocess of this container, so it needs every ENCORE_* setting and the data volume)
#   webserver      dagster-webserver -h 0.0.0.0 -p 3000 -w /opt/dagster/workspace.yaml
#   daemon         dagster-daemon run -w /opt/dagster/workspace.yaml     (schedules, sensors, run queue)
#
# The instance (runs, event logs, schedules) lives in PostgreSQL: $DAGSTER_HOME/dagster.yaml reads
# ENCORE_DAGSTER__POSTGRES_URL, the same variable the `encore` CLI uses, so runs started from the CLI and
# from the UI land in one history.
#
#   docker build -f infra/docker/dagster.Dockerfile --build-arg BASE_IMAGE=encore/base:dev -t encore/dagster:dev .
#
# No HEALTHCHECK here: the right probe depends on the role, so compose and Kubernetes define one per role
# (`dagster api grpc-health-check -p 4000`, GET /server_info, `dagster-daemon liveness-check`).

# encore-base is resolved from a named build context in compose (additional_contexts: service:...);
# plain `docker build` passes --build-arg BASE_IMAGE=encore/base:<tag>.
ARG BASE_IMAGE=encore-base
FROM ${BASE_IMAGE}

ENV DAGSTER_HOME=/opt/dagster/dagster_home

USER root
COPY infra/docker/dagster.yaml /opt/dagster/dagster_home/dagster.yaml
COPY infra/docker/workspace.yaml /opt/dagster/workspace.yaml
# The instance config is read-only; Dagster writes its scratch files (.telemetry, .nux) under DAGSTER_HOME.
RUN chown encore:encore /opt/dagster/dagster_home
# A Java runtime for the Spark training-set builder (offline.training_engine: spark; Spark's local mode runs
# in the step's process, or the step submits to offline.spark_master). Not version-pinned, as in the base.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*
USER 10001:10001

EXPOSE 3000 4000
CMD ["dagster", "code-server", "start", "-m", "orchestration.definitions", "-h", "0.0.0.0", "-p", "4000", "--location-name", "encore"]
