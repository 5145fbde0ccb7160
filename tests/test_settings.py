from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import EncoreSettings


def test_defaults_put_everything_under_data_dir(tmp_path: Path):
    s = EncoreSettings(data_dir=tmp_path)
    for p in (s.offline_dir, s.feast_dir, s.mlflow_dir, s.dagster_home, s.reports_dir, s.run_dir):
        assert tmp_path.resolve() in p.parents


def test_environment_overrides_nested_values(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_SIMULATOR__USERS", "77")
    monkeypatch.setenv("ENCORE_TRAIN__MODEL", "sasrec")
    s = EncoreSettings()
    assert s.simulator.users == 77 and s.train.model == "sasrec"


def test_yaml_file_then_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "encore.yaml"
    cfg.write_text("simulator:\n  users: 11\n  items: 22\ntrain:\n  epochs: 3\n")
    monkeypatch.setenv("ENCORE_CONFIG", str(cfg))
    monkeypatch.setenv("ENCORE_TRAIN__EPOCHS", "5")
    s = EncoreSettings()
    assert s.simulator.users == 11 and s.simulator.items == 22
    assert s.train.epochs == 5  # environment beats the file


def test_bad_values_are_rejected_clearly(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_SIMULATOR__USERS", "-1")
    with pytest.raises(ValidationError, match="users"):
        EncoreSettings()


def test_unknown_keys_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "encore.yaml"
    cfg.write_text("simulatr:\n  users: 11\n")
    monkeypatch.setenv("ENCORE_CONFIG", str(cfg))
    with pytest.raises(ValidationError, match="simulatr"):
        EncoreSettings()


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("ENCORE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="ENCORE_CONFIG"):
        EncoreSettings()
