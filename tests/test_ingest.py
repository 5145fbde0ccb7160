"""Ingest against a real tansu broker, the real offline store and a real Feast repo."""

from __future__ import annotations

import json
import time

import pytest

from features.events import InteractionEvent
from features.feature_repo import feature_store
from features.ingest import HISTORY_FEATURES, Ingestor, ingest
from features.kafka_io import make_producer, publish_events, read_topic
from features.offline_store import OfflineStore, read_interactions

pytestmark = pytest.mark.integration


def events(n: int, *, users: int = 10, start: int | None = None, prefix: str = "e") -> list[InteractionEvent]:
    start = start or int(time.time() * 1000) - 3_600_000
    return [
        InteractionEvent(event_id=f"{prefix}{i}", user_id=i % users, item_id=100 + i % 37,
                         event_type=("listen", "skip", "like")[i % 3], timestamp_ms=start + i * 1000,
                         played_ratio=(0.9, 0.1, 1.0)[i % 3])
        for i in range(n)
    ]


def send(bootstrap: str, topic: str, evs=(), raw=()) -> None:
    p = make_producer(bootstrap)
    publish_events(p, topic, evs)
    for r in raw:
        p.send(topic, value=r)
    p.flush()
    p.close()


def test_valid_events_reach_offline_and_online_stores_and_bad_ones_the_dlq(broker):
    settings, bootstrap = broker
    evs = events(300)
    bad = [b"{not json", json.dumps({"event_id": "x", "user_id": 1}).encode(), b"[]",
           json.dumps({**json.loads(evs[0].to_json_bytes()), "event_id": "f", "timestamp_ms": 4_102_444_800_000}).encode()]
    send(bootstrap, settings.topics.interactions, evs[:150], bad)
    send(bootstrap, settings.topics.interactions, evs[150:])

    report = ingest(settings, bootstrap)

    assert report.consumed == 304
    assert report.written == 300 and report.dlq == 4 and report.duplicates == 0
    assert report.written + report.duplicates + report.dlq == report.consumed
    stored = read_interactions(settings.offline_dir)
    assert sorted(stored.event_id) == sorted(e.event_id for e in evs)
    # every DLQ record names its reason and carries the original bytes
    dlq = [json.loads(m.value) for m in read_topic(bootstrap, settings.topics.dlq)]
    assert len(dlq) == 4
    assert {d["original"].encode("latin-1") for d in dlq} == set(bad)
    assert {d["error_type"] for d in dlq} == {"not_json", "schema", "not_object", "future_timestamp"}
    # the online store holds each user's history, oldest first, with the right length
    store = feature_store(settings, apply=False)
    online = store.get_online_features(HISTORY_FEATURES, [{"user_id": 3}]).to_dict()
    mine = sorted((e for e in evs if e.user_id == 3), key=lambda e: e.timestamp_ms)
    assert online["item_ids"][0] == [e.item_id for e in mine]
    assert online["timestamps_ms"][0] == sorted(online["timestamps_ms"][0])


def test_replayed_and_duplicated_events_never_count_twice(broker):
    settings, bootstrap = broker
    evs = events(200)
    send(bootstrap, settings.topics.interactions, evs + evs[:50])  # a producer retry duplicated 50
    first = ingest(settings, bootstrap)
    assert first.written == 200 and first.duplicates == 50
    send(bootstrap, settings.topics.interactions, evs)  # the whole source replayed again
    second = ingest(settings, bootstrap)
    assert second.written == 0 and second.duplicates == 200
    assert len(read_interactions(settings.offline_dir)) == 200
    off = OfflineStore(settings.offline_dir)
    assert int(off.item_stats()["events"].sum()) == 200
    off.close()
    store = feature_store(settings, apply=False)
    online = store.get_online_features(HISTORY_FEATURES, [{"user_id": 0}]).to_dict()
    assert len(online["item_ids"][0]) == 20  # 200 events over 10 users, none doubled


def test_out_of_order_events_are_placed_by_event_time(broker):
    settings, bootstrap = broker
    evs = events(30, users=1)
    send(bootstrap, settings.topics.interactions, list(reversed(evs)))
    ingest(settings, bootstrap)
    online = feature_store(settings, apply=False).get_online_features(HISTORY_FEATURES, [{"user_id": 0}]).to_dict()
    assert online["timestamps_ms"][0] == [e.timestamp_ms for e in evs]


def test_history_keeps_only_the_last_n(broker, tmp_path):
    settings, bootstrap = broker
    settings = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"history_length": 5})})
    evs = events(40, users=1)
    send(bootstrap, settings.topics.interactions, evs)
    ingest(settings, bootstrap)
    online = feature_store(settings, apply=False).get_online_features(HISTORY_FEATURES, [{"user_id": 0}]).to_dict()
    assert online["item_ids"][0] == [e.item_id for e in evs[-5:]]


def test_a_crash_before_the_offset_commit_loses_and_duplicates_nothing(broker):
    """The batch is stored but offsets are never committed (the process died): the retry repairs it."""
    settings, bootstrap = broker
    evs = events(120)
    send(bootstrap, settings.topics.interactions, evs)
    with Ingestor(settings, bootstrap) as crashed:
        batch = crashed.consumer.poll_batch(50, 1500)
        staged = []
        from features.events import parse_event
        from features.offline_store import StagedEvent

        for m in batch:
            staged.append(StagedEvent(parse_event(m.value), m.partition, m.offset))
        crashed.offline.write(staged)  # offline written, online not pushed, offsets not committed
    report = ingest(settings, bootstrap)
    assert report.consumed == 120  # redelivered from the last committed offset
    assert report.written == 70 and report.duplicates == 50
    assert len(read_interactions(settings.offline_dir)) == 120
    online = feature_store(settings, apply=False).get_online_features(HISTORY_FEATURES, [{"user_id": 1}]).to_dict()
    assert len(online["item_ids"][0]) == 12  # the 50 stored before the crash reached the online store too


def test_online_history_holds_only_what_the_offline_store_accepted(broker):
    """Two events with one event_id and other content: the system of record keeps the first, and so must
    the online history, whether the second arrives in the same batch or in a later one."""
    settings, bootstrap = broker
    evs = events(12, users=1)
    same_batch = evs[4].model_copy(update={"item_id": 999, "timestamp_ms": evs[4].timestamp_ms + 500})
    send(bootstrap, settings.topics.interactions, evs + [same_batch])
    first = ingest(settings, bootstrap)
    later = evs[8].model_copy(update={"item_id": 998, "event_type": "dislike", "played_ratio": None,
                                      "timestamp_ms": evs[-1].timestamp_ms + 1000})
    send(bootstrap, settings.topics.interactions, [later])
    second = ingest(settings, bootstrap)

    assert (first.written, first.duplicates, second.written, second.duplicates) == (12, 1, 0, 1)
    stored = read_interactions(settings.offline_dir)
    assert list(stored.event_id) == [e.event_id for e in evs]
    online = feature_store(settings, apply=False).get_online_features(HISTORY_FEATURES, [{"user_id": 0}]).to_dict()
    assert online["item_ids"][0] == list(stored.item_id)
    assert online["timestamps_ms"][0] == list(stored.timestamp_ms)
    assert online["event_types"][0] == list(stored.event_type)
