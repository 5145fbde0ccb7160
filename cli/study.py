"""``encore study ...``: studies of the models themselves, run as Dagster jobs on the data dir's instance (so
every run shows up in the UI). ``encore study scaling`` drives the scaling study's three assets:
``scaling_corpus`` once, ``scaling_point`` for each point of the grid not trained yet (one run per partition:
stop it and run it again, it goes on where it stopped), then ``scaling_laws``."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from cli.common import data_dir_option, settings_for
from infra.settings import SCALING_PROFILES, EncoreSettings, ScalingSettings


def _csv(value: str | None, cast: type) -> list[Any] | None:
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


def study_settings(settings: EncoreSettings, profile: str | None, **explicit: Any) -> EncoreSettings:
    """The settings' ``scaling`` with a profile's preset, then explicit options, on top (validated again)."""
    update = {**(SCALING_PROFILES[profile] if profile else {}), **{k: v for k, v in explicit.items() if v is not None}}
    scaling = ScalingSettings.model_validate({**settings.scaling.model_dump(), **update})
    return settings.model_copy(update={"scaling": scaling})


@click.group("study")
def study_group() -> None:
    """Studies of the models themselves (their own Dagster jobs)."""


@study_group.command("scaling")
@data_dir_option
@click.option("--profile", type=click.Choice(sorted(SCALING_PROFILES)), default=None,
              help="a preset grid: short (the defaults: 2 CPU cores, under an hour) or full (GPU-sized)")
@click.option("--name", default=None, help="the study's name (its files and MLflow tag); default: the profile's")
@click.option("--backbones", default=None, help="comma-separated, of hstu, sasrec, gpt, llama, hstu-no-rab, "
              "hstu-softmax, hstu-no-gating, argus")
@click.option("--sizes", default=None, help="comma-separated d<width>b<blocks>, e.g. d8b1,d16b1,d32b2")
@click.option("--fractions", default=None, help="comma-separated data fractions in (0, 1]")
@click.option("--seeds", default=None, help="comma-separated seeds")
@click.option("--epochs", type=int, default=None)
@click.option("--dataset", default=None, help="simulator, platform, or a data set name (with --dataset-dir)")
@click.option("--dataset-dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--fit-only", is_flag=True, help="train nothing: fit the points trained so far")
def study_scaling(data_dir: str | None, profile: str | None, name: str | None, backbones: str | None,
                  sizes: str | None, fractions: str | None, seeds: str | None, epochs: int | None,
                  dataset: str | None, dataset_dir: str | None, fit_only: bool) -> None:
    """Scaling laws of the backbones: train the grid's points (resumable), fit L(N) = E + A·N^-α per backbone
    with bootstrap intervals, check the largest size's prediction, fit L(N, D) and the compute-optimal
    frontier; the report, tables and plots go to MLflow (experiment <mlflow_experiment>-scaling), to the
    scaling_laws asset in the Dagster UI and to studies/scaling/<name>/fits/ under the data dir."""
    from infra.services import EmbeddedServices
    from models.lifecycle.tracking import tracking_uri

    try:
        settings = study_settings(
            settings_for(data_dir), profile, name=name, backbones=_csv(backbones, str), sizes=_csv(sizes, str),
            data_fractions=_csv(fractions, float), seeds=_csv(seeds, int), epochs=epochs, dataset=dataset,
            dataset_dir=dataset_dir)
    except ValueError as e:  # pydantic's ValidationError is one
        raise click.BadParameter(str(e)) from e
    try:
        uri = tracking_uri(settings, file_fallback=False)
    except RuntimeError:
        uri = None
    if uri:
        _scaling(settings, uri, fit_only)
    else:  # nothing running: bring the embedded MLflow server up for this command
        with EmbeddedServices(settings) as svc:
            _scaling(settings, svc.mlflow_uri, fit_only)


def _scaling(settings: EncoreSettings, uri: str, fit_only: bool) -> None:
    """The study's three jobs on the data dir's instance, every point not trained yet (see the module docstring)."""
    from tqdm import tqdm

    from cli.jobs import dagster_instance, run_job
    from orchestration.assets.studies import collect_points, corpus_info
    from orchestration.resources import MLflowResource

    # stdout is the study's report: not a "View run" line per point (MLflow prints them on every run's end)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    instance = dagster_instance(settings)
    mlflow = {"mlflow_server": MLflowResource(tracking_uri=uri)}
    t0 = time.monotonic()
    if not fit_only:
        if not run_job(settings, "scaling_plan_job", instance, resources=mlflow, raise_on_error=False).success:
            raise click.ClickException("scaling_plan_job failed (see the run in the Dagster UI)")
        corpus = corpus_info(settings)
        trained, missing, stale = collect_points(settings, corpus["digest"])
        untrained = set(missing) | set(stale)  # stale: trained on another corpus
        todo = [k for k in corpus["points"] if k in untrained]
        click.echo(f"study {settings.scaling.name}: {len(corpus['points'])} points on {corpus['events']:,} events "
                   f"({corpus['dataset']}), {len(trained)} already trained, {len(todo)} to train", err=True)
        failed = []
        for key in tqdm(todo, desc="scaling points", unit="point"):
            if not run_job(settings, "scaling_point_job", instance, resources=mlflow, partition_key=key,
                           log_level="WARNING", raise_on_error=False).success:
                failed.append(key)
        if failed:
            click.echo(f"{len(failed)} points failed (first: {failed[0]}); see their runs in the Dagster UI", err=True)
    result = run_job(settings, "scaling_fit_job", instance, resources=mlflow, raise_on_error=False)
    if not result.success:
        raise click.ClickException("scaling_fit_job failed (see the run in the Dagster UI)")
    laws = result.output_for_node("scaling_laws")
    click.echo(laws["report"])
    click.echo(f"\nplots: {', '.join(laws['plots'].values())}\nMLflow run: {laws['run_id'] or '-'}; "
               f"{laws['points']} points fitted, {len(laws['missing'])} missing; {time.monotonic() - t0:.0f} s")
