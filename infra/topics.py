"""Encore's Kafka topics: created where missing, with the partitions and replicas the settings ask for.

Infrastructure, not feature logic: the embedded services create them when they start a broker
(``infra.services``), and a deployment runs ``encore bootstrap`` once; topics created beforehand by a
platform's own tooling are left alone.
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from infra.settings import TopicSettings

log = logging.getLogger("encore.kafka")


def ensure_topics(bootstrap: str, topics: TopicSettings, **options: object) -> None:
    """Create the topics Encore uses where missing. ``options``: security settings (``KafkaSettings``)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="encore-admin", request_timeout_ms=10000,
                             **options)
    try:
        existing = set(admin.list_topics())
        wanted = [topics.interactions, topics.dlq, topics.exposures]
        new = [
            NewTopic(name=t, num_partitions=topics.partitions, replication_factor=topics.replication_factor)
            for t in wanted
            if t not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [t.name for t in new])
    finally:
        admin.close()
