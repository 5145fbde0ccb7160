"""Scaling study: the grid and its points, and the whole study through ``encore study scaling`` (real Dagster
instance under the data dir, real sqlite MLflow, real training on a small simulated world)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from infra.settings import EncoreSettings, ScalingSettings
from models.scaling import BACKBONES, PointSpec, grid, parse_size, power_law_fit, user_fraction


def test_power_law_fit_recovers_a_known_exponent():
    x = np.geomspace(1e3, 1e7, 6)
    fit = power_law_fit(x, 3.0 * x ** -0.076)
    assert fit["b"] == pytest.approx(-0.076, abs=1e-9) and fit["a"] == pytest.approx(3.0, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["points"] == 6
    assert math.isnan(power_law_fit([10], [1.0])["b"])


def test_point_keys_name_their_spec_and_refuse_anything_else():
    for backbone in BACKBONES:
        spec = PointSpec(backbone, 24, 2, 0.25, 3, 1)
        assert PointSpec.from_key(spec.key) == spec
    assert PointSpec("hstu-no-rab", 8, 1, 1.0, 2, 0).key == "hstu-no-rab-d8b1-f1-e2-s0"
    for bad in ("hstu-d8-f1-e2-s0", "bert-d8b1-f1-e2-s0", "hstu-d8b1-f1-e2"):
        with pytest.raises(ValueError, match="not a scaling point key"):
            PointSpec.from_key(bad)
    assert parse_size("d48b3") == (48, 3)
    with pytest.raises(ValueError, match="d<width>b<blocks>"):
        parse_size("48x3")


def test_grid_sweeps_data_only_for_the_fraction_backbones():
    sc = ScalingSettings(backbones=["hstu", "sasrec"], sizes=["d8b1", "d16b1", "d32b2"], data_fractions=[0.5, 1.0],
                         fraction_backbones=["hstu"], seeds=[0, 1], epochs=2)
    points = grid(sc)
    assert len(points) == 2 * 3 * 2 + 1 * 3 * 2 and len({p.key for p in points}) == len(points)
    assert {p.fraction for p in points if p.backbone == "sasrec"} == {1.0}
    assert {p.fraction for p in points if p.backbone == "hstu"} == {0.5, 1.0}
    with pytest.raises(ValueError, match="unknown backbones"):
        grid(sc.model_copy(update={"backbones": ["hstu", "bert"]}))
    with pytest.raises(ValueError):
        ScalingSettings(data_fractions=[0.0, 1.0])


def test_user_fractions_are_nested():
    df = pd.DataFrame({"user_id": np.repeat(np.arange(40), 3), "item_id": 1})
    quarter, half = (set(user_fraction(df, f, seed=0).user_id) for f in (0.25, 0.5))
    assert len(quarter) == 10 and len(half) == 20 and quarter < half
    assert len(user_fraction(df, 1.0)) == len(df)


@pytest.mark.integration
def test_scaling_study_end_to_end_through_the_cli(tmp_path, monkeypatch):
    from cli.main import main

    root = tmp_path / "encore"
    (root / "mlflow").mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    env = {"ENCORE_DATA_DIR": str(root), "ENCORE_MLFLOW_TRACKING_URI": uri, "ENCORE_SCALING__WORLD_USERS": "60",
           "ENCORE_SIMULATOR__ITEMS": "120", "ENCORE_SIMULATOR__SESSIONS_PER_USER": "3",
           "ENCORE_SIMULATOR__EVENTS_PER_SESSION": "8",
           "ENCORE_SCALING__OVERRIDES": json.dumps({"max_len": 20, "negatives": 16, "batch_size": 64})}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = ["study", "scaling", "--name", "t", "--backbones", "hstu,sasrec", "--sizes", "d4b1,d8b1,d16b1",
            "--fractions", "0.5,1", "--seeds", "0", "--epochs", "1"]
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "9 to train" in out.output and "L(N)" in out.output

    settings = EncoreSettings()
    study = settings.root / "studies" / "scaling" / "t"
    points = [json.loads(p.read_text()) for p in sorted((study / "points").glob("*.json"))]
    assert len(points) == 9
    hstu = sorted((p for p in points if p["backbone"] == "hstu" and p["fraction"] == 1.0), key=lambda p: p["dim"])
    assert [p["dim"] for p in hstu] == [4, 8, 16] and hstu[0]["params"] < hstu[1]["params"] < hstu[2]["params"]
    assert all(p["params"] < p["params_all"] and p["compute"] == 6.0 * p["params"] * p["tokens"] for p in points)
    half = next(p for p in points if p["key"] == "hstu-d8b1-f0.5-e1-s0")
    assert half["tokens"] < hstu[1]["tokens"] and half["users"] == 24 and half["heldout_users"] == 12
    assert all(p["eval_loss"] > 0 and 0 <= p["ndcg@10"] <= 1 for p in points)
    summary = json.loads((study / "fits" / "summary.json").read_text())
    assert set(summary["backbones"]) == {"hstu", "sasrec"}
    assert all(summary["backbones"][b]["L_N"]["n"] == 3 for b in ("hstu", "sasrec"))
    assert {"loss_vs_params"} <= {p.stem for p in (study / "fits").glob("*.png")} | {"loss_vs_params"}
    assert len(list((study / "fits").glob("*.png"))) >= 2

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("encore-scaling")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`encore.study` = 't'")
    assert len(runs) == 10  # 9 points + the fits
    fits_run = next(r for r in runs if r.info.run_name == "t-fits")
    assert "hstu_alpha" in fits_run.data.metrics or "hstu_r2_log" in fits_run.data.metrics
    assert any(a.path == "scaling/report.md" for a in client.list_artifacts(fits_run.info.run_id, "scaling"))

    # resumable: a second run trains nothing new and fits the same points again
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and "9 already trained, 0 to train" in again.output
