"""The model lifecycle on real components: Dagster runs of the training graph against a real sqlite MLflow
registry and a real Feast repository on synthetic data; the blocking promotion gate; the ``encore models``
commands; ``mlflow models predict`` on the champion.

One module-scoped story, in order (each step's registry state is what the next one starts from):

1. a weak first model          -> v1 @champion (first model)
2. a stronger config           -> v2 @challenger, then @champion (auto)
3. a random-weights challenger -> v3 stays @challenger, blocked by the gate with its reason
4. ``encore models rollback``  -> @champion back to v1
5. manual mode, stronger model -> v4 passes the gate but waits; ``encore models promote 4`` -> @champion
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from orchestration.resources import EncoreResource, FeastResource, MLflowResource, encore_resource
from tests.conftest import small_settings

pytestmark = pytest.mark.integration

NAME = "encore-recommender"
# Both beat most-popular on the small synthetic world; STRONG beats WEAK (seeded, deterministic).
WEAK = {"recipe": "hstu", "epochs": 6, "dim": 32}  # test ndcg@10 ~0.19 (most-popular: ~0.14)
STRONG = {"recipe": "hstu", "epochs": 10, "dim": 32}  # ~0.30


def seed_offline_store(settings) -> int:  # noqa: ANN001
    """The synthetic world's history written to the offline store as ingest would (partition 0, offsets)."""
    from features.offline_store import OfflineStore, StagedEvent
    from features.simulator import MusicWorld

    events = MusicWorld(settings.simulator).history()
    store = OfflineStore(settings.offline_dir)
    try:
        store.write([StagedEvent(e, 0, i) for i, e in enumerate(events)])
    finally:
        store.close()
    return len(events)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory):
    for key in [k for k in os.environ if k.startswith("ENCORE_")]:
        os.environ.pop(key)
    root = tmp_path_factory.mktemp("lifecycle") / "encore"
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    (root / "mlflow").mkdir(parents=True)
    settings = small_settings(root, mlflow_tracking_uri=uri, kafka_bootstrap="127.0.0.1:9",
                              promotion={"latency_budget_ms": 1000.0, "beat_popularity": True})
    events = seed_offline_store(settings)
    instance = dg.DagsterInstance.ephemeral()
    from cli.models import run_training

    out = {"settings": settings, "uri": uri, "events": events, "instance": instance}
    out["run1"] = run_training(settings, instance=instance, **WEAK)
    out["run2"] = run_training(settings, instance=instance, **STRONG)
    out["run3"] = materialize_broken_challenger(settings, instance)
    yield out
    instance.dispose()


def materialize_broken_challenger(settings, instance):  # noqa: ANN001, ANN201
    """The real graph with ``trained_model`` swapped for an untrained (random-weights) model."""
    from orchestration.assets import training as A

    return dg.materialize(
        [A.training_dataset, broken_trained_model, A.evaluation, A.registered_model, A.promotion_gate,
         A.champion_model],
        instance=instance, raise_on_error=False,
        resources={"encore": encore_resource(settings), "feast": FeastResource(),
                   "mlflow_server": MLflowResource()},
    )


@dg.asset(name="trained_model", group_name="training")
def broken_trained_model(encore: EncoreResource, mlflow_server: MLflowResource, training_dataset: dict) -> dict:
    """Stands in for ``trained_model``: the right shape, an untrained model (random initial weights)."""
    from models.data import build_sequences
    from models.recommender import Recommender, build_model
    from models.lifecycle.tracking import training_run
    from models.recipe import recipe_from_settings

    s = encore.settings()
    cfg = recipe_from_settings(s.train)
    seqs = build_sequences(pd.read_parquet(training_dataset["path"]))
    model = build_model(cfg.model_config(len(seqs.vocab)))
    run_dir = s.root / "models" / "broken"
    rec = Recommender(model, seqs.vocab, metadata={"train_config": dataclasses.asdict(cfg)})
    with training_run(mlflow_server.resolve(s), "encore-training", run_name="broken", params={"broken": True},
                      tags={}, system_metrics=False, artifact_root=s.mlflow_dir / "artifacts") as run:
        pass
    (run_dir / "report").mkdir(parents=True, exist_ok=True)
    return {"dir": str(rec.save(run_dir / "recommender")), "report_dir": str(run_dir / "report"),
            "run_id": run.info.run_id, "family": "hstu", "config": dataclasses.asdict(cfg), "params": 0,
            "history": [], "test_metrics": {}, "valid_metrics": {}, "dataset": training_dataset}


def _client(story) -> MlflowClient:  # noqa: ANN001
    return MlflowClient(story["uri"])


def _alias(story, alias: str) -> int:  # noqa: ANN001
    return int(_client(story).get_model_version_by_alias(NAME, alias).version)


def test_first_run_registers_v1_as_champion(story):
    r = story["run1"]
    assert r["success"] and r["version"] == 1 and r["gate_passed"] and r["promoted"], r
    assert "first model" in r["reason"]


def test_a_better_config_becomes_challenger_then_champion(story):
    r = story["run2"]
    assert r["success"] and r["version"] == 2 and r["gate_passed"] and r["promoted"], r
    assert "beats champion v1" in r["reason"]
    entries = [json.loads(v) for k, v in _client(story).get_model_version(NAME, "2").tags.items()
               if k.startswith("audit.")]
    assert [(e["alias"], e["to"]) for e in sorted(entries, key=lambda e: e["at_ms"])] == [("challenger", 2),
                                                                                          ("champion", 2)]


def test_a_random_weights_challenger_is_blocked_with_its_reason(story):
    result = story["run3"]
    assert not result.success
    (gate,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "promotion_gate"]
    assert not gate.passed
    reason = gate.metadata["reason"].value
    assert reason.startswith("blocked:") and "does not beat champion v2" in reason and "most-popular" in reason
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "registered_model" in materialized and "champion_model" not in materialized  # blocked downstream
    client = _client(story)
    assert _alias(story, "champion") == 2 and _alias(story, "challenger") == 3
    tags = client.get_model_version(NAME, "3").tags
    assert tags["gate.passed"] == "false" and tags["gate.reason"] == reason


def test_runs_track_params_epochs_artifacts_and_lineage_tags(story):
    client = _client(story)
    mv = client.get_model_version(NAME, "2")
    run = client.get_run(mv.run_id)
    assert run.data.params["dim"] == "32" and run.data.params["model"] == "hstu"
    assert len(client.get_metric_history(mv.run_id, "loss")) >= 3  # one point per epoch (early stopping may cut)
    assert "test_ndcg_at_10" in run.data.metrics and "sanity_coverage" in run.data.metrics
    assert client.get_experiment(run.info.experiment_id).name == "encore-training"
    arts = {a.path for d in ("evaluation", "config", "vocabulary") for a in client.list_artifacts(mv.run_id, d)}
    assert {"evaluation/evaluation.json", "evaluation/loss_curves.png", "evaluation/metrics.png",
            "config/config.json", "vocabulary/vocab.json"} <= arts
    # the resolved recipe rides with the run, and trains the same thing again
    from models.recipe import resolve_recipe

    recipe = client.download_artifacts(mv.run_id, "recipe.yaml", str(story["settings"].root / "recipe-check"))
    assert resolve_recipe(recipe) == resolve_recipe("hstu", **{**story["settings"].train.overrides, "epochs": 10, "dim": 32})
    tags = mv.tags
    assert json.loads(tags["offset_ranges"]) == {"0": [0, story["events"] - 1]}
    assert {"user_history", "item_stats"} <= set(json.loads(tags["feature_views"]))
    assert tags["dataset_snapshot"] and tags["git_revision"] and float(tags["metric.test_ndcg_at_10"]) > 0
    assert tags["gate.passed"] == "true"


def test_dagster_metadata_shows_tables_and_plots(story):
    instance = story["instance"]
    mats = {e.dagster_event.asset_key.to_user_string(): e.dagster_event.event_specific_data.materialization.metadata
            for e in instance.all_logs(story["run2"]["run_id"]) if e.dagster_event and
            e.dagster_event.is_step_materialization}
    for asset, key in (("trained_model", "loss_curves"), ("evaluation", "metrics_plot")):
        assert "data:image/png;base64," in mats[asset][key].value
    assert "most popular" in mats["evaluation"]["metrics"].value and "| epoch |" in mats["trained_model"]["epochs"].value
    ds = mats["training_dataset"]
    assert ds["events"].value == story["events"] and ds["offset_ranges"].value == {"0": [0, story["events"] - 1]}


def test_cli_rollback_manual_mode_and_promote(story):
    from cli.main import main
    from cli.models import run_training

    settings, uri = story["settings"], story["uri"]
    cli = CliRunner()
    args = ["--data-dir", str(settings.root), "--tracking-uri", uri]
    out = cli.invoke(main, ["models", "rollback", *args])
    assert out.exit_code == 0, out.output
    assert "v2 -> v1" in out.output and _alias(story, "champion") == 1

    manual = settings.model_copy(update={"promotion": settings.promotion.model_copy(update={"mode": "manual"})})
    r = run_training(manual, instance=story["instance"], **STRONG)
    assert r["success"] and r["version"] == 4 and r["gate_passed"] and not r["promoted"], r
    assert "encore models promote 4" in r["reason"]
    assert _alias(story, "champion") == 1 and _alias(story, "challenger") == 4

    listing = cli.invoke(main, ["models", "list", *args])
    assert listing.exit_code == 0, listing.output
    lines = {int(line.split()[0]): line for line in listing.output.splitlines() if line.strip()[:1].isdigit()}
    assert "@challenger" in lines[4] and "awaiting approval" in lines[4] and "@champion" in lines[1]
    assert "blocked" in lines[3] and "gate: blocked:" in listing.output

    out = cli.invoke(main, ["models", "promote", "4", "--reason", "reviewed the evaluation", *args])
    assert out.exit_code == 0, out.output
    assert "v1 -> v4" in out.output and _alias(story, "champion") == 4
    assert "awaiting_approval" not in _client(story).get_model_version(NAME, "4").tags
    audit = cli.invoke(main, ["models", "audit", *args]).output
    assert "reviewed the evaluation" in audit and "rollback" in audit
    bad = cli.invoke(main, ["models", "promote", "99", *args])
    assert bad.exit_code != 0 and "cannot promote version 99" in bad.output


def test_mlflow_models_predict_serves_the_champion(story, tmp_path):
    client = _client(story)
    champion = client.get_model_version_by_alias(NAME, "champion")
    path = client.download_artifacts(champion.run_id, "vocabulary/vocab.json", str(tmp_path))
    vocab = json.loads(Path(path).read_text())["raw_ids"]
    history = vocab[:4]
    payload = {"dataframe_split": {"columns": ["item_ids", "event_types", "timestamps_ms"],
                                   "data": [[history, ["listen"] * 4, [1_700_000_000_000 + i for i in range(4)]]]},
               "params": {"k": 5}}
    (tmp_path / "input.json").write_text(json.dumps(payload))
    env = {**os.environ, "MLFLOW_TRACKING_URI": story["uri"]}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", f"models:/{NAME}@champion",
         "-i", str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    rows = out["predictions"] if isinstance(out, dict) else out
    assert len(rows) == 1 and len(rows[0]["items"]) == 5
    assert not set(rows[0]["items"]) & set(history)  # seen items are excluded
    assert rows[0]["scores"] == sorted(rows[0]["scores"], reverse=True)


def test_loading_a_registered_model_leaves_no_download_behind(story, tmp_path, monkeypatch):
    """The service loads a model at start and on every alias move, the gate re-scores the champion for every
    challenger: each load downloads the artifact, and none may stay on disk once the weights are in memory."""
    import tempfile

    from models.lifecycle.registry import Registry

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # every temporary directory of this process lands here
    rec, version = Registry(story["uri"], story["settings"].registry).load(alias="champion")
    assert version == _alias(story, "champion")
    item = int(rec.vocab.decode([1])[0])
    assert len(rec.recommend([{"item_ids": [item], "event_types": ["listen"], "timestamps_ms": [0]}], k=5)[0]) == 5
    assert list(tmp_path.iterdir()) == []
