"""Dagster resources, one module each: how assets reach the settings, Kafka, Feast and MLflow.

Each resource carries only the data directory (or an explicit endpoint) so the same definitions work in the
UI, in ``encore`` commands and in tests; endpoints of embedded services are looked up when a run starts.
"""

from orchestration.resources.encore import EncoreResource, encore_resource
from orchestration.resources.feast import FeastResource
from orchestration.resources.kafka import KafkaResource
from orchestration.resources.mlflow import MLflowResource

__all__ = ["EncoreResource", "FeastResource", "KafkaResource", "MLflowResource", "encore_resource"]
