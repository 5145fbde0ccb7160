"""bench.ranking end to end on a tiny simulator: the last stdout line is the JSON report."""

from __future__ import annotations

import json

import torch

from bench.ranking import main


def test_ranking_bench_reports_metrics_on_a_tiny_simulator(capsys) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    argv = ["--users", "40", "--items", "80", "--requests", "300", "--slate", "6", "--negatives", "2",
            "--epochs", "1", "--seeds", "0"]
    main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "ranking" and out["dataset"] == "simulator"
    assert out["models"] == ["wukong", "dlrm"] and out["seeds"] == [0] and out["argv"] == argv
    assert set(out["metrics"]) == {"all", "shown"}
    for subset in out["metrics"].values():
        assert set(subset) == {"wukong", "dlrm", "popularity", "random", "oracle"}
        for scorer in subset.values():
            assert set(scorer) == {"engaged", "like", "skip"}
            for task in scorer.values():
                for metric in ("auc", "gauc"):
                    assert set(task[metric]) == {"mean", "sd", "per_seed"} and len(task[metric]["per_seed"]) == 1
                    assert all(v is None or 0.0 <= v <= 1.0 for v in task[metric]["per_seed"])
                    assert task[metric]["sd"] is None  # one seed
    # The simulated users' own probabilities are the ceiling: no model or floor scores shown items better.
    shown = out["metrics"]["shown"]
    oracle = shown["oracle"]["engaged"]["auc"]["mean"]
    assert oracle > 0.7 and all(shown[s]["engaged"]["auc"]["mean"] < oracle for s in shown if s != "oracle")
    counts = out["counts"]["per_seed"][0]
    assert counts["train"]["examples"] > 0 and counts["test"]["examples"] > 0
    assert counts["test"]["by_source"]["sampled"] > 0 and counts["test"]["by_source"]["shown"] > 0
    assert out["seconds"]["total"] > 0


def test_a_size_sweep_trains_every_model_at_every_size_on_the_same_data(capsys, tmp_path) -> None:  # noqa: ANN001
    import pytest

    torch.set_num_threads(1)
    sizes = "dim=4,layers=1,fmb_units=2,lcb_units=2,fmb_rank=2,mlp_hidden=8;dim=8,layers=2,mlp_hidden=16"
    argv = ["--users", "40", "--items", "80", "--requests", "200", "--slate", "6", "--negatives", "1", "--epochs", "1",
            "--seeds", "0,1", "--sizes", sizes, "--bootstrap", "50", "--plot", str(tmp_path / "sizes.png")]
    main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["metrics"]["shown"]) == {"wukong@1", "wukong@2", "dlrm@1", "dlrm@2", "popularity", "random", "oracle"}
    sweep = out["by_size"]
    assert (sweep["task"], sweep["subset"], sweep["sizes"]) == ("engaged", "shown", sizes.split(";"))
    for model in ("wukong", "dlrm"):
        m = sweep["models"][model]
        assert m["params"][0] < m["params"][1]  # the second size is larger
        assert m["auc"] == [out["metrics"]["shown"][f"{model}@{j}"]["engaged"]["auc"]["mean"] for j in (1, 2)]
        step = m["step"][0]  # size 2 minus size 1, seeds and users resampled
        assert step["ci_low"] <= step["ci_high"] and 0.0 <= step["p"] <= 1.0
        assert step["diff"] == pytest.approx(m["auc"][1] - m["auc"][0], abs=2e-4)
    assert sweep["references"] == {k: out["metrics"]["shown"][k]["engaged"]["auc"]["mean"] for k in ("popularity", "oracle")}
    assert len(sweep["wukong_minus_dlrm"]) == 2 and (tmp_path / "sizes.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # a sweep is for Wukong and DLRM, with two sizes or more
        main(["--sizes", "dim=4", "--seeds", "0"])


def test_the_ceiling_bench_takes_the_oracle_apart(capsys) -> None:  # noqa: ANN001
    """Every scorer of the ceiling is below the full oracle or level with it, and a guess of the user from the
    engaged plays knows more than no user at all (a world where the guess is wrong would fail this)."""
    from bench.ranking_ceiling import main as ceiling

    out = ceiling(["--users", "60", "--items", "120", "--requests", "400", "--seeds", "0", "--contexts", "8"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    auc = out["auc"]
    assert set(auc) == {"oracle", "pointwise", "pointwise, user unknown", "pointwise, user from engaged plays",
                        "pointwise, user from all events", "rank only"}
    assert all(0.5 < v <= auc["oracle"] + 1e-9 for v in auc.values())
    assert auc["pointwise, user from engaged plays"] > auc["pointwise, user unknown"]
    assert out["settings"]["contexts"] == 8 and out["wall_s"] > 0
