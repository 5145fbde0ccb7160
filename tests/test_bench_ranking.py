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
        assert set(subset) == {"wukong", "dlrm", "popularity", "random"}
        for scorer in subset.values():
            assert set(scorer) == {"engaged", "like", "skip"}
            for task in scorer.values():
                for metric in ("auc", "gauc"):
                    assert set(task[metric]) == {"mean", "sd", "per_seed"} and len(task[metric]["per_seed"]) == 1
                    assert all(v is None or 0.0 <= v <= 1.0 for v in task[metric]["per_seed"])
                    assert task[metric]["sd"] is None  # one seed
    counts = out["counts"]["per_seed"][0]
    assert counts["train"]["examples"] > 0 and counts["test"]["examples"] > 0
    assert counts["test"]["by_source"]["sampled"] > 0 and counts["test"]["by_source"]["shown"] > 0
    assert out["seconds"]["total"] > 0
