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


@ab.command("plan")
@data_dir_option
@click.option("--mde", type=float, required=True,
              help="minimum detectable effect: relative to the baseline mean (0.05 = +5%) unless --absolute")
@click.option("--absolute", is_flag=True, help="--mde is in the metric's units, not relative")
@click.option("--metric", default="listens", show_default=True,
              help="per-user metric measured on the pre-period: listens, likes, skips, listening_time, events, "
                   "skip_rate (ratio of sums, delta-method SD)")
@click.option("--baseline-mean", type=float, default=None, help="per-user mean (skips reading the offline store)")
@click.option("--baseline-sd", type=float, default=None, help="per-user standard deviation (with --baseline-mean)")
@click.option("--users-per-day", type=float, default=None, help="users entering the experiment per day, all arms")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True)
@click.option("--power", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.8, show_default=True)
@click.option("--arms", type=click.IntRange(2), default=2, show_default=True, help="arms with equal weights")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def ab_plan(data_dir: str | None, mde: float, absolute: bool, metric: str, baseline_mean: float | None,
            baseline_sd: float | None, users_per_day: float | None, alpha: float, power: float, arms: int,
            as_json: bool) -> None:
    """Size an experiment before it starts: users per arm and days to detect --mde with --power.

    Gives both horizons: the fixed-horizon test (read once, at its end) and the sequential test (read any day,
    stopped when it decides), which needs more users for the same power (the ratio is printed: about 1.35x at
    alpha 0.05 and 80% power). Baseline mean/SD and users per day come from the offline store's organic events
    before any experiment (the pre-period), or from --baseline-mean/--baseline-sd/--users-per-day. Prints the
    `plan:` block to add to the experiment's YAML, which sets the report's sequential test.

    \b
    encore ab plan --mde 0.05 --metric listens
    encore ab plan --mde 0.005 --absolute --baseline-mean 0.1 --baseline-sd 0.3 --users-per-day 8000
    """
    from experiments.sequential import baseline_from_events, plan_experiment

    if (baseline_mean is None) != (baseline_sd is None):
        raise click.BadParameter("--baseline-mean and --baseline-sd go together")
    baseline_from_store = baseline_mean is None
    if baseline_from_store:
        from features.offline_read import read_interactions

        settings = settings_for(data_dir)
        events = read_interactions(settings)
        if "source" in events.columns:
            events = events[events["source"] == "organic"]
        if events.empty:
            raise click.ClickException("no organic events in the offline store: pass --baseline-mean/--baseline-sd")
        try:
            base = baseline_from_events(events, metric)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        baseline_mean, baseline_sd = base.mean, base.sd
        users_per_day = users_per_day if users_per_day is not None else base.users_per_day
    assert baseline_sd is not None
    try:
        summary = plan_experiment(mde, relative=not absolute, mean=baseline_mean, sd=baseline_sd,
                                  users_per_day=users_per_day, alpha=alpha, power=power, arms=arms)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(summary.model_dump_json())
        return
    s = summary
    days = (lambda d: f", {d:.1f} days" if d is not None else "")  # noqa: E731
    label = metric if baseline_from_store else "baseline"
    click.echo(f"{label}: baseline mean {s.baseline_mean:.4g}, SD {s.baseline_sd:.4g}; MDE {s.mde_absolute:.4g}"
               + (f" ({s.mde_relative:+.1%})" if s.mde_relative is not None else "")
               + f"; alpha {s.alpha:g}, power {s.power:.0%}")
    click.echo(f"fixed-horizon (read once at the end): {s.fixed_users_per_arm} users per arm{days(s.fixed_days)}")
    click.echo(f"sequential (read any time):           {s.sequential_users_per_arm} users per arm"
               f"{days(s.sequential_days)} ({s.sequential_over_fixed:.2f}x the fixed-horizon size)")
    click.echo("plan block for the experiment's YAML:")
    p = s.plan
    click.echo(f"plan:\n  mde: {p.mde:g}\n  relative: {str(p.relative).lower()}\n"
               f"  planned_users_per_arm: {p.planned_users_per_arm}\n  alpha: {p.alpha:g}\n  power: {p.power:g}")


@ab.command("rollout")
@click.argument("name")
@data_dir_option
@click.option("--dry-run", is_flag=True, help="compute and print the action, change nothing")
@click.option("--json", "as_json", is_flag=True, help="print the action (and what was done) as one JSON object")
def ab_rollout(name: str, data_dir: str | None, dry_run: bool, as_json: bool) -> None:
    """Take the next step of experiment NAME's rollout policy, from its current evidence.

    Reads the current phase's report (exposures from Kafka, interactions from the offline store) and decides
    one action: advance the ramp to the next step, hold, roll back (SRM, or a guardrail's always-valid test
    showing harm: the experiment is stopped and the rolled-out alias moved back), or decide (for the
    treatment: through the promotion gate, automatically or awaiting approval as the policy says; for the
    control: stop). Prints the action with its reason and statistics, then applies it unless --dry-run; every
    applied action is in `encore ab status NAME --audit N` and on the model versions' `encore.rollout.*` tags.
    Run it on a schedule (every few minutes): it is safe to repeat, holds change nothing.

    \b
    encore ab rollout new-ranker --dry-run
    encore ab rollout new-ranker
    """
    from experiments.readout import observe_rollout
    from experiments.rollout import RolloutError, apply_action
    from experiments.store import NotFound

    settings, store = _store(data_dir)
    try:
        _, _, action = observe_rollout(settings, lambda: running_kafka(settings), name, store=store)
    except (NotFound, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    applied = None
    if not dry_run and action.kind != "hold":
        from models.lifecycle.registry import Registry
        from models.lifecycle.tracking import tracking_uri

        try:
            registry = Registry(tracking_uri(settings), settings.registry)
        except RuntimeError as exc:
            raise click.ClickException(f"{exc} (the rollout acts on the model registry; --dry-run needs none)") \
                from exc
        try:
            applied = apply_action(action, store=store, registry=registry, actor="rollout")
        except RolloutError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"action": json.loads(action.model_dump_json()), "dry_run": dry_run,
                               "applied": json.loads(applied.model_dump_json(exclude={"action"})) if applied
                               else None}))
        return
    click.echo(f"{name}: {action.kind.upper()} (step {action.step}/{action.steps}, traffic {action.from_traffic:g}"
               + (f" -> {action.to_traffic:g}" if action.to_traffic != action.from_traffic else "") + ")")
    click.echo(f"  why: {action.reason}")
    if action.srm_p is not None:
        click.echo(f"  SRM p = {action.srm_p:.3g}; users {action.users} ({action.users_in_step} in this step)")
    for metric, e in action.evidence.items():
        cs = f"[{e.cs_low:+.4g}, {e.cs_high:+.4g}]" if e.cs_low is not None and e.cs_high is not None else "–"
        p = f"{e.always_valid_p:.3g}" if e.always_valid_p is not None else "–"
        click.echo(f"  {metric}: diff {e.diff:+.4g} {cs}, always-valid p {p}, {e.decision or 'no sequential test'}"
                   + (" *" if metric in action.statistics else ""))
    if dry_run:
        click.echo("  dry run: nothing changed")
    elif applied is not None:
        for effect in applied.effects:
            click.echo(f"  done: {effect}")
