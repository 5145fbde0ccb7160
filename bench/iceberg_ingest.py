"""Ingest into the Iceberg offline store by several worker processes: the kill drill, throughput, freshness.

Every worker is a separate process with its own data dir (its own Feast online store, locks and logs), as
on its own host; they share only the Iceberg catalog (a SQLite file here, PostgreSQL in production) and the
warehouse. Each owns one partition of a multi-partition topic on the embedded broker.

1. **drill**: events with known ids are produced at a steady rate while each of ``--workers`` workers is
   SIGKILLed ``--kills`` times, each time a moment after one of its batches committed (so it dies while
   the next batch is being read, written or committed) and restarted. Then: ``lost`` / ``duplicated`` /
   ``unexpected`` rows, counted in the table's raw rows against the produced ids, and ``stalled``
   partitions (the table's recorded offset short of the partition's end after a timeout). How the kills
   landed is read back: ``kills_after_table_commit`` (the table's offset ahead of Kafka's committed one: a
   crash between the two commits) and ``orphan_data_files`` (written but never committed: a crash during a
   commit, or a commit conflict's first attempt).
2. **throughput**: ``--events`` produced up front (a share malformed, as ``bench.ingest``), ingested by
   ``--throughput-workers`` workers; ``events_per_s`` = valid events / time from the first batch stored to
   the last (the definition of ``bench.ingest``'s workers phase); ``events_per_s_first_poll_to_last_done``
   counts every batch whole.
3. **freshness**: ``--rate`` events/s for ``--seconds`` while the workers run; freshness of an event = when
   its batch was done (table commit, online push, Kafka commit) minus its Kafka timestamp.

Commit conflicts (another worker committed first; retried) are reported per phase. The LAST line printed
is one JSON object.

    python -m bench.iceberg_ingest --events 200000 --rate 5000 --seconds 20
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.ingest import make_payloads
from features.events import InteractionEvent
from features.kafka_io import committed_offsets, make_producer
from infra.services import EmbeddedServices
from infra.settings import EncoreSettings, child_env

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("encore.bench.iceberg")


# ---------------------------------------------------------------------------------------------- workers


def worker_main(partitions: list[int], report_path: Path) -> None:
    """One ingest worker (settings from ENCORE_CONFIG) until SIGTERM; then its figures as JSON."""
    from features.ingest import Ingestor
    from infra.settings import load_settings

    settings = load_settings()
    faulthandler.register(signal.SIGUSR1)  # a stuck worker's stacks, on demand, in its log
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    freshness: list[float] = []
    # (batch start, its rows stored in the table, batch done: online pushed and Kafka committed), wall clock
    spans: list[tuple[float, float, float]] = []

    def on_batch(b) -> None:  # noqa: ANN001 - a BatchReport
        now = time.time()
        start = now - b.seconds
        spans.append((start, start + b.stage_seconds.get("parse", 0) + b.stage_seconds.get("offline", 0), now))
        freshness.extend(b.freshness_s)

    with Ingestor(settings, settings.kafka_bootstrap, partitions=partitions) as worker:
        report_path.with_suffix(".ready").touch()
        report = worker.run(stop=stop, idle_ms=500, on_batch=on_batch)
        stats = worker.offline.store.stats
    report_path.write_text(json.dumps({"partitions": partitions, "written": report.written, "dlq": report.dlq,
                                       "batches": report.batches, "commits": stats.commits,
                                       "conflicts": stats.conflicts, "fenced": stats.fenced,
                                       "spans": spans, "freshness": freshness}))


class Zygote:
    """A process that has imported the worker's code and forks workers on request.

    A worker's start is mostly imports (Feast, pandas, pyarrow: ~8 s of CPU, ~25 s on a loaded 2-core box);
    a drill restarts workers six times. Forked from a process that imported and nothing else (no threads,
    no sockets), each worker is still a process of its own, with its own clients and state."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.iceberg_ingest", "--zygote"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()  # one request and its answer at a time (the drill restarts from threads)

    def spawn(self, index: int, config: Path, report: Path, log_path: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(f"{index}\t{config}\t{report}\t{log_path}\n")
            return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def zygote_main() -> None:
    import features.ingest  # noqa: F401 - the imports every worker needs, done once
    import features.iceberg_ingest  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited workers: no zombies to wait for
    for line in sys.stdin:
        index, config, report, log_path = line.rstrip("\n").split("\t")
        pid = os.fork()
        if pid:
            print(pid, flush=True)
            continue
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        for key in [k for k in os.environ if k.startswith("ENCORE_")]:
            del os.environ[key]
        os.environ["ENCORE_CONFIG"] = config
        code = 0
        try:
            _worker_logging()
            worker_main([int(index)], Path(report))
        except BaseException:  # noqa: BLE001 - logged, and the exit code says it
            logging.getLogger("encore.bench.iceberg").exception("worker failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Worker:
    index: int
    settings: EncoreSettings
    dir: Path
    zygote: Zygote | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None
    starts: int = 0

    @property
    def report(self) -> Path:
        return self.dir / f"report-{self.starts}.json"

    def start(self) -> None:
        """A fresh worker process: forked by the zygote, or a new interpreter (``python -m``)."""
        self.starts += 1
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "settings.yaml"
        env = child_env(self.settings, config)
        log_path = self.dir / f"worker-{self.starts}.log"
        if self.zygote is not None:
            self.pid = self.zygote.spawn(self.index, config, self.report, log_path)
            return
        out = open(log_path, "w")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.iceberg_ingest", "--worker", str(self.index),
                                      "--report", str(self.report)], env=env, cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def ready(self) -> bool:
        return self.report.with_suffix(".ready").exists()

    def alive(self) -> bool:
        return self.pid is not None and (self.proc.poll() is None if self.proc else _alive(self.pid))

    def _signal_and_wait(self, sig: int, timeout_s: float) -> None:
        assert self.pid is not None
        os.kill(self.pid, sig)
        if self.proc is not None:
            self.proc.wait(timeout=timeout_s)
        else:
            wait_for(lambda: not _alive(self.pid), timeout_s, f"worker {self.index} to exit", every_s=0.01)

    def kill(self) -> None:
        self._signal_and_wait(signal.SIGKILL, 30)

    def stop(self) -> dict:
        self._signal_and_wait(signal.SIGTERM, 120)
        if not self.report.exists():
            raise RuntimeError(f"worker {self.index} wrote no report; see {self.dir}")
        return json.loads(self.report.read_text())

    def ensure_dead(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)  # type: ignore[arg-type]


def platform(root: Path, partitions: int, batch_size: int) -> EncoreSettings:
    """Settings of the broker side; each worker gets a copy with its own data dir."""
    shared = root / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    return EncoreSettings(
        data_dir=root / "broker", topics={"partitions": partitions},
        ingest={"batch_size": batch_size, "max_batch_wait_ms": 500, "poll_timeout_ms": 1000},
        offline={"backend": "iceberg", "catalog_url": f"sqlite:///{shared / 'catalog.sqlite'}",
                 "warehouse": str(shared / "warehouse")})


def make_workers(settings: EncoreSettings, bootstrap: str, root: Path, n: int,
                 zygote: Zygote | None = None) -> list[Worker]:
    return [Worker(i, settings.model_copy(update={"data_dir": root / f"worker-{i}", "kafka_bootstrap": bootstrap}),
                   root / f"worker-{i}", zygote) for i in range(n)]


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


def wait_for(cond, timeout_s: float, what: str, every_s: float = 0.05) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every_s)
    raise TimeoutError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------- the table


def table_rows(settings: EncoreSettings) -> tuple[int, dict[str, int]]:
    """(raw rows, rows per event_id) of the interactions table, before any deduplication."""
    from collections import Counter

    from features.iceberg_store import IcebergStore, _scan

    store = IcebergStore(settings)
    try:
        ids = _scan(store.table, ["event_id"])["event_id"].to_pylist()
    finally:
        store.close()
    return len(ids), Counter(ids)


def exactness(settings: EncoreSettings, produced: set[str]) -> dict[str, int]:
    rows, per_id = table_rows(settings)
    stored = set(per_id)
    return {"rows": rows, "stored": len(stored), "lost": len(produced - stored),
            "duplicated": rows - len(stored), "unexpected": len(stored - produced)}


class TableWatch:
    """The table's recorded offsets, read through a catalog connection of its own (as an operator would)."""

    def __init__(self, settings: EncoreSettings) -> None:
        from features.iceberg_store import IcebergStore

        self.store = IcebergStore(settings)
        self.group, self.topic = settings.ingest.group_id, settings.topics.interactions

    def offsets(self, partitions: list[int]) -> dict[int, int]:
        self.store.table.refresh()
        return {p: o or 0 for p, o in self.store.recorded_offsets(self.group, self.topic, partitions).items()}

    def uncommitted_files(self) -> int:
        from features.iceberg_store import referenced_files

        refs = referenced_files(self.store.table)
        data = Path(self.store.table.location().removeprefix("file://")) / "data"
        return sum(1 for f in data.rglob("*.parquet") if str(f) not in refs)

    def close(self) -> None:
        self.store.close()


# ---------------------------------------------------------------------------------------------- the drill


class Producer(threading.Thread):
    """Known ids at a steady rate until stopped; remembers each partition's end offset."""

    def __init__(self, bootstrap: str, topic: str, rate: float, users: int) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.rate, self.users = bootstrap, topic, rate, users
        self.stop_event = threading.Event()
        self.ids: set[str] = set()
        self.ends: dict[int, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = make_producer(self.bootstrap)
            start, futures, i = time.monotonic(), [], 0
            now_ms = int(time.time() * 1000)
            while not self.stop_event.is_set():
                e = InteractionEvent(event_id=f"d{i}", user_id=i % self.users, item_id=i % 97, event_type="listen",
                                     timestamp_ms=now_ms - 3_600_000 + i, played_ratio=0.5)
                futures.append(producer.send(self.topic, key=str(e.user_id).encode(), value=e.to_json_bytes()))
                self.ids.add(e.event_id)
                i += 1
                ahead = i / self.rate - (time.monotonic() - start)
                if ahead > 0.002:
                    time.sleep(ahead)
            producer.flush()
            for f in futures:
                md = f.get(timeout=30)
                self.ends[md.partition] = max(self.ends.get(md.partition, 0), md.offset + 1)
            producer.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the drill
            self.error = exc


def drill(root: Path, *, workers: int = 3, kills: int = 2, rate: float = 600, users: int = 60,
          batch_size: int = 500, catch_up_s: float = 90, seed: int = 0, fork: bool = False) -> dict:
    """Run the kill drill (see the module docstring); returns its figures. ``fork``: workers are forked
    from a zygote that has done the imports (fast restarts, for the test) instead of new interpreters."""
    rng = random.Random(seed)
    settings = platform(root, workers, batch_size)
    t0 = time.monotonic()
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        bootstrap, topic = svc.kafka_bootstrap, settings.topics.interactions
        parts = list(range(workers))
        zygote = Zygote() if fork else None
        pool = make_workers(settings, bootstrap, root, workers, zygote)
        producer = Producer(bootstrap, topic, rate, users)
        producer.start()
        for w in pool:
            w.start()
        watch = TableWatch(settings.model_copy(update={"data_dir": root / "watch"}))
        evidence = {"after_commit": 0}
        lock = threading.Lock()
        errors: list[BaseException] = []

        def kill_twice(w: Worker, seed: int) -> None:
            # Every worker on its own schedule: the moment after its next batch commits, plus up to about one
            # batch window, so it dies while it holds consumed-but-uncommitted messages (the producer never
            # pauses: there is always a backlog).
            rng = random.Random(seed)
            own = TableWatch(settings.model_copy(update={"data_dir": root / f"watch-{w.index}"}))
            try:
                for _ in range(kills):
                    base = own.offsets(parts)[w.index]
                    try:
                        wait_for(lambda: not w.alive() or own.offsets(parts)[w.index] > base, 60,
                                 f"worker {w.index} to commit a batch", every_s=0.05)
                        if not w.alive():
                            raise RuntimeError(f"worker {w.index} exited on its own; see {w.dir}")
                    except TimeoutError:
                        if w.alive():
                            os.kill(w.pid, signal.SIGUSR1)  # type: ignore[arg-type] - its stacks, to its log
                            time.sleep(0.5)
                        raise
                    time.sleep(rng.uniform(0.0, 0.4))
                    w.kill()
                    table = own.offsets(parts)[w.index]
                    kafka = committed_offsets(bootstrap, settings.ingest.group_id, topic).get(w.index, 0)
                    with lock:
                        evidence["after_commit"] += table > kafka
                    w.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the drill
                errors.append(exc)
            finally:
                own.close()

        try:
            threads = [threading.Thread(target=kill_twice, args=(w, rng.randrange(1 << 30))) for w in pool]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            producer.stop_event.set()
            producer.join()
            if producer.error:
                raise producer.error
            ends = producer.ends
            try:
                wait_for(lambda: all(watch.offsets(parts)[p] >= ends.get(p, 0) for p in parts), catch_up_s,
                         "every partition to catch up", every_s=0.25)
            except TimeoutError:
                pass
            final = watch.offsets(parts)
            stalled = [p for p in parts if final[p] < ends.get(p, 0)]
            reports = [w.stop() for w in pool]
            orphans = watch.uncommitted_files()
        finally:
            producer.stop_event.set()
            producer.join(timeout=60)
            for w in pool:
                w.ensure_dead()
            watch.close()
            if zygote is not None:
                zygote.close()
        check = exactness(settings, producer.ids)
    return {"workers": workers, "kills": kills * workers, "produced": len(producer.ids),
            "kills_after_table_commit": evidence["after_commit"],
            "orphan_data_files": orphans,
            "stalled": len(stalled), "partition_ends": ends, "table_offsets": final,
            "conflicts_last_run": sum(r["conflicts"] for r in reports),
            "commits_last_run": sum(r["commits"] for r in reports),
            "fenced_last_run": sum(r["fenced"] for r in reports), **check,
            "seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------------------------------------- speed


def _run_workers(settings: EncoreSettings, bootstrap: str, root: Path, n: int, until) -> list[dict]:  # noqa: ANN001
    pool = make_workers(settings, bootstrap, root, n)
    for w in pool:
        w.start()
    try:
        wait_for(lambda: all(w.ready() for w in pool), 180, "the workers to start", every_s=0.1)
        until()
        return [w.stop() for w in pool]
    finally:
        for w in pool:
            w.ensure_dead()


def throughput(root: Path, *, events: int, workers: int, batch_size: int, users: int, items: int,
               malformed: float) -> dict:
    settings = platform(root, workers, batch_size)
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        payloads, valid = make_payloads(events, users=users, items=items, malformed_share=malformed, seed=1,
                                        start_ms=int(time.time() * 1000) - 86_400_000)
        from bench.ingest import produce

        produce(svc.kafka_bootstrap, settings.topics.interactions, payloads)
        watch = TableWatch(settings.model_copy(update={"data_dir": root / "watch"}))

        def caught_up() -> bool:
            total = sum(watch.offsets(list(range(workers))).values())
            return total >= len(payloads)

        try:
            reports = _run_workers(settings, svc.kafka_bootstrap, root, workers,
                                   lambda: wait_for(caught_up, 600, "the backlog", every_s=0.2))
        finally:
            watch.close()
        check = exactness(settings, valid)
    spans = [s for r in reports for s in r["spans"]]
    # as bench.ingest's workers phase: from the first batch stored to the last one stored
    seconds = max(s[1] for s in spans) - min(s[1] for s in spans)
    strict = max(s[2] for s in spans) - min(s[0] for s in spans)  # first poll to last batch done
    return {"workers": workers, "events": events, "valid": len(valid), "events_per_s": round(len(valid) / seconds),
            "seconds": round(seconds, 2), "events_per_s_first_poll_to_last_done": round(len(valid) / strict),
            "batches": sum(r["batches"] for r in reports),
            "conflicts": sum(r["conflicts"] for r in reports), "commits": sum(r["commits"] for r in reports),
            **check}


def freshness(root: Path, *, rate: float, seconds: float, workers: int, batch_size: int, users: int, items: int,
              malformed: float) -> dict:
    settings = platform(root, workers, batch_size)
    n = int(rate * seconds)
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        start_ms = int(time.time() * 1000) - 3_600_000
        _, valid = make_payloads(n, users=users, items=items, malformed_share=malformed, seed=2, start_ms=start_ms)
        watch = TableWatch(settings.model_copy(update={"data_dir": root / "watch"}))

        def produce_then_drain() -> None:
            # the producer is a separate process, as in production (bench.ingest's own producer mode)
            env = {**os.environ, "ENCORE_TOPICS__INTERACTIONS": settings.topics.interactions}
            subprocess.run([sys.executable, "-m", "bench.ingest", "--produce-to", svc.kafka_bootstrap,
                            "--rate", str(rate), "--events", str(n), "--users", str(users), "--items", str(items),
                            "--malformed", str(malformed), "--seed", "2", "--start-ms", str(start_ms)],
                           check=True, cwd=ROOT, env=env)
            wait_for(lambda: sum(watch.offsets(list(range(workers))).values()) >= n, 120, "the last events")
            time.sleep(1.0)  # the last batch's Kafka commit and report

        try:
            reports = _run_workers(settings, svc.kafka_bootstrap, root, workers, produce_then_drain)
        finally:
            watch.close()
        check = exactness(settings, valid)
    fresh = np.array([f for r in reports for f in r["freshness"]])
    return {"rate": rate, "events": n, "workers": workers, "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3),
            "freshness_p99_s": round(float(np.percentile(fresh, 99)), 3),
            "conflicts": sum(r["conflicts"] for r in reports), "commits": sum(r["commits"] for r in reports), **check}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=3, help="workers (and partitions) of the drill")
    ap.add_argument("--kills", type=int, default=2, help="SIGKILLs per worker in the drill")
    ap.add_argument("--drill-rate", type=float, default=2000, help="events/s produced during the drill")
    ap.add_argument("--events", type=int, default=200_000, help="events for the throughput phase")
    ap.add_argument("--throughput-workers", type=int, default=2)
    ap.add_argument("--malformed", type=float, default=0.01)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=5000, help="events/s of the freshness phase")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--phases", default="drill,throughput,freshness")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one worker process
    ap.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)  # internal: forks workers
    args = ap.parse_args(argv)
    if args.zygote:
        zygote_main()
        return {}
    if args.worker is not None:
        _worker_logging()
        worker_main([args.worker], args.report)
        return {}
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    phases = set(args.phases.split(","))
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="encore-bench-iceberg-") as tmp:
        if "drill" in phases:
            out["drill"] = drill(Path(tmp) / "drill", workers=args.workers, kills=args.kills, rate=args.drill_rate,
                                 users=max(args.workers * 20, 60), batch_size=min(args.batch_size, 2000))
        if "throughput" in phases:
            out["throughput"] = throughput(Path(tmp) / "throughput", events=args.events,
                                           workers=args.throughput_workers, batch_size=args.batch_size,
                                           users=args.users, items=args.items, malformed=args.malformed)
        if "freshness" in phases:
            out["freshness"] = freshness(Path(tmp) / "freshness", rate=args.rate, seconds=args.seconds,
                                         workers=args.throughput_workers, batch_size=args.batch_size,
                                         users=args.users, items=args.items, malformed=args.malformed)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
