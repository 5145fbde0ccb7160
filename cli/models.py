"""``encore models ...``: the model lifecycle from the command line.

``encore models train`` launches the same Dagster ``training_job`` as the UI (same definitions, same
instance under the data dir, so the run and the gate's verdict show up in the UI); ``list``, ``promote``,
``rollback`` and ``audit`` work on the MLflow registry directly (aliases, never stages), and every alias
move is recorded as an audit entry.
"""

from __future__ import annotations

import json

import click

from cli.common import data_dir_option, settings_for
from infra.settings import EncoreSettings

_uri = click.option("--tracking-uri", "uri", envvar="ENCORE_MLFLOW_TRACKING_URI", default=None,
                    help="MLflow tracking URI (default: settings, the running embedded server, or the sqlite file)")


_rankers = click.option("--rankers", is_flag=True,
                         help="the rankers' registered model (registry.ranker_model_name) instead of the retrievers'")


def _registry(settings: EncoreSettings, explicit: str | None = None,  # noqa: ANN202 - models.lifecycle Registry
              rankers: bool = False):
    """The settings' registered model (or the rankers'), found by the lifecycle room's tracking-URI rule."""
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import tracking_uri

    try:
        return Registry(tracking_uri(settings, explicit), settings.registry.for_rankers() if rankers
                        else settings.registry)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def run_config(recipe: str = "", epochs: int = 0, dim: int = 0, blocks: int = 0, seed: int = -1) -> dict:
    return {"ops": {"trained_model": {"config": {"recipe": recipe, "epochs": epochs, "dim": dim, "blocks": blocks,
                                                  "seed": seed}}}}


def run_training(settings: EncoreSettings, *, instance=None, tracking: str | None = None,  # noqa: ANN001
                 **config: object) -> dict:
    """Run ``training_job`` in process (as ``encore models train`` does) and summarise the gate's verdict."""
    from cli.jobs import run_job
    from orchestration.resources import MLflowResource

    resources = {"mlflow_server": MLflowResource(tracking_uri=tracking)} if tracking else {}
    result = run_job(settings, "training_job", instance, resources=resources, run_config=run_config(**config),
                     log_level="WARNING", raise_on_error=False)
    summary: dict = {"success": result.success, "run_id": result.run_id}
    for ev in result.get_asset_check_evaluations():
        if ev.check_name == "promotion_gate":
            summary["gate_passed"] = ev.passed
            summary["gate_reason"] = ev.metadata["reason"].value if "reason" in ev.metadata else ""
    try:
        summary["version"] = result.output_for_node("registered_model")["version"]
    except Exception:  # noqa: BLE001 - failed before registering
        summary["version"] = None
    try:
        champ = result.output_for_node("champion_model")
        summary.update(promoted=champ["promoted"], reason=champ["reason"])
    except Exception:  # noqa: BLE001 - the gate blocked it, or an earlier step failed
        summary.update(promoted=False, reason=summary.get("gate_reason") or "training_job failed before the gate")
    if not summary.get("gate_reason") and not result.success:
        failures = [e.message for e in result.all_events if e.is_step_failure]
        summary["reason"] = failures[0] if failures else "training_job failed"
    return summary


@click.group("models")
def models_group() -> None:
    """Registered model versions: train, list, promote, roll back, audit (MLflow aliases)."""


@models_group.command("train")
@data_dir_option
@click.option("--recipe", default="", help="hstu, sasrec, argus, gpt, llama, a models/configs name, or a YAML path "
                                           "(default: the settings' train.recipe)")
@click.option("--epochs", type=int, default=0, help="override the epoch count")
@click.option("--dim", type=int, default=0, help="override the model width")
@click.option("--seed", type=int, default=-1, help="override the seed")
def models_train(data_dir: str | None, recipe: str, epochs: int, dim: int, seed: int) -> None:
    """Run the Dagster training_job: snapshot → train → evaluate → register → gate → champion."""
    from infra.services import EmbeddedServices
    from models.lifecycle.tracking import tracking_uri

    settings = settings_for(data_dir)
    try:
        tracking = tracking_uri(settings, file_fallback=False)
    except RuntimeError:
        tracking = None
    if tracking:
        s = run_training(settings, tracking=tracking, recipe=recipe, epochs=epochs, dim=dim, seed=seed)
    else:  # nothing running: bring the embedded MLflow server up for this command
        with EmbeddedServices(settings) as svc:
            s = run_training(settings, tracking=svc.mlflow_uri, recipe=recipe, epochs=epochs, dim=dim, seed=seed)
    if s["version"] is None:
        raise click.ClickException(f"training failed: {s['reason']}")
    verdict = "passed" if s.get("gate_passed") else "BLOCKED"
    click.echo(f"version {s['version']}: promotion gate {verdict}\n  {s.get('gate_reason', '')}")
    if s["promoted"]:
        click.echo(f"  version {s['version']} is now @champion")
    elif s.get("gate_passed"):
        click.echo(f"  {s['reason']}")
    else:
        click.echo(f"  version {s['version']} stays @challenger (details: the promotion_gate check in the Dagster UI)")


@models_group.command("list")
@data_dir_option
@_uri
@click.option("--metric", default=None, help="metric column (default: the gate's, e.g. test_ndcg@10; "
              "ranker_auc with --rankers)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_rankers
def models_list(data_dir: str | None, uri: str | None, metric: str | None, as_json: bool, rankers: bool) -> None:
    """Every version of the registered model with its aliases, metric, data snapshot and gate verdict."""
    settings = settings_for(data_dir)
    metric = metric or ("ranker_auc" if rankers else f"{settings.promotion.split}_{settings.promotion.metric}")
    registry = _registry(settings, uri, rankers)
    rows = registry.versions(metric)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no registered versions of {registry.name} yet")
        return
    click.echo(f"{'version':>7}  {'aliases':<22} {'model':<7} {metric:>14}  {'gate':<7} {'created':<16}  snapshot")
    for r in rows:
        aliases = ",".join("@" + a for a in r["aliases"]) + (" (awaiting approval)" if r["awaiting_approval"] else "")
        value = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        gate = {"true": "passed", "false": "blocked"}.get(r["gate"], "-")
        click.echo(f"{r['version']:>7}  {aliases:<22} {r['model']:<7} {value:>14}  {gate:<7} {r['created']:<16}  "
                   f"{r['dataset_snapshot']}")
        if r["gate"] == "false":
            click.echo(f"{'':>9}gate: {r['gate_reason']}")


@models_group.command("promote")
@click.argument("version", type=int)
@data_dir_option
@_uri
@click.option("--reason", default="promoted by hand", show_default=True, help="recorded in the audit trail")
@_rankers
def models_promote(version: int, data_dir: str | None, uri: str | None, reason: str, rankers: bool) -> None:
    """Move @champion to VERSION (manual mode, or overriding the gate); recorded in the audit trail."""
    from models.lifecycle.promotion import promote
    from models.lifecycle.registry import NotRegistered

    settings = settings_for(data_dir)
    try:
        entry = promote(_registry(settings, uri, rankers), version, reason=reason)
    except NotRegistered as exc:
        raise click.ClickException(f"cannot promote version {version}: {exc}") from exc
    if entry["action"] == "noop":
        click.echo(entry["reason"])
    else:
        click.echo(f"@{entry['alias']}: v{entry['from']} -> v{entry['to']} ({reason}, by {entry['actor']})")


@models_group.command("rollback")
@data_dir_option
@_uri
@click.option("--reason", default="rolled back by hand", show_default=True, help="recorded in the audit trail")
@_rankers
def models_rollback(data_dir: str | None, uri: str | None, reason: str, rankers: bool) -> None:
    """Give @champion back to the version that held it before the current one."""
    from models.lifecycle.promotion import rollback

    settings = settings_for(data_dir)
    try:
        entry = rollback(_registry(settings, uri, rankers), reason=reason)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"@{entry['alias']}: v{entry['from']} -> v{entry['to']} (rollback, by {entry['actor']})")
    if entry.get("summaries"):
        click.echo(f"note: {entry['summaries']}", err=True)


@models_group.command("audit")
@data_dir_option
@_uri
@_rankers
def models_audit(data_dir: str | None, uri: str | None, rankers: bool) -> None:
    """Every alias move, oldest first: when, which alias, from and to which version, who and why."""
    import pandas as pd

    settings = settings_for(data_dir)
    for e in _registry(settings, uri, rankers).audit_log():
        when = pd.Timestamp(e["at_ms"], unit="ms").strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{when}  @{e['alias']:<10} v{e['from']} -> v{e['to']}  {e.get('action', 'set'):<8} "
                   f"{e.get('actor', '?')}: {e['reason']}")
