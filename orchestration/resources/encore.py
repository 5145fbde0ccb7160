"""The settings every asset reads (``infra.settings``), carried to each run without its secrets in run config."""

from __future__ import annotations

import hashlib

import dagster as dg

from infra.settings import EncoreSettings, get_settings, read_settings_file, write_settings_file


class EncoreResource(dg.ConfigurableResource):
    """Settings shared by all assets.

    ``settings_file`` (a whole settings object, as ``encore`` commands and tests pass it: see
    ``encore_resource``) wins; else ``data_dir`` overrides the process's settings; else the process's
    settings (``ENCORE_*``, YAML) as is. A file rather than the settings themselves, because Dagster stores
    resource config with each run, and the settings may hold passwords.
    """

    data_dir: str = ""
    settings_file: str = ""

    def settings(self) -> EncoreSettings:
        if self.settings_file:
            return read_settings_file(self.settings_file)
        if self.data_dir:
            return EncoreSettings(data_dir=self.data_dir)
        return get_settings()


def encore_resource(settings: EncoreSettings) -> EncoreResource:
    """An ``EncoreResource`` carrying exactly ``settings`` (through a 0600 file under the run dir)."""
    text = settings.model_dump_json()
    path = settings.run_dir / f"settings-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not path.is_file():
        write_settings_file(settings, path)
    return EncoreResource(settings_file=str(path))
