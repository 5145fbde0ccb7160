"""What every ``encore`` command shares: the one ``--data-dir`` option, settings with a readable error, logging,
and the endpoint of the running Kafka broker."""

from __future__ import annotations

import logging
import time

import click

from infra.settings import EncoreSettings, load_settings

data_dir_option = click.option("--data-dir", envvar="ENCORE_DATA_DIR", default=None,
                               help="where Encore keeps its state (default ./.encore)")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Client libraries narrate every connection at INFO; their warnings still show.
    for noisy in ("kafka", "feast", "urllib3", "httpx", "alembic", "mlflow", "dagster", "torchrec"):
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy == "kafka" else logging.WARNING)


def settings_for(data_dir: str | None) -> EncoreSettings:
    """The command's settings; a wrong setting is a one-line usage error, not a traceback."""
    try:
        return load_settings(data_dir)
    except Exception as exc:  # pydantic explains exactly which setting is wrong
        raise click.ClickException(f"invalid settings: {exc}") from exc


def running_kafka(settings: EncoreSettings) -> str:
    from infra.services import resolve_kafka

    try:
        return resolve_kafka(settings)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
