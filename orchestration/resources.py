"""Dagster resources: how assets reach Kafka, Feast and MLflow.

Each resource carries only the data directory (or an explicit endpoint) so the same definitions work in the
UI, in ``encore`` commands and in tests; endpoints of embedded services are looked up when a run starts.
"""

from __future__ import annotations

import json

import dagster as dg
from feast import FeatureStore

from features.feature_repo import feature_store
from infra.services import resolve_kafka, resolve_mlflow
from infra.settings import EncoreSettings, get_settings


class EncoreResource(dg.ConfigurableResource):
    """Settings shared by all assets.

    ``settings_json`` (a whole settings object, as ``encore`` commands and tests pass it) wins; else
    ``data_dir`` overrides the process's settings; else the process's settings (``ENCORE_*``, YAML) as is.
    """

    data_dir: str = ""
    settings_json: str = ""

    def settings(self) -> EncoreSettings:
        if self.settings_json:
            return EncoreSettings(**json.loads(self.settings_json))
        if self.data_dir:
            return EncoreSettings(data_dir=self.data_dir)
        return get_settings()


class KafkaResource(dg.ConfigurableResource):
    bootstrap: str = ""  # empty: ENCORE_KAFKA_BOOTSTRAP or the embedded broker now running

    def resolve(self, settings: EncoreSettings) -> str:
        return self.bootstrap or resolve_kafka(settings)


class FeastResource(dg.ConfigurableResource):
    def store(self, settings: EncoreSettings) -> FeatureStore:
        return feature_store(settings)


class MLflowResource(dg.ConfigurableResource):
    tracking_uri: str = ""  # empty: ENCORE_MLFLOW_TRACKING_URI or the embedded server now running

    def resolve(self, settings: EncoreSettings) -> str:
        return self.tracking_uri or resolve_mlflow(settings)
