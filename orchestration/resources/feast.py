"""How assets reach Feast: the feature store of the settings (``features.feature_repo``)."""

from __future__ import annotations

import dagster as dg
from feast import FeatureStore

from features.feature_repo import feature_store
from infra.settings import EncoreSettings


class FeastResource(dg.ConfigurableResource):
    def store(self, settings: EncoreSettings) -> FeatureStore:
        return feature_store(settings)
