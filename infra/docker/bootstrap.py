"""One-shot bootstrap of a deployment: Encore's Kafka topics and its Feast definitions. Idempotent.

Run once before the long-lived services (compose: the `bootstrap` service; Kubernetes: the encore-bootstrap
Job), from any Encore image:

    python infra/docker/bootstrap.py

Why a separate step: serving reads Feast's registry without writing it (``feature_store(apply=False)``), so
the feature views must exist before the first replica starts, and replicas starting together must not race
to create topics or registry rows. Topics are created only where missing, with ``topics.partitions``
partitions and ``topics.replication_factor`` replicas (``features.kafka_io.ensure_topics``); topics created
beforehand by your platform's tooling are left alone.
"""

from __future__ import annotations

import sys

from infra.settings import load_settings


def main() -> int:
    settings = load_settings()
    if not settings.kafka_bootstrap:
        print("bootstrap: ENCORE_KAFKA_BOOTSTRAP is not set", file=sys.stderr)
        return 2
    from features.feature_repo import feature_store
    from features.kafka_io import ensure_topics

    ensure_topics(settings.kafka_bootstrap, settings.topics, **settings.kafka.client_options())
    print(f"bootstrap: topics {settings.topics.interactions}, {settings.topics.dlq}, {settings.topics.exposures} "
          f"on {settings.kafka_bootstrap}")
    store = feature_store(settings, apply=True)
    views = sorted(v.name for v in store.list_feature_views())
    print(f"bootstrap: Feast project {store.project}: feature views {', '.join(views)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
