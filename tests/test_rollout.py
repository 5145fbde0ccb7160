"""Rollouts that act on their own evidence: the decision rule on constructed reports, the actions on a real
experiment store and a real MLflow server, and the A/A false-action rate by simulation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from pydantic import ValidationError

from bench.rollouts import GUARDRAIL, PRIMARY, Arm, aa_rates, experiment, look_report, simulate_rollout
from experiments.assignment import Experiment
from experiments.rollout import current_step, next_action, step_progress
from experiments.sequential import SequentialPlan
from experiments.stats import TestResult

NOW = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)


def _arms(n_control: int, n_treatment: int, *, listen_lift: float = 0.0, skip_p: tuple[float, float] = (0.3, 0.3),
          seed: int = 0) -> tuple[Arm, Arm]:
    rng = np.random.default_rng(seed)
    arms = []
    for n, lift, p in ((n_control, 0.0, skip_p[0]), (n_treatment, listen_lift, skip_p[1])):
        arm = Arm()
        plays = rng.poisson(6.0, n).astype(float)
        arm.add(rng.gamma(0.5, 4.0 * (1 + lift), n), rng.binomial(plays.astype(int), p).astype(float), plays)
        arms.append(arm)
    return arms[0], arms[1]


def _report(exp: Experiment, control: Arm, treatment: Arm):  # noqa: ANN202
    history: dict[str, list[tuple[int, TestResult]]] = {PRIMARY: [], GUARDRAIL: []}
    return look_report(control, treatment, exp.plan, history, t_ms=0)


def _at(traffic: float, **policy: object) -> Experiment:
    base = experiment(min_users=1_000)
    if policy:
        base = Experiment.model_validate({**base.model_dump(), "rollout": {**base.rollout.model_dump(), **policy}})
    return base.model_copy(update={"traffic": traffic})


# ------------------------------------------------------------------------------------------------ the policy


def test_a_policy_refuses_what_it_cannot_ramp_or_watch():
    good = experiment()
    data = good.model_dump()
    for change, message in [
        ({"steps": [0.05, 0.01]}, "strictly increase"),
        ({"steps": [0.01, 0.01]}, "strictly increase"),
        ({"steps": [0.0, 0.5]}, r"\(0, 1\]"),
        ({"steps": [0.01, 1.5]}, r"\(0, 1\]"),
        ({"steps": [0.00015, 0.5]}, "not a multiple of 0.0001"),
        ({"steps": ["0.5"]}, "valid number"),
        ({"min_users_per_step": 0}, "greater than or equal to 1"),
        ({"guardrails": ["skip_rate", "nope"]}, "unknown metric 'nope'"),
        ({"primary_metric": "revenue"}, "unknown metric 'revenue'"),
        ({"on_decision": "yolo"}, "promote"),
        ({"treatment": "control"}, "different variants"),
        ({"treatment": "arm-b"}, "does not have"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Experiment.model_validate({**data, "rollout": {**data["rollout"], **change}})
    with pytest.raises(ValidationError, match="pinned 'version:<n>'"):
        Experiment.model_validate({**data, "variants": [{"name": "control", "weight": 0.5, "target": "alias:champion"},
                                                        {"name": "treatment", "weight": 0.5,
                                                         "target": "alias:challenger"}]})
    with pytest.raises(ValidationError, match="rollout.alias"):
        Experiment.model_validate({**data, "variants": [{"name": "control", "weight": 0.5, "target": "popularity"},
                                                        {"name": "treatment", "weight": 0.5, "target": "version:2"}]})
    with pytest.raises(ValidationError, match="no ramp schedule"):
        Experiment.model_validate({**data, "ramp": [{"at": "2026-01-01T00:00:00Z", "traffic": 0.5}]})
    assert good.rollout.guardrails == ["skip_rate"] and good.rollout_alias == "champion"
    assert [current_step(good.rollout, t) for t in (0.0, 0.005, 0.01, 0.03, 0.05, 0.25, 0.5, 1.0)] == \
        [0, 0, 1, 1, 2, 3, 4, 4]


# ------------------------------------------------------------------------------------------ the decision rule


def test_before_the_first_step_the_ramp_starts_and_a_clean_step_advances_once_it_has_its_users():
    start = next_action(_at(0.0), None, now=NOW, users_in_step=0)
    assert (start.kind, start.to_traffic, start.step) == ("advance", 0.01, 0)

    exp = _at(0.01)
    report = _report(exp, *_arms(600, 600))
    assert not report.srm.flagged
    early = next_action(exp, report, now=NOW, users_in_step=999)
    assert early.kind == "hold" and early.to_traffic == 0.01 and "999 of 1000 users" in early.reason
    ready = next_action(exp, report, now=NOW, users_in_step=1_200)
    assert (ready.kind, ready.from_traffic, ready.to_traffic, ready.step) == ("advance", 0.01, 0.05, 1)
    assert set(ready.evidence) == {PRIMARY, GUARDRAIL} and ready.statistics == {}
    assert ready.evidence[GUARDRAIL].always_valid_p > 0.05 and ready.srm_p > 0.001


def test_each_step_can_ask_for_its_own_number_of_users():
    per_step = _at(0.05, min_users_per_step=[100, 2_000, 5_000])
    report = _report(per_step, *_arms(600, 600))
    assert next_action(_at(0.01, min_users_per_step=[100, 2_000, 5_000]), report, now=NOW,
                       users_in_step=150).kind == "advance"
    held = next_action(per_step, report, now=NOW, users_in_step=1_500)
    assert held.kind == "hold" and "1500 of 2000 users" in held.reason
    with pytest.raises(ValidationError, match="one per step before the last"):
        _at(0.05, min_users_per_step=[100, 2_000])


def test_a_step_also_waits_for_its_hours():
    exp = _at(0.05, min_hours_per_step=24)
    report = _report(exp, *_arms(2_000, 2_000, seed=1))
    held = next_action(exp, report, now=NOW, users_in_step=5_000, step_started_at=NOW - timedelta(hours=3))
    assert held.kind == "hold" and "3.0 of 24 hours" in held.reason
    later = next_action(exp, report, now=NOW, users_in_step=5_000, step_started_at=NOW - timedelta(hours=25))
    assert (later.kind, later.to_traffic) == ("advance", 0.25)


def test_a_harmed_guardrail_rolls_back_at_once_whatever_the_step_has_seen():
    exp = _at(0.01)
    report = _report(exp, *_arms(800, 800, skip_p=(0.30, 0.40), seed=2))
    action = next_action(exp, report, now=NOW, users_in_step=10)  # far from the step's users: no matter
    assert action.kind == "rollback" and action.to_traffic == 0.0
    assert set(action.statistics) == {GUARDRAIL}
    harm = action.statistics[GUARDRAIL]
    assert harm.decision == "treatment_worse" and harm.always_valid_p <= 0.05 and harm.cs_low > 0
    assert "skip_rate" in action.reason and "always-valid p" in action.reason
    # the same harm at the last step still rolls back rather than deciding
    assert next_action(_at(0.5), report, now=NOW, users_in_step=10).kind == "rollback"


def test_a_sample_ratio_mismatch_rolls_back_even_when_every_metric_looks_fine():
    exp = _at(0.05)
    report = _report(exp, *_arms(1_000, 850, seed=3))
    assert report.srm.flagged
    action = next_action(exp, report, now=NOW, users_in_step=5_000)
    assert action.kind == "rollback" and action.srm_flagged and action.srm_p < 0.001
    assert "sample ratio mismatch" in action.reason


def test_the_last_step_decides_on_the_primary_metric_and_earlier_steps_do_not():
    report = _report(_at(0.5), *_arms(15_000, 15_000, listen_lift=0.15, seed=4))
    decided = next_action(_at(0.5), report, now=NOW, users_in_step=10)
    assert decided.kind == "decide_treatment" and set(decided.statistics) == {PRIMARY}
    assert decided.statistics[PRIMARY].lift_cs_low > 0 and decided.statistics[PRIMARY].always_valid_p <= 0.05
    # the same evidence one step earlier keeps ramping (the guardrails must see the larger traffic first)
    assert next_action(_at(0.25), report, now=NOW, users_in_step=10_000).kind == "advance"
    undecided = _report(_at(0.5), *_arms(3_000, 3_000, seed=5))
    assert next_action(_at(0.5), undecided, now=NOW, users_in_step=10).kind == "hold"


def test_a_worse_primary_metric_rolls_back_at_any_step():
    report = _report(_at(0.05), *_arms(8_000, 8_000, listen_lift=-0.2, seed=6))
    action = next_action(_at(0.05), report, now=NOW, users_in_step=10)
    assert action.kind == "rollback" and action.to_traffic == 0.0 and "primary metric is harmed" in action.reason
    assert set(action.statistics) == {PRIMARY}


def test_at_the_planned_horizon_the_fixed_horizon_readout_decides():
    plan = SequentialPlan(mde=0.05, planned_users_per_arm=2_000)
    exp = _at(0.5, at_horizon="fixed_readout").model_copy(update={"plan": plan})
    win = _report(exp, *_arms(2_500, 2_500, listen_lift=0.12, seed=7))
    assert win.test(PRIMARY).sequential.decision in ("horizon_reached", "treatment_better")
    assert next_action(exp, win, now=NOW, users_in_step=0).kind == "decide_treatment"
    flat = _report(exp, *_arms(2_500, 2_500, seed=8))
    assert flat.test(PRIMARY).sequential.decision == "horizon_reached"
    action = next_action(exp, flat, now=NOW, users_in_step=0)
    assert action.kind == "decide_control" and "horizon" in action.reason
    # keep_control: a win only the fixed-horizon test sees does not promote (it was read after watching)
    only_fixed = next(r for seed in range(40) if (r := _report(exp, *_arms(2_500, 2_500, listen_lift=0.07,
                                                                          seed=100 + seed))).test(PRIMARY)
                      .sequential.decision == "horizon_reached" and r.test(PRIMARY).result.p_value < 0.05)
    assert next_action(exp, only_fixed, now=NOW, users_in_step=0).kind == "decide_treatment"
    keep = exp.model_copy(update={"rollout": exp.rollout.model_copy(update={"at_horizon": "keep_control"})})
    assert next_action(keep, only_fixed, now=NOW, users_in_step=0).kind == "decide_control"


def test_a_rollout_acts_only_on_a_running_experiment():
    exp = _at(0.05).model_copy(update={"status": "paused"})
    report = _report(exp, *_arms(800, 800, skip_p=(0.3, 0.45)))
    assert next_action(exp, report, now=NOW, users_in_step=0).kind == "hold"
    with pytest.raises(ValueError, match="no rollout policy"):
        next_action(exp.model_copy(update={"rollout": None}), report, now=NOW, users_in_step=0)


def test_the_rule_reads_the_report_the_platform_builds():
    from experiments.report import ab_report
    from tests.test_analysis import TWO_ARMS, simulate

    exposures, interactions, _ = simulate(1_500, seed=11, weights=TWO_ARMS)
    report = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS,
                       plan=SequentialPlan(mde=0.05))
    action = next_action(_at(0.01, primary_metric="hit_rate"), report, now=NOW, users_in_step=1_500)
    assert action.kind == "advance" and set(action.evidence) == {"hit_rate", "skip_rate"}
    assert action.users == sum(report.srm.observed.values())


# ------------------------------------------------------------------------------------------------ simulation


def test_aa_rollouts_rarely_act_and_a_planted_harm_is_rolled_back_early():
    rng = np.random.default_rng(123)
    aa = aa_rates([simulate_rollout(rng) for _ in range(120)])
    # k false actions in 120 runs at a true rate of alpha = 0.05: P(k >= 14) < 0.001, so a rule that errs more
    # often than alpha fails here
    assert aa["false_action_rate"]["value"] * 120 <= 13, aa
    harm = [simulate_rollout(rng, skip_p_treatment=0.33) for _ in range(40)]
    early = sum(o.kind == "rollback" and o.traffic <= 0.05 for o in harm)
    assert early >= 32, [(o.kind, o.traffic) for o in harm]


# --------------------------------------------------------------------------------- acting: store and registry


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking + registry server with a registered model of three versions (v1 champion)."""
    from mlflow import MlflowClient

    from infra.services import start_mlflow
    from models.lifecycle.registry import Registry
    from tests.conftest import small_settings

    settings = small_settings(tmp_path_factory.mktemp("rollout") / "encore")
    server = start_mlflow(settings)
    try:
        client = MlflowClient(server.endpoint)
        name = settings.registry.model_name
        client.create_registered_model(name)
        run = client.create_run(client.create_experiment("rollout-models"))
        for _ in range(3):
            client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        registry = Registry(server.endpoint, settings.registry)
        registry.set_alias(settings.registry.champion_alias, 1, reason="first model", actor="test")
        yield settings, registry
    finally:
        server.stop()


def _stored(tmp_path, version: int, policy: dict | None = None):  # noqa: ANN202
    from experiments.store import ExperimentStore

    store = ExperimentStore(tmp_path / "experiments")
    base = experiment().model_dump()
    base.update(name=f"ranker-v{version}", salt=None, traffic=0.01, variants=[
        {"name": "control", "weight": 0.5, "target": "alias:champion"},
        {"name": "treatment", "weight": 0.5, "target": f"version:{version}"}])
    base["rollout"] = {**base["rollout"], **(policy or {})}
    store.create(Experiment.model_validate(base), actor="test")
    return store, store.snapshot().get(base["name"])


def test_a_rollback_stops_the_treatment_moves_the_alias_back_and_tags_both_versions(tmp_path, registry_server):
    from experiments.rollout import TAG_PREFIX, apply_action

    settings, registry = registry_server
    champion = settings.registry.champion_alias
    store, exp = _stored(tmp_path, 2)
    # ramp to 5% on clean evidence: the audit line carries the statistics
    clean = next_action(exp, _report(exp, *_arms(600, 600)), now=NOW, users_in_step=1_200)
    applied = apply_action(clean, store=store, registry=registry, actor="rollout")
    assert store.snapshot().get(exp.name).traffic == 0.05 and applied.tagged_versions == [2, 1]
    line = store.audit(exp.name)[-1]
    assert line["action"] == "ramp" and line["actor"] == "rollout" and line["change"]["traffic"] == 0.05
    assert line["change"]["rollout"]["kind"] == "advance" and "skip_rate" in line["change"]["rollout"]["evidence"]
    assert step_progress(store, store.snapshot().get(exp.name), 1_500)[0] == 1_500 - clean.users
    with pytest.raises(Exception, match="stale rollout action"):
        apply_action(clean, store=store, registry=registry)  # computed at 1%, the store is at 5% now

    # the pipeline had registered v2 as challenger (after v1); meanwhile it was made champion by hand; then its
    # guardrail is harmed: both aliases go back to the versions they replaced
    challenger = settings.registry.challenger_alias
    registry.set_alias(challenger, 1, reason="registered", actor="test")
    registry.set_alias(challenger, 2, reason="registered", actor="test")
    registry.set_alias(champion, 2, reason="early promotion by hand", actor="test", action="promote")
    exp = store.snapshot().get(exp.name)
    harmed = next_action(exp, _report(exp, *_arms(800, 800, skip_p=(0.30, 0.40), seed=2)), now=NOW,
                         users_in_step=10)
    assert harmed.kind == "rollback"
    applied = apply_action(harmed, store=store, registry=registry, actor="rollout")

    assert store.snapshot().get(exp.name).status == "stopped"  # what serving reads within a second
    assert registry.alias_version(champion) == 1 and applied.alias_restored_to == 1
    assert applied.restored_aliases == {challenger: 1, champion: 1} and registry.alias_version(challenger) == 1
    assert registry.audit_log()[-1] | {"at_ms": 0} == registry.audit_log()[-1] | {
        "alias": champion, "from": 2, "to": 1, "action": "rollback", "actor": "rollout", "at_ms": 0}
    for version, role in ((2, "treatment"), (1, "restored")):
        tags = registry.tags(version)
        assert tags[f"{TAG_PREFIX}action"] == "rollback" and tags[f"{TAG_PREFIX}experiment"] == exp.name
        assert tags[f"{TAG_PREFIX}phase"] == "1" and tags[f"{TAG_PREFIX}reason"] == harmed.reason
        assert float(tags[f"{TAG_PREFIX}metric.skip_rate.always_valid_p"]) <= 0.05
        assert float(tags[f"{TAG_PREFIX}metric.skip_rate.lift_cs_low"]) > 0
        assert tags[f"{TAG_PREFIX}role"] in (role, "control")
        assert any(k.startswith(f"{TAG_PREFIX}log.") for k in tags)
    stopped, _, moved = store.audit(exp.name)[-3:]
    assert stopped["action"] == "stopped" and stopped["change"]["status"] == "stopped"
    assert stopped["change"]["rollout"]["reason"] == harmed.reason
    assert stopped["change"]["rollout"]["statistics"]["skip_rate"]["always_valid_p"] <= 0.05
    assert moved["action"] == "rollout-alias" and (moved["change"]["from"], moved["change"]["to"]) == (2, 1)


def test_a_decided_treatment_passes_the_gate_before_it_becomes_champion(tmp_path, registry_server):
    from experiments.rollout import apply_action
    from models.lifecycle.registry import AWAITING_APPROVAL, GATE_PASSED, GATE_REASON

    settings, registry = registry_server
    champion = settings.registry.champion_alias
    before = registry.alias_version(champion)
    store, exp = _stored(tmp_path, 3, {"on_decision": "promote"})
    store.ramp(exp.name, traffic=0.5, actor="test")
    exp = store.snapshot().get(exp.name)
    decided = next_action(exp, _report(exp, *_arms(15_000, 15_000, listen_lift=0.15, seed=4)), now=NOW,
                          users_in_step=0)
    assert decided.kind == "decide_treatment"

    # no gate verdict: nothing is promoted, the wait is recorded once
    first = apply_action(decided, store=store, registry=registry)
    assert first.awaiting == "gate" and not first.promoted and registry.alias_version(champion) == before
    assert store.snapshot().get(exp.name).status == "running"
    assert store.audit(exp.name)[-1]["action"] == "rollout-awaiting-gate"
    again = apply_action(decided, store=store, registry=registry)
    assert again.effects == ["still awaiting gate"] and len(store.audit(exp.name)) == 3

    # the gate passed: the promotion path moves the champion and the experiment ends
    registry.set_tags(3, {GATE_PASSED: "true", GATE_REASON: "beats the champion"})
    done = apply_action(decided, store=store, registry=registry)
    assert done.promoted and registry.alias_version(champion) == 3
    assert store.snapshot().get(exp.name).status == "stopped"
    assert registry.tags(3)["encore.rollout.action"] == "decide_treatment"
    assert float(registry.tags(3)["encore.rollout.metric.listening_time.lift_cs_low"]) > 0
    assert AWAITING_APPROVAL not in registry.tags(3)


def test_the_command_prints_the_action_and_applies_it_unless_dry(tmp_path, registry_server, monkeypatch):
    import json

    from click.testing import CliRunner

    from cli.main import main

    _, registry = registry_server
    monkeypatch.setenv("ENCORE_MLFLOW_TRACKING_URI", registry.tracking_uri)
    config = experiment().model_dump(mode="json", exclude={"salt", "phase", "phase_started_at"})
    config["name"] = "ranker-cli"
    (tmp_path / "exp.json").write_text(json.dumps(config))
    data = ["--data-dir", str(tmp_path / "encore")]
    cli = CliRunner()
    assert cli.invoke(main, ["ab", "create", str(tmp_path / "exp.json"), *data]).exit_code == 0
    dry = cli.invoke(main, ["ab", "rollout", "ranker-cli", "--dry-run", *data])
    assert dry.exit_code == 0, dry.output
    assert "ADVANCE (step 0/4, traffic 0 -> 0.01)" in dry.output and "dry run: nothing changed" in dry.output
    done = cli.invoke(main, ["ab", "rollout", "ranker-cli", "--json", *data])
    assert done.exit_code == 0, done.output
    out = json.loads(done.output.strip().splitlines()[-1])
    assert out["action"]["kind"] == "advance" and out["applied"]["tagged_versions"][0] == 2
    status = json.loads(cli.invoke(main, ["ab", "status", "ranker-cli", "--json", *data]).output)
    assert status["experiments"][0]["traffic_now"] == 0.01 and status["audit"][-1]["actor"] == "rollout"
    nothing = cli.invoke(main, ["ab", "rollout", "nope", *data])
    assert nothing.exit_code != 0 and "no experiment named 'nope'" in nothing.output


def test_the_closed_loop_drill_states_a_valid_rollout_and_plots_its_timelines(tmp_path):
    """The drill itself runs for minutes (``encore bench rollout-loop``); its experiment and its plot are checked
    here so that a change of the policy's rules cannot leave the drill's config behind unnoticed."""
    from dataclasses import asdict

    from cli.rollout_drill import MIN_USERS, STEPS, Tick, _experiment, timeline_png

    exp = _experiment("drill-x", 3)
    assert exp.rollout.steps == STEPS and exp.rollout.min_users_for(2) == MIN_USERS[1]
    assert exp.variant("treatment").target == "version:3" and exp.rollout_alias == "champion"

    def tick(i: int, traffic: float, action: str) -> dict:
        return asdict(Tick(tick=i, traffic=traffic, requests=10, treatment_requests=5, treatment_fallbacks=0,
                           users={"all": 10 * i, "in_step": i}, action=action, reason="", to_traffic=traffic,
                           primary_lift=0.1 * i, primary_cs=(None, None), guardrail_lift=-0.1,
                           guardrail_cs=(-0.3, 0.1),
                           checks={"srm": True, "guardrails": action != "rollback"}, aliases={"champion": 1}))
    result = {"good": {"treatment": 2, "final_action": "decide_treatment",
                       "timeline": [tick(0, 0.0, "advance"), tick(1, 0.01, "hold"), tick(2, 0.5, "decide_treatment")]},
              "harmful": {"treatment": 3, "final_action": "rollback",
                          "timeline": [tick(0, 0.0, "advance"), tick(1, 0.05, "rollback")]}}
    png = timeline_png(result, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
