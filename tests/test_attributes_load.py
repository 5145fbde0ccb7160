"""Loading user and item attributes into Feast: the source's files (or the simulator's catalogue) through the
Dagster ``attributes_job`` (``encore attributes``), idempotent, with changes valid from the load on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from features.attributes import changed_rows, historical_attributes, source_attributes, sync_attributes
from features.feature_repo import feature_store
from infra.settings import EncoreSettings
from tests.test_ranking_features import write_ml100k

T0_MS = 1_700_000_000_000


def test_the_synthetic_source_is_the_simulators_catalogue_and_bad_sources_fail_clearly(tmp_path: Path) -> None:
    settings = EncoreSettings(data_dir=tmp_path)
    users, items = source_attributes("synthetic", settings)
    assert users is None and len(items) == settings.simulator.items
    assert items["genres"].map(len).eq(1).all() and items["album"].str.startswith("a").all()
    with pytest.raises(ValueError, match="unknown attribute source 'nope'"):
        source_attributes("nope", settings)
    with pytest.raises(ValueError, match="needs the dataset's folder"):
        source_attributes("ml-100k", settings)
    with pytest.raises(ValueError, match="no user or item attribute file"):
        source_attributes("ml-100k", settings, tmp_path)


def test_loading_twice_writes_nothing_and_a_change_holds_from_its_load(tmp_path: Path) -> None:
    settings = EncoreSettings(data_dir=tmp_path / "d")
    store = feature_store(settings)
    write_ml100k(tmp_path / "ml")
    users, items = source_attributes("ml-100k", settings, tmp_path / "ml")
    assert sync_attributes(store, settings, users=users, items=items, now_ms=T0_MS) == {
        "user_attributes": 4, "item_attributes": 20}
    assert sync_attributes(store, settings, users=users, items=items, now_ms=T0_MS + 1) == {
        "user_attributes": 0, "item_attributes": 0}
    moved = users.copy()
    moved.loc[moved["user_id"] == 2, "occupation"] = "programmer"
    assert sync_attributes(store, settings, users=moved, items=None, now_ms=T0_MS + 1000)["user_attributes"] == 1
    # the first load holds from before any event; the change only from its own load on
    entity = pd.DataFrame({"user_id": [2, 2, 2], "item_id": [1, 1, 1], "t_ms": [10**12, T0_MS + 999, T0_MS + 1000]})
    got = historical_attributes(store, settings, entity)
    assert got["occupation"].tolist() == ["other", "other", "programmer"]
    assert got["genres"].tolist()[0] == ["Comedy", "War"]


def test_changed_rows_compares_values_as_the_views_read_them() -> None:
    stored = pd.DataFrame({"item_id": [1, 2], "genres": [["a"], ["b"]], "album": ["", "x"],
                           "event_timestamp": pd.to_datetime([1, 2], unit="s", utc=True)})
    new = pd.DataFrame({"item_id": [1, 2, 3], "genres": [["a"], ["c"], []], "album": [None, "x", ""]})
    assert changed_rows(new, stored, "item_id", ("genres", "album"))["item_id"].tolist() == [2, 3]
    assert changed_rows(new, None, "item_id", ("genres", "album")) is new


def test_encore_attributes_runs_the_dagster_job_and_reports_errors(tmp_path: Path) -> None:
    from cli.main import main

    settings = EncoreSettings(data_dir=tmp_path / "d")
    write_ml100k(tmp_path / "ml")
    runner = CliRunner()
    ok = runner.invoke(main, ["attributes", "ml-100k", "--data-dir", str(settings.root),
                              "--dataset-dir", str(tmp_path / "ml")])
    assert ok.exit_code == 0, ok.output
    assert "4 users and 20 items read; 4 user and 20 item rows written" in ok.output
    again = runner.invoke(main, ["attributes", "ml-100k", "--data-dir", str(settings.root),
                                 "--dataset-dir", str(tmp_path / "ml")])
    assert "0 user and 0 item rows written" in again.output, again.output
    bad = runner.invoke(main, ["attributes", "ml-1m", "--data-dir", str(settings.root),
                               "--dataset-dir", str(tmp_path / "ml")])
    assert bad.exit_code != 0 and "no user or item attribute file" in bad.output
    online = feature_store(settings).get_online_features(["user_attributes:occupation", "item_attributes:genres"],
                                                         [{"user_id": 4, "item_id": 2}]).to_dict()
    assert online["occupation"] == ["writer"] and online["genres"] == [["Drama", "War"]]
