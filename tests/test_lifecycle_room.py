"""The lifecycle room's own rules: one settings group names the registered model and its aliases for every
writer and reader, and one rule finds the MLflow tracking URI. A real sqlite MLflow registry, no server."""

from __future__ import annotations

import dataclasses
import json

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from infra.settings import EncoreSettings
from orchestration.resources import EncoreResource, MLflowResource, encore_resource
from tests.conftest import small_settings

NAMES = {"ENCORE_REGISTRY__MODEL_NAME": "team-recs", "ENCORE_REGISTRY__CHALLENGER_ALIAS": "candidate",
         "ENCORE_REGISTRY__CHAMPION_ALIAS": "live"}
PASSING_REPORT = {
    split: {"ndcg@10": value, "hr@10": value} for split, value in
    (("valid", 0.3), ("test", 0.3), ("popularity_valid", 0.1), ("popularity_test", 0.1))
} | {"sanity": {"finite_params": 1.0, "finite_scores": 1.0, "score_std": 0.1, "coverage": 0.5,
                "latency_p95_ms": 1.0}}


@dg.asset(name="evaluation", group_name="training")
def untrained_evaluation(encore: EncoreResource, mlflow_server: MLflowResource) -> dict:
    """Stands in for ``trained_model`` + ``evaluation``: an untrained model in its own training run, with an
    evaluation report the gate passes (the names are under test here, not the model)."""
    from models.data import build_sequences
    from models.lifecycle.tracking import TRAINING, experiment_name, training_run
    from models.recommender import Recommender, build_model
    from models.recipe import recipe_from_settings

    s = encore.settings()
    events = pd.DataFrame({"user_id": [1] * 6 + [2] * 6, "item_id": list(range(10, 16)) * 2,
                           "event_type": "listen", "timestamp_ms": range(12)})
    cfg = recipe_from_settings(s.train)
    seqs = build_sequences(events)
    rec = Recommender(build_model(cfg.model_config(len(seqs.vocab))), seqs.vocab,
                      metadata={"train_config": dataclasses.asdict(cfg)})
    with training_run(mlflow_server.resolve(s), experiment_name(s.mlflow_experiment, TRAINING), run_name="names",
                      params={}, tags={}, system_metrics=False, artifact_root=s.mlflow_dir / "artifacts") as run:
        pass
    out = s.root / "models" / "untrained"
    (out / "report").mkdir(parents=True, exist_ok=True)
    dataset = {"snapshot": "s0", "offset_ranges": {"0": [0, 11]}, "events": 12, "path": str(out / "none.parquet")}
    return {"dir": str(rec.save(out / "recommender")), "report_dir": str(out / "report"), "run_id": run.info.run_id,
            "family": "hstu", "params": 0, "test_metrics": {}, "evaluation": PASSING_REPORT, "dataset": dataset}


@pytest.mark.integration
def test_the_registry_settings_name_the_model_for_every_writer_and_reader(tmp_path, monkeypatch):
    from bench.serve import has_champion
    from cli.main import main
    from experiments.assignment import default_experiment
    from experiments.store import registry_target_checker
    from orchestration.assets import training as A
    from serving.app import model_pool

    for key, value in NAMES.items():
        monkeypatch.setenv(key, value)
    settings = small_settings(tmp_path / "encore")
    assert (settings.registry.model_name, settings.registry.challenger_alias,
            settings.registry.champion_alias) == ("team-recs", "candidate", "live")
    settings.mlflow_dir.mkdir(parents=True)
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"

    # writers: the Dagster assets register (challenger alias), judge (gate tags) and promote (champion alias)
    result = dg.materialize([untrained_evaluation, A.registered_model, A.promotion_gate, A.champion_model],
                            resources={"encore": encore_resource(settings), "mlflow_server": MLflowResource(
                                tracking_uri=uri)}, raise_on_error=False)
    assert result.success
    assert result.output_for_node("champion_model")["promoted"]
    client = MlflowClient(uri)
    assert {a: int(v) for a, v in client.get_registered_model("team-recs").aliases.items()} == {"candidate": 1,
                                                                                               "live": 1}
    assert client.get_model_version("team-recs", "1").tags["gate.passed"] == "true"
    with pytest.raises(MlflowException):
        client.get_registered_model("encore-recommender")  # no writer fell back to the default name

    # readers: the service's model pool, the experiment target checker, the default experiment, the bench
    pool = model_pool(settings, uri)
    assert pool.default_target == "alias:live"
    pool.ensure({pool.default_target})
    assert pool.default is not None and pool.default.version == 1
    check = registry_target_checker(settings, uri)
    assert check("alias:live") is None and check("alias:candidate") is None and check("version:1") is None
    assert "does not exist" in check("alias:champion") and "'team-recs'" in check("version:2")
    assert default_experiment(settings).variant("treatment").target == "alias:live"
    (settings.feast_dir).mkdir(parents=True)
    (settings.feast_dir / "online.db").touch()
    assert has_champion(settings)  # through the tracking-URI rule's sqlite fallback: nothing runs here

    # ... and the commands (same environment: the names come from ENCORE_REGISTRY__*)
    cli = CliRunner()
    listing = cli.invoke(main, ["models", "list", "--json", "--data-dir", str(settings.root)])
    assert listing.exit_code == 0, listing.output
    (row,) = json.loads(listing.output)
    assert row["version"] == 1 and row["aliases"] == ["candidate", "live"] and row["gate"] == "true"
    audit = cli.invoke(main, ["models", "audit", "--data-dir", str(settings.root)])
    assert "@candidate" in audit.output and "@live" in audit.output


def test_the_tracking_uri_rule(tmp_path):
    from models.lifecycle.tracking import tracking_uri

    settings = EncoreSettings(data_dir=tmp_path)
    with pytest.raises(RuntimeError, match="no MLflow registry"):
        tracking_uri(settings)
    assert tracking_uri(settings, "http://explicit:5000") == "http://explicit:5000"
    settings.mlflow_dir.mkdir(parents=True)
    (settings.mlflow_dir / "mlflow.db").touch()
    assert tracking_uri(settings) == f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="ENCORE_MLFLOW_TRACKING_URI"):
        tracking_uri(settings, file_fallback=False)  # writers need the server, not its database file
    settings.run_dir.mkdir(parents=True)
    (settings.run_dir / "endpoints.json").write_text(json.dumps({"mlflow_uri": "http://127.0.0.1:5999"}))
    assert tracking_uri(settings) == tracking_uri(settings, file_fallback=False) == "http://127.0.0.1:5999"
    configured = settings.model_copy(update={"mlflow_tracking_uri": "http://mlflow:5000"})
    assert tracking_uri(configured) == "http://mlflow:5000"
    assert tracking_uri(configured, "http://explicit:5000") == "http://explicit:5000"


def test_the_ab_report_run_lands_in_the_ab_experiment(tmp_path):
    from experiments.readout import _log_to_mlflow
    from experiments.report import ab_report, render_html
    from tests.test_analysis import TWO_ARMS, simulate

    settings = small_settings(tmp_path / "encore", mlflow_experiment="team")
    settings.mlflow_dir.mkdir(parents=True)
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    exposures, interactions, _ = simulate(200, effect=0.2, seed=1, salt="log", weights=TWO_ARMS)
    report = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS, name="ab-x")
    html = render_html(report, settings.reports_dir / "ab.html")
    _log_to_mlflow(uri, settings, html, report)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("team-ab").experiment_id])
    assert run.info.run_name == "ab-x" and "p_adj.hit_rate.treatment" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/ab.html",
                                                                                   "report/report.json"}


@pytest.mark.integration
def test_serving_refuses_a_model_that_reads_more_history_than_the_online_store_keeps(tmp_path):
    from models.lifecycle.registry import Registry
    from orchestration.assets import training as A
    from serving.app import ModelDoesNotFit, ModelHolder

    settings = small_settings(tmp_path / "encore")  # recipes read max_len = 20 events per user
    settings.mlflow_dir.mkdir(parents=True)
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    result = dg.materialize([untrained_evaluation, A.registered_model],
                            resources={"encore": encore_resource(settings), "mlflow_server": MLflowResource(
                                tracking_uri=uri)})
    assert result.success
    registry, target = Registry(uri, settings.registry), f"alias:{settings.registry.challenger_alias}"
    short = ModelHolder(registry, target, max_history=19)
    with pytest.raises(ModelDoesNotFit, match=r"reads 20 events per user .* keeps 19 \(ingest.history_length\)"):
        short.load()
    fetched = []
    registry.load = lambda **kw: fetched.append(kw)  # the next poll must neither fetch it again nor raise again
    assert short.load() is False and fetched == [] and short.current is None
    registry = Registry(uri, settings.registry)
    holder = ModelHolder(registry, target, max_history=20)
    assert holder.load() and holder.current.recommender.config.max_len == 20
