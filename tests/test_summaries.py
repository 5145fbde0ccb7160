"""VISTA's cached summaries on the platform (issue #36): the incremental refresh is exact, a summary of another
summariser version is refused, the Dagster asset backfills then refreshes against a real Feast repo and a
real MLflow registry, serving uses the cached state (and says stale without one), the gate ties a VISTA
version to its backfilled summaries."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from models.data import ItemVocab
from models.recommender import Recommender, build_model
from models.recipe import resolve_recipe
from models.summaries import (CACHED, LAGGING, STALE, SummariserMismatch, known_events, refresh_summaries,
                              serving_states)
from models.vista import SummaryState
from tests.conftest import small_settings

K, D, RECENT = 8, 16, 8
T0 = 1_700_000_000_000
ITEMS = np.arange(100, 160)


def vista(seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    cfg = resolve_recipe("vista", dim=D, max_len=RECENT, vista_tokens=K, blocks=1, heads=1)
    vocab = ItemVocab.build(ITEMS)
    return Recommender(build_model(cfg.model_config(len(vocab))), vocab)


def world(seed: int = 0) -> pd.DataFrame:
    """Users of 3..300 events over a month, some items unknown to the model, and runs of same-millisecond
    events (the order of which only the (time, item, type) key decides)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user, n in enumerate([3, 8, 9, 40, 120, 300]):
        ts = np.sort(rng.integers(T0, T0 + 30 * 86_400_000, n))
        for lo in range(5, n - 4, 17):
            ts[lo:lo + 4] = ts[lo]  # four events in one millisecond
        for t in ts:
            rows.append((user, int(rng.integers(95, 165)), str(rng.choice(["listen", "like", "skip"])), int(t)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp_ms"])


def from_scratch(rec: Recommender, events: pd.DataFrame) -> dict[int, SummaryState]:
    """The reference: each user's known events but the last RECENT, summarised in one pass by the model."""
    out = {}
    for user, g in known_events(rec, events).groupby("user_id"):
        older = g.iloc[: max(len(g) - RECENT, 0)]
        out[int(user)] = rec.summarise([{"item_ids": older.item_id.tolist(), "event_types": older.event_type.tolist(),
                                         "timestamps_ms": older.timestamp_ms.tolist()}])
    return out


def states(table: pd.DataFrame) -> dict[int, SummaryState]:
    return {int(u): SummaryState.from_bytes([s], K, D) for u, s in zip(table.user_id, table.state)}


def assert_same(a: SummaryState, b: SummaryState) -> None:
    assert int(a.count) == int(b.count) and int(a.last_time) == int(b.last_time)
    finite = torch.isfinite(b.log_mass)
    assert torch.equal(torch.isfinite(a.log_mass), finite)
    torch.testing.assert_close(a.log_mass[finite], b.log_mass[finite], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=2e-3, rtol=0)  # fp16 storage of P


# ---------------------------------------------------------------------------------------------------- refresh


def _split_inside_ties(rec: Recommender, events: pd.DataFrame) -> pd.DataFrame:
    """Each user's first events, cut so that the first refresh's summary ends inside a same-millisecond run:
    its newest summarised event has the same time as the next, unsummarised one."""
    parts = []
    for _, g in known_events(rec, events).groupby("user_id"):
        ms = g.timestamp_ms.to_numpy()
        ties = [p for p in range(10, len(ms) - 1) if ms[p] == ms[p + 1]]
        parts.append(g.head(ties[0] + 1 + RECENT) if ties else g.head(len(g) // 2))
    return pd.concat(parts)


def test_an_incremental_refresh_equals_a_summary_from_scratch_over_the_same_events():
    rec, events = vista(), world()
    first = _split_inside_ties(rec, events)
    early = refresh_summaries(rec, first, None, recent=RECENT)
    cut_ms = int(events.timestamp_ms.quantile(0.8))
    middle = refresh_summaries(rec, events[events.timestamp_ms <= cut_ms], early, recent=RECENT, chunk=16)
    late = refresh_summaries(rec, events, middle, recent=RECENT, chunk=16)  # small chunks: users folded in pieces
    full = refresh_summaries(rec, events, None, recent=RECENT)
    split = early[early.events_summarised > 0].set_index("user_id").summarised_until_ms
    assert (split.to_numpy() == [first[first.user_id == u].timestamp_ms.iloc[-RECENT] for u in split.index]).sum() >= 2
    assert late.attrs["events_folded"] < full.attrs["events_folded"]  # the last refresh folded only new events
    assert late.attrs["events_folded"] + middle.attrs["events_folded"] + early.attrs["events_folded"] \
        == full.attrs["events_folded"]
    cols = ["user_id", "events_summarised", "summarised_until_ms", "summarised_until_item", "summarised_until_type"]
    pd.testing.assert_frame_equal(late[cols], full[cols])
    reference = from_scratch(rec, events)
    for user, state in states(late).items():
        assert_same(state, reference[user])
        assert_same(states(full)[user], reference[user])
    # every user with events before the recent window has them all summarised; the others an empty state
    n_known = known_events(rec, events).groupby("user_id").size()
    assert (late.set_index("user_id").events_summarised == (n_known - RECENT).clip(lower=0)).all()


def test_a_refresh_with_nothing_new_changes_nothing_and_folds_nothing():
    rec, events = vista(), world()
    full = refresh_summaries(rec, events, None, recent=RECENT)
    again = refresh_summaries(rec, events, full, recent=RECENT)
    assert again.attrs["events_folded"] == 0
    pd.testing.assert_frame_equal(again.reset_index(drop=True), full.reset_index(drop=True))


def test_a_late_event_inside_the_summarised_prefix_resummarises_its_user_and_is_not_lost():
    rec, events = vista(), world()
    full = refresh_summaries(rec, events, None, recent=RECENT)
    # a late event for user 5 (300 events), older than everything the state summarises, and a known item
    late_row = pd.DataFrame([(5, 120, "like", T0 - 86_400_000)], columns=events.columns)
    with_late = pd.concat([events, late_row], ignore_index=True)
    again = refresh_summaries(rec, with_late, full, recent=RECENT)
    assert again.attrs["users_resummarised"] == 1 and again.attrs["users_folded"] == 1
    reference = from_scratch(rec, with_late)
    assert int(states(again)[5].count) == int(states(full)[5].count) + 1
    for user, state in states(again).items():
        assert_same(state, reference[user])  # user 5 from scratch, everyone else untouched
    others = again[again.user_id != 5].reset_index(drop=True)
    pd.testing.assert_frame_equal(others, full[full.user_id != 5].reset_index(drop=True))
    # once caught up, nothing is late any more
    assert refresh_summaries(rec, with_late, again, recent=RECENT).attrs["users_resummarised"] == 0


def test_states_of_another_summariser_version_are_refused():
    events = world()
    old = refresh_summaries(vista(seed=0), events, None, recent=RECENT)
    other = vista(seed=1)
    assert other.summariser_version != old.summariser_version[0]
    with pytest.raises(SummariserMismatch, match="backfill"):
        refresh_summaries(other, events, old, recent=RECENT)


# ---------------------------------------------------------------------------------------------------- serving


def _history(events: pd.DataFrame, user: int, n: int = 200) -> dict:
    """The user's online history: the last n events in the online store's (time, item, type) order."""
    g = events[events.user_id == user].drop_duplicates(["timestamp_ms", "item_id", "event_type"])
    g = g.sort_values(["timestamp_ms", "item_id", "event_type"]).tail(n)
    return {"item_ids": g.item_id.tolist(), "event_types": g.event_type.tolist(),
            "timestamps_ms": g.timestamp_ms.tolist()}


def test_serving_folds_the_events_the_cache_has_not_seen_and_marks_stale_without_a_cache():
    rec, events = vista(), world()
    user = 5  # 300 events: the history holds the last 200, the cache was refreshed 30 events ago
    cutoff = np.sort(events[events.user_id == user].timestamp_ms.to_numpy())[-31]
    cached = refresh_summaries(rec, events[events.timestamp_ms < cutoff], None, recent=RECENT)
    row = cached.set_index("user_id").loc[user].to_dict()
    history = _history(events, user)
    other = refresh_summaries(vista(seed=1), events, None, recent=RECENT).set_index("user_id").loc[user].to_dict()
    hs = [{**history, "summary": row}, {**history, "summary": None}, {**history, "summary": other}]
    got, marks = serving_states(rec, hs, history_length=1_000)
    assert marks == [CACHED, STALE, STALE]
    assert got[1] is None and got[2] is None
    assert_same(got[0], from_scratch(rec, events)[user])  # the cache + the 30 newer older events = everything
    # a cache whose newest event shares its millisecond with older events it has not summarised: exact too
    tied = refresh_summaries(rec, _split_inside_ties(rec, events), None, recent=RECENT).set_index("user_id")
    got4, marks4 = serving_states(rec, [{**_history(events, 4), "summary": tied.loc[4].to_dict()}])
    assert marks4 == [CACHED]
    assert_same(got4[0], from_scratch(rec, events)[4])
    # (seen items not excluded: the full history has seen more than the online one)
    with_cache = rec.recommend(hs, k=5, summaries=got, exclude_seen=False)
    assert with_cache[0] != with_cache[1]  # the whole life is not the 200 events the history holds
    exact = rec.recommend([_history(events, user, n=10_000)], k=5, exclude_seen=False)[0]  # every event, one pass
    assert [i for i, _ in with_cache[0]] == [i for i, _ in exact]
    np.testing.assert_allclose([s for _, s in with_cache[0]], [s for _, s in exact], atol=2e-3)


def test_a_cache_older_than_the_online_history_reaches_is_used_and_marked_lagging():
    rec, events = vista(), world()
    mine = events[events.user_id == 5].sort_values("timestamp_ms")
    early = refresh_summaries(rec, mine.iloc[:50], None, recent=RECENT).set_index("user_id").loc[5].to_dict()
    history = _history(events, 5)  # the last 200 of 300 events: the 50 first ones are not in it
    got, marks = serving_states(rec, [{**history, "summary": early}], history_length=200)
    assert marks == [LAGGING]
    # the cache's 42 events plus the history's older ones: the 58 events in between are missing
    older_in_history = int((rec.vocab.encode(history["item_ids"]) > 0).sum()) - RECENT
    assert int(got[0].count) == int(early["events_summarised"]) + older_in_history
    assert serving_states(rec, [{**history, "summary": early}], history_length=1_000)[1] == [CACHED]


def test_a_history_behind_the_cache_is_not_read_with_it():
    rec, events = vista(), world()
    row = refresh_summaries(rec, events, None, recent=RECENT).set_index("user_id").loc[4].to_dict()
    old = events[(events.user_id == 4)].sort_values("timestamp_ms").iloc[:-3]  # the online history lags by 3
    states_, marks = serving_states(rec, [{**_history(old, 4), "summary": row}])
    assert marks == [STALE] and states_ == [None]  # else events would be read twice (cached and raw)


# ---------------------------------------------------------------------------------------------------- lifecycle


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """One real MLflow store (SQLite) for the module: (tracking uri, a run to register versions from)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client.create_run(client.create_experiment("models", artifact_location=str(root / "artifacts")))


def registry_of(mlflow_run: tuple[str, object], name: str, versions: int = 2):  # noqa: ANN201 - a Registry
    """A registered model ``name`` of ``versions`` empty versions (the gate reads tags and aliases only)."""
    from mlflow import MlflowClient

    from infra.settings import RegistrySettings
    from models.lifecycle.registry import Registry

    uri, run = mlflow_run
    client = MlflowClient(uri)
    client.create_registered_model(name)
    for _ in range(versions):
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return Registry(uri, RegistrySettings(model_name=name))


def test_the_gate_refuses_a_vista_version_until_its_own_summaries_are_backfilled(mlflow_run):
    from models.lifecycle.gate import GateDecision, summaries_check, with_summaries
    from models.lifecycle.promotion import SummariesNotReady, promote

    registry = registry_of(mlflow_run, "gate-test", versions=3)
    registry.set_tags(1, {"model": "hstu"})
    registry.set_tags(2, {"model": "vista", "summariser_version": "abc123abc123"})
    assert summaries_check(registry.tags(1), {}) is None  # not a vista model: no such check
    promote(registry, 1, reason="first")
    with pytest.raises(SummariesNotReady, match="no cached summaries of summariser abc123abc123"):
        promote(registry, 2, reason="vista")
    registry.record_summaries("0123456789ab", {"users": 3})  # another summariser's backfill
    with pytest.raises(SummariesNotReady, match="mismatch"):
        promote(registry, 2, reason="vista")
    ok, why = summaries_check(registry.tags(2), registry.summary_backfills())
    passed = GateDecision(True, "test_ndcg@10", 0.3, None, None, 0.1, {"finite": True})
    blocked = with_summaries(passed, (ok, why))
    assert not blocked.passed and blocked.checks["summaries_backfilled"] is False and "mismatch" in blocked.summary
    registry.record_summaries("abc123abc123", {"users": 3})
    assert with_summaries(passed, summaries_check(registry.tags(2), registry.summary_backfills())).passed
    assert promote(registry, 2, reason="vista")["to"] == 2
    assert registry.champion_version() == 2
    # rolling back onto a VISTA version is never refused, and says which summaries to refresh
    from models.lifecycle.promotion import rollback

    registry.set_tags(3, {"model": "hstu"})
    promote(registry, 3, reason="back to hstu")
    entry = rollback(registry, reason="drill")
    assert entry["to"] == 2 and "user_summaries partition abc123abc123" in entry["summaries"]


# ---------------------------------------------------------------------------------------------------- Dagster


def _write_offline(settings, events: pd.DataFrame, first_offset: int = 0) -> None:  # noqa: ANN001
    from features.events import InteractionEvent
    from features.offline_store import OfflineStore, StagedEvent

    store = OfflineStore(settings.offline_dir)
    try:
        store.write([StagedEvent(InteractionEvent(event_id=f"e{first_offset + i}", user_id=int(r.user_id),
                                                  item_id=int(r.item_id), event_type=r.event_type,
                                                  timestamp_ms=int(r.timestamp_ms)), 0, first_offset + i)
                     for i, r in enumerate(events.itertuples())])
    finally:
        store.close()


def test_the_asset_backfills_then_folds_only_new_events_and_the_service_answers_from_them(tmp_path, mlflow_run):
    from features.feature_repo import feature_store
    from models.lifecycle.registry import Registry
    from orchestration.assets.summaries import summaries_path, user_summaries
    from orchestration.resources import FeastResource, MLflowResource, encore_resource
    from serving.app import HistoryReader

    uri, run = mlflow_run
    settings = small_settings(tmp_path / "encore", mlflow_tracking_uri=uri)
    rec, events = vista(), world()
    registry = Registry(uri, settings.registry)
    example = pd.DataFrame({"item_ids": [[100, 101]], "event_types": [["listen", "like"]],
                            "timestamps_ms": [[T0, T0 + 1000]]})
    reg = registry.register(rec, run_id=run.info.run_id, metrics={}, tags={"model": "vista"}, input_example=example)
    version = rec.summariser_version
    assert registry.tags(reg.version)["summariser_version"] == version  # the lifecycle tie
    cut = int(events.timestamp_ms.quantile(0.7))
    _write_offline(settings, events[events.timestamp_ms < cut])

    instance = dg.DagsterInstance.ephemeral()
    resources = {"encore": encore_resource(settings), "feast": FeastResource(), "mlflow_server": MLflowResource()}
    # the sensor sees the challenger's new summariser version: a partition and its backfill run
    from orchestration.sensors import summaries_sensor

    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        tick = summaries_sensor(ctx)
    assert [r.partition_keys for r in tick.dynamic_partitions_requests] == [[version]]
    assert [r.partition_key for r in tick.run_requests] == [version]
    instance.add_dynamic_partitions("summariser_versions", [version])

    def materialise() -> dict:
        result = dg.materialize([user_summaries], partition_key=version, instance=instance, resources=resources)
        checks = result.get_asset_check_evaluations()
        assert [c.passed for c in checks] == [True]
        return {k: v.value for k, v in result.asset_materializations_for_node("user_summaries")[0].metadata.items()}

    first = materialise()
    assert first["backfill"] is True and first["online"] is True
    assert version in registry.summary_backfills()  # the marker the gate reads
    _write_offline(settings, events[events.timestamp_ms >= cut], first_offset=len(events))
    second = materialise()
    full = refresh_summaries(rec, events, None, recent=RECENT)
    assert second["backfill"] is False
    assert 0 < second["events_folded"] < full.attrs["events_folded"]
    assert first["events_folded"] + second["events_folded"] == full.attrs["events_folded"]
    assert second["bytes_per_user"] == 2 * K * D + 4 * K + 16
    table = pd.read_parquet(summaries_path(settings.root, version))
    reference = from_scratch(rec, events)
    for user, state in states(table).items():
        assert_same(state, reference[user])
    # online: the same rows, read through the service's reader with the user's history (as ingest wrote it)
    from datetime import datetime, timezone

    from features.feature_repo import write_online

    history = _history(events, 5)
    write_online(feature_store(settings, apply=False), "user_history", "user_id", [{
        "user_id": 5, **history, "played_ratios": [-1.0] * len(history["item_ids"]),
        "length": len(history["item_ids"]), "event_timestamp": datetime.now(timezone.utc)}], "event_timestamp")
    reader = HistoryReader(settings)
    online = reader.read_summaries([5, 0, 999])
    assert online[2] is None
    assert online[0]["summariser_version"] == version and online[0]["state"] == table.set_index("user_id").state[5]
    assert online[1]["events_summarised"] == 0
    read = reader.read([5, 0], summary_users=[5])
    assert "summary" not in read[0] and read[5]["item_ids"] == history["item_ids"]
    got, marks = serving_states(rec, [read[5]], history_length=settings.ingest.history_length)
    assert marks == [CACHED]
    assert_same(got[0], reference[5])
    # offline: the view's snapshots are readable point-in-time through Feast
    store = feature_store(settings, apply=False)
    at = pd.DataFrame({"user_id": [5], "event_timestamp": [pd.Timestamp.now(tz="UTC")]})
    hist = store.get_historical_features(at, ["user_summary:events_summarised"]).to_df()
    assert int(hist.events_summarised[0]) == int(table.set_index("user_id").events_summarised[5])

    # the service, with the VISTA model promoted (its summaries are backfilled, so the tie lets it through)
    import json

    from experiments.store import Snapshot
    from infra.services import EmbeddedServices
    from models.lifecycle.promotion import promote
    from serving.app import RecommendationRequest, Recommendations

    promote(registry, reg.version, reason="summaries backfilled")
    write_online(feature_store(settings, apply=False), "user_history", "user_id", [{  # a history, no summary
        "user_id": 777, **history, "played_ratios": [-1.0] * len(history["item_ids"]),
        "length": len(history["item_ids"]), "event_timestamp": datetime.now(timezone.utc)}], "event_timestamp")
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        service = Recommendations(settings, svc.kafka_bootstrap, uri, static=Snapshot())
        try:
            service.load_models()
            answers = service.serve_batch([RecommendationRequest(user_id=u) for u in (5, 777, 999)])
        finally:
            service.close()
    docs = [json.loads(a.body) for a in answers]
    assert [(d["source"], d.get("summary")) for d in docs] == [("model", CACHED), ("model", STALE),
                                                               ("popularity", None)]
    assert docs[0]["scores"] != docs[1]["scores"]  # the whole life against the 200 events the history holds
    assert "summary" not in docs[2]  # no model answered it: the body of any non-VISTA answer


def test_the_asset_writes_nothing_without_a_vista_model(tmp_path, mlflow_run):
    from orchestration.assets.summaries import user_summaries
    from orchestration.resources import FeastResource, MLflowResource, encore_resource

    registry = registry_of(mlflow_run, "plain-test")
    settings = small_settings(tmp_path / "encore2", registry={"model_name": "plain-test"})
    registry.set_tags(1, {"model": "hstu"})
    promote_first = registry.set_alias(settings.registry.champion_alias, 1, reason="t", actor="test")
    assert promote_first["to"] == 1
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("summariser_versions", ["abc123abc123"])
    result = dg.materialize([user_summaries], partition_key="abc123abc123", instance=instance, resources={
        "encore": encore_resource(settings), "feast": FeastResource(),
        "mlflow_server": MLflowResource(tracking_uri=registry.tracking_uri)})
    meta = result.asset_materializations_for_node("user_summaries")[0].metadata
    assert "vista" in meta["skipped"].value
    assert not (settings.root / "summaries").exists()

