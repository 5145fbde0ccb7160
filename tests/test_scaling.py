"""Scaling study: the power-law fit itself, and the Dagster asset on real data with a real sqlite MLflow."""

from __future__ import annotations

import json
import math
import os

import dagster as dg
import numpy as np
import pytest
from mlflow import MlflowClient

from models.scaling import power_law_fit
from orchestration.resources import FeastResource, MLflowResource, encore_resource
from tests.conftest import small_settings
from tests.test_lifecycle import seed_offline_store


def test_power_law_fit_recovers_a_known_exponent():
    x = np.geomspace(1e3, 1e7, 6)
    fit = power_law_fit(x, 3.0 * x ** -0.076)
    assert fit["b"] == pytest.approx(-0.076, abs=1e-9) and fit["a"] == pytest.approx(3.0, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["points"] == 6
    noisy = power_law_fit(x, 3.0 * x ** -0.076 * np.exp(np.random.default_rng(0).normal(0, 0.01, 6)))
    assert abs(noisy["b"] + 0.076) < 0.01 and 0.9 < noisy["r2"] < 1.0


def test_power_law_fit_ignores_unusable_points():
    fit = power_law_fit([10, 100, 0, 1000], [1.0, 0.5, 2.0, float("nan")])
    assert fit["points"] == 2 and fit["b"] == pytest.approx(math.log(0.5) / math.log(10))
    assert math.isnan(power_law_fit([10], [1.0])["b"])


@pytest.mark.integration
def test_scaling_study_asset_logs_fit_and_plot(tmp_path):
    for key in [k for k in os.environ if k.startswith("ENCORE_")]:
        os.environ.pop(key)
    from orchestration.assets.studies import scaling_study
    from orchestration.assets.training import training_dataset

    root = tmp_path / "encore"
    (root / "mlflow").mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    settings = small_settings(root, mlflow_tracking_uri=uri, kafka_bootstrap="127.0.0.1:9",
                              scaling={"dims": [8, 16], "data_fractions": [0.5, 1.0], "epochs": 1})
    seed_offline_store(settings)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [training_dataset, scaling_study], instance=instance,
            resources={"encore": encore_resource(settings), "feast": FeastResource(),
                       "mlflow_server": MLflowResource()})
        assert result.success
        study = result.output_for_node("scaling_study")
        meta = instance.get_latest_materialization_event(dg.AssetKey("scaling_study")).asset_materialization.metadata
    points = study["points"]
    assert [(p["fraction"], p["dim"]) for p in points] == [(0.5, 8), (0.5, 16), (1.0, 8), (1.0, 16)]
    assert points[1]["params"] > points[0]["params"] and points[2]["compute"] > points[0]["compute"]
    assert all(p["eval_loss"] > 0 and 0 <= p["ndcg@10"] <= 1 for p in points)
    # one epoch: tokens are the training windows' input events, fewer than the events (targets are not inputs)
    assert all(p["compute"] == 6.0 * p["params"] * p["tokens"] and 0 < p["tokens"] < p["events"] for p in points)
    assert set(study["fits"]) == {"eval_loss~params", "eval_loss~compute", "ndcg@10~params", "ndcg@10~compute"}
    assert all(f["points"] == 4 and np.isfinite(f["b"]) for f in study["fits"].values())
    assert "data:image/png;base64," in meta["plot"].value and "exponent" in meta["fits"].value

    client = MlflowClient(uri)
    run = client.get_run(study["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "encore-scaling"
    assert "eval_loss_vs_params_b" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(study["run_id"], "scaling")}
    assert {"scaling/scaling.png", "scaling/fits.json", "scaling/points.csv"} <= arts
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{study['run_id']}'")
    assert len(children) == 4
    assert json.loads((tmp_path / "encore" / "studies").glob("*/fits.json").__next__().read_text()) == study["fits"]
