from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import EncoreSettings


def test_defaults_put_everything_under_data_dir(tmp_path: Path):
    s = EncoreSettings(data_dir=tmp_path)
    for p in (s.offline_dir, s.feast_dir, s.mlflow_dir, s.dagster_home, s.reports_dir, s.run_dir):
        assert tmp_path.resolve() in p.parents


def test_environment_overrides_nested_values(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_SIMULATOR__USERS", "77")
    monkeypatch.setenv("ENCORE_TRAIN__RECIPE", "sasrec")
    s = EncoreSettings()
    assert s.simulator.users == 77 and s.train.recipe == "sasrec"


def test_yaml_file_then_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "encore.yaml"
    cfg.write_text("simulator:\n  users: 11\n  items: 22\ntrain:\n  recipe: hstu\n")
    monkeypatch.setenv("ENCORE_CONFIG", str(cfg))
    monkeypatch.setenv("ENCORE_TRAIN__RECIPE", "sasrec")
    s = EncoreSettings()
    assert s.simulator.users == 11 and s.simulator.items == 22
    assert s.train.recipe == "sasrec"  # environment beats the file


def test_bad_values_are_rejected_clearly(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_SIMULATOR__USERS", "-1")
    with pytest.raises(ValidationError, match="users"):
        EncoreSettings()


def test_unknown_keys_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "encore.yaml"
    cfg.write_text("simulatr:\n  users: 11\n")
    monkeypatch.setenv("ENCORE_CONFIG", str(cfg))
    with pytest.raises(ValidationError, match="simulatr"):
        EncoreSettings()


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("ENCORE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="ENCORE_CONFIG"):
        EncoreSettings()


def test_kafka_security_options_reach_every_client(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ENCORE_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("ENCORE_KAFKA__SASL_USERNAME", "ingest")
    monkeypatch.setenv("ENCORE_KAFKA__SASL_PASSWORD", "s3cret-s3cret")
    monkeypatch.setenv("ENCORE_KAFKA__SSL_CAFILE", "/etc/ssl/kafka-ca.pem")
    s = EncoreSettings()
    assert s.kafka.client_options() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "ingest",
        "sasl_plain_password": "s3cret-s3cret", "ssl_cafile": "/etc/ssl/kafka-ca.pem"}
    assert "s3cret" not in repr(s)
    assert EncoreSettings(_env_prefix="NOT_ENCORE_").kafka.client_options() == {}  # plaintext: kafka-python defaults


def test_sasl_without_credentials_is_rejected(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="sasl_mechanism, sasl_username and sasl_password"):
        EncoreSettings()


def test_child_env_writes_secrets_for_the_child_only(tmp_path: Path):
    from infra.settings import child_env

    s = EncoreSettings(data_dir=tmp_path, feast={"redis": "redis:6379,password=pw-in-url"})
    env = child_env(s, tmp_path / "child.yaml")
    path = Path(env["ENCORE_CONFIG"])
    assert (path.stat().st_mode & 0o777) == 0o600
    assert "pw-in-url" in path.read_text()


def test_dagster_instance_storage_follows_the_settings(tmp_path: Path):
    from cli.jobs import instance_yaml, psycopg2_url

    assert "storage" not in instance_yaml(EncoreSettings(data_dir=tmp_path))
    text = instance_yaml(EncoreSettings(data_dir=tmp_path, dagster={"postgres_url": "postgresql://u:p@db:5432/dagster"}))
    assert "postgresql+psycopg2://u:p@db:5432/dagster" in text
    assert psycopg2_url("postgresql+psycopg2://h/d") == "postgresql+psycopg2://h/d"


def test_private_files_are_private_even_when_an_older_file_was_not(tmp_path: Path):
    from infra.settings import write_private_file

    path = tmp_path / "dagster.yaml"
    path.write_text("telemetry: {enabled: false}\n")
    path.chmod(0o644)  # as an earlier version wrote it
    write_private_file(path, "storage: {postgres: {postgres_url: 'postgresql+psycopg2://u:pw@db/dagster'}}\n")
    assert (path.stat().st_mode & 0o777) == 0o600 and "pw@db" in path.read_text()


def test_the_registry_group_names_the_model_and_its_aliases(monkeypatch: pytest.MonkeyPatch):
    s = EncoreSettings()
    assert (s.registry.model_name, s.registry.challenger_alias, s.registry.champion_alias) == (
        "encore-recommender", "challenger", "champion")  # what existing registries hold
    monkeypatch.setenv("ENCORE_REGISTRY__MODEL_NAME", "team-recs")
    monkeypatch.setenv("ENCORE_REGISTRY__CHAMPION_ALIAS", "live")
    s = EncoreSettings()
    assert s.registry.model_name == "team-recs" and s.registry.champion_alias == "live"
    monkeypatch.setenv("ENCORE_REGISTRY__CHALLENGER_ALIAS", "live")
    with pytest.raises(ValidationError, match="must differ"):
        EncoreSettings()


def test_the_moved_serve_model_settings_say_where_they_went(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ENCORE_SERVE__MODEL_NAME", "team-recs")
    with pytest.raises(ValidationError, match=r"serve.model_name moved to registry.model_name "
                                              r"\(ENCORE_REGISTRY__MODEL_NAME\)"):
        EncoreSettings()
    monkeypatch.delenv("ENCORE_SERVE__MODEL_NAME")
    with pytest.raises(ValidationError, match="serve.model_alias moved to registry.champion_alias"):
        EncoreSettings(serve={"model_alias": "live"})


def test_named_admin_tokens_and_the_single_token_as_actor_admin(monkeypatch: pytest.MonkeyPatch):
    import json

    monkeypatch.setenv("ENCORE_SERVE__ADMIN_TOKENS", json.dumps({"alice": "alice-token-0123456789",
                                                                 "ci": "ci-token-0123456789ab"}))
    monkeypatch.setenv("ENCORE_SERVE__ADMIN_TOKEN", "legacy-token-0123456789")
    s = EncoreSettings()
    assert {actor: t.get_secret_value() for actor, t in s.serve.admin_credentials().items()} == {
        "alice": "alice-token-0123456789", "ci": "ci-token-0123456789ab", "admin": "legacy-token-0123456789"}
    assert "alice-token" not in repr(s) and "alice-token" not in str(s.model_dump())
    # revealed only in JSON dumps, which is how child processes receive their settings
    assert s.model_dump(mode="json")["serve"]["admin_tokens"]["ci"] == "ci-token-0123456789ab"
    assert EncoreSettings(_env_prefix="NOT_ENCORE_").serve.admin_credentials() == {}


@pytest.mark.parametrize("serve, problem", [
    ({"admin_tokens": {"alice": "too-short"}}, "admin_tokens.alice"),
    ({"admin_tokens": {"alice": "same-token-0123456789", "bob": "same-token-0123456789"}}, "a token of its own"),
    ({"admin_tokens": {"admin": "admin-token-0123456789"}, "admin_token": "other-token-0123456789"}, "'admin'"),
    ({"admin_tokens": {"../x": "a-token-0123456789ab"}}, "actor name"),
])
def test_bad_admin_tokens_are_refused_without_echoing_them(serve: dict, problem: str):
    with pytest.raises(ValidationError, match=problem) as err:
        EncoreSettings(serve=serve)
    assert "0123456789" not in str(err.value) and "too-short" not in str(err.value)


def test_the_settings_file_of_dagster_runs_is_not_named_after_secrets(tmp_path: Path):
    import hashlib

    from orchestration.resources import encore_resource

    first = EncoreSettings(data_dir=tmp_path, serve={"admin_token": "first-secret-0123456789"})
    second = EncoreSettings(data_dir=tmp_path, serve={"admin_token": "second-secret-0123456789"})
    a, b = Path(encore_resource(first).settings_file), Path(encore_resource(second).settings_file)
    # the name (which Dagster stores with every run) is the same whatever the secret
    assert a == b and a.parent == first.run_dir
    for s in (first, second):
        assert hashlib.sha256(s.model_dump_json().encode()).hexdigest()[:12] not in a.name
    # and the file carries exactly the latest caller's settings, privately
    assert b.read_text().count("second-secret-0123456789") == 1 and "first-secret" not in b.read_text()
    assert (b.stat().st_mode & 0o777) == 0o600
    assert encore_resource(second).settings().serve.admin_token.get_secret_value() == "second-secret-0123456789"
    other = EncoreSettings(data_dir=tmp_path, serve={"admin_token": "first-secret-0123456789", "default_k": 5})
    assert Path(encore_resource(other).settings_file) != a  # non-secret settings still pick the file
    assert not list(first.run_dir.glob(".*.tmp"))
