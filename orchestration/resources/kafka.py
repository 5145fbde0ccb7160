"""How assets reach Kafka: an explicit bootstrap, else the settings' or the running embedded broker's."""

from __future__ import annotations

import dagster as dg

from infra.services import resolve_kafka
from infra.settings import EncoreSettings


class KafkaResource(dg.ConfigurableResource):
    bootstrap: str = ""  # empty: ENCORE_KAFKA_BOOTSTRAP or the embedded broker now running

    def resolve(self, settings: EncoreSettings) -> str:
        return self.bootstrap or resolve_kafka(settings)
