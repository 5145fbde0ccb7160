-- First start of the compose PostgreSQL only (mounted into /docker-entrypoint-initdb.d): one database per
-- consumer, all owned by the `encore` role that the image creates from POSTGRES_USER.
--   mlflow   MLflow tracking and model registry (mlflow server --backend-store-uri)
--   dagster  Dagster instance: runs, event logs, schedules, sensor cursors (ENCORE_DAGSTER__POSTGRES_URL)
--   feast    Feast SQL registry (ENCORE_FEAST__REGISTRY)
-- Separate databases keep each tool's migrations (alembic in all three) from meeting the others' tables.
CREATE DATABASE mlflow OWNER encore;
CREATE DATABASE dagster OWNER encore;
CREATE DATABASE feast OWNER encore;
