"""Ingest benchmark: Kafka → validation → offline store → Feast online store, measured end to end.

Three phases; the second and third each run on a fresh embedded broker and data dir:

1. **ceiling**: the raw consume rate of the same broker and client (kafka-python, no processing);
2. **throughput**: N events (a share malformed) produced up front, then ingested as fast as possible;
   ``events_per_s`` = valid events stored / time from the first poll to the last commit;
3. **freshness**: events produced at a fixed rate while a continuous ingest worker runs; freshness of an
   event = time its batch's offsets were committed (so it is in both stores) minus its Kafka timestamp.

Every phase checks exactness: ``lost`` = valid events produced but not stored; ``duplicated`` = stored
rows beyond one per event_id (counted in the raw Parquet files, before any read-side deduplication).
The LAST line printed is one JSON object.

    python -m bench.ingest --events 200000 --rate 5000 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb

from features.events import InteractionEvent
from features.ingest import Ingestor
from features.kafka_io import PartitionConsumer, make_producer
from infra.services import EmbeddedServices
from infra.settings import EncoreSettings

EVENT_TYPES = ("listen", "listen", "listen", "skip", "like")


def make_payloads(n: int, *, users: int, items: int, malformed_share: float, seed: int,
                  start_ms: int) -> tuple[list[tuple[bytes, bytes]], set[str]]:
    """(key, value) pairs; returns also the ids of the valid events."""
    rng = random.Random(seed)
    out, valid = [], set()
    for i in range(n):
        if rng.random() < malformed_share:
            bad = rng.choice([b"{not json", b'{"event_id": "x"}', b"[]", b'{"event_id": "y", "user_id": -1}'])
            out.append((b"0", bad))
            continue
        user = int(users * rng.random() ** 2)  # skewed: some users are far more active
        e = InteractionEvent(event_id=f"b{seed}-{i}", user_id=user, item_id=int(items * rng.random() ** 3),
                             event_type=rng.choice(EVENT_TYPES), timestamp_ms=start_ms + i,
                             played_ratio=round(rng.random(), 3))
        out.append((str(user).encode(), e.to_json_bytes()))
        valid.add(e.event_id)
    return out, valid


def produce(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]], rate: float | None = None) -> None:
    producer = make_producer(bootstrap, linger_ms=5 if rate else 20)
    start = time.monotonic()
    for i, (key, value) in enumerate(payloads):
        producer.send(topic, key=key, value=value)
        if rate:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0.001:
                time.sleep(ahead)
    producer.flush()
    producer.close()


def exactness(settings: EncoreSettings, valid_ids: set[str]) -> dict[str, int]:
    glob = str(settings.offline_dir / "date=*" / "*.parquet")
    with duckdb.connect() as con:
        rows, unique = con.execute(f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{glob}')").fetchone()
        stored = {r[0] for r in con.execute(f"SELECT DISTINCT event_id FROM read_parquet('{glob}')").fetchall()}
    return {"lost": len(valid_ids - stored), "duplicated": int(rows - unique), "stored": int(unique)}


def bench_ceiling(bootstrap: str, topic: str, n: int) -> float:
    """Raw consume rate of the ingest consumer (same client, same broker): fetch and decode, nothing else."""
    consumer = PartitionConsumer(bootstrap, f"encore-bench-ceiling-{time.time_ns()}", topic)
    got = 0
    start = time.monotonic()
    while got < n:
        batch = consumer.poll_batch(20_000, idle_ms=2000)
        if not batch:
            break
        got += len(batch)
    seconds = time.monotonic() - start
    consumer.close()
    return got / seconds


def phase_throughput(root: Path, args: argparse.Namespace) -> dict:
    settings = EncoreSettings(data_dir=root / "throughput", ingest={"batch_size": args.batch_size})
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        payloads, valid = make_payloads(args.events, users=args.users, items=args.items,
                                        malformed_share=args.malformed, seed=1, start_ms=int(time.time() * 1000) - 86_400_000)
        produce(svc.kafka_bootstrap, settings.topics.interactions, payloads)
        ceiling = bench_ceiling(svc.kafka_bootstrap, settings.topics.interactions, len(payloads))
        marks: list[float] = []
        with Ingestor(settings, svc.kafka_bootstrap) as ingestor:
            first = {}

            def on_batch(b) -> None:  # noqa: ANN001
                marks.append(time.monotonic())
                first.setdefault("t", time.monotonic() - b.seconds)

            report = ingestor.run(on_batch=on_batch)
        seconds = marks[-1] - first["t"]
        check = exactness(settings, valid)
    return {"events": len(payloads), "valid": len(valid), "dlq": report.dlq, "events_per_s": round(len(valid) / seconds),
            "seconds": round(seconds, 2), "batches": report.batches, "raw_consume_per_s": round(ceiling), **check}


def phase_throughput_workers(root: Path, args: argparse.Namespace) -> dict:
    """The same backlog on a topic of ``--workers`` partitions, one worker process per partition.

    Timed from the first stored batch to the last stored event (process start-up excluded, as for one
    worker). Workers share the offline store's SQLite index and Feast's online store.
    """
    from features.offline_store import OfflineStore
    from infra.settings import child_env

    n = args.workers
    settings = EncoreSettings(data_dir=root / f"throughput-{n}", ingest={"batch_size": args.batch_size},
                              topics={"partitions": n})
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        payloads, valid = make_payloads(args.events, users=args.users, items=args.items,
                                        malformed_share=args.malformed, seed=1,
                                        start_ms=int(time.time() * 1000) - 86_400_000)
        produce(svc.kafka_bootstrap, settings.topics.interactions, payloads)
        env = child_env(settings.model_copy(update={"kafka_bootstrap": svc.kafka_bootstrap}),
                        root / f"workers-{n}.yaml")
        procs = [subprocess.Popen([sys.executable, "-m", "cli", "ingest", "--follow", "--partitions",
                                   str(p)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for p in range(n)]
        try:
            while not list(settings.offline_dir.glob("date=*/*.parquet")):
                time.sleep(0.02)
            first = time.monotonic()
            store = OfflineStore(settings.offline_dir)
            deadline = first + 600
            while store.counts()["events"] < len(valid) and time.monotonic() < deadline:
                time.sleep(0.05)
            seconds = time.monotonic() - first
            store.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
        check = exactness(settings, valid)
    return {"workers": n, "events_per_s": round(len(valid) / seconds), "seconds": round(seconds, 2), **check}


def phase_freshness(root: Path, args: argparse.Namespace) -> dict:
    settings = EncoreSettings(data_dir=root / "freshness", ingest={"batch_size": args.batch_size})
    n = int(args.rate * args.seconds)
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        start_ms = int(time.time() * 1000) - 3_600_000
        _, valid = make_payloads(n, users=args.users, items=args.items, malformed_share=args.malformed,
                                 seed=2, start_ms=start_ms)
        stop = threading.Event()
        with Ingestor(settings, svc.kafka_bootstrap) as ingestor:
            result: dict = {}
            worker = threading.Thread(target=lambda: result.update(r=ingestor.run(stop=stop, idle_ms=500)))
            worker.start()
            time.sleep(2)
            # the producer is a separate process, as in production: it must not share this one's GIL
            subprocess.run([sys.executable, "-m", "bench.ingest", "--produce-to", svc.kafka_bootstrap,
                            "--rate", str(args.rate), "--events", str(n), "--users", str(args.users),
                            "--items", str(args.items), "--malformed", str(args.malformed), "--seed", "2",
                            "--start-ms", str(start_ms)], check=True, cwd=Path(__file__).resolve().parents[1])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if exactness(settings, valid)["lost"] == 0:
                    break
                time.sleep(0.5)
            stop.set()
            worker.join()
        report = result["r"]
        check = exactness(settings, valid)
    return {"rate": args.rate, "events": n, "freshness_p50_s": round(report.freshness_p50_s, 3),
            "freshness_p99_s": round(report.freshness_p99_s, 3), **check}


def _configured_profile() -> str:
    try:
        return EncoreSettings().profile
    except ValueError:  # a half-configured production profile is still production
        return os.environ.get("ENCORE_PROFILE", "local")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="events for the throughput phase")
    ap.add_argument("--malformed", type=float, default=0.01, help="share of malformed messages")
    ap.add_argument("--users", type=int, default=5_000, help="distinct users (skewed activity)")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=5000, help="events/s for the freshness phase")
    ap.add_argument("--seconds", type=float, default=20, help="length of the freshness phase")
    ap.add_argument("--workers", type=int, default=1,
                    help="also measure throughput with this many worker processes on as many partitions")
    ap.add_argument("--produce-to", default=None, help=argparse.SUPPRESS)  # internal: the producer process
    ap.add_argument("--seed", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--start-ms", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.produce_to:
        payloads, _ = make_payloads(args.events, users=args.users, items=args.items,
                                    malformed_share=args.malformed, seed=args.seed, start_ms=args.start_ms)
        produce(args.produce_to, EncoreSettings().topics.interactions, payloads, rate=args.rate)
        return {}
    if _configured_profile() == "production":
        # The benchmark writes the stores it measures: never those of a production deployment.
        raise SystemExit("bench ingest refuses the production profile: it writes to the stores it measures. "
                         "Run it in the local profile (ENCORE_FEAST__REDIS etc. may point at disposable servers).")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="encore-bench-") as tmp:
        thr = phase_throughput(Path(tmp), args)
        multi = phase_throughput_workers(Path(tmp), args) if args.workers > 1 else None
        fresh = phase_freshness(Path(tmp), args)
    out = {
        "events": thr["events"], "valid": thr["valid"], "dlq": thr["dlq"],
        "lost": thr["lost"] + fresh["lost"], "duplicated": thr["duplicated"] + fresh["duplicated"],
        "events_per_s": thr["events_per_s"], "raw_consume_per_s": thr["raw_consume_per_s"],
        "freshness_rate": fresh["rate"], "freshness_p50_s": fresh["freshness_p50_s"],
        "freshness_p99_s": fresh["freshness_p99_s"], "batches": thr["batches"], "throughput_seconds": thr["seconds"],
    }
    if multi:
        out["lost"] += multi["lost"]
        out["duplicated"] += multi["duplicated"]
        out[f"events_per_s_{multi['workers']}_workers"] = multi["events_per_s"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
