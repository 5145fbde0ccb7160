"""The one typed settings object of Encore.

Precedence (highest first): keyword arguments, ``ENCORE_*`` environment variables, the YAML file named by
``ENCORE_CONFIG`` (or ``./encore.yaml`` when it exists), then the defaults below. Nested groups use a
double underscore in environment variables, e.g. ``ENCORE_SIMULATOR__USERS=2000``.

Every path lives under ``data_dir`` unless set explicitly, so one folder holds a whole local platform
(broker state is in memory; the Feast offline store is the system of record).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class _Group(BaseModel):
    """A settings group: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class TopicSettings(_Group):
    interactions: str = "interactions"
    dlq: str = "interactions.dlq"
    exposures: str = "exposures"
    partitions: int = Field(default=1, ge=1, description="partitions per topic when Encore creates them")
    replication_factor: int = Field(default=1, ge=1, description="replicas per partition when Encore creates "
                                    "topics (3 on a production cluster)")


def _reveal(secret: SecretStr | None) -> str | None:
    """Secrets print as ``**********`` but are written out in JSON/YAML dumps, since child processes
    (``child_env``) and in-process Dagster runs receive the settings that way. Those files are 0600."""
    return None if secret is None else secret.get_secret_value()


def _reveal_all(secrets: dict[str, SecretStr]) -> dict[str, str]:
    """``_reveal`` for a mapping of secrets (named admin tokens)."""
    return {name: secret.get_secret_value() for name, secret in secrets.items()}


# The actor of the single ``serve.admin_token`` (named tokens are ``serve.admin_tokens``); actor names are
# written to the experiment audit log as ``api:<name>``.
ADMIN_ACTOR = "admin"
# A ranker is always a registry target of registry.ranker_model_name (there is no baseline ranker): the one rule
# for serve.ranker and for an experiment arm's ranker.
RANKER_TARGET_PATTERN = r"^(alias:[A-Za-z0-9_.-]+|version:[1-9][0-9]*)$"
_ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KafkaSettings(_Group):
    """How every Kafka client authenticates (kafka-python option names). The address is ``kafka_bootstrap``."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers' certificates")
    ssl_certfile: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = None

    _reveal_password = field_serializer("sasl_password", when_used="json")(staticmethod(_reveal))

    @model_validator(mode="after")
    def _coherent(self) -> "KafkaSettings":
        sasl = self.security_protocol.startswith("SASL")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username "
                             "and sasl_password (ENCORE_KAFKA__SASL_*)")
        if not sasl and self.sasl_mechanism:
            raise ValueError(f"sasl_mechanism is set but security_protocol is {self.security_protocol}")
        return self

    def client_options(self) -> dict[str, object]:
        """Keyword arguments for KafkaProducer/KafkaConsumer/KafkaAdminClient (empty on plaintext)."""
        options: dict[str, object] = {}
        if self.security_protocol != "PLAINTEXT":
            options["security_protocol"] = self.security_protocol
        if self.sasl_mechanism:
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=_reveal(self.sasl_password))
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                options[name] = str(value)
        return options


class FeastSettings(_Group):
    """Where Feast keeps its registry and online store. Unset: SQLite files under ``data_dir`` (local)."""

    redis: SecretStr | None = Field(default=None, description="Redis online store, as Feast's connection "
                                    "string: 'host:port[,password=...][,ssl=true][,db=0]'")
    registry: SecretStr | None = Field(default=None, description="SQL registry, a SQLAlchemy URL such as "
                                       "'postgresql+psycopg://user:password@host:5432/feast'")
    registry_cache_ttl_s: int = Field(default=60, ge=0, description="how long clients trust their cached registry")

    _reveal_urls = field_serializer("redis", "registry", when_used="json")(staticmethod(_reveal))


class DagsterSettings(_Group):
    """Dagster instance storage (runs, event logs, schedules, sensor cursors). Unset: SQLite under data_dir."""

    postgres_url: SecretStr | None = Field(default=None, description="e.g. 'postgresql://user:password@host:"
                                           "5432/dagster' (dagster-postgres)")

    _reveal_url = field_serializer("postgres_url", when_used="json")(staticmethod(_reveal))


class OfflineSettings(_Group):
    """Where the offline store (the system of record) lives and in which format.

    parquet: files plus a SQLite event-id index under ``data_dir`` (one host: SQLite is unsafe on a network
    filesystem). iceberg: an Apache Iceberg table behind a SQL catalog, which ingest workers on several hosts
    append to (see features/iceberg_store.py); only the catalog and the warehouse are shared."""

    backend: Literal["parquet", "iceberg"] = "parquet"
    catalog_url: SecretStr | None = Field(
        default=None, description="SQLAlchemy URL of the Iceberg SQL catalog, e.g. 'postgresql+psycopg://user:"
        "password@host:5432/iceberg'; unset: a SQLite file under data_dir (one host only)")
    warehouse: str | None = Field(
        default=None, description="where table data and metadata live: a path, or 's3://bucket/prefix' (with "
        "the AWS_* or s3.* settings pyiceberg reads); unset: under data_dir")
    namespace: str = Field(default="encore", min_length=1, pattern=r"^[A-Za-z0-9_]+$")
    worker_assignment: Literal["static", "group"] = Field(
        default="static", description="how an Iceberg ingest worker gets its partitions. static: those given "
        "to it (--partitions; all when none), e.g. by StatefulSet ordinal; group: Kafka's consumer group assigns "
        "them and moves them on rebalance (each new owner resumes from the offsets the table records)")
    commit_retries: int = Field(default=30, ge=0, description="commit conflicts (another worker committed "
                                "first) retried per batch before the batch fails and is redelivered")
    target_file_mb: int = Field(default=128, ge=1, description="data file size compaction aims at")
    compaction_days: int = Field(default=2, ge=1, description="the dedup/compaction window: the last N event "
                                 "days are rewritten (duplicate event_ids dropped, small files merged)")
    snapshot_retention_s: int = Field(default=3600, ge=0, description="snapshots older than this are expired "
                                      "(those that carry a partition's newest Kafka offsets are kept)")
    orphan_grace_s: int = Field(default=3600, ge=60, description="unreferenced files younger than this are "
                                "kept by orphan cleanup (a writer may be about to commit them)")
    training_engine: Literal["inprocess", "spark"] = Field(
        default="inprocess", description="what builds the training set from the offline store's snapshot. "
        "inprocess: DuckDB in the Dagster step; spark: a Spark job (features/spark_training.py; needs a Java "
        "runtime), the same rows")
    spark_master: str = Field(default="local[*]", description="the Spark master the spark engine submits to, "
                              "e.g. 'local[4]' or 'spark://host:7077'")

    _reveal_url = field_serializer("catalog_url", when_used="json")(staticmethod(_reveal))

    def catalog_uri(self, root: Path) -> str:
        if self.catalog_url is not None:
            return self.catalog_url.get_secret_value()
        return f"sqlite:///{root / 'offline' / 'iceberg' / 'catalog.sqlite'}"

    def warehouse_uri(self, root: Path) -> str:
        return self.warehouse or str(root / "offline" / "iceberg" / "warehouse")


class SimulatorSettings(_Group):
    """Size and seed of the synthetic music-streaming world (the default data)."""

    users: int = Field(default=600, ge=1)
    items: int = Field(default=800, ge=2)
    genres: int = Field(default=12, ge=1)
    sessions_per_user: int = Field(default=6, ge=1)
    events_per_session: int = Field(default=12, ge=1)
    days: int = Field(default=30, ge=1, description="span of simulated history, ending 'now'")
    seed: int = 7
    quality_weight: float = Field(default=0.0, ge=0.0, description="how much each track's hidden quality moves "
                                  "reactions to it (choices never see it; see features/simulator.py); 0: "
                                  "reactions follow the choice model alone")


class IngestSettings(_Group):
    batch_size: int = Field(default=20000, ge=1, description="max events consumed per bounded batch")
    poll_timeout_ms: int = Field(default=2000, ge=1, description="a batch closes after this long without data")
    max_batch_wait_ms: int = Field(default=1000, ge=1, description="a batch closes this long after its first "
                                   "record even under steady traffic (bounds freshness)")
    item_stats_interval_s: float = Field(default=5.0, ge=0, description="push user_stats and item_stats at most "
                                        "this often (histories go out with every batch)")
    history_length: int = Field(default=200, ge=1, description="N events kept per user in user_history")
    max_payload_bytes: int = Field(default=64 * 1024, ge=256)
    max_future_skew_s: int = Field(default=3600, ge=0, description="events further in the future go to DLQ")
    group_id: str = "encore-ingest"
    freshness_max_age_s: int = Field(default=900, ge=1, description="freshness check: newest ingest at most "
                                     "this old while events wait in Kafka")


class TrainSettings(_Group):
    """Which training recipe the platform trains: a recipe under ``models/configs/`` (or a YAML path), plus
    explicit overrides. The recipe files are the only place recipe values live (``models.recipe``); these
    settings hold none, e.g. ``ENCORE_TRAIN__RECIPE=hstu`` or ``ENCORE_TRAIN__OVERRIDES__EPOCHS=3``."""

    recipe: str = Field(default="default", min_length=1,
                        description="recipe name (models/configs/<name>.yaml) or path: default, hstu, sasrec, "
                        "argus, hstu-ml1m, ...")
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe keys to change in every run of "
                                      "the platform (whichever recipe it names), e.g. {epochs: 3}; checked against "
                                      "the recipe's keys when a run starts")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        """Recipe values left the settings for the recipe files; an old configuration is told where they went."""
        old_keys = ("model", "max_len", "dim", "blocks", "heads", "dropout", "negatives", "temperature", "batch_size",
                    "lr", "epochs", "seed", "feedback_weight")  # the group's fields before recipes had one home
        if isinstance(data, dict):
            moved = sorted(k for k in data if k in old_keys)
            if moved:
                raise ValueError("; ".join(f"train.{k} is a recipe value now: set train.overrides.{k} "
                                           f"(ENCORE_TRAIN__OVERRIDES__{k.upper()}) or pick a recipe" for k in moved))
        return data


class PromotionSettings(_Group):
    """The gate between a registered ``challenger`` and the ``champion`` that serving loads."""

    mode: Literal["auto", "manual"] = Field(
        default="auto", description="auto moves champion when the gate passes; manual waits for a person")
    metric: str = Field(default="ndcg@10", description="held-out ranking metric the challenger must improve")
    split: Literal["valid", "test"] = Field(default="test", description="leave-one-out split the gate compares on")
    margin: float = Field(default=0.0, ge=0.0, description="absolute improvement over the champion required")
    beat_popularity: bool = Field(default=False, description="the challenger must also beat most-popular "
                                  "(off by default: tiny CPU-sized test models may not)")
    min_coverage: float = Field(default=0.05, ge=0.0, le=1.0,
                                description="share of the catalogue in the top-k of the sample users")
    min_score_std: float = Field(default=1e-4, ge=0.0, description="top-k scores must not collapse to a constant")
    latency_budget_ms: float = Field(default=100.0, gt=0.0, description="p95 of a one-user request on CPU")
    sample_users: int = Field(default=64, ge=1, description="users in the sanity and latency sample")
    retrain_after_events: int = Field(default=5000, ge=1, description="the retrain sensor fires after N new events")


class ScalingSettings(_Group):
    """The scaling study (``encore study scaling``; Dagster ``scaling_corpus`` → ``scaling_point`` partitions →
    ``scaling_laws``). The defaults are the short profile: it runs on 2 CPU cores in under an hour on a simulated
    world of its own; ``SCALING_PROFILES["full"]`` is the GPU-sized one (``--profile full``)."""

    name: str = Field(default="short", min_length=1, pattern=r"^[a-z0-9_-]+$",
                      description="the study's name: its MLflow runs are tagged with it, its files live under "
                                  "studies/scaling/<name>/")
    dataset: str = Field(default="simulator", min_length=1,
                         description="what the points train on: simulator (a world of world_users users, "
                                     "generated here, the same on every machine), platform (the offline store's "
                                     "interactions), or a data set name of features.datasets read from dataset_dir")
    dataset_dir: Path | None = None
    world_users: int = Field(default=2500, ge=10, description="users of the simulated world (dataset: simulator); a "
                             "fifth are held out of training as every point's evaluation set")
    backbones: list[str] = Field(default=["hstu", "sasrec", "gpt", "llama", "hstu-no-rab", "hstu-softmax",
                                          "hstu-no-gating", "argus"], min_length=1,
                                 description="models.scaling.BACKBONES: hstu, sasrec, gpt, llama, HSTU ablations and "
                                             "argus (HSTU with the feedback task)")
    sizes: list[str] = Field(default=["d16b1", "d24b2", "d32b2", "d48b2", "d64b3"], min_length=3,
                             description="model sizes, d<width>b<blocks>: non-embedding N over 1.5+ orders")
    data_fractions: list[float] = Field(default=[0.25, 0.5, 1.0], min_length=1,
                                        description="shares of the users the fraction_backbones also train on")
    fraction_backbones: list[str] = Field(default=["hstu"], description="backbones swept over data_fractions too "
                                          "(for L(D), the L(N, D) surface and the compute-optimal frontier)")
    seeds: list[int] = Field(default=[0, 1], min_length=1)
    epochs: int = Field(default=4, ge=1, description="epochs of every point (no early stop; the best validation "
                        "epoch's weights are measured)")
    recipe: str = Field(default="default", min_length=1, description="the recipe every point starts from")
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe keys for every point, e.g. "
                                      "{device: cuda, max_len: 200}")

    @field_validator("data_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError("data_fractions must lie in (0, 1]")
        return v


# Named presets of the scaling study (``encore study scaling --profile``): keys of ScalingSettings.
SCALING_PROFILES: dict[str, dict[str, Any]] = {
    "short": {},  # the defaults
    "full": {"name": "full", "world_users": 30000, "sizes": ["d16b1", "d32b2", "d64b2", "d96b4", "d128b4", "d192b6",
                                                             "d256b8"],
             "data_fractions": [0.125, 0.25, 0.5, 1.0], "seeds": [0, 1, 2], "epochs": 10,
             "overrides": {"batch_size": 512}},  # device: the recipe's auto (a GPU where there is one)
}


class RegistrySettings(_Group):
    """The registered model of the MLflow registry and its two aliases. Every writer (registration, the gate,
    promotion, rollback) and every reader (serving, experiment targets, ``encore models``) uses these; the
    defaults are the names existing registries hold."""

    model_name: str = Field(default="encore-recommender", min_length=1)
    ranker_model_name: str = Field(default="encore-ranker", min_length=1,
                                   description="the registered model of the rankers (the cascade's second stage); "
                                               "the same two aliases, gate and audit trail as the retrievers'")
    challenger_alias: str = Field(default="challenger", min_length=1, description="every new version gets it")
    champion_alias: str = Field(default="champion", min_length=1, description="the version serving loads (the "
                                "default model and the default experiment's treatment) and the gate compares to")

    @model_validator(mode="after")
    def _distinct_aliases(self) -> "RegistrySettings":
        if self.challenger_alias == self.champion_alias:
            raise ValueError("challenger_alias and champion_alias must differ")
        if self.ranker_model_name == self.model_name:
            raise ValueError("ranker_model_name and model_name must differ: rankers and retrievers are promoted apart")
        return self

    def for_rankers(self) -> "RegistrySettings":
        """The same names with the rankers' registered model: what a ``Registry`` of rankers is built with."""
        return self.model_copy(update={"model_name": self.ranker_model_name})


class ServeSettings(_Group):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    default_k: int = Field(default=10, ge=1, le=1000)
    admin_tokens: dict[str, Annotated[SecretStr, Field(min_length=16)]] = Field(
        default_factory=dict, description="named bearer tokens of the /admin API, actor name -> token (16+ "
        "characters each); the audit log records the actor as 'api:<name>'")
    admin_token: SecretStr | None = Field(default=None, min_length=16,
                                          description="a single /admin bearer token, the actor 'admin' (kept for "
                                          "older configurations; prefer admin_tokens)")
    model_poll_s: float = Field(default=2.0, gt=0, description="how often aliases are checked for moves")

    _reveal_token = field_serializer("admin_token", when_used="json")(staticmethod(_reveal))
    _reveal_tokens = field_serializer("admin_tokens", when_used="json")(staticmethod(_reveal_all))
    experiments_poll_s: float = Field(default=1.0, gt=0, description="how often the experiment store is re-read")
    registry_timeout_s: int = Field(default=5, ge=1, le=600,
                                    description="longest wait of one MLflow registry request of the service (the "
                                                "model thread only; experiments and the kill switch never wait "
                                                "on the registry)")
    registry_retries: int = Field(default=0, ge=0, le=10,
                                  description="MLflow client retries per registry request of the service (the "
                                              "next model poll retries anyway)")
    max_batch: int = Field(default=64, ge=1, le=4096, description="most requests scored in one micro-batch")
    ranker: str | None = Field(default=None, pattern=RANKER_TARGET_PATTERN,
                               description="the ranker (a target of registry.ranker_model_name, e.g. "
                                           "'alias:champion') that reranks the retriever's candidates for requests "
                                           "outside any experiment arm that names its own; none: retrieval only")
    retrieval_k: int = Field(default=200, ge=1, le=10_000,
                             description="candidates the retriever hands to the ranker (the cascade's K)")
    cascade_weights: dict[Literal["feedback", "retrieval"], float] = Field(
        default_factory=lambda: {"feedback": 1.0, "retrieval": 1.0},
        description="the cascade's final score: w_feedback * log P(positive reaction | shown) from the ranker + "
                    "w_retrieval * the retriever's logit (cosine / its training temperature); 1 and 1 rank by "
                    "P(picks it) x P(likes it | shown), see serving/cascade.py")
    torch_threads: int = Field(default=1, ge=1, description="intra-op threads of the serving process")
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024,
                                description="largest request body accepted; a larger one is answered 413 "
                                            "before it is read")
    online_read_timeout_s: float = Field(
        default=0.25, gt=0, le=30, description="deadline of one online-store read (a micro-batch's histories); "
        "a read that fails or runs past it puts the replica in degraded mode: popularity answers marked "
        "'degraded', /readyz 503, until a probe reads the store again")
    online_probe_s: float = Field(default=1.0, gt=0, le=300,
                                  description="how often a degraded replica probes the online store to recover")

    @model_validator(mode="after")
    def _some_cascade_weight(self) -> "ServeSettings":
        weights = self.cascade_weights
        if any(w != w or abs(w) == float("inf") for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"serve.cascade_weights {weights} must be finite and not all zero (no order)")
        return self

    @model_validator(mode="after")
    def _distinct_admin_actors(self) -> "ServeSettings":
        for actor in self.admin_tokens:
            if not _ACTOR_RE.fullmatch(actor):
                raise ValueError(f"serve.admin_tokens: actor name {actor!r} must be 1-64 letters, digits, '.', '_' "
                                 "or '-' (it is written to the audit log)")
        if self.admin_token is not None and ADMIN_ACTOR in self.admin_tokens:
            raise ValueError(f"serve.admin_token is the actor {ADMIN_ACTOR!r}, which serve.admin_tokens names too; "
                             "keep one of them")
        tokens = [t.get_secret_value() for t in self.admin_credentials().values()]
        if len(set(tokens)) != len(tokens):
            # a token shared by two actors would make the audit log name either of them
            raise ValueError("serve.admin_tokens: every actor needs a token of its own (two are the same)")
        return self

    def admin_credentials(self) -> dict[str, SecretStr]:
        """Every admin actor and its token: ``admin_tokens`` plus ``admin_token`` as the actor 'admin'."""
        named = dict(self.admin_tokens)
        if self.admin_token is not None:
            named[ADMIN_ACTOR] = self.admin_token
        return named

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        """The registered model's name and aliases left this group for ``registry`` (one place for writers
        and readers); an old configuration is told where they went rather than just 'extra inputs'."""
        moved = {"model_name": "registry.model_name", "model_alias": "registry.champion_alias"}
        if isinstance(data, dict) and any(k in data for k in moved):
            raise ValueError("; ".join(f"serve.{k} moved to {v} (ENCORE_{v.upper().replace('.', '__')})"
                                       for k, v in moved.items() if k in data))
        return data


class RankingSettings(_Group):
    """The ranking stage's training (``ranking_job``): examples from the exposures log (every served item with
    the reactions it drew), the champion retriever's ARGUS feedback head fine-tuned on them (or, with ``recipe``
    naming a wukong / dlrm / hstu ranking recipe, that model trained on them), gated on the later share of
    requests, registered under ``registry.ranker_model_name``."""

    task: Literal["engaged", "like"] = Field(
        default="engaged", description="the reaction the ranker predicts (and the cascade ranks by): engaged = "
        "any positive reaction (a listen, like, playlist add), like = a like")
    test_share: float = Field(default=0.3, gt=0.0, lt=1.0, description="the latest share of requests, by time, "
                              "held out for the gate")
    epochs: int = Field(default=20, ge=1, description="most epochs of fine-tuning; the last tenth of the training "
                        "period by time chooses how many")
    lr: float = Field(default=1e-3, gt=0.0, description="the feedback head's learning rate")
    encoder_lr: float = Field(default=0.0, ge=0.0, description="0 keeps the pre-trained encoder frozen (seconds "
                              "of fine-tuning); > 0 fine-tunes it too, at this rate")
    batch_size: int = Field(default=512, ge=1)
    margin: float = Field(default=0.0, ge=0.0, description="AUC a challenger ranker must add to the champion's")
    label_wait_s: int = Field(default=0, ge=0, description="a served slate's reactions count as complete this "
                              "long after it was served; later slates are left out of the data set (their missing "
                              "reactions would read as negatives). 0 suits the simulator, whose users react at "
                              "once; with real users set it to how long reactions take to arrive (e.g. 600)")
    sampled_negatives: int = Field(default=20, ge=0, description="catalogue items drawn per training request as "
                                   "negatives (never the gate's test examples, which are the served items only): "
                                   "the cascade asks the ranker about a top-200, most of which no slate showed")
    min_examples: int = Field(default=200, ge=1, description="fewer shown items with reactions than this in the "
                              "training period: the job fails and says so rather than fit noise")
    seed: int = 0
    recipe: str | None = Field(default=None, description="a ranking recipe (models/configs/ranking/NAME.yaml). "
                               "Its model picks the family ranking_job trains and the cascade serves: argus "
                               "fine-tunes the champion retriever's head, its task and fine-tuning values "
                               "(ft_epochs, ft_lr, ft_encoder_lr, ft_batch_size) replacing task, epochs, lr, "
                               "encoder_lr and batch_size here; wukong, dlrm or hstu train that model with the "
                               "recipe's sizes and training values (and its attributes, read online at serving). "
                               "Unset: ARGUS with these values, which are the ranking base recipe's")


class ExperimentSettings(_Group):
    """The default two-arm A/B test run by `make run`."""

    name: str = "hstu-vs-popularity"
    salt: str = "encore-ab-1"
    treatment_share: float = Field(default=0.5, gt=0.0, lt=1.0)
    users: int = Field(default=300, ge=2, description="simulated users taking part")
    requests_per_user: int = Field(default=4, ge=1)
    attribution_window_s: int = Field(default=3600, ge=1)


class EncoreSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ENCORE_",
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,  # a rejected URL may carry a password: name the setting, not its value
    )

    profile: Literal["local", "production"] = Field(
        default="local", description="local: start what is not configured (broker, MLflow) and keep every store "
        "under data_dir; production: start nothing, every endpoint must be configured")
    data_dir: Path = Path(".encore")
    kafka_bootstrap: str | None = Field(
        default=None, description="host:port of a real Kafka cluster; unset starts the embedded broker"
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="unset: sqlite under data_dir, served by an embedded MLflow server"
    )
    mlflow_experiment: str = "encore"
    mlflow_backend_store_uri: SecretStr | None = Field(
        default=None, description="backend of an MLflow server that Encore starts (`encore services up`), e.g. "
        "'postgresql://user:password@host/mlflow'; unset: sqlite under data_dir")
    mlflow_artifacts_destination: str | None = Field(
        default=None, description="artifact root of an MLflow server that Encore starts, e.g. 's3://bucket/mlflow' "
        "(with MLFLOW_S3_ENDPOINT_URL and AWS_* credentials in the environment); unset: under data_dir")
    log_level: str = "INFO"

    kafka: KafkaSettings = KafkaSettings()
    feast: FeastSettings = FeastSettings()
    dagster: DagsterSettings = DagsterSettings()
    topics: TopicSettings = TopicSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    ingest: IngestSettings = IngestSettings()
    offline: OfflineSettings = OfflineSettings()
    train: TrainSettings = TrainSettings()
    registry: RegistrySettings = RegistrySettings()
    promotion: PromotionSettings = PromotionSettings()
    scaling: ScalingSettings = ScalingSettings()
    serve: ServeSettings = ServeSettings()
    ranking: RankingSettings = RankingSettings()
    experiment: ExperimentSettings = ExperimentSettings()

    _reveal_backend = field_serializer("mlflow_backend_store_uri", when_used="json")(staticmethod(_reveal))

    @model_validator(mode="after")
    def _production_is_fully_configured(self) -> "EncoreSettings":
        # Production starts no embedded service and keeps no store in local SQLite files, so every endpoint
        # must be named. One error lists them all: a half-configured deployment fails at start-up, not later.
        if self.profile != "production":
            return self
        required = {
            "ENCORE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "ENCORE_MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "ENCORE_FEAST__REDIS": self.feast.redis,
            "ENCORE_FEAST__REGISTRY": self.feast.registry,
            "ENCORE_DAGSTER__POSTGRES_URL": self.dagster.postgres_url,
        }
        if self.offline.backend == "iceberg":  # a SQLite catalog is one host's: name a shared one
            required["ENCORE_OFFLINE__CATALOG_URL"] = self.offline.catalog_url
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise ValueError("profile 'production' starts no embedded services; set " + ", ".join(missing)
                             + " (environment or YAML; see docs/operations.md)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _yaml_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    # ---- derived locations (one place, so every component agrees) ----
    @property
    def root(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def offline_dir(self) -> Path:
        """Parquet files of validated interactions, partitioned by event date: the system of record."""
        return self.root / "offline" / "interactions"

    @property
    def feast_dir(self) -> Path:
        return self.root / "feast"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def experiments_dir(self) -> Path:
        """The experiment store: current configs, every version, the audit log (``experiments.store``)."""
        return self.root / "experiments"

    @property
    def run_dir(self) -> Path:
        """Pid and endpoint files of the embedded services."""
        return self.root / "run"


def _yaml_file() -> Path | None:
    explicit = os.environ.get("ENCORE_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"ENCORE_CONFIG points at {path}, which is not a file")
        return path
    default = Path("encore.yaml")
    return default if default.is_file() else None


@lru_cache(maxsize=1)
def get_settings() -> EncoreSettings:
    """Process-wide settings; call ``get_settings.cache_clear()`` after changing the environment."""
    return EncoreSettings()


def load_settings(data_dir: str | Path | None = None) -> EncoreSettings:
    """The settings of a command: ``data_dir`` (a ``--data-dir`` option) beats every other source.

    Never written into ``os.environ``: a process that runs several commands (tests, notebooks) must not
    leak one command's data dir into the next.
    """
    if data_dir:
        return EncoreSettings(data_dir=Path(data_dir))
    get_settings.cache_clear()
    return get_settings()


def write_private_file(path: Path, text: str) -> Path:
    """Write a file that may hold secrets: readable by this user only, from its first byte (new files) and
    after the write (files an older version created with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


def write_settings_file(settings: EncoreSettings, path: Path) -> Path:
    """The whole settings object as YAML, secrets included, in a private file."""
    import yaml

    return write_private_file(path, yaml.safe_dump(settings.model_dump(mode="json")))


def read_settings_file(path: str | Path) -> EncoreSettings:
    """Exactly the settings in ``path`` (written by ``write_settings_file``): they beat ``ENCORE_*`` variables."""
    import yaml

    return EncoreSettings(**(yaml.safe_load(Path(path).read_text()) or {}))


def child_env(settings: EncoreSettings, path: Path) -> dict[str, str]:
    """Environment for a child process that must run with exactly ``settings``.

    The settings go to a YAML file named by ``ENCORE_CONFIG``; inherited ``ENCORE_*`` variables are dropped,
    since they would override the file.
    """
    write_settings_file(settings, path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
    env["ENCORE_CONFIG"] = str(path)
    return env
