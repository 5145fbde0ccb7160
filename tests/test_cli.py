import subprocess
import sys

import pytest
from click.testing import CliRunner

from orchestration.cli import main

COMMANDS = ["run", "replay", "ingest", "train", "serve", "ab", "services", "ui"]


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
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "--help"], capture_output=True, text=True)
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
