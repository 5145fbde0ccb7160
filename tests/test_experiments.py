"""Experiment store, validation, routing (layers, holdout, targeting, ramps, kill switch) and `encore ab`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from experiments.assignment import Experiment, RampStep, assign, in_holdout
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
