"""``encore ab ...``: create, ramp, pause, resume, stop and inspect experiments; flip the kill switch; report.

Commands edit the experiment store under the data dir (``experiments.store``); a running service picks a
change up within ``serve.experiments_poll_s`` (1 s by default). Every change is validated against the other
experiments and the MLflow registry, saved as a new version, and written to the audit log.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from cli.common import data_dir_option, running_kafka, settings_for


def _store(data_dir: str | None):  # noqa: ANN202
    from experiments.store import ExperimentStore

    settings = settings_for(data_dir)
    return settings, ExperimentStore(settings.experiments_dir)


def _checker(settings):  # noqa: ANN001, ANN202 - None when no registry is reachable (targets then go unchecked)
    from experiments.store import registry_target_checker
    from models.lifecycle.tracking import tracking_uri

    try:
        return registry_target_checker(settings, tracking_uri(settings))
    except RuntimeError:
        return None


def _run(fn):  # noqa: ANN001, ANN202
    from experiments.store import ExperimentError

    try:
        return fn()
    except ExperimentError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def ab() -> None:
    """A/B experiments: definitions, rollouts, kill switch, analysis."""


@ab.command("create")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_dir_option
@click.option("--replace", is_flag=True, help="save a new version of an existing experiment (same salt); new "
              "variants or weights on one that has run open a new phase")
@click.option("--rerandomise", is_flag=True, help="with --replace: rotate the salt (users are re-drawn into the "
              "arms) and open a new phase")
def ab_create(file: Path, data_dir: str | None, replace: bool, rerandomise: bool) -> None:
    """Create an experiment from a YAML/JSON FILE (validated: weights, targets, layer overlaps, unique salt).

    Leave `salt` out to get a generated one (recommended); a salt any experiment of the store uses or has used
    is refused."""
    from experiments.assignment import load_experiment

    if rerandomise and not replace:
        raise click.UsageError("--rerandomise re-draws an existing experiment: use it with --replace")
    settings, store = _store(data_dir)
    try:
        exp = load_experiment(file)
    except ValueError as exc:
        raise click.ClickException(f"{file}: {exc}") from exc
    version = _run(lambda: store.create(exp, actor="cli", check_target=_checker(settings), replace=replace,
                                        rerandomise=rerandomise))
    saved = store.snapshot().get(exp.name)
    click.echo(f"{exp.name}: version {version} ({saved.status}, traffic {saved.traffic:g}, layer {saved.layer}, "
               f"salt {saved.salt}, phase {saved.phase})")


def _parse_schedule(spec: str) -> list:
    """``"0.1@+0m,0.5@+1h,1@2026-12-01T00:00Z"``: traffic@(+offset with s/m/h/d, or an ISO time)."""
    from experiments.assignment import RampStep

    now = datetime.now(timezone.utc)
    steps = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        share, _, when = part.partition("@")
        if not when:
            raise click.BadParameter(f"{part!r}: expected TRAFFIC@WHEN")
        if when.startswith("+"):
            units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
            try:
                at = now + timedelta(seconds=float(when[1:-1]) * units[when[-1]])
            except (KeyError, ValueError) as exc:
                raise click.BadParameter(f"{when!r}: expected +N[s|m|h|d]") from exc
        else:
            try:
                at = datetime.fromisoformat(when.replace("Z", "+00:00"))
            except ValueError as exc:
                raise click.BadParameter(f"{when!r}: not an ISO time") from exc
        try:
            steps.append(RampStep(at=at, traffic=float(share)))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return steps


@ab.command("ramp")
@click.argument("name")
@data_dir_option
@click.option("--traffic", type=click.FloatRange(0, 1), default=None, help="new traffic share, now")
@click.option("--schedule", default=None, help='ramp steps, e.g. "0.1@+0m,0.5@+1h,1.0@+1d"')
def ab_ramp(name: str, data_dir: str | None, traffic: float | None, schedule: str | None) -> None:
    """Raise an experiment's traffic now and/or set a ramp schedule (units keep their variant)."""
    _, store = _store(data_dir)
    steps = _parse_schedule(schedule) if schedule else None
    exp = _run(lambda: store.ramp(name, traffic, steps, actor="cli"))
    click.echo(f"{name}: traffic {exp.traffic_at():g} now" + (f", {len(exp.ramp)} ramp steps" if exp.ramp else ""))


def _status_command(action: str, status: str, doc: str) -> None:
    @ab.command(action, help=doc)
    @click.argument("name")
    @data_dir_option
    def command(name: str, data_dir: str | None) -> None:
        _, store = _store(data_dir)
        _run(lambda: store.set_status(name, status, actor="cli"))
        click.echo(f"{name}: {status}")


_status_command("pause", "paused", "Pause an experiment: its units get the default experience, it keeps its slice.")
_status_command("resume", "running", "Resume a paused experiment (the same units get the same variants).")
_status_command("stop", "stopped", "Stop an experiment for good (it frees its layer slice).")


@ab.command("kill")
@data_dir_option
@click.option("--off", is_flag=True, help="turn the kill switch off again")
@click.option("--reason", default="", help="recorded in the audit log")
def ab_kill(data_dir: str | None, off: bool, reason: str) -> None:
    """Kill switch: every experiment off at once, everyone gets the default model (configs untouched)."""
    _, store = _store(data_dir)
    version = store.set_kill(not off, actor="cli", reason=reason)
    click.echo(f"kill switch {'off' if off else 'ON'} (store version {version})")


@ab.command("status")
@click.argument("name", required=False)
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--audit", "audit_lines", type=int, default=5, show_default=True, help="audit entries to show")
def ab_status(name: str | None, data_dir: str | None, as_json: bool, audit_lines: int) -> None:
    """Show experiments (or one), their versions, traffic in force, and the latest audit entries."""
    _, store = _store(data_dir)
    snap = store.snapshot()
    exps = [snap.get(name)] if name else list(snap.experiments)
    if name:
        _run(lambda: snap.get(name))
    rows = [{"name": e.name, "version": snap.versions[e.name], "status": e.status, "phase": e.phase,
             "phase_started_at": e.phase_started_at.isoformat() if e.phase_started_at else None, "layer": e.layer,
             "layer_range": list(e.layer_range), "traffic_now": e.traffic_at(), "holdout": e.holdout,
             "variants": {v.name: f"{v.weight:g} -> {v.target}" for v in e.variants},
             "targeting": e.targeting} for e in exps]
    audit = store.audit(name, limit=audit_lines)
    if as_json:
        click.echo(json.dumps({"store_version": snap.version, "kill": snap.kill, "experiments": rows,
                               "audit": audit}, default=str))
        return
    click.echo(f"store version {snap.version}; kill switch {'ON' if snap.kill else 'off'}")
    for r in rows:
        click.echo(f"- {r['name']} v{r['version']} [{r['status']}] phase {r['phase']} "
                   f"layer {r['layer']} {r['layer_range']} "
                   f"traffic {r['traffic_now']:g} holdout {r['holdout']:g}; "
                   + ", ".join(f"{k}: {v}" for k, v in r["variants"].items())
                   + (f"; targeting {r['targeting']}" if r["targeting"] else ""))
    for a in audit:
        click.echo(f"  {a['time']} {a['actor']} {a['action']} {a.get('experiment') or ''} "
                   f"v{a.get('version') or '-'}")


@ab.command("report")
@data_dir_option
def ab_report(data_dir: str | None) -> None:
    """Analyse the A/B test: exposures joined with interactions; writes an HTML report."""
    from cli.jobs import run_job

    settings = settings_for(data_dir)
    running_kafka(settings)
    result = run_job(settings, "ab_report_job").output_for_node("ab_report")
    click.echo(result["markdown"])
    click.echo(f"report: {result['html']}")
