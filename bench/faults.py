"""Fault drill: ``encore bench faults``. Real services, real faults, one JSON line of figures.

It starts the embedded services (tansu broker, MLflow server) on a temporary data dir (or ``--data-dir``),
builds a small platform on them and breaks it, phase by phase:

1. **ingest**: the synthetic history and ``--events`` drill events go to Kafka with poison messages of
   ``poison_kinds`` kinds in between (not JSON, a tombstone, a user id beyond int64, nesting 2,000 deep, an
   oversized payload, ...). Ingest workers (``encore ingest --follow``, separate processes) are SIGKILLed
   the moment a batch's file lands in the offline store, i.e. after the offline write and before the
   offset commit; then a fresh worker catches up.

   - ``ingest_stalled``: 1 if the committed offsets did not move past every message sent (poison included)
     in time: a message the worker cannot move past stops it for good, on every restart;
   - ``lost``: valid events sent but not in the offline store; ``duplicated``: rows beyond one per
     event id in its Parquet files (counted raw, before any read-side deduplication);
   - ``online_offline_mismatch``: users whose online ``user_history`` is not their last
     ``ingest.history_length`` events in the offline store (the system of record);
   - ``kills_mid_batch``: how many kills landed between a batch's offline write and its commit.

2. **training**: ``encore models train`` (the Dagster ``training_job``) makes the champion that is served.

3. **neighbours**: bursts of concurrent normal requests with bad ones in the same micro-batches (an
   oversized ``context``, wrong types, invalid JSON, a body over ``serve.max_body_bytes``).
   ``neighbour_failures``: normal requests answered other than 200 (the bad ones must fail alone).

4. **MLflow outage** (its process group SIGSTOPped: connections accepted, never answered):
   ``kill_switch_s``: seconds from setting the kill switch in the experiment store (as ``encore ab kill``
   does) until served answers carry no assignment, with the model thread stuck on the registry
   (``kill_switch_off_s``: the same for turning it off); ``healthz_during_mlflow_outage_s``: seconds from
   spawning a new replica until its ``/healthz`` answers 200 (interpreter start-up included;
   ``healthz_baseline_s`` is the same with MLflow answering, so the outage's own share shows).

5. **online-store outage** (the Feast SQLite online store): (a) slow, another connection holds
   ``BEGIN EXCLUSIVE`` on it; (b) unreadable, the file truncated to 0 bytes; then its bytes written back.
   ``degraded_answers``: 200 answers marked ``"degraded": true``; ``errors_during_online_outage``: answers
   other than 200 and transport errors during (a) and (b); ``online_outage_max_ms``: the slowest answer;
   ``recovered_after_store_restore``: a ``"degraded": false`` answer came within ``--recover-timeout``
   seconds of the restore, without restarting the replica (``recovery_s``: how long it took;
   ``first_200_after_restore_s``: until the first 200 answer of any kind).

The bar (``BAR``): ingest_stalled 0, lost 0, duplicated 0, online_offline_mismatch 0, neighbour_failures 0,
kill_switch_s <= 2, healthz_during_mlflow_outage_s <= 5, errors_during_online_outage 0,
recovered_after_store_restore true. Progress goes to stderr; the LAST stdout line is one JSON object;
the exit status is 1 when the bar is missed (``--no-check``: always 0 once the drill ran).

    python -m bench.faults --events 6000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import httpx

from features.events import InteractionEvent
from features.kafka_io import PartitionConsumer, make_producer, publish_events
from infra.services import EmbeddedServices, free_port, frozen, spawn_service, wait_until
from infra.settings import EncoreSettings, child_env

REPO = Path(__file__).resolve().parents[1]
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"[faults] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- config


@dataclass
class DrillConfig:
    events: int = 6000  # drill events on top of the synthetic history
    seed: int = 7
    users: int = 120  # simulator users (the drill events are theirs too)
    items: int = 150
    batch_size: int = 1500  # small batches: many commit windows for the kills to land in
    kills: int = 2  # SIGKILLs that must land mid-batch (between the offline write and the commit)
    max_kill_attempts: int = 6
    bursts: int = 5  # neighbour bursts of 60 normal + the bad requests
    outage_s: float = 3.0  # length of each online-store fault
    recover_timeout_s: float = 30.0
    catch_up_timeout_s: float = 180.0
    data_dir: Path | None = None


BAR: dict[str, Callable[[object], bool]] = {
    "ingest_stalled": lambda v: v == 0,
    "lost": lambda v: v == 0,
    "duplicated": lambda v: v == 0,
    "online_offline_mismatch": lambda v: v == 0,
    "neighbour_failures": lambda v: v == 0,
    "kill_switch_s": lambda v: v is not None and v <= 2.0,
    "healthz_during_mlflow_outage_s": lambda v: v is not None and v <= 5.0,
    "errors_during_online_outage": lambda v: v == 0,
    "recovered_after_store_restore": lambda v: v is True,
}


def bar_failures(result: dict) -> list[str]:
    """The figures of ``result`` that miss the bar, as ``name=value``."""
    return [f"{name}={result.get(name)!r}" for name, ok in BAR.items() if not ok(result.get(name))]


def drill_settings(root: Path, cfg: DrillConfig) -> EncoreSettings:
    """A platform small enough to build in a minute or two on 2 cores; serving keeps its defaults, which
    are what the drill measures."""
    return EncoreSettings(
        data_dir=root,
        simulator={"users": cfg.users, "items": cfg.items, "sessions_per_user": 3, "events_per_session": 10,
                   "seed": cfg.seed},
        train={"overrides": {"epochs": 2, "dim": 16, "max_len": 20, "negatives": 16, "batch_size": 64}},
        ingest={"batch_size": cfg.batch_size, "max_batch_wait_ms": 200, "poll_timeout_ms": 1000,
                "item_stats_interval_s": 0},
        # the gate's latency probe is about the model, not the faults; a shared box must not block promotion
        promotion={"latency_budget_ms": 60_000},
    )


# --------------------------------------------------------------------------------------------- ingest


@dataclass
class IngestResult:
    poison_kinds: int = 0
    valid_events: int = 0
    dlq: int = 0
    kills_mid_batch: int = 0
    ingest_stalled: int = 0
    lost: int = 0
    duplicated: int = 0
    online_offline_mismatch: int = 0
    seconds: float = 0.0


def poison_messages(settings: EncoreSettings) -> dict[str, bytes | None]:
    """One message of each kind that has broken (or could break) an ingest loop; ``None`` is a tombstone."""
    now = int(time.time() * 1000)
    good = {"event_id": "p", "user_id": 1, "item_id": 1, "event_type": "listen", "timestamp_ms": now - 1000}
    return {
        "not_json": b"{not json",
        "tombstone": None,
        "empty": b"",
        "invalid_utf8": b'{"event_id": "\xff\xfe", "user_id": 1}',
        "json_array": b"[1, 2, 3]",
        "missing_fields": b'{"event_id": "only-an-id"}',
        "wrong_types": json.dumps({**good, "event_id": "wt", "user_id": "seven", "item_id": [1]}).encode(),
        "negative_id": json.dumps({**good, "event_id": "neg", "user_id": -1}).encode(),
        "user_id_beyond_int64": json.dumps({**good, "event_id": "huge", "user_id": 2**64}).encode(),
        "deep_nesting": b'{"event_id": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        "far_future": json.dumps({**good, "event_id": "fut", "timestamp_ms": now + 10 * 86_400_000}).encode(),
        "oversized": json.dumps({**good, "event_id": "big",
                                 "pad": "x" * (settings.ingest.max_payload_bytes + 1024)}).encode(),
    }


def drill_events(cfg: DrillConfig) -> list[InteractionEvent]:
    """Seeded events of the simulator's users, in the last two hours, one millisecond apart."""
    rng = random.Random(cfg.seed)
    start = int(time.time() * 1000) - 7_200_000
    kinds = ("listen", "listen", "listen", "skip", "like")
    return [InteractionEvent(event_id=f"drill{cfg.seed}-{i}", user_id=rng.randrange(cfg.users),
                             item_id=rng.randrange(cfg.items), event_type=rng.choice(kinds),
                             timestamp_ms=start + i, played_ratio=round(rng.random(), 3))
            for i in range(cfg.events)]


def _send(bootstrap: str, topic: str, events: list[InteractionEvent]) -> None:
    producer = make_producer(bootstrap)
    publish_events(producer, topic, events)
    producer.flush()
    producer.close()


def _send_raw(bootstrap: str, topic: str, payloads: list[bytes | None]) -> None:
    producer = make_producer(bootstrap)
    for payload in payloads:
        producer.send(topic, key=b"poison", value=payload)  # a key: a tombstone (no value) needs one
    producer.flush()
    producer.close()


def _parquet_glob(settings: EncoreSettings) -> str:
    return str(settings.offline_dir / "date=*" / "*.parquet")


def _parquet_files(settings: EncoreSettings) -> list[Path]:
    # each file appears by rename, so a listing never sees a partial one
    return list(settings.offline_dir.glob("date=*/*.parquet"))


def _raw_counts(settings: EncoreSettings) -> tuple[int, set[str]]:
    """(rows in the Parquet files, the distinct event ids): before any read-side deduplication."""
    if not _parquet_files(settings):
        return 0, set()
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT count(*) FROM read_parquet('{_parquet_glob(settings)}')").fetchone()[0]
        ids = {r[0] for r in con.execute(f"SELECT DISTINCT event_id FROM read_parquet('{_parquet_glob(settings)}')")
               .fetchall()}
    return int(rows), ids


def committed(settings: EncoreSettings, bootstrap: str) -> int:
    """The ingest group's committed offsets, summed over the partitions (the messages it has moved past).

    Read as the worker's own consumer reads them: on tansu the admin API's group listing does not show
    offsets committed by a consumer with a static assignment (no group join)."""
    consumer = PartitionConsumer(bootstrap, settings.ingest.group_id, settings.topics.interactions)
    try:
        return sum(o or 0 for o in consumer.committed().values())
    finally:
        consumer.close()


def _worker(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "ingest", "--follow"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _poll(check: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every_s)
    return check()


def _kill_mid_batch(settings: EncoreSettings, bootstrap: str, env: dict[str, str],
                    chunks: list[list[InteractionEvent]], cfg: DrillConfig, log: Log) -> tuple[int, int]:
    """Send a chunk, start a worker, SIGKILL it the moment its next batch file lands; repeat until
    ``cfg.kills`` kills landed mid-batch. Returns (kills mid-batch, chunks sent)."""
    topic = settings.topics.interactions
    landed, sent = 0, 0
    # each attempt first publishes new events, so the worker always has a backlog when it dies
    while landed < cfg.kills and sent < min(cfg.max_kill_attempts, len(chunks) - 1):
        _send(bootstrap, topic, chunks[sent])
        sent += 1
        files = len(_parquet_files(settings))
        worker = _worker(env)
        # a directory listing is cheap enough to poll every 2 ms, so the kill follows the file closely
        _poll(lambda: worker.poll() is not None or len(_parquet_files(settings)) > files, 120, every_s=0.002)
        if worker.poll() is not None:
            log(f"ingest worker exited early with {worker.returncode}")
            continue
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        written = _raw_counts(settings)[0]
        done = committed(settings, bootstrap)
        # rows written beyond the committed offsets (less the dead-lettered messages, which advance the
        # offsets without a row): the kill fell between the offline write and the commit
        mid = written > done - _dlq_before(settings)
        landed += int(mid)
        log(f"kill {sent}: {written} rows written, offsets committed to {done}"
            f"{' (mid-batch)' if mid else ''}")
    return landed, sent


def _dlq_before(settings: EncoreSettings) -> int:
    """Messages dead-lettered so far (they advance the offsets without adding rows)."""
    from features.offline_store import OfflineStore

    store = OfflineStore(settings.offline_dir)
    try:
        return len(store.dlq_records())
    finally:
        store.close()


def _history_keys(rows: list[tuple[int, int, str]], n: int) -> list[tuple[int, int, str]]:
    # the online history's own identity and order: (timestamp_ms, item_id, event_type), the last n
    return sorted(set(rows))[-n:]


def online_offline_mismatch(settings: EncoreSettings) -> int:
    """Users whose online ``user_history`` is not their last ``history_length`` events in the offline store."""
    from features.feature_repo import feature_store
    from features.ingest import HISTORY_FEATURES

    with duckdb.connect() as con:
        rows = con.execute(f"SELECT user_id, timestamp_ms, item_id, event_type FROM "
                           f"read_parquet('{_parquet_glob(settings)}')").fetchall()
    offline: dict[int, list[tuple[int, int, str]]] = {}
    for user, ts, item, kind in rows:
        offline.setdefault(int(user), []).append((int(ts), int(item), str(kind)))
    users = sorted(offline)
    online = feature_store(settings, apply=False).get_online_features(
        HISTORY_FEATURES, [{"user_id": u} for u in users]).to_dict()
    n = settings.ingest.history_length
    bad = 0
    for i, user in enumerate(users):
        got = list(zip(online["timestamps_ms"][i] or [], online["item_ids"][i] or [], online["event_types"][i] or []))
        bad += [(int(t), int(it), str(k)) for t, it, k in got] != _history_keys(offline[user], n)
    return bad


def phase_ingest(settings: EncoreSettings, bootstrap: str, cfg: DrillConfig, log: Log) -> IngestResult:
    from features.replay import replay
    from features.simulator import MusicWorld

    t0 = time.monotonic()
    topic = settings.topics.interactions
    history = [e for e in MusicWorld(settings.simulator).history() if isinstance(e, InteractionEvent)]
    drill = drill_events(cfg)
    step = max(1, len(drill) // (cfg.max_kill_attempts + 2))
    chunks = [drill[i:i + step] for i in range(0, len(drill), step)]
    poison = poison_messages(settings)
    valid = {e.event_id for e in history} | {e.event_id for e in drill}
    result = IngestResult(poison_kinds=len(poison), valid_events=len(valid))
    messages = len(history) + len(poison) + len(drill)

    # the history, then the poison, then everything else: the good events after the poison must arrive
    replay(history, bootstrap, topic, progress=False)
    _send_raw(bootstrap, topic, list(poison.values()))
    log(f"sent {len(history)} history events and {len(poison)} poison messages; drill events follow in "
        f"{len(chunks)} chunks")
    env = child_env(settings.model_copy(update={"kafka_bootstrap": bootstrap}), settings.run_dir / "faults.yaml")
    result.kills_mid_batch, sent = _kill_mid_batch(settings, bootstrap, env, chunks, cfg, log)
    for chunk in chunks[sent:]:
        _send(bootstrap, topic, chunk)

    worker = _worker(env)
    try:
        caught_up = _poll(lambda: len(_raw_counts(settings)[1] & valid) >= len(valid), cfg.catch_up_timeout_s,
                          every_s=0.5)
        log(f"restarted worker {'caught up' if caught_up else 'did NOT catch up'}")
        # every message sent, poison included, must be committed past; the broker's reported end offsets
        # are no yardstick (tansu reports the last record batch's base offset), the count sent is
        def committed_all() -> bool:
            return committed(settings, bootstrap) >= messages

        result.ingest_stalled = int(not _poll(committed_all, 15, every_s=0.5))
        time.sleep(2.5)  # let it flush the throttled stats and go idle
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    rows, ids = _raw_counts(settings)
    result.lost = len(valid - ids)
    result.duplicated = rows - len(ids)
    result.dlq = _dlq_before(settings)
    result.online_offline_mismatch = online_offline_mismatch(settings)
    result.seconds = round(time.monotonic() - t0, 1)
    return result


# --------------------------------------------------------------------------------------------- training


def train_champion(settings: EncoreSettings, bootstrap: str, mlflow_uri: str, log: Log) -> None:
    """``encore models train`` as a user runs it (the bench sits below the command-line tool)."""
    env = child_env(settings.model_copy(update={"kafka_bootstrap": bootstrap, "mlflow_tracking_uri": mlflow_uri}),
                    settings.run_dir / "faults-train.yaml")
    proc = subprocess.run([sys.executable, "-m", "cli", "models", "train"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"encore models train failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    log("champion trained: " + (proc.stdout.strip().splitlines() or [""])[-1][:200])


# --------------------------------------------------------------------------------------------- serving


@dataclass
class ServingResult:
    neighbour_requests: int = 0
    neighbour_failures: int = 0
    bad_requests: int = 0
    bad_statuses: dict[str, int] = field(default_factory=dict)
    kill_switch_s: float | None = None
    kill_switch_off_s: float | None = None
    healthz_during_mlflow_outage_s: float | None = None
    healthz_baseline_s: float | None = None


def bad_requests(limit: int) -> dict[str, bytes]:
    """Requests the service must refuse on their own (422/413), each as the raw JSON body."""
    return {
        "oversized_context": json.dumps({"user_id": 8, "k": 5, "context": {"blob": "y" * 40_000}}).encode(),
        "wrong_types": json.dumps({"user_id": "seven", "k": "5", "exclude_seen": "maybe"}).encode(),
        "bool_user": json.dumps({"user_id": True}).encode(),
        "invalid_json": b'{"user_id": 1, "k": ',
        "deep_nesting": b"[" * 5000,
        "huge_body": b'{"user_id": 1, "pad": "' + b"x" * (limit * 3) + b'"}',
    }


def phase_neighbours(endpoint: str, limit: int, cfg: DrillConfig, out: ServingResult) -> None:
    """Bursts of normal requests with the bad ones in the middle, all at once, so they share micro-batches."""
    bad = bad_requests(limit)
    headers = {"content-type": "application/json"}
    # separate clients: a connection the server closes after a 413 must not be reused by a normal request
    with httpx.Client(base_url=endpoint, timeout=30) as normal_http, \
            httpx.Client(base_url=endpoint, timeout=30) as bad_http, ThreadPoolExecutor(24) as pool:

        def normal(body: dict) -> int:
            try:
                return normal_http.post("/v1/recommendations", json=body).status_code
            except httpx.HTTPError:
                return -1

        def refused(raw: bytes) -> str:
            try:
                return str(bad_http.post("/v1/recommendations", content=raw, headers=headers).status_code)
            except httpx.HTTPError as exc:  # the server may close a huge body's connection mid-send
                return type(exc).__name__

        for burst in range(cfg.bursts):
            bodies = [{"user_id": (burst * 60 + i) % cfg.users, "k": 5, "context": {"device": "web"}}
                      for i in range(60)]
            futures = [pool.submit(normal, b) for b in bodies[:30]]
            futures += [pool.submit(refused, raw) for raw in bad.values()]
            futures += [pool.submit(normal, b) for b in bodies[30:]]
            for fut in futures:
                got = fut.result()
                if isinstance(got, int):
                    out.neighbour_requests += 1
                    out.neighbour_failures += got != 200
                else:
                    out.bad_requests += 1
                    out.bad_statuses[got] = out.bad_statuses.get(got, 0) + 1


def _time_until(check: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until ``check()`` holds, or None if it did not within ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if check():
                return round(time.monotonic() - t0, 3)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return None


def _user_in_arm(settings: EncoreSettings, arm: str) -> int:
    from experiments.assignment import assign, default_experiment

    exp = default_experiment(settings)
    return next(u for u in range(settings.simulator.users) if assign(exp, u) == arm)


def phase_mlflow_outage(settings: EncoreSettings, svc: EmbeddedServices, endpoint: str, out: ServingResult,
                        log: Log) -> None:
    from experiments.store import ExperimentStore

    store = ExperimentStore(settings.experiments_dir)
    user = _user_in_arm(settings, "treatment")
    mlflow = next(p for p in svc.started if p.name == "mlflow")

    def arm() -> str | None:
        r = httpx.post(f"{endpoint}/v1/recommendations", json={"user_id": user, "k": 5}, timeout=5)
        r.raise_for_status()
        arms = [a["variant"] for a in r.json()["assignments"] if a["experiment"] == settings.experiment.name]
        return arms[0] if arms else None

    # the same start-up with MLflow answering: what interpreter start-up and imports alone cost on this box
    out.healthz_baseline_s = _replica_healthz_s(settings, svc)
    log(f"a replica spawned with MLflow answering answered /healthz after {out.healthz_baseline_s} s")
    with frozen(mlflow):
        log("MLflow SIGSTOPped; waiting for the model thread to block on the registry")
        time.sleep(3 * settings.serve.model_poll_s + 0.5)
        try:
            store.set_kill(True, actor="bench-faults", reason="fault drill: registry hung")
            out.kill_switch_s = _time_until(lambda: arm() is None, 30)
        finally:
            store.set_kill(False, actor="bench-faults")
        out.kill_switch_off_s = _time_until(lambda: arm() == "treatment", 30)
        log(f"kill switch in force after {out.kill_switch_s} s, off again after {out.kill_switch_off_s} s")
        out.healthz_during_mlflow_outage_s = _replica_healthz_s(settings, svc)
        log(f"a replica spawned with MLflow hung answered /healthz after {out.healthz_during_mlflow_outage_s} s")


def _replica_healthz_s(settings: EncoreSettings, svc: EmbeddedServices) -> float | None:
    port = free_port()
    mine = settings.model_copy(update={"kafka_bootstrap": svc.kafka_bootstrap, "mlflow_tracking_uri": svc.mlflow_uri})
    env = child_env(mine, settings.run_dir / "faults-replica.yaml")
    t0 = time.monotonic()
    replica = spawn_service("faults-replica", [sys.executable, "-m", "cli", "serve", "--port", str(port),
                                               "--experiment", "none"], settings,
                            endpoint=f"http://127.0.0.1:{port}", env=env)
    try:
        wait_until(lambda: httpx.get(f"{replica.endpoint}/healthz", timeout=1).status_code == 200, timeout_s=60,
                   what="replica /healthz with MLflow hung", proc=replica.proc)
        return round(time.monotonic() - t0, 2)
    except (TimeoutError, RuntimeError):
        return None
    finally:
        replica.stop()


# --------------------------------------------------------------------------------------------- online store


@dataclass
class OnlineOutageResult:
    answers: int = 0
    degraded_answers: int = 0
    errors_during_online_outage: int = 0
    online_outage_max_ms: float = 0.0
    online_outage_statuses: dict[str, int] = field(default_factory=dict)  # status (or exception) -> count
    recovered_after_store_restore: bool = False
    recovery_s: float | None = None
    first_200_after_restore_s: float | None = None  # any 200 answer, degraded or not


@dataclass
class _Traffic:
    """Requests sent in a loop by a few threads until ``stop`` is set, tallied into ``result``."""

    endpoint: str
    users: int
    result: OnlineOutageResult
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seconds: float, threads: int = 4) -> None:
        self.stop.clear()
        workers = [threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(threads)]
        for w in workers:
            w.start()
        time.sleep(seconds)
        self.stop.set()
        for w in workers:
            w.join(timeout=30)

    def _loop(self, n: int) -> None:
        with httpx.Client(base_url=self.endpoint, timeout=10) as http:
            i = n
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/recommendations", json={"user_id": i % self.users, "k": 5})
                    ok, degraded = r.status_code == 200, r.status_code == 200 and r.json().get("degraded") is True
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    ok, degraded, status = False, False, type(exc).__name__
                ms = (time.monotonic() - t0) * 1000
                with self.lock:
                    self.result.online_outage_statuses[status] = self.result.online_outage_statuses.get(status, 0) + 1
                    self.result.answers += 1
                    self.result.errors_during_online_outage += not ok
                    self.result.degraded_answers += degraded
                    self.result.online_outage_max_ms = max(self.result.online_outage_max_ms, round(ms, 1))
                i += 4


def _hold_exclusive(db: Path, seconds: float, held: threading.Event) -> None:
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        con.execute("ROLLBACK")
    finally:
        held.set()
        con.close()


def phase_online_outage(settings: EncoreSettings, endpoint: str, cfg: DrillConfig, log: Log) -> OnlineOutageResult:
    db = settings.feast_dir / "online.db"
    out = OnlineOutageResult()
    traffic = _Traffic(endpoint, settings.simulator.users, out)

    # (a) slow: a writer holds the database's exclusive lock while requests flow
    held = threading.Event()
    locker = threading.Thread(target=_hold_exclusive, args=(db, cfg.outage_s, held), daemon=True)
    locker.start()
    held.wait(timeout=30)
    traffic.run(cfg.outage_s)
    locker.join(timeout=60)
    log(f"slow store: {out.answers} answers, {out.degraded_answers} degraded, "
        f"{out.errors_during_online_outage} errors, max {out.online_outage_max_ms} ms")

    # (b) unreadable: the file emptied under the running replica, then its bytes written back in place
    original = db.read_bytes()
    try:
        with open(db, "r+b") as fh:
            fh.truncate(0)
        traffic.run(cfg.outage_s)
    finally:
        with open(db, "r+b") as fh:  # the same inode: the replica's open connection sees the restore
            fh.write(original)
            fh.truncate(len(original))
    log(f"unreadable store, totals: {out.answers} answers, {out.degraded_answers} degraded, "
        f"{out.errors_during_online_outage} errors")

    user = _user_in_arm(settings, "treatment")

    restored = time.monotonic()

    def healthy() -> bool:
        r = httpx.post(f"{endpoint}/v1/recommendations", json={"user_id": user, "k": 5}, timeout=5)
        if r.status_code == 200 and out.first_200_after_restore_s is None:
            out.first_200_after_restore_s = round(time.monotonic() - restored, 3)
        return r.status_code == 200 and r.json().get("degraded") is False

    out.recovery_s = _time_until(healthy, cfg.recover_timeout_s)
    out.recovered_after_store_restore = out.recovery_s is not None
    log(f"after the restore: {'non-degraded after %s s' % out.recovery_s if out.recovery_s is not None else 'never non-degraded'}")
    return out


# --------------------------------------------------------------------------------------------- the drill


def run_bench(cfg: DrillConfig, log: Log = _stderr) -> dict:
    """The whole drill on a temporary data dir (or ``cfg.data_dir``, which must be fresh); the figures."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="encore-faults-") as tmp:
        root = cfg.data_dir or Path(tmp) / "encore"
        settings = drill_settings(root, cfg)
        from serving.launch import start_server

        with EmbeddedServices(settings) as svc:
            log(f"services up (Kafka {svc.kafka_bootstrap}, MLflow {svc.mlflow_uri}); data dir {root}")
            ingest = phase_ingest(settings, svc.kafka_bootstrap, cfg, log)
            log(f"ingest: {asdict(ingest)}")
            train_champion(settings, svc.kafka_bootstrap, svc.mlflow_uri, log)
            server = start_server(settings, svc.kafka_bootstrap, svc.mlflow_uri)
            try:
                serving = ServingResult()
                phase_neighbours(server.endpoint, settings.serve.max_body_bytes, cfg, serving)
                log(f"neighbours: {serving.neighbour_failures} of {serving.neighbour_requests} failed; "
                    f"bad requests answered {serving.bad_statuses}")
                phase_mlflow_outage(settings, svc, server.endpoint, serving, log)
                online = phase_online_outage(settings, server.endpoint, cfg, log)
            finally:
                server.stop()
    ingest_figures = {k: v for k, v in asdict(ingest).items() if k != "seconds"}
    return {**ingest_figures, **asdict(serving), **asdict(online),
            "events": cfg.events, "seed": cfg.seed, "users": cfg.users, "batch_size": cfg.batch_size,
            "kills": cfg.kills, "outage_s": cfg.outage_s, "ingest_seconds": ingest.seconds,
            "seconds": round(time.monotonic() - t0, 1)}


def _configured_profile() -> str:
    try:
        return EncoreSettings().profile
    except ValueError:  # a half-configured production profile is still production
        return os.environ.get("ENCORE_PROFILE", "local")


def parse_args(argv: list[str] | None) -> tuple[DrillConfig, bool]:
    ap = argparse.ArgumentParser(prog="encore bench faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DrillConfig()
    ap.add_argument("--events", type=int, default=d.events, help="drill events on top of the synthetic history")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the simulator and of the drill events")
    ap.add_argument("--users", type=int, default=d.users, help="simulated users")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="ingest batch size")
    ap.add_argument("--kills", type=int, default=d.kills, help="SIGKILLs that must land mid-batch")
    ap.add_argument("--bursts", type=int, default=d.bursts, help="neighbour bursts (60 normal requests each)")
    ap.add_argument("--outage", dest="outage_s", type=float, default=d.outage_s,
                    help="seconds of each online-store fault (slow, then unreadable)")
    ap.add_argument("--recover-timeout", dest="recover_timeout_s", type=float, default=d.recover_timeout_s,
                    help="seconds allowed for non-degraded answers after the store is restored")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="a fresh data dir to build the drill in (kept afterwards); default: a temporary one")
    ap.add_argument("--no-check", action="store_true",
                    help="only report: exit 0 even when a figure misses the bar")
    a = ap.parse_args(argv)
    if a.events < 100 or a.kills < 0 or a.outage_s <= 0 or a.batch_size < 1:
        ap.error("--events must be at least 100, --kills non-negative, --outage and --batch-size positive")
    if a.data_dir is not None and a.data_dir.exists() and any(a.data_dir.iterdir()):
        ap.error(f"--data-dir {a.data_dir} is not empty: the drill needs a fresh one")
    cfg = DrillConfig(events=a.events, seed=a.seed, users=a.users, batch_size=a.batch_size, kills=a.kills,
                      bursts=a.bursts, outage_s=a.outage_s, recover_timeout_s=a.recover_timeout_s,
                      data_dir=a.data_dir)
    return cfg, a.no_check


def main(argv: list[str] | None = None) -> dict:
    cfg, no_check = parse_args(argv)
    if _configured_profile() == "production":
        # the drill kills workers and corrupts stores: never those of a production deployment
        raise SystemExit("bench faults refuses the production profile: it breaks the stores it measures")
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    result = run_bench(cfg)
    missed = bar_failures(result)
    result["bar_failures"] = missed
    print(json.dumps(result), flush=True)
    if missed and not no_check:
        _stderr("bar missed: " + ", ".join(missed))
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
