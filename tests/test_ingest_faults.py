"""Faults lose nothing and duplicate nothing: SIGKILL of the ingest worker mid-batch, a broker restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import duckdb
import pytest

from features.events import InteractionEvent
from features.feature_repo import feature_store
from features.ingest import HISTORY_FEATURES, Ingestor, ingest
from features.kafka_io import committed_offsets, make_producer, publish_events
from infra.topics import ensure_topics
from features.offline_store import OfflineStore
from infra.services import start_broker
from infra.settings import child_env
from tests.conftest import small_settings

pytestmark = pytest.mark.integration



def dlq_records(settings):  # noqa: ANN001, ANN201 - EncoreSettings -> DataFrame
    """The DLQ as the offline store keeps it (original bytes, error type, reason)."""
    off = OfflineStore(settings.offline_dir)
    try:
        return off.dlq_records()
    finally:
        off.close()

def make_events(n: int, prefix: str, users: int = 50) -> list[InteractionEvent]:
    start = int(time.time() * 1000) - 7_200_000
    return [InteractionEvent(event_id=f"{prefix}{i}", user_id=i % users, item_id=i % 97, event_type="listen",
                             timestamp_ms=start + i, played_ratio=0.75) for i in range(n)]


def send(bootstrap: str, topic: str, events: list[InteractionEvent]) -> None:
    p = make_producer(bootstrap)
    publish_events(p, topic, events)
    p.flush()
    p.close()


def send_raw(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    p = make_producer(bootstrap)
    for payload in payloads:
        p.send(topic, value=payload)
    p.flush()
    p.close()


def committed(settings, bootstrap: str) -> int:
    """The group's committed offsets, summed over the partitions (the next offset it would read)."""
    with Ingestor(settings, bootstrap) as reader:
        return sum(o or 0 for o in reader.consumer.committed().values())


def parquet_files(settings) -> list:
    """The offline store's data files (each appears by rename, so a listing never sees a partial one)."""
    return list(settings.offline_dir.glob("date=*/*.parquet"))


def raw_counts(settings) -> tuple[int, int]:
    """(rows in the Parquet files, distinct event ids) — before any read-side deduplication."""
    if not parquet_files(settings):
        return 0, 0
    glob = str(settings.offline_dir / "date=*" / "*.parquet")
    with duckdb.connect() as con:
        return con.execute(f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{glob}')").fetchone()


def wait_for(cond, timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def assert_exact(settings, events: list[InteractionEvent]) -> None:
    rows, unique = raw_counts(settings)
    assert unique == len(events), f"lost {len(events) - unique}"
    assert rows == unique, f"{rows - unique} duplicate rows"
    off = OfflineStore(settings.offline_dir)
    try:
        assert int(off.item_stats()["events"].sum()) == len(events)
        assert int(off.user_stats()["events"].sum()) == len(events)
    finally:
        off.close()
    # the online history of a user equals their last N events in the system of record
    store = feature_store(settings, apply=False)
    online = store.get_online_features(HISTORY_FEATURES, [{"user_id": 7}]).to_dict()
    mine = sorted((e for e in events if e.user_id == 7), key=lambda e: e.timestamp_ms)
    n = settings.ingest.history_length
    assert online["item_ids"][0] == [e.item_id for e in mine][-n:]


def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(broker, tmp_path):
    settings, bootstrap = broker
    settings = settings.model_copy(update={"ingest": settings.ingest.model_copy(
        update={"batch_size": 1500, "max_batch_wait_ms": 200, "poll_timeout_ms": 1000})})
    topic, group = settings.topics.interactions, settings.ingest.group_id
    events = make_events(12_000, "k")
    chunks = [events[i:i + 2000] for i in range(0, len(events), 2000)]
    env = child_env(settings.model_copy(update={"kafka_bootstrap": bootstrap}), tmp_path / "settings.yaml")
    cmd = [sys.executable, "-m", "cli", "ingest", "--follow"]

    # Each attempt first publishes new events, so the worker always has a backlog when it dies (a fast
    # machine can otherwise finish everything before the kill). It is killed the moment a batch's file
    # lands in the offline store, i.e. while it pushes that batch online and before it commits offsets.
    # Whether that window was hit is then read from the broker: rows written beyond the committed offsets.
    sent, mid_batch = 0, 0
    for attempt in range(len(chunks) - 1):
        send(bootstrap, topic, chunks[attempt])
        sent += len(chunks[attempt])
        files = len(parquet_files(settings))
        worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a directory listing is cheap enough to poll every 2 ms, so the kill follows the file closely
        wait_for(lambda: worker.poll() is not None or len(parquet_files(settings)) > files, 120,
                 "the worker's next batch file", every_s=0.002)
        assert worker.poll() is None, f"the worker exited early with {worker.returncode}"
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        written = raw_counts(settings)[0]
        committed = sum(committed_offsets(bootstrap, group, topic).values())
        assert written <= sent and committed <= written
        # every attempt but the first starts from what the earlier ones committed: the read must see it
        assert attempt == 0 or committed > 0, "no committed offsets read back"
        mid_batch += written > committed
        if mid_batch == 2:
            break
    assert mid_batch >= 1, "no kill landed between a batch's offline write and its offset commit"
    for chunk in chunks[attempt + 1:]:
        send(bootstrap, topic, chunk)

    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: raw_counts(settings)[1] >= len(events), 180, "the restarted worker to catch up")
        time.sleep(2.5)  # let it flush the throttled stats and go idle
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    assert_exact(settings, events)


def test_broker_restart_is_survived_without_manual_steps(tmp_path):
    settings = small_settings(tmp_path / "encore", ingest={"poll_timeout_ms": 500, "max_batch_wait_ms": 200,
                                                            "item_stats_interval_s": 0})
    broker = start_broker(settings)
    port = int(broker.endpoint.split(":")[1])
    ensure_topics(broker.endpoint, settings.topics)
    first, second = make_events(1000, "a"), make_events(1500, "b")
    stop = threading.Event()
    try:
        send(broker.endpoint, settings.topics.interactions, first)
        with Ingestor(settings, broker.endpoint) as worker:
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(r=worker.run(stop=stop)))
            thread.start()
            wait_for(lambda: raw_counts(settings)[1] == 1000, 60, "the first events")
            broker.stop()  # memory storage: the log and the committed offsets are gone
            broker = start_broker(settings, port=port)
            ensure_topics(broker.endpoint, settings.topics)
            send(broker.endpoint, settings.topics.interactions, second)  # offsets 0..1499 again
            wait_for(lambda: raw_counts(settings)[1] == 2500, 90, "the events sent after the restart")
            stop.set()
            thread.join(timeout=30)
        assert result["r"].broker_resets >= 1
    finally:
        stop.set()
        broker.stop()
    assert_exact(settings, first + second)


def test_poison_messages_go_to_the_dlq_and_ingest_moves_past_them(broker):
    """A user id beyond int64 and a message nested 2,000 levels deep once stopped ingest on every restart."""
    settings, bootstrap = broker
    topic = settings.topics.interactions
    evs = make_events(120, "a")
    before, after = evs[:60], evs[60:]
    huge_id = json.dumps({**json.loads(before[0].to_json_bytes()), "event_id": "huge", "user_id": 2**64}).encode()
    nested = b'{"event_id": ' + b"[" * 2000 + b"]" * 2000 + b"}"  # about 4 KB
    send(bootstrap, topic, before)
    send_raw(bootstrap, topic, [huge_id, nested])
    send(bootstrap, topic, after)

    report = ingest(settings, bootstrap)

    assert report.consumed == 122 and report.written == 120 and report.dlq == 2
    assert_exact(settings, before + after)
    assert committed(settings, bootstrap) == 122
    dlq = dlq_records(settings)
    assert set(dlq.original.map(bytes)) == {huge_id, nested}
    reasons = dict(zip(dlq.original.map(bytes), dlq.reason))
    assert "user_id" in reasons[huge_id]
    assert "nest" in reasons[nested]
    again = ingest(settings, bootstrap)  # a restart finds nothing left to redo
    assert again.consumed == 0


def test_an_event_a_store_rejects_goes_to_the_dlq_and_the_rest_of_its_batch_is_kept(broker, monkeypatch):
    """Defence in depth: an event that passed validation but fails the offline store's write.

    The parser is made to let one out-of-range event through (the broker and the stores are real); the
    batch must be split around it: the good events stored once, the poison in the DLQ with the store's
    reason, the offsets committed past it.
    """
    import features.ingest as ingest_module

    settings, bootstrap = broker
    topic = settings.topics.interactions
    real_parse = ingest_module.parse_event

    def lenient_parse(payload, **kwargs):
        if payload is not None and b'"poison"' in payload:
            return InteractionEvent.model_construct(**{**json.loads(payload), "user_id": 2**64})
        return real_parse(payload, **kwargs)

    monkeypatch.setattr(ingest_module, "parse_event", lenient_parse)
    good = make_events(200, "g")
    poison = InteractionEvent(event_id="poison", user_id=7, item_id=3, event_type="like",
                              timestamp_ms=good[100].timestamp_ms)
    send(bootstrap, topic, good[:100] + [poison] + good[100:])

    report = ingest(settings, bootstrap)

    assert report.consumed == 201
    assert report.written == 200 and report.dlq == 1 and report.duplicates == 0
    assert_exact(settings, good)
    assert committed(settings, bootstrap) == 201
    dlq = dlq_records(settings)
    assert list(dlq.error_type) == ["store_rejected"]
    assert "offline store" in dlq.reason[0] and "poison" in bytes(dlq.original[0]).decode()
