import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import main

COMMANDS = ["run", "replay", "ingest", "train", "serve", "ab", "services", "ui", "bootstrap", "models", "study",
            "bench"]


def test_help_lists_every_subcommand():
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    for cmd in COMMANDS:
        assert f"  {cmd}" in out.output


@pytest.mark.parametrize("args", [[c] for c in COMMANDS] + [["ab", "report"], ["services", "up"],
                                                             ["services", "stop"], ["services", "status"]])
def test_each_subcommand_has_help(args):
    out = CliRunner().invoke(main, [*args, "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage:" in out.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "replay" in out.stdout


def test_replay_reports_malformed_lines_of_a_file(tmp_path, broker):
    settings, bootstrap = broker
    f = tmp_path / "events.jsonl"
    f.write_text(
        '{"event_id": "a", "user_id": 1, "item_id": 2, "event_type": "listen", "timestamp_ms": 1700000000000}\n'
        '{"event_id": "b", "user_id": 1, "item_id": 2, "event_type": "zap", "timestamp_ms": 1700000000000}\n'
        "not json at all\n"
    )
    out = CliRunner().invoke(main, ["replay", str(f), "--bootstrap", bootstrap], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "sent 1 events" in out.output
    assert "line 2: event_type" in out.output and "line 3: not valid JSON" in out.output


def test_replay_of_an_unknown_source_is_a_clear_error(tmp_path):
    out = CliRunner().invoke(main, ["replay", "nope-dataset", "--bootstrap", "127.0.0.1:1"])
    assert out.exit_code != 0 and "unknown source" in out.output


TINY_CONFIG = """model: hstu
max_len: 20
dim: 16
negatives: 16
batch_size: 64
epochs: 1
"""


def _small_world(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("ENCORE_DATA_DIR", str(tmp_path / "encore"))
    for key, value in {"USERS": "80", "ITEMS": "100", "SESSIONS_PER_USER": "3", "EVENTS_PER_SESSION": "8"}.items():
        monkeypatch.setenv(f"ENCORE_SIMULATOR__{key}", value)


def test_train_prints_its_metrics_as_the_last_line_and_saves_the_model(tmp_path, monkeypatch):
    import json

    from models.recommender import Recommender

    _small_world(monkeypatch, tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG)
    runs = [CliRunner().invoke(main, ["train", "--config", str(cfg), "--seed", str(seed), "--out",
                                      str(tmp_path / f"model-{seed}")], catch_exceptions=False)
            for seed in (7, 7, 8)]
    results = []
    for out in runs:
        assert out.exit_code == 0, out.output
        results.append(json.loads(out.output.strip().splitlines()[-1]))
    for key in ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"):
        assert 0.0 <= results[0][key] <= 1.0
    assert results[0]["config"] == str(cfg) and results[0]["epochs"] == 1 and results[0]["wall_s"] > 0
    assert [r["seed"] for r in results] == [7, 7, 8]
    metrics = [{k: v for k, v in r.items() if k not in ("wall_s", "seed")} for r in results]
    assert metrics[0] == metrics[1], "the same seed must reproduce the same model"
    assert metrics[0] != metrics[2], "another seed must train another model"
    assert Recommender.load(tmp_path / "model-7").config.num_items > 0


@pytest.mark.parametrize("args, message", [
    (["--config", "no-such-config"], "no recipe 'no-such-config'"),
    (["--dataset", "ml-100k"], "needs --dataset-dir"),
])
def test_train_rejects_bad_input_with_a_clear_error(tmp_path, monkeypatch, args, message):
    _small_world(monkeypatch, tmp_path)
    out = CliRunner().invoke(main, ["train", *args])
    assert out.exit_code == 1 and message in out.output, out.output
    assert "Traceback" not in out.output


def test_train_names_a_malformed_item_file_before_training(tmp_path, monkeypatch):
    # the item file sets the catalogue (unrated movies are candidates): a bad line stops the run up front
    _small_world(monkeypatch, tmp_path)
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n")
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\nTwo::Jumanji (1995)::Adventure\n")
    out = CliRunner().invoke(main, ["train", "--dataset", "ml-1m", "--dataset-dir", str(tmp_path)])
    assert out.exit_code == 1 and "movies.dat, line 2: expected an item id" in out.output, out.output
    assert "Traceback" not in out.output
