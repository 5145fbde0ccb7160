"""The settings every asset reads (``infra.settings``), carried to each run without its secrets in run config."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import dagster as dg
import yaml

from infra.settings import EncoreSettings, get_settings, read_settings_file, write_private_file


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


def masked_settings_digest(settings: EncoreSettings) -> str:
    """SHA-256 (hex) of the settings with every secret masked: it depends on no secret's value."""
    # The Python-mode dump keeps SecretStr objects (only JSON dumps reveal them), which str() masks as '**********'
    masked = json.dumps(settings.model_dump(), default=str, sort_keys=True)
    return hashlib.sha256(masked.encode()).hexdigest()


def encore_resource(settings: EncoreSettings) -> EncoreResource:
    """An ``EncoreResource`` carrying exactly ``settings`` (through a 0600 file under the run dir).

    The file is ``run/settings-<prefix of masked_settings_digest>.yaml``: its name, which Dagster stores with
    each run, derives from the non-secret settings only, so it reveals nothing about a password or token.
    Settings that differ only in their secrets share the name; the file is then replaced (atomically, so a
    reader sees the old or the new file, never a mix) and holds the secrets of the latest caller.
    """
    text = yaml.safe_dump(settings.model_dump(mode="json"))  # what write_settings_file writes: secrets revealed
    path = settings.run_dir / f"settings-{masked_settings_digest(settings)[:12]}.yaml"
    try:
        current = path.read_text()
    except FileNotFoundError:
        current = None
    if current != text:
        tmp = write_private_file(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"), text)
        os.replace(tmp, path)
    return EncoreResource(settings_file=str(path))
