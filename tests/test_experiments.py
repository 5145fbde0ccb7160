"""Experiment store, validation, routing (layers, holdout, targeting, ramps, kill switch) and `encore ab`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from click.testing import CliRunner

from experiments.assignment import Experiment, RampStep, assign, choose_variant, in_holdout
from experiments.store import Conflict, ExperimentError, ExperimentStore, NotFound, Router, validate_set


def exp(name: str = "e1", **kw: object) -> Experiment:
    base: dict = {"name": name, "salt": f"salt-{name}",
                  "variants": [{"name": "control", "weight": 0.5, "target": "popularity"},
                               {"name": "treatment", "weight": 0.5, "target": "alias:champion"}]}
    return Experiment.model_validate({**base, **kw})


def known_targets(target: str) -> str | None:
    return None if target in {"alias:champion", "alias:challenger", "version:1"} else f"{target} is unknown"


def test_store_versions_every_change_and_audits_it(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    assert store.create(exp(traffic=0.1), check_target=known_targets) == 1
    store.ramp("e1", 0.5)
    store.set_status("e1", "paused")
    store.set_status("e1", "running")
    snap = store.snapshot()
    assert snap.versions["e1"] == 4 and snap.get("e1").traffic == 0.5 and snap.version == 4
    history = store.history("e1")
    assert [h["version"] for h in history] == [1, 2, 3, 4]
    assert [h["config"]["traffic"] for h in history] == [0.1, 0.5, 0.5, 0.5]
    assert [a["action"] for a in store.audit()] == ["create", "ramp", "paused", "resume"]
    with pytest.raises(Conflict):
        store.create(exp())
    with pytest.raises(NotFound):
        store.ramp("nope", 0.2)


def test_store_refuses_unsafe_changes(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp(traffic=0.5))
    with pytest.raises(ExperimentError, match="ramping .* down"):
        store.ramp("e1", 0.2)
    with pytest.raises(ExperimentError, match="salt"):
        store.create(exp(salt="another"), replace=True)
    store.set_status("e1", "stopped")
    with pytest.raises(ExperimentError, match="stopped"):
        store.set_status("e1", "running")
    with pytest.raises(ExperimentError, match="unknown"):
        store.create(exp("e2", variants=[{"name": "a", "weight": 1.0, "target": "alias:nope"}]),
                     check_target=known_targets)
    with pytest.raises(ExperimentError, match="baseline"):
        store.create(exp("e3", variants=[{"name": "a", "weight": 1.0, "target": "random"}]))
    assert store.snapshot().versions == {"e1": 2}  # refused changes left no trace


def test_overlapping_slices_of_a_layer_are_rejected_disjoint_ones_accepted(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp("a", layer="ranking", layer_range=(0.0, 0.5)))
    with pytest.raises(ExperimentError, match="overlaps"):
        store.create(exp("b", layer="ranking", layer_range=(0.4, 1.0)))
    store.create(exp("b", layer="ranking", layer_range=(0.5, 1.0)))
    store.create(exp("c", layer="ui"))  # another layer may cover everything
    store.set_status("a", "stopped")  # a stopped experiment frees its slice
    store.create(exp("d", layer="ranking", layer_range=(0.0, 0.5)))
    with pytest.raises(ExperimentError, match="overlaps"):
        validate_set([exp("x"), exp("y")])


def test_layers_are_mutually_exclusive_and_independent_across_layers(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp("a", layer="ranking", layer_range=(0.0, 0.3)))
    store.create(exp("b", layer="ranking", layer_range=(0.3, 1.0)))
    store.create(exp("c", layer="ui", variants=[{"name": "x", "weight": 1.0, "target": "popularity"}]))
    router = Router(store.snapshot())
    counts = {"a": 0, "b": 0, "c": 0}
    n = 20_000
    for u in range(n):
        got = [x.experiment for x in router.assign(u)]
        ranking = [g for g in got if g in ("a", "b")]
        assert len(ranking) == 1  # the slices cover the whole layer: exactly one ranking experiment
        for g in got:
            counts[g] += 1
    assert counts["c"] == n
    assert abs(counts["a"] / n - 0.3) < 0.02 and abs(counts["b"] / n - 0.7) < 0.02
    # ui assignments are independent of the ranking slices
    in_a = [u for u in range(n) if router.assign(u)[0].experiment == "a"]
    assert 0.45 < sum(assign(exp("c", layer="ui", variants=[{"name": "x", "weight": 1.0, "target": "popularity"}]),
                             u) == "x" for u in in_a) / len(in_a) <= 1.0


def test_holdout_targeting_ramp_schedule_and_kill_switch(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    e = exp(holdout=0.1, targeting={"device": ["ios", "android"]}, traffic=0.0,
            ramp=[RampStep(at=now - timedelta(hours=1), traffic=0.2), RampStep(at=now + timedelta(hours=1),
                                                                               traffic=1.0)])
    assert e.traffic_at(now) == 0.2 and e.traffic_at(now + timedelta(hours=2)) == 1.0
    users = range(10_000)
    on = [u for u in users if assign(e, u, {"device": "ios"}, now)]
    assert not any(assign(e, u, {"device": "web"}, now) for u in users)
    assert not any(assign(e, u, None, now) for u in users)
    assert not any(in_holdout(u, 0.1) for u in on)
    assert abs(len(on) / 10_000 - 0.9 * 0.2) < 0.015
    later = [u for u in users if assign(e, u, {"device": "ios"}, now + timedelta(hours=2))]
    assert set(on) <= set(later) and abs(len(later) / 10_000 - 0.9) < 0.015
    # units keep their arm as the ramp proceeds
    assert all(assign(e, u, {"device": "ios"}, now) == assign(e, u, {"device": "ios"}, now + timedelta(hours=2))
               for u in on)
    with pytest.raises(ValueError, match="decrease"):
        exp(ramp=[RampStep(at=now, traffic=0.5), RampStep(at=now + timedelta(hours=1), traffic=0.1)])

    store = ExperimentStore(tmp_path)
    store.create(exp())
    assert Router(store.snapshot()).assign(1)
    store.set_kill(True, reason="incident")
    assert Router(store.snapshot()).assign(1) == []
    store.set_kill(False)
    assert Router(store.snapshot()).assign(1)
    assert [a["action"] for a in store.audit()][-2:] == ["kill", "unkill"]


def test_encore_ab_commands_drive_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import main

    data = tmp_path / "encore"
    monkeypatch.setenv("ENCORE_DATA_DIR", str(data))
    spec = tmp_path / "exp.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "hstu-ramp", "salt": "s-1", "layer": "ranking", "traffic": 0.05,
        "variants": [{"name": "control", "weight": 0.5, "target": "popularity"},
                     {"name": "treatment", "weight": 0.5, "target": "alias:champion"}]}))
    run = CliRunner().invoke
    r = run(main, ["ab", "create", str(spec)])
    assert r.exit_code == 0, r.output
    assert run(main, ["ab", "create", str(spec)]).exit_code != 0  # exists
    r = run(main, ["ab", "ramp", "hstu-ramp", "--traffic", "0.25", "--schedule", "0.5@+1h,1.0@+2d"])
    assert r.exit_code == 0, r.output
    r = run(main, ["ab", "ramp", "hstu-ramp", "--traffic", "0.1"])
    assert r.exit_code != 0 and "down" in r.output
    assert run(main, ["ab", "pause", "hstu-ramp"]).exit_code == 0
    assert run(main, ["ab", "resume", "hstu-ramp"]).exit_code == 0
    assert run(main, ["ab", "kill", "--reason", "drill"]).exit_code == 0
    r = run(main, ["ab", "status", "--json"])
    status = json.loads(r.output)
    assert status["kill"] is True
    [row] = status["experiments"]
    assert row["version"] == 4 and row["traffic_now"] == 0.25 and row["status"] == "running"
    assert run(main, ["ab", "kill", "--off"]).exit_code == 0
    assert run(main, ["ab", "stop", "hstu-ramp"]).exit_code == 0
    r = run(main, ["ab", "status", "hstu-ramp"])
    assert r.exit_code == 0 and "[stopped]" in r.output
    assert run(main, ["ab", "status", "nope"]).exit_code != 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "salt": "s", "variants": [{"name": "a", "weight": 0.7,
                                                                       "target": "popularity"}]}))
    r = run(main, ["ab", "create", str(bad)])
    assert r.exit_code != 0 and "sum to 1" in r.output


BAD_NAMES = ["../../x", "..", "a/../../b", "a/b", "a\\b", "/tmp/x", "a..b", "", ".hidden", "-flag", "Upper",
             "sp ace", "x" * 65, "nul\x00", "line\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_an_experiment_name_that_could_be_a_path_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="experiment name"):
        exp(name)


def test_valid_experiment_names_are_accepted() -> None:
    for name in ("e1", "hstu-vs-popularity", "ranking.v2_b", "0", "x" * 64):
        assert exp(name).name == name


def test_the_store_writes_nothing_outside_its_folder(tmp_path: Path) -> None:
    """Defence in depth: an unvalidated model or a planted symbolic link still cannot lead the store outside."""
    root = tmp_path / "data" / "experiments"
    store = ExperimentStore(root)
    sneaky = exp().model_copy(update={"name": "../../escaped"})  # model_copy does not validate
    with pytest.raises(ExperimentError, match="experiment name"):
        store.create(sneaky)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "versions").mkdir(parents=True)
    (root / "versions" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ExperimentError, match="outside the experiment store"):
        store.create(exp("linked"))
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped").exists()
    assert store.snapshot().experiments == () and store.audit() == []  # refused changes left no trace
    with pytest.raises(NotFound):
        store.history("../../escaped")


def test_encore_ab_create_refuses_a_path_as_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import main

    data = tmp_path / "a" / "encore"
    monkeypatch.setenv("ENCORE_DATA_DIR", str(data))
    for suffix, dump in ((".yaml", yaml.safe_dump), (".json", json.dumps)):
        spec = tmp_path / f"evil{suffix}"
        spec.write_text(dump({"name": "../../../x", "salt": "s",
                              "variants": [{"name": "a", "weight": 1.0, "target": "popularity"}]}))
        r = CliRunner().invoke(main, ["ab", "create", str(spec)])
        assert r.exit_code != 0 and "experiment name '../../../x' is invalid" in r.output, r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()
    assert not (data / "experiments" / "state.json").exists()


# ---------------------------------------------------------------------------------------------- config guards


def salted(name: str, **kw: object) -> Experiment:
    """``exp`` without a salt: the store generates one."""
    return exp(name, **kw).model_copy(update={"salt": None})


@pytest.mark.parametrize("layers", [("ranking", "ranking"), ("ranking", "ui")])
def test_a_reused_salt_is_refused_in_the_same_layer_and_across_layers(tmp_path: Path,
                                                                        layers: tuple[str, str]) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp("a", salt="shared", layer=layers[0], layer_range=(0.0, 0.5)))
    with pytest.raises(ExperimentError, match="salt 'shared' is already used by experiment 'a'"):
        store.create(exp("b", salt="shared", layer=layers[1], layer_range=(0.5, 1.0)))
    store.set_status("a", "stopped")  # a stopped experiment's salt stays taken: its users carry its effects
    with pytest.raises(ExperimentError, match="already used"):
        store.create(exp("c", salt="shared", layer=layers[1]))
    assert sorted(store.snapshot().versions) == ["a"]


def test_a_draft_may_take_a_new_salt_but_never_a_used_one(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp("a", salt="s-a", layer="ui"))
    store.create(exp("d", salt="s-d", status="draft"))
    store.create(exp("d", salt="s-d2", status="draft"), replace=True)
    with pytest.raises(ExperimentError, match="already used"):
        store.create(exp("d", salt="s-a", status="draft"), replace=True)
    with pytest.raises(ExperimentError, match="already used by it"):  # its own earlier salt, too
        store.create(exp("d", salt="s-d", status="draft"), replace=True)
    assert store.snapshot().get("d").salt == "s-d2"


def test_a_salt_is_generated_when_omitted_and_unique_across_1000_creations(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # 20 stores of 50: generated salts must differ within a store and between deployments (no counter, no clock)
    salts = []
    for s in range(20):
        store = ExperimentStore(tmp_path / f"store{s}")
        for i in range(50):
            store.create(salted(f"e{i}", layer=f"l{i}", status="draft"))
        salts += [e.salt for e in store.snapshot().experiments]
    assert len(salts) == 1000 and all(s and len(s) == 16 for s in salts) and len(set(salts)) == 1000
    # a replace that omits the salt keeps the stored one: assignment reads the stored config only
    before = store.snapshot().get("e7").salt
    store.create(salted("e7", layer="l7", status="draft", traffic=0.5), replace=True)
    assert store.snapshot().get("e7").salt == before
    assert store.audit("e0")[0]["change"]["salt"] == store.snapshot().get("e0").salt
    # a generated salt that happens to be taken is drawn again, never reused
    import experiments.store as store_module

    draws = iter([before, "f" * 16])
    monkeypatch.setattr(store_module, "new_salt", lambda: next(draws))
    store.create(salted("late", layer="late"))
    assert store.snapshot().get("late").salt == "f" * 16


def test_the_settings_default_experiment_keeps_its_salt_in_the_store(tmp_path: Path) -> None:
    from experiments.assignment import default_experiment
    from infra.settings import EncoreSettings

    settings = EncoreSettings(data_dir=tmp_path)
    store = ExperimentStore(settings.experiments_dir)
    store.create(default_experiment(settings))
    stored = store.snapshot().get(settings.experiment.name)
    assert stored.salt == settings.experiment.salt == "encore-ab-1"
    assert [assign(stored, u) for u in range(500)] == [assign(default_experiment(settings), u) for u in range(500)]
    with pytest.raises(ExperimentError, match="already used"):
        store.create(exp("copy", salt=settings.experiment.salt, layer="ui"))


def test_a_weight_change_on_a_running_experiment_opens_a_phase_a_ramp_does_not(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp(traffic=0.2))
    first = store.snapshot().get("e1")
    assert first.phase == 1 and first.phase_started_at is not None
    store.ramp("e1", 0.5)
    store.set_status("e1", "paused")
    store.set_status("e1", "running")
    assert store.snapshot().get("e1").phase == 1  # ramps, pauses, resumes: units keep their arm
    assert store.snapshot().get("e1").phase_started_at == first.phase_started_at
    new_weights = [{"name": "control", "weight": 0.3, "target": "popularity"},
                   {"name": "treatment", "weight": 0.7, "target": "alias:champion"}]
    second = store.update("e1", variants=new_weights)
    assert second.phase == 2 and second.phase_started_at > first.phase_started_at
    assert second.salt == first.salt  # not re-randomised: users whose position stays in their arm keep it
    switched = sum(choose_variant(first, u) != choose_variant(second, u) for u in range(10_000))
    assert 1_700 < switched < 2_300  # only the positions in [0.3, 0.5) change arm
    row = store.audit("e1")[-1]
    assert row["phase"] == 2 and row["change"]["new_phase"]["reason"] == "variants changed"
    assert row["change"]["new_phase"]["rerandomised"] is False
    assert store.phases("e1") == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2}
    # a replace with new weights is the same change; the phase a config file states is ignored
    store.create(exp(traffic=0.5, phase=9, variants=[{"name": "control", "weight": 0.5, "target": "popularity"},
                                                     {"name": "treatment", "weight": 0.5,
                                                      "target": "alias:champion"}]), replace=True)
    assert store.snapshot().get("e1").phase == 3
    with pytest.raises(ExperimentError, match="store sets phase"):
        store.update("e1", phase=7)


def test_a_draft_changes_weights_without_a_phase_and_starts_phase_1_when_it_runs(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp(status="draft"))
    assert store.snapshot().get("e1").phase_started_at is None
    store.update("e1", variants=[{"name": "control", "weight": 0.9, "target": "popularity"},
                                 {"name": "treatment", "weight": 0.1, "target": "alias:champion"}])
    running = store.set_status("e1", "running")
    assert running.phase == 1 and running.phase_started_at is not None


def test_rerandomising_rotates_the_salt_only_when_asked(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp())
    first = store.snapshot().get("e1")
    with pytest.raises(ExperimentError, match="re-randomise explicitly"):
        store.create(exp(salt="fresh"), replace=True)
    second = store.update("e1", rerandomise=True)
    assert second.salt != first.salt and second.phase == 2
    assert store.audit("e1")[-1]["change"]["new_phase"]["rerandomised"] is True
    agree = sum(assign(first, u) == assign(second, u) for u in range(10_000))
    assert 4_700 < agree < 5_300  # an independent draw: half the users keep their arm by chance
    with pytest.raises(ExperimentError, match="already used by it"):  # a retired salt is never reused
        store.create(exp(salt=first.salt), replace=True, rerandomise=True)
    with pytest.raises(ExperimentError, match="already used by experiment 'e1'"):
        store.create(exp("e2", salt=first.salt, layer="ui"))


def test_the_readout_analyses_the_current_phase_only(tmp_path: Path) -> None:
    import pandas as pd

    from experiments.readout import select_phase

    store = ExperimentStore(tmp_path)
    store.create(exp())
    store.ramp("e1", 1.0)
    store.update("e1", variants=[{"name": "control", "weight": 0.2, "target": "popularity"},
                                 {"name": "treatment", "weight": 0.8, "target": "alias:champion"}])
    current = store.snapshot().get("e1")
    assert current.phase == 2

    def exposure(i: int, version: int | None) -> dict:
        assignments = [{"experiment": "other", "variant": "x", "version": 3}]
        if version is not None:
            assignments.append({"experiment": "e1", "variant": "control", "version": version})
        return {"request_id": f"r{i}", "user_id": i, "variant": "control", "experiment": "e1",
                "assignments": assignments, "timestamp_ms": 1_000 + i}

    exposures = pd.DataFrame([exposure(0, 1), exposure(1, 2), exposure(2, 3), exposure(3, 3), exposure(4, None)])
    phases = store.phases("e1")
    assert list(select_phase(exposures, "e1", phases, current.phase)["request_id"]) == ["r2", "r3"]
    assert list(select_phase(exposures, "e1", phases, 1)["request_id"]) == ["r0", "r1"]
    # before any phase change every exposure is phase 1, with or without a version
    assert len(select_phase(exposures, "e1", {1: 1, 2: 1}, 1)) == 5
def test_the_service_the_router_and_assign_hash_a_user_alike(tmp_path: Path) -> None:
    """The request model hands the router an int; the router, assign() and an analysis reading ids back from
    strings (a Kafka key, a CSV) place the unit identically."""
    from experiments.store import ExperimentStore, Router
    from serving.app import RecommendationRequest

    store = ExperimentStore(tmp_path)
    store.create(exp("e1"))
    e1 = store.snapshot().get("e1")
    router = Router(store.snapshot())
    for user in (7, 42, 10_000_019):
        served = RecommendationRequest.model_validate_json(f'{{"user_id": {user}}}').user_id
        [routed] = router.assign(served)
        assert routed.variant == assign(e1, user) == assign(e1, str(served))
    for body in ('{"user_id": "42"}', '{"user_id": 42.5}', '{"user_id": true}'):
        with pytest.raises(ValidationError):
            RecommendationRequest.model_validate_json(body)
    # 42.0 is the integer 42 in JSON Schema (what the OpenAPI spec promises), and it is hashed as 42
    assert RecommendationRequest.model_validate_json('{"user_id": 42.0}').user_id == 42
    assert isinstance(RecommendationRequest.model_validate_json('{"user_id": 42.0}').user_id, int)


def test_a_store_written_before_the_salt_register_still_refuses_its_salts(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    store.create(exp("a", salt="old-a", layer="ui"))
    store.update("a", rerandomise=True)  # "old-a" retired into the version files
    store.create(exp("b", salt="old-b"))
    state = json.loads(store.state_file.read_text())
    del state["salts"]
    state["experiments"]["b"]["config"]["salt"] = state["experiments"]["a"]["config"]["salt"]  # shared, as before
    store.state_file.write_text(json.dumps(state))
    assert store.set_status("b", "stopped").status == "stopped"  # a confounded experiment can still be stopped
    for salt in ("old-a", "old-b", store.snapshot().get("a").salt):
        with pytest.raises(ExperimentError, match="already used"):
            store.create(exp("c", salt=salt, layer="c"))


def test_encore_ab_create_generates_the_salt_and_replaces_into_a_new_phase(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import main

    monkeypatch.setenv("ENCORE_DATA_DIR", str(tmp_path / "encore"))
    spec = tmp_path / "exp.yaml"
    config = {"name": "ranker", "variants": [{"name": "control", "weight": 0.5, "target": "popularity"},
                                             {"name": "treatment", "weight": 0.5, "target": "popularity"}]}
    spec.write_text(yaml.safe_dump(config))
    run = CliRunner().invoke
    r = run(main, ["ab", "create", str(spec)])
    assert r.exit_code == 0 and "phase 1" in r.output, r.output
    salt = r.output.split("salt ")[1].split(",")[0]
    assert len(salt) == 16
    config["variants"][0]["weight"], config["variants"][1]["weight"] = 0.2, 0.8
    spec.write_text(yaml.safe_dump(config))
    r = run(main, ["ab", "create", str(spec), "--replace"])
    assert r.exit_code == 0 and f"salt {salt}, phase 2" in r.output, r.output
    assert run(main, ["ab", "create", str(spec), "--rerandomise"]).exit_code != 0  # only with --replace
    r = run(main, ["ab", "create", str(spec), "--replace", "--rerandomise"])
    assert r.exit_code == 0 and "phase 3" in r.output and salt not in r.output, r.output
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**config, "name": "other", "layer": "ui", "salt": salt}))
    r = run(main, ["ab", "create", str(other)])
    assert r.exit_code != 0 and "already used by experiment 'ranker'" in r.output, r.output
    r = run(main, ["ab", "status", "ranker", "--json"])
    assert json.loads(r.output)["experiments"][0]["phase"] == 3


def test_the_readout_keeps_exposures_where_another_layers_experiment_came_first() -> None:
    """The top-level variant of an exposure is the first assigned experiment's (it picks the model); an
    experiment of another layer finds its arm in ``assignments``, and only there."""
    import pandas as pd

    from experiments.readout import exposures_of

    exposures = pd.DataFrame([
        {"request_id": "r0", "experiment": "ui", "variant": "big",
         "assignments": [{"experiment": "ui", "variant": "big", "version": 1},
                         {"experiment": "ranker", "variant": "treatment", "version": 3}]},
        {"request_id": "r1", "experiment": "ranker", "variant": "control",
         "assignments": [{"experiment": "ranker", "variant": "control", "version": 3}]},
        {"request_id": "r2", "experiment": "ui", "variant": "small",
         "assignments": [{"experiment": "ui", "variant": "small", "version": 1}]},
        {"request_id": "r3", "experiment": None, "variant": None, "assignments": []},
    ])
    ranker = exposures_of(exposures, "ranker")
    assert list(ranker["request_id"]) == ["r0", "r1"] and list(ranker["variant"]) == ["treatment", "control"]
    assert set(ranker["experiment"]) == {"ranker"}
    assert list(exposures_of(exposures, "ui")["variant"]) == ["big", "small"]
    # exposures logged before `assignments` existed: the top level is all there is
    old = pd.DataFrame([{"request_id": "r9", "experiment": "ranker", "variant": "control"}])
    assert list(exposures_of(old, "ranker")["variant"]) == ["control"]
