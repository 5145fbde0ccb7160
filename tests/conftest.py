"""Shared fixtures: real embedded services (tansu broker, MLflow server) on temporary data dirs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from infra.settings import EncoreSettings

logging.getLogger("kafka").setLevel(logging.CRITICAL)


def small_settings(data_dir: Path, **overrides: object) -> EncoreSettings:
    """A platform small enough for tests on 2 CPU cores."""
    base: dict = {
        "data_dir": data_dir,
        "simulator": {"users": 120, "items": 150, "sessions_per_user": 3, "events_per_session": 10, "seed": 3},
        "train": {"overrides": {"epochs": 2, "dim": 16, "max_len": 20, "negatives": 16, "batch_size": 64}},
        "experiment": {"users": 60, "requests_per_user": 2},
        "ingest": {"batch_size": 2000, "poll_timeout_ms": 1500},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return EncoreSettings(**base)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests build their settings explicitly; a developer's ENCORE_* variables must not leak in.
    for key in list(os.environ):
        if key.startswith("ENCORE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def broker(tmp_path: Path):
    """A fresh tansu broker with Encore's topics; yields (settings, bootstrap)."""
    from infra.services import EmbeddedServices

    settings = small_settings(tmp_path / "encore")
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        yield settings, svc.kafka_bootstrap
