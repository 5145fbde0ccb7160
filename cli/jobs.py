"""The one in-process Dagster job runner of ``encore``: every command that runs a job (``run``, ``ingest``,
``models train``, ``ui``'s instance) goes through ``run_job`` on the persistent instance of the data dir, so
each run shows up in the Dagster UI like one launched there."""

from __future__ import annotations

import logging
import os
from typing import Any

import dagster as dg

from infra.settings import EncoreSettings, write_private_file

log = logging.getLogger("encore.jobs")


def dagster_instance(settings: EncoreSettings) -> dg.DagsterInstance:
    """The persistent Dagster instance of these settings, so runs launched here show up in the UI.

    Its ``dagster.yaml`` lives under the data dir and is written from the settings: SQLite storage there
    (local), or with ``dagster.postgres_url`` set, dagster-postgres storage shared with the deployed webserver
    and daemon (production).
    """
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    text = instance_yaml(settings)
    if not path.exists() or path.read_text() != text:
        write_private_file(path, text)  # may hold a database password
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def psycopg2_url(url: str) -> str:
    """dagster-postgres sends statements (``NOTIFY run_events, %(id)s``) that only psycopg2's client-side
    parameter binding accepts, while SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3: pin the driver."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def instance_yaml(settings: EncoreSettings) -> str:
    import yaml

    config: dict = {"telemetry": {"enabled": False}}
    if settings.dagster.postgres_url is not None:
        config["storage"] = {"postgres": {"postgres_url": psycopg2_url(settings.dagster.postgres_url.get_secret_value())}}
    header = "# Written by Encore from its settings (ENCORE_DAGSTER__*); edits here are overwritten.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def run_job(settings: EncoreSettings, job_name: str, instance: dg.DagsterInstance | None = None, *,
            resources: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None,
            log_level: str = "INFO", raise_on_error: bool = True,
            partition_key: str | None = None) -> dg.ExecuteInProcessResult:
    """Run ``job_name`` of the code location in this process with exactly ``settings``.

    ``resources`` add to (or replace) the ``encore`` resource, e.g. an explicit MLflow endpoint; ``run_config``
    is the job's own (op configs); ``log_level`` is the console logger's; ``partition_key`` runs one partition
    of a partitioned job (a rollout's experiment)."""
    from orchestration.definitions import defs
    from orchestration.resources import encore_resource

    instance = instance or dagster_instance(settings)
    job = defs.resolve_job_def(job_name)
    log.info("Dagster: running %s", job_name)
    return job.execute_in_process(
        instance=instance,
        resources={"encore": encore_resource(settings), **(resources or {})},
        # Dagster's console logger narrates every engine event at DEBUG; assets' own logs are INFO.
        run_config={**(run_config or {}), "loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=raise_on_error,
        partition_key=partition_key,
    )
