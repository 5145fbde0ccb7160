"""Replay a source of interaction events into Kafka, in timestamp order, at a chosen rate.

Sources: ``synthetic`` (the music-streaming simulator), a public dataset name (``ml-100k``, ``ml-1m``,
``ml-20m``, ``ml-25m``, ``amazon``, ``yambda`` with ``--dataset-dir``) or a JSON-lines file of events.
Every event is validated before it is sent: a malformed line is reported with its line number and reason
and counted, never silently dropped (``send_invalid=True`` publishes it anyway, to exercise the DLQ).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from tqdm import tqdm

from features.events import InteractionEvent, InvalidEvent, parse_event
from features.kafka_io import make_producer
from infra.settings import EncoreSettings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger("encore.replay")


@dataclass
class ReplayReport:
    sent: int = 0
    invalid: int = 0
    invalid_sent: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # the first few, for the terminal

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


Item = InteractionEvent | tuple[int, bytes, InvalidEvent]  # a valid event, or (line, raw bytes, why not)


def jsonl_source(path: Path, settings: EncoreSettings) -> Iterator[Item]:
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            parsed = parse_event(raw, max_payload_bytes=settings.ingest.max_payload_bytes,
                                 max_future_skew_s=settings.ingest.max_future_skew_s)
            yield parsed if isinstance(parsed, InteractionEvent) else (line_no, raw, parsed)


def open_source(source: str, settings: EncoreSettings, data_dir: Path | None = None,
                limit: int | None = None) -> Iterator[Item]:
    """Check ``source`` now (so a typo fails before anything connects), then iterate it lazily."""
    if source == "synthetic":
        from features.simulator import MusicWorld

        events: Iterable[Item] = MusicWorld(settings.simulator).history()
    elif Path(source).suffix in {".jsonl", ".json", ".ndjson"} or Path(source).is_file():
        if not Path(source).is_file():
            raise FileNotFoundError(f"no such events file: {source}")
        events = jsonl_source(Path(source), settings)
    else:
        from features.datasets import DATASETS, load_dataset

        if source not in DATASETS:
            raise ValueError(f"unknown source {source!r}: use synthetic, a JSON-lines file, or one of {sorted(DATASETS)}")
        if data_dir is None:
            raise ValueError(f"source {source!r} needs --dataset-dir pointing at the dataset's files")
        events = load_dataset(source, data_dir)
    return itertools.islice(events, limit)


def replay(
    items: Iterable[Item],
    bootstrap: str,
    topic: str,
    *,
    rate: float | None = None,
    total: int | None = None,
    send_invalid: bool = False,
    progress: bool = True,
    kafka_options: dict[str, object] | None = None,
) -> ReplayReport:
    """Publish events (already in timestamp order) at ``rate`` events/s (None: as fast as possible).

    ``kafka_options``: the client's security settings (``settings.kafka.client_options()``)."""
    report = ReplayReport()
    producer = make_producer(bootstrap, **(kafka_options or {}))
    start = time.monotonic()
    bar = tqdm(total=total, unit="ev", desc=f"replay → {topic}", disable=not progress, mininterval=0.5)
    try:
        for item in items:
            if isinstance(item, InteractionEvent):
                producer.send(topic, key=str(item.user_id).encode(), value=item.to_json_bytes())
                report.sent += 1
            else:
                line_no, raw, why = item
                report.invalid += 1
                msg = f"line {line_no}: {why.reason}"
                if len(report.problems) < 10:
                    report.problems.append(msg)
                log.warning("invalid event at %s", msg)
                if send_invalid:
                    producer.send(topic, value=raw)
                    report.invalid_sent += 1
            bar.update(1)
            if rate:
                # pace by schedule, not by sleeping per event: keeps the long-run rate exact
                ahead = (report.sent + report.invalid) / rate - (time.monotonic() - start)
                if ahead > 0.002:
                    time.sleep(ahead)
        producer.flush()
    finally:
        bar.close()
        producer.close()
    report.seconds = time.monotonic() - start
    return report


def events_frame(source: str, settings: EncoreSettings, data_dir: Path | None = None) -> "pd.DataFrame":
    """A source's events as a DataFrame, for offline training without Kafka."""
    if source == "synthetic":
        from features.simulator import MusicWorld

        return MusicWorld(settings.simulator).history_frame()
    from features.datasets import load_frame

    if data_dir is None:
        raise ValueError(f"dataset {source!r} needs --dataset-dir pointing at its files")
    return load_frame(source, data_dir)


def dataset_catalogue(source: str, data_dir: Path | None) -> np.ndarray | None:
    """Ids of every item a dataset's item file lists (``features.datasets.load_catalogue``), for training on it
    offline; None for the simulator and for datasets without an item file (the catalogue is then the events')."""
    if source == "synthetic" or data_dir is None:
        return None
    from features.datasets import load_catalogue

    return load_catalogue(source, data_dir)
