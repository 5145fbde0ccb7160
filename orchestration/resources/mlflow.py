"""How assets reach MLflow: an explicit tracking URI, else the settings' or the running embedded server's."""

from __future__ import annotations

import dagster as dg

from infra.services import resolve_mlflow
from infra.settings import EncoreSettings


class MLflowResource(dg.ConfigurableResource):
    tracking_uri: str = ""  # empty: ENCORE_MLFLOW_TRACKING_URI or the embedded server now running

    def resolve(self, settings: EncoreSettings) -> str:
        return self.tracking_uri or resolve_mlflow(settings)
