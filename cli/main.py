"""``encore``: the command-line tool of the platform.

Every command reads the one settings object (``ENCORE_*`` variables, ``encore.yaml`` or ``ENCORE_CONFIG``);
``--data-dir`` is a shortcut for ``ENCORE_DATA_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cli.ab import ab as ab_group
from cli.bench import bench as bench_group
from cli.common import data_dir_option, running_kafka, settings_for, setup_logging, wait_forever
from cli.models import models_group
from cli.offline import offline_group
from cli.study import study_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default from settings)")
def main(log_level: str | None) -> None:
    """Encore: streaming interactions → Feast → TorchRec generative recommenders → MLflow → serving + A/B."""
    setup_logging(log_level or os.environ.get("ENCORE_LOG_LEVEL", "INFO"))


# ---------------------------------------------------------------- end to end


@main.command()
@data_dir_option
@click.option("--fresh", is_flag=True, help="delete the data dir first")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def run(data_dir: str | None, fresh: bool, no_progress: bool) -> None:
    """Run the whole road end to end on embedded services and print a summary."""
    from cli.run import format_summary, run_end_to_end

    settings = settings_for(data_dir)
    if fresh and settings.root.exists():
        import shutil

        from infra.services import reap_stale

        reap_stale(settings)
        shutil.rmtree(settings.root)
    try:
        summary = run_end_to_end(settings, progress=not no_progress)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: embedded services stopped", err=True)
        sys.exit(130)
    click.echo(format_summary(summary, settings))


# ---------------------------------------------------------------- streaming


@main.command()
@click.argument("source")
@data_dir_option
@click.option("--dataset-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="folder with the dataset's files (for ml-100k, ml-1m, ml-20m, ml-25m, amazon, yambda)")
@click.option("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
@click.option("--limit", type=int, default=None, help="stop after this many events")
@click.option("--send-invalid", is_flag=True, help="publish invalid lines anyway (they go to the DLQ on ingest)")
@click.option("--bootstrap", default=None, help="Kafka bootstrap (default: settings or the running embedded broker)")
def replay(source: str, data_dir: str | None, dataset_dir: Path | None, rate: float | None, limit: int | None,
           send_invalid: bool, bootstrap: str | None) -> None:
    """Publish SOURCE (synthetic, a dataset name, or a JSON-lines file) to Kafka in timestamp order."""
    from features.replay import open_source, replay as do_replay

    settings = settings_for(data_dir)
    bootstrap = bootstrap or settings.kafka_bootstrap or running_kafka(settings)
    try:
        items = open_source(source, settings, dataset_dir, limit)
        report = do_replay(items, bootstrap, settings.topics.interactions, rate=rate, send_invalid=send_invalid,
                            kafka_options=settings.kafka.client_options())
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for problem in report.problems:
        click.echo(f"invalid: {problem}", err=True)
    click.echo(f"sent {report.sent} events in {report.seconds:.1f}s ({report.events_per_s:.0f}/s); "
               f"{report.invalid} invalid ({report.invalid_sent} sent anyway)")
    if report.invalid and not send_invalid:
        click.echo("invalid events were reported above and not sent; --send-invalid routes them to the DLQ",
                   err=True)


@main.command()
@data_dir_option
@click.option("--follow", is_flag=True,
              help="run as a long-lived worker (no Dagster run): consume until Ctrl-C or SIGTERM")
@click.option("--partitions", default="", help="with --follow: this worker's partitions, e.g. 0,2 "
              "(default all); run one worker per disjoint set to scale out")
def ingest(data_dir: str | None, follow: bool, partitions: str) -> None:
    """Consume the interactions topic into the offline store and Feast.

    By default this is the Dagster ingest_job (one bounded run, recorded in the instance and visible in
    the UI); --follow runs a continuous worker instead.
    """
    settings = settings_for(data_dir)
    bootstrap = running_kafka(settings)
    if follow:
        import signal
        import threading

        from features.ingest import Ingestor

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        parts = [int(p) for p in partitions.split(",") if p.strip()]
        with Ingestor(settings, bootstrap, partitions=parts) as worker:
            target = settings.offline_dir if settings.offline.backend == "parquet" else "the Iceberg table"
            click.echo(f"ingest worker on {bootstrap} → {target}; Ctrl-C stops it")
            report = worker.run(stop=stop, on_batch=lambda b: click.echo(
                f"offsets {b.first_offset}..{b.last_offset}: {b.written} stored, {b.duplicates} duplicate, "
                f"{b.dlq} DLQ"))
        click.echo(f"stopped: {report.written} stored, {report.duplicates} duplicates, {report.dlq} to DLQ")
        return
    from cli.jobs import run_job

    result = run_job(settings, "ingest_job")
    click.echo("ingest_job " + ("succeeded" if result.success else "failed"))


@main.command()
@click.argument("source", default="synthetic")
@data_dir_option
@click.option("--dataset-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="folder with the dataset's user/item files (u.user and u.item for ml-100k, users.dat and "
                   "movies.dat for ml-1m)")
def attributes(source: str, data_dir: str | None, dataset_dir: Path | None) -> None:
    """Load SOURCE's user and item attributes into Feast (the Dagster attributes_job).

    SOURCE is synthetic (the simulator's genres and albums, the default) or a MovieLens name with
    --dataset-dir. Only new entities and changed values are written, so loading twice writes nothing.
    """
    from cli.jobs import run_job

    settings = settings_for(data_dir)
    config = {"source": source} | ({"dataset_dir": str(dataset_dir)} if dataset_dir else {})
    result = run_job(settings, "attributes_job", raise_on_error=False,
                     run_config={"ops": {"entity_attributes": {"config": config}}})
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        reason = failure.step_failure_data.error.message.strip() if failure else "see the run in Dagster"
        raise click.ClickException(f"attributes_job failed: {reason}")
    meta = result.asset_materializations_for_node("entity_attributes")[0].metadata
    click.echo(f"attributes_job succeeded: {meta['users_read'].value} users and {meta['items_read'].value} items "
               f"read; {meta['user_rows_written'].value} user and {meta['item_rows_written'].value} item rows "
               "written (new or changed)")


# ---------------------------------------------------------------- models


@main.command()
@click.option("--dataset", type=click.Choice(["synthetic", "ml-100k", "ml-1m", "ml-20m", "ml-25m", "amazon", "yambda"]),
              default="synthetic", show_default=True)
@click.option("--dataset-dir", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="folder with the dataset's files; its item file (u.item, movies.dat, movies.csv), "
                                 "where present, is the catalogue ranked, unrated items included")
@click.option("--config", "--recipe", "config_name", default="default", show_default=True,
              help="a recipe under models/configs/ (default, hstu, sasrec, argus, hstu-ml1m, ...) or a YAML path")
@click.option("--epochs", type=int, default=None, help="override the recipe's epoch count")
@click.option("--seed", type=int, default=None, help="override the recipe's seed (weights, batches, negatives)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="save the trained recommender here")
@click.option("--print-recipe", is_flag=True, help="print the resolved recipe as YAML and exit (nothing is trained)")
def train(dataset: str, dataset_dir: Path | None, config_name: str, epochs: int | None, seed: int | None,
          out: Path | None, print_recipe: bool) -> None:
    """Train a model offline on a dataset (no Kafka needed) and print its test metrics as JSON.

    The LAST line printed is one JSON object: hr@1 hr@10 hr@50 hr@200 ndcg@10 ndcg@50 ndcg@200 mrr, config,
    epochs, wall_s, seed.
    """
    from features.replay import dataset_catalogue, events_frame
    from models.recipe import recipe_names, resolve_recipe
    from models.train import train as do_train

    settings = settings_for(None)
    overrides = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
    try:
        cfg = resolve_recipe(config_name, **overrides)
    except FileNotFoundError as exc:
        raise click.ClickException(f"no recipe {config_name!r} ({exc.filename}); shipped: "
                                   f"{', '.join(recipe_names())}") from exc
    except (TypeError, ValueError) as exc:
        raise click.ClickException(f"recipe {config_name!r}: {exc}") from exc
    if print_recipe:
        click.echo(cfg.to_yaml(), nl=False)
        return
    try:
        df = events_frame(dataset, settings, dataset_dir)
        catalogue = dataset_catalogue(dataset, dataset_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = do_train(df, cfg, progress=True, catalogue=catalogue)
    if out:
        result.recommender().save(out)
    click.echo(json.dumps({**result.test_metrics, "config": config_name, "epochs": len(result.history),
                           "wall_s": round(result.wall_s, 3), "seed": cfg.seed}))


@main.command()
@data_dir_option
@click.option("--host", default=None, help="default from settings (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default from settings")
@click.option("--experiment", default="default",
              help="'default' (the experiment store, seeded with the settings' two-arm test when it lacks it), "
                   "'store' (the store as it is), 'none', or a YAML/JSON experiment file (saved into the store)")
def serve(data_dir: str | None, host: str | None, port: int | None, experiment: str) -> None:
    """Serve recommendations over HTTP (FastAPI): POST /v1/recommendations, /healthz, /readyz, /metrics, /admin."""
    import uvicorn

    from infra.services import resolve_endpoints
    from experiments.assignment import default_experiment
    from experiments.store import ExperimentError, ExperimentStore, registry_target_checker
    from serving.boot import Booting

    settings = settings_for(data_dir)
    try:
        endpoints = resolve_endpoints(settings)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    store = ExperimentStore(settings.experiments_dir)
    mode: object = "store"
    try:
        if experiment == "default":
            exp = default_experiment(settings)
            if exp.name not in store.snapshot().versions:
                store.create(exp, actor="serve --experiment default")
        elif experiment == "none":
            mode = None
        elif experiment != "store":
            from experiments.assignment import load_experiment

            store.create(load_experiment(Path(experiment)), actor=f"serve --experiment {experiment}", replace=True,
                         check_target=registry_target_checker(settings, endpoints.mlflow_uri))
    except (ExperimentError, ValueError, OSError) as exc:
        raise click.ClickException(f"experiment: {exc}") from exc

    def build():  # noqa: ANN202 - imported in the background: the server answers /healthz meanwhile
        from serving.app import create_app

        return create_app(settings, endpoints.kafka_bootstrap, endpoints.mlflow_uri, mode)  # type: ignore[arg-type]

    uvicorn.run(Booting(build), host=host or settings.serve.host, port=port or settings.serve.port or 8000,
                log_level="warning", access_log=False, timeout_keep_alive=30)


@main.command()
def bootstrap() -> None:
    """Create Encore's Kafka topics (where missing) and register its Feast definitions; idempotent.

    Run once before the long-lived services of a deployment (compose: the `bootstrap` service; Kubernetes:
    the encore-bootstrap Job). Serving reads Feast's registry without writing it, so the feature views must
    exist before the first replica starts, and replicas starting together must not race to create topics or
    registry rows. Topics get ``topics.partitions`` partitions and ``topics.replication_factor`` replicas;
    topics created beforehand by your platform's tooling are left alone.
    """
    from features.feature_repo import feature_store
    from infra.topics import ensure_topics

    settings = settings_for(None)
    if not settings.kafka_bootstrap:
        raise click.ClickException("bootstrap: ENCORE_KAFKA_BOOTSTRAP is not set")
    ensure_topics(settings.kafka_bootstrap, settings.topics, **settings.kafka.client_options())
    click.echo(f"bootstrap: topics {settings.topics.interactions}, {settings.topics.dlq}, {settings.topics.exposures} "
               f"on {settings.kafka_bootstrap}")
    store = feature_store(settings, apply=True)
    views = sorted(v.name for v in store.list_feature_views())
    click.echo(f"bootstrap: Feast project {store.project}: feature views {', '.join(views)}")


# ---------------------------------------------------------------- services and UIs


@main.group()
def services() -> None:
    """The embedded services (Kafka-protocol broker, MLflow server)."""


@services.command("up")
@data_dir_option
def services_up(data_dir: str | None) -> None:
    """Start the embedded services and keep them up until Ctrl-C.

    Should it ever hang, `kill -USR1 <pid>` prints every thread's stack to stderr."""
    import faulthandler
    import signal

    from infra.services import EmbeddedServices

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = settings_for(data_dir)
    with EmbeddedServices(settings) as svc:
        click.echo(f"Kafka bootstrap: {svc.kafka_bootstrap}\nMLflow:          {svc.mlflow_uri}\nCtrl-C stops them.")
        wait_forever()


@services.command("stop")
@data_dir_option
def services_stop(data_dir: str | None) -> None:
    """Stop embedded services left running by a crashed process."""
    from infra.services import reap_stale

    settings = settings_for(data_dir)
    reaped = reap_stale(settings)
    (settings.run_dir / "endpoints.json").unlink(missing_ok=True)
    click.echo("stopped: " + (", ".join(reaped) if reaped else "nothing was running"))


@services.command("status")
@data_dir_option
def services_status(data_dir: str | None) -> None:
    """Show the endpoints of the running services."""
    from infra.services import resolve_endpoints

    settings = settings_for(data_dir)
    try:
        e = resolve_endpoints(settings)
        click.echo(f"Kafka bootstrap: {e.kafka_bootstrap}\nMLflow:          {e.mlflow_uri}")
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@data_dir_option
@click.option("--dagster-port", type=int, default=3000, show_default=True)
def ui(data_dir: str | None, dagster_port: int) -> None:
    """Start the services plus Dagster (`dagster dev`: web UI and the daemon that runs sensors and schedules)
    on this data dir; Ctrl-C stops everything."""
    import subprocess

    from infra.services import EmbeddedServices, stop_pid
    from infra.settings import child_env
    from cli.jobs import dagster_instance

    settings = settings_for(data_dir)
    with EmbeddedServices(settings) as svc:
        dagster_instance(settings)
        # Runs launched from the UI or by sensors execute in fresh processes: they get these exact settings
        # (plus the endpoints of the services just started) through a settings file.
        resolved = settings.model_copy(update={"kafka_bootstrap": svc.kafka_bootstrap,
                                               "mlflow_tracking_uri": svc.mlflow_uri or None})
        env = {**child_env(resolved, settings.run_dir / "dagster-settings.yaml"),
               "DAGSTER_HOME": str(settings.dagster_home)}
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster")), "dev", "-m", "orchestration.definitions",
             "-h", "127.0.0.1", "-p", str(dagster_port)], env=env, start_new_session=True)
        click.echo(f"Dagster UI: http://127.0.0.1:{dagster_port} (sensors and schedules run here too)\n"
                   f"MLflow UI:  {svc.mlflow_uri}\nKafka:      {svc.kafka_bootstrap}\nCtrl-C stops everything.")
        try:
            wait_forever()
        finally:
            stop_pid(proc.pid)


for group in (bench_group, ab_group, models_group, offline_group, study_group):
    main.add_command(group)

if __name__ == "__main__":
    main()
