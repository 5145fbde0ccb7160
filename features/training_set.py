"""Which engine builds a training set: the one ``offline.training_engine`` names.

Both builders read the same store snapshot and return the same rows (tests/test_spark_training.py): DuckDB in
this process (``features.offline_read.training_events``), or Spark (``features.spark_training``), which pays a
JVM start for the ability to run on a cluster. The training asset calls this and never asks which it got.
"""

from __future__ import annotations

import pandas as pd

from features.offline_read import training_events
from infra.settings import EncoreSettings


def build_training_set(settings: EncoreSettings, snapshot_id: int | None = None,
                       cutoff_ms: int | None = None) -> pd.DataFrame:
    """Every stored event up to ``cutoff_ms`` (None: all) in the snapshot, one row per event_id, the training
    columns, ordered by user, time and id, built by the settings' engine."""
    if settings.offline.training_engine == "spark":
        from features.spark_training import spark_training_events  # pyspark loads only when it is used

        return spark_training_events(settings, snapshot_id, cutoff_ms)
    return training_events(settings, snapshot_id, cutoff_ms)
