"""Shared fixtures: real embedded services (tansu broker, MLflow server) on temporary data dirs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from infra.settings import EncoreSettings

logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (restored after it): two threads beside another busy process spend most
    of their time waiting. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def simulated_slates(*, users: int, items: int, requests: int, slate: int, seed: int, sessions_per_user: int,
                     events_per_session: int, t0_ms: int = 1_700_000_000_000):  # -> (interactions, exposures)
    """A simulated world's organic history until ``t0_ms``, then ``requests`` slates of ``slate`` uniformly drawn
    items, one a minute, each to a random user who reacts (``MusicWorld.respond``): the served log the ranking
    tests learn from, as two frames."""
    from features.simulator import MusicWorld
    from infra.settings import SimulatorSettings

    world = MusicWorld(SimulatorSettings(users=users, items=items, sessions_per_user=sessions_per_user,
                                         events_per_session=events_per_session, seed=seed))
    history = world.history_frame(end_ms=t0_ms)
    rng = np.random.default_rng(seed)
    exposures, reactions = [], []
    for n in range(requests):
        user = int(rng.integers(users))
        items_shown = rng.choice(items, size=slate, replace=False).tolist()
        request, now = f"req-{n}", t0_ms + 60_000 * (n + 1)
        exposures.append({"request_id": request, "user_id": user, "timestamp_ms": now, "items": items_shown})
        reactions += [e.model_dump() for e in world.respond(user, items_shown, request_id=request, variant="control",
                                                            now_ms=now)]
    return pd.concat([history, pd.DataFrame(reactions)], ignore_index=True), pd.DataFrame(exposures)


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


def attribute_frames(users: int, items: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Static attributes of ``users`` users and ``items`` items (valid since forever), in the frames
    ``features.attributes`` loads: users' gender, age and occupation, items' genres and album."""
    user_rows = pd.DataFrame({"user_id": np.arange(users), "gender": ["MF"[u % 2] for u in range(users)],
                              "age": [(18, 25, 35)[u % 3] for u in range(users)],
                              "occupation": [f"job{u % 4}" for u in range(users)]})
    item_rows = pd.DataFrame({"item_id": np.arange(items), "genres": [["Jazz"] if i % 2 else ["Rock", "Pop"]
                                                                      for i in range(items)],
                              "album": [f"a{i % 5}" for i in range(items)]})
    return user_rows, item_rows
