"""Guarded rollouts in Dagster: the sensor on experiment state, the guard with its blocking checks, the step.

The rollout's evidence is a report built by the real sequential engine on synthetic per-user data (as in
``tests/test_rollout.py``), handed to ``observe_rollout`` in place of the Kafka + offline-store readout; the
experiment store, the MLflow registry (SQLite-backed) and Dagster are the real ones."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pytest

from bench.rollouts import experiment
from experiments.assignment import Experiment
from experiments.store import ExperimentStore
from orchestration.resources import KafkaResource, MLflowResource, encore_resource
from tests.conftest import small_settings
from tests.test_rollout import _arms, _report

DEAD_KAFKA = "127.0.0.1:9"  # never dialled: the report comes from the synthetic readout below


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow registry (SQLite) with a registered model of three versions, v1 champion."""
    from mlflow import MlflowClient

    from models.lifecycle.registry import Registry

    root = tmp_path_factory.mktemp("rollout-dagster")
    settings = small_settings(root / "encore")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    name = settings.registry.model_name
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment("rollout-models", artifact_location=str(root / "artifacts")))
    for _ in range(3):
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    reg = Registry(uri, settings.registry)
    reg.set_alias(settings.registry.champion_alias, 1, reason="first model", actor="test")
    return reg


@pytest.fixture
def readout(monkeypatch: pytest.MonkeyPatch):
    """Reports per experiment name, read by ``observe_rollout`` instead of Kafka exposures and the offline store;
    an experiment without one has no exposures yet."""
    import experiments.readout

    reports: dict = {}

    def read_report(settings, bootstrap, name=None, phase=None):  # noqa: ANN001, ANN202
        if name not in reports:
            raise RuntimeError("no exposures with an experiment variant yet: serve recommendations first")
        exp = ExperimentStore(settings.experiments_dir).snapshot().get(name)
        return exp, reports[name], sum(reports[name].srm.observed.values())

    monkeypatch.setattr(experiments.readout, "read_report", read_report)
    return reports


def _create(settings, name: str, *, traffic: float, version: int = 2, layer: str = "default") -> Experiment:  # noqa: ANN001
    store = ExperimentStore(settings.experiments_dir)
    base = experiment(min_users=1_000).model_dump()
    base.update(name=name, salt=None, traffic=traffic, layer=layer, variants=[
        {"name": "control", "weight": 0.5, "target": "alias:champion"},
        {"name": "treatment", "weight": 0.5, "target": f"version:{version}"}])
    store.create(Experiment.model_validate(base), actor="test")
    return store.snapshot().get(name)


def _resources(settings, registry) -> dict:  # noqa: ANN001
    return {"encore": encore_resource(settings), "kafka": KafkaResource(bootstrap=DEAD_KAFKA),
            "mlflow_server": MLflowResource(tracking_uri=registry.tracking_uri)}


def _run(settings, registry, name: str) -> dg.ExecuteInProcessResult:  # noqa: ANN001
    from orchestration.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("rollouts", [name])
    return defs.resolve_job_def("rollout_job").execute_in_process(
        partition_key=name, instance=instance, resources=_resources(settings, registry), raise_on_error=False)


def _started(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}


# ---------------------------------------------------------------------------------------------------- sensor


def test_the_sensor_requests_a_run_per_acting_rollout_and_skips_holds_with_their_reason(tmp_path, readout):
    from orchestration.sensors import rollout_sensor

    settings = small_settings(tmp_path / "encore")
    _create(settings, "ramp-start", traffic=0.0, layer="a")  # before its first step: the ramp starts
    waiting = _create(settings, "ramp-wait", traffic=0.01, layer="b")
    readout["ramp-wait"] = _report(waiting, *_arms(300, 300))  # 600 of the step's 1000 users
    _create(settings, "ramp-done", traffic=0.01, layer="c")
    store = ExperimentStore(settings.experiments_dir)
    store.set_status("ramp-done", "stopped", actor="test")
    resources = {"encore": encore_resource(settings), "kafka": KafkaResource(bootstrap=DEAD_KAFKA)}

    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
            result = rollout_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        [request] = result.run_requests
        assert request.partition_key == "ramp-start" and request.run_key.startswith("ramp-start:p1:v1:advance:0:")
        assert request.tags == {"encore/rollout-action": "advance", "encore/experiment": "ramp-start"}
        [add] = result.dynamic_partitions_requests
        assert add.partitions_def_name == "rollouts" and sorted(add.partition_keys) == ["ramp-start", "ramp-wait"]

        # the partitions exist now; the ramp started by hand: both hold, each with its reason
        instance.add_dynamic_partitions("rollouts", list(add.partition_keys))
        store.ramp("ramp-start", traffic=0.01, actor="test")
        with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
            result = rollout_sensor(ctx)
        assert not result.run_requests and not result.dynamic_partitions_requests
        reason = result.skip_reason.skip_message
        assert "ramp-wait: hold at step 1/4" in reason and "600 of 1000 users in this step" in reason
        assert "ramp-start: hold at step 1/4" in reason and "no sequential test yet" in reason
        assert "ramp-done" not in reason

    unreachable = {"encore": encore_resource(settings), "kafka": KafkaResource()}  # no broker configured or running
    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance, resources=unreachable) as ctx:
        skipped = rollout_sensor(ctx)
    assert isinstance(skipped, dg.SkipReason) and skipped.skip_message.startswith("Kafka not reachable")


def test_one_state_launches_at_most_one_run_an_hour():
    from orchestration.sensors import rollout_run_key

    at = datetime(2026, 3, 1, 12, 34, tzinfo=timezone.utc)
    assert rollout_run_key("x", 2, 7, "advance", 0.05, at) == "x:p2:v7:advance:0.05:2026-03-01T12"
    assert rollout_run_key("x", 2, 8, "advance", 0.05, at) != rollout_run_key("x", 2, 7, "advance", 0.05, at)
    assert rollout_run_key("x", 2, 7, "decide_treatment", 0.5, at) == "x:p2:v7:decide_treatment:0.5:2026-03-01T12"


# ------------------------------------------------------------------------------------------------------- job


def test_a_harmed_guardrail_is_rolled_back_by_the_guard_and_blocks_the_step(tmp_path, readout, registry):
    settings = small_settings(tmp_path / "encore")
    champion = settings.registry.champion_alias
    exp = _create(settings, "harmed", traffic=0.05, version=2)
    registry.set_alias(champion, 2, reason="early promotion by hand", actor="test", action="promote")
    readout["harmed"] = _report(exp, *_arms(800, 800, skip_p=(0.30, 0.40), seed=2))

    result = _run(settings, registry, "harmed")

    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {k: c.passed for k, c in checks.items()} == {"srm": True, "guardrails": False}
    evidence = checks["guardrails"].metadata["skip_rate"].value
    assert evidence["decision"] == "treatment_worse" and evidence["always_valid_p"] <= 0.05
    assert evidence["lift_cs"][0] > 0
    # the guard acted on its own: stopped, the alias back on the version it replaced, audited as dagster
    store = ExperimentStore(settings.experiments_dir)
    assert store.snapshot().get("harmed").status == "stopped"
    assert registry.alias_version(champion) == 1
    assert registry.audit_log()[-1]["action"] == "rollback" and registry.audit_log()[-1]["actor"] == "dagster"
    assert [r["actor"] for r in store.audit("harmed")[-2:]] == ["dagster", "dagster"]
    [guard] = result.asset_materializations_for_node("rollout_guard")
    assert guard.metadata["action"].value == "rollback" and "skip_rate" in guard.metadata["evidence"].value
    assert "data:image/png;base64," in guard.metadata["sequential_boundary"].value
    # the blocking check stopped the run before the step: Dagster never started it
    assert _started(result) == {"rollout_guard"} and result.get_failed_step_keys() == {"rollout_guard"}
    assert not result.asset_materializations_for_node("rollout_step")


def test_a_clean_step_passes_the_checks_and_the_step_advances_the_traffic(tmp_path, readout, registry):
    settings = small_settings(tmp_path / "encore")
    exp = _create(settings, "clean", traffic=0.01, version=3)
    readout["clean"] = _report(exp, *_arms(600, 600))  # 1200 users in step 1/4, nothing harmed

    result = _run(settings, registry, "clean")

    assert result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {"srm": True,
                                                                                      "guardrails": True}
    assert result.output_for_node("rollout_guard")["action"]["kind"] == "advance"
    assert result.output_for_node("rollout_guard")["applied"] is None  # the guard only rolls back
    [step] = result.asset_materializations_for_node("rollout_step")
    assert step.metadata["action"].value == "advance" and step.metadata["traffic_after"].value == 0.05
    assert "traffic 0.01 -> 0.05" in step.metadata["effects"].value
    assert step.metadata["alias_version"].value == registry.alias_version(settings.registry.champion_alias)
    store = ExperimentStore(settings.experiments_dir)
    assert store.snapshot().get("clean").traffic == 0.05
    line = store.audit("clean")[-1]
    assert line["action"] == "ramp" and line["actor"] == "dagster" and line["change"]["rollout"]["kind"] == "advance"
    assert registry.tags(3)["encore.rollout.action"] == "advance"


def test_the_code_location_loads_with_the_rollout_job_sensor_and_checks():
    from orchestration.definitions import defs

    repo = defs.get_repository_def()
    job = defs.resolve_job_def("rollout_job")
    assert job.partitions_def.name == "rollouts"
    assert {n.name for n in job.nodes} == {"rollout_guard", "rollout_step"}
    assert repo.get_sensor_def("rollout_sensor").job_name == "rollout_job"
    checks = {(k.asset_key.to_user_string(), k.name) for k in repo.asset_graph.asset_check_keys}
    assert {("rollout_guard", "srm"), ("rollout_guard", "guardrails")} <= checks
    assert dg.AssetKey("experiment_store") in repo.asset_graph.get(dg.AssetKey("rollout_guard")).parent_keys
