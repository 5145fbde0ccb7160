"""Dagster only: the code location (``definitions``), asset groups (``assets/``), jobs, sensors and schedules,
and one resource per module (``resources/``)."""
