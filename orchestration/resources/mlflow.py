"""How assets reach MLflow: an explicit tracking URI, else the settings' or the running embedded server's
(the lifecycle room's rule, ``models.lifecycle.tracking.tracking_uri``, without the sqlite-file fallback:
assets write runs and models, which need the server)."""

from __future__ import annotations

import dagster as dg

from infra.settings import EncoreSettings


class MLflowResource(dg.ConfigurableResource):
    tracking_uri: str = ""  # empty: ENCORE_MLFLOW_TRACKING_URI or the embedded server now running

    def resolve(self, settings: EncoreSettings) -> str:
        from models.lifecycle.tracking import tracking_uri

        return tracking_uri(settings, self.tracking_uri or None, file_fallback=False)
