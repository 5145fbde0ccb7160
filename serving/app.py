"""The online recommendation service (FastAPI + uvicorn): ``encore serve``.

Per request: route the user through the running experiments (deterministic salted hashes, see
``experiments.assignment``), read the user's history from the Feast online store (an event ingested seconds ago
is visible), score the full catalogue with the variant's model (or popularity), drop what the user has seen,
log an exposure to Kafka, answer.

Hot path (why it is fast on 2 CPU cores):

* **micro-batching** — the async endpoint only parses and validates; requests go to one worker thread that
  takes everything queued at that moment (up to ``serve.max_batch``) and serves it as one batch: one Feast
  online read for all users, one forward pass per model. At low load a batch is a single request and adds no
  wait; under load batches grow and the cost per request falls. One worker also means no GIL fights;
* the Feast lookup goes straight to the provider's ``online_read`` with the registered ``user_history``
  feature view (the same rows ``get_online_features`` returns, without its per-call planning);
* torch runs with one intra-op thread (``serve.torch_threads``): on a small CPU box, OpenMP threads spinning
  against uvicorn and Kafka cost far more than they gain on a [B, 32] x [32, V] product;
* responses are serialised once with ``json.dumps`` (no second pydantic pass); the exposure reuses the bytes.

Failures stay with the request that has them: a request whose assignment, scoring or exposure fails answers
503 alone, and an exposure is
logged only for a request that is answered 200 (an exposure for an unanswered request would skew the A/B
analysis). What a request may carry is bounded before it is queued: the body (``serve.max_body_bytes``, else
413, before the body is read), its types (strict: no ``true`` for 1, ``"5"`` for 5 or ``0`` for false) and its
free-form ``context``, which travels in every exposure (else 422).

The online store is the one step a micro-batch shares. Its reads have a deadline
(``serve.online_read_timeout_s``); a read that fails or runs past it puts the replica in degraded mode
(``OnlineHistory``): answers come from popularity marked ``"degraded": true`` (exposures too), ``/readyz``
answers 503, and a probe thread reconnects and leaves degraded mode once the store reads again, no restart.
A served ranker's user and item attributes are read from the same store with the same deadline: a read that
fails or runs past it fails that micro-batch's ranker step alone (retrieval order), and one past the deadline
degrades the replica too (``OnlineHistory.read_attributes`` says why).

A VISTA model (one with a summariser, issue #36) reads each user's cached ``user_summary`` row beside the
``user_history`` row, in the same deadline-bounded read of the same micro-batch (only for the users a VISTA
model answers: other batches read exactly what they always did). The summary must be of the model's own
summariser version; the events of the 200-event history that left the model's recent window after the summary
was refreshed are folded into it (``models.summaries.serving_states``: exact, a few events), so the cost does
not grow with the user's history. A missing or mismatched summary is never an error: the model summarises
what the online history holds, and the answer says ``"summary": "stale"`` (``"cached"`` otherwise).

Models come from the MLflow registry by alias or version (``alias:champion``, ``version:3``); a background
thread watches the aliases and swaps a model in when its alias moves. The new model is loaded and warmed up
before the swap, which is one reference assignment, so requests in flight finish on the old model and no
request fails.

The control plane never waits on the registry. The experiment store (kill switch included) is re-read by a
thread of its own (``serve.experiments_poll_s``) that makes no registry call; models are loaded and polled by
another (``model-watch``), whose registry calls are bounded (``serve.registry_timeout_s``, no client retries:
the next poll is the retry). A change that needs a model not tried yet (a new variant's target) is held back,
that experiment alone, until the model thread has tried to load it; a kill, a pause or a stop never needs one.
Start-up loads no model either: the server listens at once (``/healthz``), answers from popularity until the
default model is loaded, and ``/readyz`` answers 503 until then.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from features.feature_repo import feature_store
from features.ingest import HISTORY_FEATURES
from features.kafka_io import make_producer
from features.offline_read import item_stats as offline_item_stats
from serving.cascade import rerank, retrieval_temperature
from infra.settings import EncoreSettings
from experiments.assignment import POPULARITY, RANKER_KEY_PREFIX, Experiment, RampStep, ranker_key
from experiments.store import (
    Conflict,
    ExperimentError,
    ExperimentStore,
    NotFound,
    Router,
    Snapshot,
    models_of,
    registry_target_checker,
)

if TYPE_CHECKING:
    from models.lifecycle.registry import Registry

log = logging.getLogger("encore.serving")
_T = TypeVar("_T")

_HISTORY_FIELDS = ("item_ids", "event_types", "timestamps_ms")
_SUMMARY_FIELDS = ("state", "summariser_version", "events_summarised", "summarised_until_ms", "summarised_until_item",
                   "summarised_until_type")


def _empty_history() -> dict[str, list]:
    """The history of a user the online store has nothing for (or cannot be read for)."""
    return {f: [] for f in _HISTORY_FIELDS}


# ============================================================================ API models


# The request context travels in every exposure (one Kafka record per answer; the producer refuses records over
# its max_request_size, 1 MiB by default) and experiment targeting reads it: a few short keys is all it is for.
CONTEXT_MAX_KEYS = 32
CONTEXT_MAX_KEY_CHARS = 64
CONTEXT_MAX_VALUE_CHARS = 256
CONTEXT_MAX_TOTAL_CHARS = 2048  # keys and values together

ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=CONTEXT_MAX_KEY_CHARS)]
ContextValue = Annotated[str, StringConstraints(max_length=CONTEXT_MAX_VALUE_CHARS)]


class RecommendationRequest(BaseModel):
    # strict: the JSON types the schema states, as ingest reads events (no true as 1, "5" as 5, 0 as false, 1.5 as
    # 1). An integral number written 1.0 is an integer in JSON Schema, and ingest reads ids that way too: see below
    model_config = ConfigDict(extra="forbid", strict=True)

    # int64 (the online store's key) said as a format too: a JSON Schema reader that holds numbers as doubles
    # rounds 2**63 - 1 up to 2**63 and would otherwise take the integers just above it for valid
    user_id: int = Field(ge=0, le=2**63 - 1, json_schema_extra={"format": "int64"})
    k: int = Field(default=10, ge=1, le=1000)
    exclude_seen: bool = True
    context: dict[ContextKey, ContextValue] | None = Field(
        default=None, max_length=CONTEXT_MAX_KEYS,
        description=(f"free-form request context (device, page); targeting reads it and every exposure carries it. "
                     f"At most {CONTEXT_MAX_KEYS} keys of 1-{CONTEXT_MAX_KEY_CHARS} characters, string values of at "
                     f"most {CONTEXT_MAX_VALUE_CHARS}, and {CONTEXT_MAX_TOTAL_CHARS} characters of keys and values "
                     "in all"))

    @field_validator("user_id", "k", mode="before")
    @classmethod
    def _integral_number(cls, value: object) -> object:
        # the schema's "integer" is JSON Schema's: any number with a zero fractional part, 1.0 included
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("context")
    @classmethod
    def _bounded_context(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and sum(len(key) + len(v) for key, v in value.items()) > CONTEXT_MAX_TOTAL_CHARS:
            raise ValueError(f"context holds more than {CONTEXT_MAX_TOTAL_CHARS} characters of keys and values")
        return value


class AssignmentOut(BaseModel):
    experiment: str
    variant: str
    version: int = Field(description="version of the experiment's config that made the assignment")


class RecommendationResponse(BaseModel):
    request_id: str
    user_id: int
    items: list[int]
    scores: list[float]
    variant: str | None = Field(description="variant of the first assigned experiment (the one choosing the model)")
    experiment: str | None
    assignments: list[AssignmentOut]
    model_version: int | None
    ranker_version: int | None = Field(default=None, description="version of the ranker (registry.ranker_model_name) "
                                       "that reranked the retriever's candidates; null: retrieval order")
    source: str = Field(description="'model' or 'popularity' (cold start, baseline arm, or degraded)")
    degraded: bool = Field(description="true when the online store could not be read: the answer is popularity, "
                                       "without the user's history (nothing seen is excluded)")
    summary: str | SkipJsonSchema[None] = Field(
        default=None, description="VISTA models only (absent otherwise): 'cached' when the user's cached summary "
                                  "was used, 'lagging' when it was used but may miss events older than the online "
                                  "history, 'stale' when there was none of the model's summariser version and the "
                                  "model summarised the online history instead")


class RampIn(BaseModel):
    """A new traffic share, a schedule, or both; a field that is not wanted is left out (null is no value)."""

    # the schema says "at least one of the two" as the validator below does, so a client sees it up front
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"anyOf": [{"required": ["traffic"]}, {"required": ["schedule"]}]})

    traffic: float | SkipJsonSchema[None] = Field(default=None, ge=0, le=1)
    schedule: list[RampStep] | SkipJsonSchema[None] = Field(
        default=None, description="steps in time order whose traffic never decreases")

    @field_validator("traffic", "schedule", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("leave the field out instead of sending null")
        return value

    @model_validator(mode="after")
    def _something_to_do(self) -> RampIn:
        if self.traffic is None and self.schedule is None:
            raise ValueError("ramp needs a traffic share or a schedule")
        return self


class KillIn(BaseModel):
    # strict like the recommendation request: 0 is not false
    model_config = ConfigDict(extra="forbid", strict=True)

    on: bool
    reason: str = Field(default="", max_length=500)


class KillOut(BaseModel):
    kill: bool
    version: int = Field(description="the experiment store's version after the change")


class CreatedOut(BaseModel):
    name: str
    version: int = Field(description="the experiment's version: 1, or the next one with replace=true")
    salt: str = Field(description="the salt in force: the config's, the one kept by a replace, or generated")
    phase: int = Field(description="the analysis phase: a new one when a replace changed the variants of an "
                                   "experiment that has run, or re-randomised it")


class AuditEntry(BaseModel):
    time: str
    actor: str
    action: str
    experiment: str | None
    version: int | None = Field(description="the experiment's version the change saved (none for the kill switch)")
    store_version: int
    change: dict[str, Any]


class HistoryEntry(BaseModel):
    version: int
    saved_at: str
    actor: str
    action: str
    config: dict[str, Any]


class ExperimentOut(Experiment):
    version: int = Field(description="the experiment's version in the store")


class ExperimentsOut(BaseModel):
    version: int = Field(description="the experiment store's version")
    kill: bool
    experiments: list[ExperimentOut]


class ExperimentDetail(ExperimentOut):
    history: list[HistoryEntry]
    audit: list[AuditEntry]


class ErrorOut(BaseModel):
    detail: str


class FieldErrorOut(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidOut(BaseModel):
    detail: list[FieldErrorOut] | str = Field(
        description="the fields that are not of the schema, or why the store refused a change")


# ============================================================================ models


@dataclass
class LoadedModel:
    recommender: Any
    version: int


class ModelDoesNotFit(ValueError):
    """A model reads longer histories than the online store keeps: served, it would see truncated inputs."""


class ModelHolder:
    """Holds the model of one registry target (``alias:<a>`` or ``version:<n>``); alias targets can move.

    ``max_history``: the events per user the online store keeps (``ingest.history_length``); a model whose
    recipe reads more (``max_len``) is refused, and the one already loaded stays."""

    def __init__(self, registry: Registry, target: str, max_history: int) -> None:
        self.registry, self.target, self.max_history = registry, target, max_history
        self.current: LoadedModel | None = None
        self.swaps = 0
        self.refused_version: int | None = None  # refused once (and said why): the poll neither fetches nor logs it again

    def load(self) -> bool:
        """Load the target's model if it changed; True when a new model was swapped in."""
        version = self.registry.resolve(self.target)
        if self.current is not None and self.current.version == version:
            return False
        if version == self.refused_version:
            return False  # keep what we have
        recommender, version = self.registry.load(version=version)
        if recommender.events_read > self.max_history:
            self.refused_version = version
            raise ModelDoesNotFit(
                f"{self.registry.name} version {version} ({self.target}) reads {recommender.events_read} events "
                f"per user (max_len) but the online store keeps {self.max_history} (ingest.history_length): refused; "
                "raise ENCORE_INGEST__HISTORY_LENGTH (and re-ingest) or serve a model trained with a shorter max_len")
        _warm_up(recommender)
        self.current = LoadedModel(recommender, version)  # atomic reference swap
        self.swaps += 1
        log.info("serving %s %s = version %d", self.registry.name, self.target, version)
        return True


def _warm_up(recommender: Any) -> None:
    """One throw-away forward pass, so the first real request does not pay for lazy initialisation."""
    try:
        if not hasattr(recommender, "recommend"):  # a ServedRanker: one request of one candidate (ids are hashed)
            if not getattr(recommender, "reads_attributes", False):  # (its attribute reader is bound on first use)
                recommender.score_candidates([{"user_id": 0, "item_ids": [1], "event_types": ["listen"],
                                               "timestamps_ms": [0]}], [[1]], now_ms=1000)
            return
        item = int(recommender.vocab.decode([1])[0])
        recommender.recommend([{"item_ids": [item], "event_types": ["listen"], "timestamps_ms": [0]}], k=1)
    except Exception:  # noqa: BLE001 - a warm-up problem must not block serving; real requests will tell
        log.debug("warm-up failed", exc_info=True)


class ModelPool:
    """One ModelHolder per target any running experiment (or the default) needs: retrievers by their target
    (``alias:champion``), rankers by their pool key (``ranker/alias:champion``, from the rankers' registry)."""

    def __init__(self, registry: Registry, default_target: str, max_history: int,
                 rankers: Registry | None = None) -> None:
        self.registry, self.default_target, self.max_history = registry, default_target, max_history
        self.rankers = rankers
        self.holders: dict[str, ModelHolder] = {}
        self.lock = threading.Lock()
        self.tried: set[str] = set()  # targets whose load was attempted at least once (loaded or not)
        self.last_error: str | None = None  # the last registry failure, until a registry call succeeds again

    def ensure(self, targets: set[str]) -> None:
        for target in sorted(t for t in targets if ":" in t):
            if target in self.holders:
                continue
            holder = self._holder(target)
            try:
                holder.load()
            except Exception as exc:  # noqa: BLE001 - requests fall back to the default model meanwhile
                self.last_error = _one_line(exc)
                log.warning("could not load %s (%s); retrying on the next refresh", target, self.last_error)
                continue
            finally:
                self.tried = self.tried | {target}
            with self.lock:
                self.holders = {**self.holders, target: holder}
            self.last_error = None

    def refresh(self) -> None:
        for holder in list(self.holders.values()):
            if holder.target.startswith("alias:"):
                try:
                    holder.load()
                except Exception as exc:  # noqa: BLE001 - keep serving the old model if the registry hiccups
                    self.last_error = _one_line(exc)
                    log.warning("model refresh of %s failed; keeping version %s", holder.target,
                                getattr(holder.current, "version", None), exc_info=True)
                else:
                    self.last_error = None

    def _holder(self, key: str) -> ModelHolder:
        if key.startswith(RANKER_KEY_PREFIX):
            if self.rankers is None:
                raise ValueError(f"{key}: this service has no rankers' registry")
            return ModelHolder(self.rankers, key.removeprefix(RANKER_KEY_PREFIX), self.max_history)
        return ModelHolder(self.registry, key, self.max_history)

    def get(self, target: str) -> LoadedModel | None:
        holder = self.holders.get(target) or self.holders.get(self.default_target)
        return holder.current if holder else None

    def get_ranker(self, target: str) -> LoadedModel | None:
        """The loaded ranker of a rankers' registry target; None (retrieval order) while it is not loaded. No
        fallback to another ranker: an arm's exposures must never say one ranker when another ranked them."""
        holder = self.holders.get(ranker_key(target))
        return holder.current if holder else None

    @property
    def default(self) -> LoadedModel | None:
        holder = self.holders.get(self.default_target)
        return holder.current if holder else None


def _reads_summaries(loaded: LoadedModel | None) -> bool:
    """Whether a loaded model is a VISTA model (it reads cached summaries)."""
    return loaded is not None and getattr(loaded.recommender, "summariser_version", None) is not None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def model_pool(settings: EncoreSettings, tracking_uri: str) -> ModelPool:
    """The service's models: the settings' registered model; by default, its champion alias."""
    from models.lifecycle.registry import Registry

    return ModelPool(Registry(tracking_uri, settings.registry), f"alias:{settings.registry.champion_alias}",
                     settings.ingest.history_length, rankers=Registry(tracking_uri, settings.registry.for_rankers()))


# ============================================================================ Feast


class HistoryReader:
    """The users' ``user_history`` rows from the Feast online store, for a batch of users in one read; and, for
    a ranker that reads them, user and item attributes from the same store (``read_attributes``)."""

    def __init__(self, settings: EncoreSettings) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._EntityKey, self._Value = EntityKey, Value
        self.settings = settings
        self.store = feature_store(settings, apply=False)
        self.view = self.store.get_feature_view("user_history")
        try:  # a registry applied before VISTA has no user_summary: every VISTA answer is then "stale"
            self.summary_view = self.store.get_feature_view("user_summary")
        except Exception:  # noqa: BLE001 - Feast raises its own not-found type per registry backend
            self.summary_view = None
        self.provider = self.store.provider  # the public path (get_online_features) re-plans on every call
        self._warm_attributes()

    def _warm_attributes(self) -> None:
        """One throw-away attribute read, here rather than in the first cascade batch: Feast's first
        ``get_online_features`` of the attribute views loads and plans them (~0.4 s measured), past the read
        deadline (0.25 s by default), so a ranker's first attribute read would time out and degrade the replica
        right after every start. A registry without attribute views fails here harmlessly (no ranker can
        read them then either)."""
        try:
            self.read_attributes([0], [0])
        except Exception:  # noqa: BLE001 - warming only; a real read raises (and is handled) where it matters
            log.debug("attribute read warm-up failed", exc_info=True)

    def reconnected(self) -> "HistoryReader":
        """The same store and feature views over a fresh provider: a new SQLite connection or Redis client (no
        registry read, so it works while the registry is away too). The attribute read's ``get_online_features``
        uses it as well: the store is copied with the fresh provider in place of its own (Feast's lazily set
        ``_provider``) and keeps its loaded registry, so the first attribute read after a reconnect does not
        pay for loading the registry within the read deadline."""
        from feast.infra.provider import get_provider

        fresh = copy.copy(self)
        fresh.provider = get_provider(self.store.config)
        fresh.store = copy.copy(self.store)
        fresh.store._provider = fresh.provider
        return fresh

    def read(self, user_ids: list[int], summary_users: list[int] | None = None) -> dict[int, dict[str, list]]:
        """The users' histories; each of ``summary_users`` (VISTA) also gets its cached ``user_summary`` row
        under ``"summary"`` (None when it has none)."""
        keys = [self._EntityKey(join_keys=["user_id"], entity_values=[self._Value(int64_val=u)]) for u in user_ids]
        rows = self.provider.online_read(config=self.store.config, table=self.view, entity_keys=keys,
                                         requested_features=list(_HISTORY_FIELDS))
        out: dict[int, dict[str, list]] = {}
        for uid, (_, values) in zip(user_ids, rows):
            if not values:
                out[uid] = _empty_history()
                continue
            out[uid] = {
                "item_ids": list(values["item_ids"].int64_list_val.val) if "item_ids" in values else [],
                "event_types": list(values["event_types"].string_list_val.val) if "event_types" in values else [],
                "timestamps_ms": (list(values["timestamps_ms"].int64_list_val.val)
                                  if "timestamps_ms" in values else []),
            }
        if summary_users:
            for uid, summary in zip(summary_users, self.read_summaries(summary_users)):
                out[uid] = {**out[uid], "summary": summary}
        return out

    def read_attributes(self, user_ids: Any, item_ids: Any) -> Any:
        """The latest user and item attributes of each (user, item) pair (``features.attributes.online_attributes``:
        the views training read as of t), one row per pair."""
        from features.attributes import online_attributes

        return online_attributes(self.store, self.settings, user_ids, item_ids)

    def read_summaries(self, user_ids: list[int]) -> list[dict[str, Any] | None]:
        """The users' cached ``user_summary`` rows (``_SUMMARY_FIELDS``), None for a user without one."""
        if self.summary_view is None:
            return [None] * len(user_ids)
        keys = [self._EntityKey(join_keys=["user_id"], entity_values=[self._Value(int64_val=u)]) for u in user_ids]
        rows = self.provider.online_read(config=self.store.config, table=self.summary_view, entity_keys=keys,
                                         requested_features=list(_SUMMARY_FIELDS))
        out: list[dict[str, Any] | None] = []
        for _, values in rows:
            if not values or any(f not in values for f in _SUMMARY_FIELDS):
                out.append(None)
                continue
            out.append({f: getattr(values[f], values[f].WhichOneof("val")) for f in _SUMMARY_FIELDS})
        return out

    def read_slow(self, user_ids: list[int]) -> dict[int, dict[str, list]]:
        """The public ``get_online_features`` path (the reference the fast path is tested against)."""
        row = self.store.get_online_features(HISTORY_FEATURES, [{"user_id": u} for u in user_ids]).to_dict()
        return {u: {f: list(row[f][i] or []) for f in _HISTORY_FIELDS} for i, u in enumerate(user_ids)}


class OnlineStoreUnavailable(RuntimeError):
    """The online store did not answer within its deadline, or the replica is degraded and no read was tried."""


class OnlineHistory:
    """The online store as the service sees it: reads with a deadline, and a degraded mode for outages.

    Every read of the store goes through here, on one read thread, with the deadline: the users' histories
    (``read``) and a ranker's user and item attributes (``read_attributes``).

    A read that fails, or runs past ``serve.online_read_timeout_s``, puts the replica in degraded mode: that
    micro-batch and every one after it is answered from popularity, marked ``degraded``, without trying the
    store (so a hung store costs one batch the deadline, once, not every request five seconds of SQLite's
    busy wait), and ``/readyz`` answers 503. A probe thread then builds a fresh reader every
    ``serve.online_probe_s`` (a new SQLite connection or Redis client, since the old one may hold a broken
    file or a dead socket) and leaves degraded mode when it reads within the deadline.
    """

    PROBE_USER = 0  # any key: a read of an unknown user still touches the table

    def __init__(self, settings: EncoreSettings, make_reader: Any = HistoryReader) -> None:
        self.timeout_s = settings.serve.online_read_timeout_s
        self.probe_s = settings.serve.online_probe_s
        self._make_reader = lambda: make_reader(settings)
        self._reader: HistoryReader | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.error: str | None = None  # why the replica is degraded; None when the store reads
        self.since: float | None = None  # wall-clock time degraded mode began
        self._lock = threading.Lock()
        try:
            self._swap_in(self._make_reader())
        except Exception as exc:  # noqa: BLE001 - start degraded; the probe builds the reader once it can
            self._degrade(f"online store not opened: {_one_line(exc)}")

    @property
    def degraded(self) -> bool:
        return self.error is not None

    def read(self, user_ids: list[int], summary_users: list[int] | None = None) -> dict[int, dict[str, list]] | None:
        """The users' histories (with the cached summaries of ``summary_users``, for VISTA models: the same
        read, the same deadline), or None when the store cannot be read within the deadline (degraded)."""
        try:
            return self._within_deadline(f"a read of {len(user_ids)} users",
                                         lambda reader: reader.read(user_ids, summary_users))
        except Exception:  # noqa: BLE001 - any store error degrades; the probe finds when it is back
            return None

    def read_attributes(self, user_ids: Any, item_ids: Any) -> Any:
        """A ranker's user and item attributes (``HistoryReader.read_attributes``), within the same deadline.
        Raises when the store does not answer in time (``OnlineStoreUnavailable``) or the read fails: the
        ranker step of that micro-batch fails and its answers keep the retriever's order (``_rerank``).

        Past the deadline the replica degrades, as for a history read: both reads share the store and the one
        read thread, and the read still runs on that thread, so the next micro-batch's history read would
        queue behind it and miss its deadline too; degrading answers the next batches from popularity at once
        and lets the probe bring a fresh reader and thread, so a hung store costs one batch the deadline, not
        every cascade batch. A read that raises does not degrade: the error may be the attribute path's alone
        (a row it cannot decode) while histories read fine, and a store that is really down fails the next
        history read, which degrades the replica then."""
        return self._within_deadline(f"an attribute read of {len(user_ids)} pairs",
                                     lambda reader: reader.read_attributes(user_ids, item_ids),
                                     degrade_on_error=False)

    def _within_deadline(self, what: str, read: Callable[[HistoryReader], _T], *,
                         degrade_on_error: bool = True) -> _T:
        """``read(reader)`` on the read thread, its answer within the deadline. Past it the replica degrades and
        this raises ``OnlineStoreUnavailable`` (at once, with no read, while degraded); a read that raises
        degrades it too when ``degrade_on_error``, and its error is raised."""
        with self._lock:
            pool, reader = self._pool, self._reader
        if self.error is not None or pool is None or reader is None:
            raise OnlineStoreUnavailable(self.error or "the online store is not open")
        try:
            return pool.submit(read, reader).result(timeout=self.timeout_s)
        except FutureTimeout:
            why = f"{what} ran past the {self.timeout_s:g} s deadline"
            self._degrade(why, pool)
            raise OnlineStoreUnavailable(why) from None
        except Exception as exc:
            if degrade_on_error:
                self._degrade(f"{what} failed: {_one_line(exc)}", pool)
            raise

    def probe(self) -> bool:
        """Try a fresh reader; put it in force (leave degraded mode) when it reads within the deadline."""
        try:
            with self._lock:
                current = self._reader
            reader = current.reconnected() if current is not None else self._make_reader()
            t0 = time.monotonic()
            reader.read([self.PROBE_USER])
            took = time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - still away
            self.error = f"online store unreadable: {_one_line(exc)}"
            return False
        if took > self.timeout_s:
            self.error = f"online store slow: a probe read took {took:.2f} s (deadline {self.timeout_s:g} s)"
            return False
        self._swap_in(reader)
        return True

    def watch(self, stop: threading.Event) -> None:
        """The probe thread's loop: while degraded, probe every ``online_probe_s``."""
        while not stop.wait(self.probe_s):
            if self.error is None:
                continue
            since = self.since
            if self.probe():
                log.warning("online store readable again after %.1f s: degraded mode over",
                            time.time() - (since or time.time()))

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def _swap_in(self, reader: HistoryReader) -> None:
        # a new pool with the new reader: a read still hung in the old pool's thread is left to finish alone
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online-read")
        with self._lock:
            old, self._pool, self._reader = self._pool, pool, reader
            self.error, self.since = None, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def _degrade(self, why: str, pool: ThreadPoolExecutor | None = None) -> None:
        with self._lock:
            if pool is not None and pool is not self._pool:
                return  # a read of a reader already replaced: its failure says nothing about the store now
            if self.error is None:
                self.since = time.time()
                log.error("online store: %s; answering from popularity (degraded) until it reads again", why)
            self.error = why


# ============================================================================ the service


@dataclass
class _Job:
    req: RecommendationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)  # queue wait counts in the latency metric


@dataclass(frozen=True)
class _Scored:
    """A request's items as a model answered them: the retriever's version, and the ranker's when one reranked
    them (with its P per item, which the exposure logs)."""

    items: list[tuple[int, float]]
    version: int | None
    ranker_version: int | None = None
    ranker_scores: list[float] | None = None
    source: str = "model"
    summary: str | None = None  # VISTA: how its summary was obtained (models.summaries: cached, lagging, stale)


@dataclass(slots=True)
class _Answer:
    """One request's answer, ready to send: the response body and the exposure to log when it is sent."""
    body: bytes
    key: bytes
    exposure: bytes
    variant: str | None
    source: str


def _resolve(future: asyncio.Future, value: Any) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class Recommendations:
    """Everything a request needs, built once at start-up, and the micro-batching worker."""

    def __init__(self, settings: EncoreSettings, kafka_bootstrap: str, tracking_uri: str,
                 store: ExperimentStore | None = None, static: Snapshot | None = None) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.history = OnlineHistory(settings)
        self.models = model_pool(settings, tracking_uri)
        self.store = store
        self.router = Router(static if static is not None else Snapshot())
        self.producer = make_producer(kafka_bootstrap, linger_ms=20, **settings.kafka.client_options())
        self.popular: list[tuple[int, float]] = []
        self._shared_encoders: dict[tuple[int, int], bool] = {}  # (retriever, ranker version) -> same encoder
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self._models_lock = threading.Lock()  # one loader at a time: the model thread or an admin request
        self._models_wanted = threading.Event()  # wakes the model thread: a change waits for a model
        self._pending: set[str] = set()  # targets the latest store snapshot needs that were never tried
        self._held_back = False  # the snapshot in force left an experiment out (its model was not tried yet)
        self.models_tried = threading.Event()  # the model thread's first pass is over (models and experiments)
        self._threads: list[threading.Thread] = []
        self.registry = CollectorRegistry()
        self.requests = Counter("encore_requests_total", "recommendation requests", ["variant", "source"],
                                registry=self.registry)
        self.failures = Counter("encore_request_failures_total", "requests answered 503", registry=self.registry)
        self.ranker_failures = Counter("encore_ranker_failures_total", "answers left in retrieval order because "
                                       "their ranker failed", registry=self.registry)
        self.degraded_answers = Counter("encore_degraded_answers_total", "answers from popularity because the "
                                        "online store could not be read", registry=self.registry)
        Gauge("encore_online_store_up", "1 when the online store reads within its deadline, 0 while degraded",
              registry=self.registry).set_function(lambda: 0.0 if self.history.degraded else 1.0)
        self.latency = Histogram("encore_request_seconds", "time from enqueue to answer", registry=self.registry,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.batch_seconds = Histogram("encore_batch_seconds", "time to score one micro-batch",
                                       registry=self.registry,
                                       buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.batch_size = Histogram("encore_batch_size", "requests per micro-batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.model_version = Gauge("encore_model_version", "served model version per target", ["target"],
                                   registry=self.registry)
        self.store_version = Gauge("encore_experiments_version", "experiment store version in force",
                                   registry=self.registry)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Everything but the models, which need the registry: the model thread loads them once the server
        listens. Until the default model is loaded, requests are answered from popularity and /readyz
        answers 503 (a fresh deployment before the first promotion, or the registry away)."""
        import torch

        torch.set_num_threads(self.settings.serve.torch_threads)
        self.reload_experiments()
        self.refresh_popularity()
        for name, target in (("recommend-batcher", self._work), ("experiment-watch", self._watch_experiments),
                             ("model-watch", self._watch_models),
                             ("online-probe", lambda: self.history.watch(self._stop))):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        self._models_wanted.set()
        self.queue.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self.history.close()
        self.producer.flush(timeout=5)
        self.producer.close(timeout=5)

    def reload_experiments(self) -> set[str]:
        """Put the store's latest snapshot in force; makes no registry call, so it never waits on MLflow.

        A running experiment that needs a model never tried (a new variant's target) is held back, that
        experiment alone: its earlier config stays in force if it had one, else it is left out, until the
        model thread has tried the model (loaded or failed: then its requests fall back to the default model,
        as before). Returns the targets still to try (the model thread is woken for them)."""
        if self.store is None:
            return set()
        # The admin API and the watcher threads all reload: serialise them, and only ever move forward, or
        # a watcher holding an older snapshot could undo a change the admin API has just put in force.
        with self._reload_lock:
            snap = self.store.snapshot()
            current = self.router.snapshot
            if snap.version < current.version or (snap.version == current.version and current.experiments
                                                  and not self._held_back):
                return set()
            tried = self.models.tried
            missing = {t for t in Router(snap).targets() if ":" in t} - tried
            effective = snap
            if missing:
                in_force = {e.name: e for e in self.router.running}
                kept, versions = [], dict(snap.versions)
                for e in snap.experiments:
                    if e.status == "running" and models_of(e) & missing:
                        old = in_force.get(e.name)
                        if old is not None and not models_of(old) & missing:
                            kept.append(old)
                            versions[e.name] = current.versions[e.name]
                        else:
                            versions.pop(e.name, None)
                        continue
                    kept.append(e)
                effective = Snapshot(version=snap.version, kill=snap.kill, experiments=tuple(kept), versions=versions)
            changed = effective != current
            self._pending, self._held_back = missing, bool(missing)
            self.router = Router(effective)
            self.store_version.set(snap.version)
            if changed:
                log.info("experiments: store version %d, %d running, kill=%s%s", snap.version,
                         len(self.router.running), snap.kill,
                         f"; held back until their models are tried: {sorted(missing)}" if missing else "")
        if missing:
            self._models_wanted.set()
        return missing

    def load_models(self) -> None:
        """One pass of the model thread: load what is missing (the default target, the running experiments'
        and the held-back ones'), check the aliases for moves, then put held-back experiments in force."""
        with self._models_lock:
            self.models.ensure({self.models.default_target} | self.router.targets() | self._pending
                               | self._default_ranker_keys())
            self.models.refresh()
        for target, holder in self.models.holders.items():
            if holder.current:
                self.model_version.labels(target).set(holder.current.version)
        if self._pending:
            self.reload_experiments()

    def _default_ranker_keys(self) -> set[str]:
        ranker = self.settings.serve.ranker
        return {ranker_key(ranker)} if ranker else set()

    def _watch_experiments(self) -> None:
        while not self._stop.wait(self.settings.serve.experiments_poll_s):
            try:
                self.reload_experiments()
            except Exception:  # noqa: BLE001 - a bad read keeps the experiments in force
                log.warning("experiment reload failed", exc_info=True)

    def _watch_models(self) -> None:
        if self.models.default is None:
            log.info("loading the models of %s from the registry; serving popularity until the default one is "
                     "loaded (/readyz answers 503)", self.models.default_target)
        while not self._stop.is_set():
            self._models_wanted.clear()
            try:
                self.load_models()
            except Exception:  # noqa: BLE001 - the next poll tries again; the models in memory stay
                log.warning("model poll failed", exc_info=True)
            self.models_tried.set()
            if self.models.default is None and not self._stop.is_set():
                # A fresh deployment starts before the first promotion, or the registry is away: stay up,
                # answer from popularity, report not-ready until a model holds the target.
                log.warning("no model for %s yet (%s): serving popularity (/readyz answers 503)",
                            self.models.default_target, self.models.last_error or "no version holds it")
            self._models_wanted.wait(self.settings.serve.model_poll_s)

    def refresh_popularity(self) -> None:
        stats = offline_item_stats(self.settings)
        stats = stats.sort_values(["positives", "events", "item_id"], ascending=[False, False, True])
        total = max(int(stats["positives"].sum()), 1)
        self.popular = [(int(i), float(p) / total) for i, p in zip(stats["item_id"], stats["positives"])]

    # ---------------------------------------------------------------- requests

    async def submit(self, req: RecommendationRequest) -> bytes:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put(_Job(req, future, loop))
        return await future

    def _work(self) -> None:
        max_batch = self.settings.serve.max_batch
        while True:
            job = self.queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            t0 = time.perf_counter()
            try:
                answers: list[_Answer | Exception] = self.serve_batch([j.req for j in batch])
            except Exception as exc:  # noqa: BLE001 - a step the batch shares failed: all 503, the worker lives on
                log.exception("recommendation batch failed")
                answers = [exc] * len(batch)
            results: list[bytes | Exception | None] = []
            for j, answer in zip(batch, answers):
                if isinstance(answer, Exception):
                    results.append(answer)
                elif j.future.done():  # cancelled (the caller is gone): not answered, so no exposure
                    results.append(None)
                else:
                    results.append(self._publish(answer))
            self.batch_size.observe(len(batch))
            done = time.perf_counter()
            self.batch_seconds.observe(done - t0)
            for j, r in zip(batch, results):
                self.latency.observe(done - j.enqueued)
                j.loop.call_soon_threadsafe(_resolve, j.future, r)

    def _publish(self, answer: _Answer) -> bytes | Exception:
        """Log the answer's exposure; the body to answer 200 with, or why this request fails (alone, unlogged)."""
        try:
            self.producer.send(self.settings.topics.exposures, key=answer.key, value=answer.exposure)
        except Exception as exc:  # noqa: BLE001 - e.g. a record over the producer's size limit: this request only
            log.exception("exposure of user %s not logged; the request answers 503", answer.key.decode())
            return exc
        self.requests.labels(answer.variant or "none", answer.source).inc()
        return answer.body

    def serve_batch(self, reqs: list[RecommendationRequest]) -> list[_Answer | Exception]:
        """The answers to a batch of requests, in order, each ready to send or the exception it failed with; no
        side effects (the caller logs the exposure of each answer it sends, see ``_publish``). An online store
        that cannot be read within its deadline fails no request: the batch is answered from popularity,
        marked degraded."""
        now_ms = int(time.time() * 1000)
        now = datetime.fromtimestamp(now_ms / 1000, timezone.utc)
        router = self.router
        failed: dict[int, Exception] = {}
        assignments: list[tuple] = []
        for i, r in enumerate(reqs):
            try:
                assignments.append(router.assign(r.user_id, r.context, now))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("assignment of user %d failed", r.user_id)
                failed[i] = exc
                assignments.append(())
        users = sorted({r.user_id for r in reqs})
        vista = self._summary_users(reqs, assignments, failed)
        histories = self.history.read(users, vista) if vista else self.history.read(users)
        degraded = histories is None
        if histories is None:  # no history to score or exclude: popularity for all, marked degraded
            histories = {u: _empty_history() for u in users}
            self.degraded_answers.inc(len(reqs))
        default_target = self.models.default_target
        results: list[_Scored | None] = [None] * len(reqs)

        # one forward pass per (retriever, ranker, exclude_seen) group
        groups: dict[tuple[int, int, bool], tuple[LoadedModel, LoadedModel | None, list[int]]] = {}
        for i, (r, a) in enumerate(zip(reqs, assignments)):
            if i in failed:
                continue
            target = a[0].target if a else default_target
            if target == POPULARITY or not histories[r.user_id]["item_ids"]:
                continue
            loaded = self.models.get(target)
            if loaded is None:
                continue
            # an experiment's arm names its ranker (or none: retrieval order); serve.ranker is for the rest
            ranker_target = a[0].ranker if a else self.settings.serve.ranker
            ranker = self.models.get_ranker(ranker_target) if ranker_target else None
            groups.setdefault((id(loaded), id(ranker), r.exclude_seen), (loaded, ranker, []))[2].append(i)
        for (_, _, exclude_seen), (loaded, ranker, idx) in groups.items():
            def forward(part: list[int], loaded: LoadedModel = loaded, ranker: LoadedModel | None = ranker,
                        exclude_seen: bool = exclude_seen) -> list[_Scored]:
                hs = [histories[reqs[i].user_id] for i in part]
                k = max(reqs[i].k for i in part)
                depth = max(k, self.settings.serve.retrieval_k) if ranker is not None else k
                if _reads_summaries(loaded):
                    return self._forward_vista(loaded, ranker, hs, [reqs[i] for i in part], depth, exclude_seen,
                                               now_ms)
                recs, states = loaded.recommender.retrieve(hs, k=depth, exclude_seen=exclude_seen, now_ms=now_ms)
                if ranker is None:
                    return [_Scored(items[: reqs[i].k], loaded.version) for i, items in zip(part, recs)]
                return self._rerank(ranker, loaded, hs, recs, states, [reqs[i] for i in part], now_ms)

            try:
                scored = [(idx, forward(idx))]
            except Exception:  # noqa: BLE001 - one request may be what breaks the pass: score them one by one
                log.exception("forward pass of %d requests failed; scoring them one by one", len(idx))
                scored = []
                for i in idx:
                    try:
                        scored.append(([i], forward([i])))
                    except Exception as exc:  # noqa: BLE001 - this request fails alone
                        failed[i] = exc
            for part, recs in scored:
                for i, answer in zip(part, recs):
                    if answer.items:  # an empty answer (no known item in the history) falls back to popularity
                        results[i] = answer

        out: list[_Answer | Exception] = []
        for i, r in enumerate(reqs):
            if i in failed:
                out.append(failed[i])
                continue
            try:
                out.append(self._answer(r, assignments[i], results[i], histories[r.user_id], now_ms, degraded))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("answer to user %d failed", r.user_id)
                out.append(exc)
        return out

    def _summary_users(self, reqs: list[RecommendationRequest], assignments: list[tuple],
                       failed: dict[int, Exception]) -> list[int]:
        """The users a VISTA model will answer (their cached summaries are read with their histories)."""
        users: set[int] = set()
        for i, (r, a) in enumerate(zip(reqs, assignments)):
            target = a[0].target if a else self.models.default_target
            if i not in failed and target != POPULARITY and _reads_summaries(self.models.get(target)):
                users.add(r.user_id)
        return sorted(users)

    def _forward_vista(self, loaded: LoadedModel, ranker: LoadedModel | None, hs: list[dict[str, Any]],
                       asked: list[RecommendationRequest], depth: int, exclude_seen: bool, now_ms: int) -> list[_Scored]:
        """A VISTA model's pass: each user's cached summary (plus the older events it has not seen), or, for a
        user without a usable one, a summary of the online history, marked stale."""
        from models.summaries import serving_states

        rec = loaded.recommender
        states, marks = serving_states(rec, hs, history_length=self.settings.ingest.history_length)
        recs, users = rec.retrieve(hs, k=depth, exclude_seen=exclude_seen, now_ms=now_ms, summaries=states)
        if ranker is None:
            scored = [_Scored(items[: r.k], loaded.version) for items, r in zip(recs, asked)]
        else:
            scored = self._rerank(ranker, loaded, hs, recs, users, asked, now_ms)
        return [dataclasses.replace(s, summary=m) for s, m in zip(scored, marks)]

    def _rerank(self, ranker: LoadedModel, retriever: LoadedModel, histories: list[dict[str, list]],
                recs: list[list[tuple[int, float]]], states: list, asked: list[RecommendationRequest],
                now_ms: int) -> list[_Scored]:
        """The cascade's second stage for one pass. A ranker that fails leaves the retriever's order (the answer
        says no ranker ranked it, and ``encore_ranker_failures_total`` counts it) rather than failing requests
        the retriever has answered.

        The ranker gets each history with its request's ``user_id`` and ``context`` (a ranker that reads the user's
        id or attributes needs them; an ARGUS ranker ignores them), and a ranker that reads user and item
        attributes reads them online from Feast (``features.attributes.online_attributes``), once per pass, within
        the online store's deadline (``OnlineHistory.read_attributes``)."""
        try:
            shared = self._shares_encoder(retriever, ranker)
            self._bind_ranker_inputs(ranker)
            histories = [{**h, "user_id": r.user_id, "context": dict(r.context or {})}
                         for h, r in zip(histories, asked)]
            ranked = rerank(ranker.recommender, histories, recs, k=[r.k for r in asked],
                            weights=self.settings.serve.cascade_weights,
                            temperature=retrieval_temperature(retriever.recommender), now_ms=now_ms,
                            states=states if shared else None)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("ranker version %d failed on %d requests; answering in retrieval order",
                          ranker.version, len(recs))
            self.ranker_failures.inc(len(recs))
            return [_Scored(items[: r.k], retriever.version) for items, r in zip(recs, asked)]
        return [_Scored(r.items, retriever.version, ranker.version if r.ranker_scores is not None else None,
                        r.ranker_scores) for r in ranked]

    def _bind_ranker_inputs(self, ranker: LoadedModel) -> None:
        """Give a ranker that reads attributes (``ServedRanker.reads_attributes``) the online reader, once: the
        online store's deadline-bounded read (``OnlineHistory.read_attributes``), so a hung store fails that
        micro-batch's ranker step within the deadline instead of holding the worker."""
        model = ranker.recommender
        if getattr(model, "reads_attributes", False) and model.attributes is None:
            model.bind_attributes(self.history.read_attributes)

    def _shares_encoder(self, retriever: LoadedModel, ranker: LoadedModel) -> bool:
        """Whether the ranker computes the retriever's user states (its encoder was frozen while its head was
        fine-tuned: the default): then the cascade encodes each history once. Compared once per pair of
        registry versions (a version's weights never change)."""
        key = (retriever.version, ranker.version)
        if key not in self._shared_encoders:
            shared = retriever.recommender.same_encoder(ranker.recommender)
            self._shared_encoders = {**self._shared_encoders, key: shared}  # replaced whole: readers never lock
        return self._shared_encoders[key]

    def _answer(self, r: RecommendationRequest, a: tuple, result: _Scored | None, history: dict[str, list],
                now_ms: int, degraded: bool = False) -> _Answer:
        if result is None:
            seen = set(history["item_ids"]) if r.exclude_seen else set()
            items = []
            for item, score in self.popular:
                if item not in seen:
                    items.append((item, score))
                    if len(items) == r.k:
                        break
            result = _Scored(items, None, source=POPULARITY)
        items, source, version = result.items, result.source, result.version
        variant = a[0].variant if a else None
        doc = {
            "request_id": uuid.uuid4().hex, "user_id": r.user_id, "items": [it for it, _ in items],
            "scores": [round(s, 6) for _, s in items], "variant": variant,
            "experiment": a[0].experiment if a else None,
            "assignments": [{"experiment": x.experiment, "variant": x.variant, "version": x.version} for x in a],
            "model_version": version, "ranker_version": result.ranker_version, "source": source,
            "degraded": degraded,
        }
        if result.summary is not None:  # VISTA answers only: every other body stays as it was
            doc["summary"] = result.summary
        body = json.dumps(doc, separators=(",", ":")).encode()
        # the exposure carries the serving time; analysis attributes later interactions to it
        exposure = {k: v for k, v in doc.items() if k != "scores"}
        exposure["timestamp_ms"] = now_ms
        if result.ranker_scores is not None:  # what placed each item: the ranker's P, aligned with items
            exposure["ranker_scores"] = [round(p, 4) for p in result.ranker_scores]
        if r.context:
            exposure["context"] = r.context
        return _Answer(body, str(r.user_id).encode(), json.dumps(exposure, separators=(",", ":")).encode(),
                       variant, source)

    def recommend(self, req: RecommendationRequest) -> RecommendationResponse:
        """One request, synchronously (for callers without an event loop); its exposure is logged."""
        answer = self.serve_batch([req])[0]
        if isinstance(answer, Exception):
            raise answer
        body = self._publish(answer)
        if isinstance(body, Exception):
            raise body
        return RecommendationResponse.model_validate_json(body)


# ============================================================================ the app


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        # the rest of the body is not read: the connection closes after the answer
        super().__init__(status_code=413, detail=f"request body over {limit} bytes (serve.max_body_bytes)",
                         headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is read.

    A Content-Length over the limit is answered at once, without running the app; a body without one (chunked)
    is counted as it streams in, and the read that crosses the limit raises a 413 ``HTTPException`` (FastAPI
    passes an HTTPException from its body read on to the exception handlers, which answer it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_bytes:
                    exc = _BodyTooLarge(self.max_bytes)
                    await JSONResponse({"detail": exc.detail}, status_code=413, headers=exc.headers)(scope, receive,
                                                                                                     send)
                    return
                break
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_limited, send)


def create_app(settings: EncoreSettings, kafka_bootstrap: str, tracking_uri: str,
               experiment: Experiment | None | Literal["store"] = "store") -> FastAPI:
    """The service. ``experiment``: ``"store"`` serves the experiment store under the data dir (managed by
    ``encore ab`` and the admin API); an ``Experiment`` or ``None`` serves that one fixed config (or none)."""
    from models.lifecycle.registry import bound_client_waits

    # the service process's MLflow client: a bounded wait per call and no client retries (the model thread's
    # next poll is the retry), so that a registry that hangs never holds a thread for minutes
    bound_client_waits(settings.serve.registry_timeout_s, settings.serve.registry_retries)
    store = ExperimentStore(settings.experiments_dir) if experiment == "store" else None
    static = None
    if store is None:
        static = Snapshot(version=1, experiments=(experiment,) if experiment else (),
                          versions={experiment.name: 1} if experiment else {})
    service = Recommendations(settings, kafka_bootstrap, tracking_uri, store=store, static=static)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await asyncio.to_thread(service.start)
        app.state.ready = True
        yield
        app.state.ready = False
        service.close()

    app = FastAPI(title="Encore recommendations", version="1", lifespan=lifespan,
                  description="Recommendations from the registry's models, A/B experiments, exposures to Kafka.")
    app.state.ready = False
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.serve.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input back, which may not be JSON-serialisable (raw bytes): never a 500
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(400)
    async def _undecodable(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 to a body json.loads fails on with other than a syntax error: not UTF-8, nested
        # past the parser's recursion limit, an integer of more digits than Python converts. It is invalid JSON
        # all the same: 422, as a syntax error is (the status the schema documents)
        if isinstance(exc.__cause__, (ValueError, RecursionError)):
            return JSONResponse(status_code=422, content={"detail": [{
                "loc": ["body"], "type": "json_invalid",
                "msg": f"the body is not JSON that can be decoded ({type(exc.__cause__).__name__}): "
                       "UTF-8, nesting and integer sizes within the parser's limits"}]})
        return await http_exception_handler(request, exc)

    @app.exception_handler(405)
    async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's Allow names the methods of the first route whose path matches; a path served by several
        # routes (GET and POST /admin/experiments) allows the methods of all of them
        allowed = sorted({method for route in app.routes if route.matches(request.scope)[0] != Match.NONE
                          for method in getattr(route, "methods", None) or ()})
        return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.post("/v1/recommendations", response_model=RecommendationResponse,
              responses={413: {"model": ErrorOut, "description": "request body over serve.max_body_bytes (not read)"},
                         422: {"model": InvalidOut,
                               "description": "invalid request: not UTF-8 JSON, or not of the schema (types are "
                                              "strict: no true for 1, \"5\" for 5, 0 for false)"},
                         503: {"model": ErrorOut, "description": "a dependency failed, or this request's exposure "
                                                                 "could not be logged"}})
    async def recommendations(req: RecommendationRequest) -> Response:
        try:
            body = await service.submit(req)
        except Exception as exc:  # noqa: BLE001 - a dependency failed: say so with a 503, never a bare 500
            service.failures.inc()
            raise HTTPException(status_code=503, detail=f"temporarily unavailable: {type(exc).__name__}") from exc
        return Response(content=body, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready: the default model is not loaded (yet), or "
                                                    "the online store cannot be read (answers are degraded)"}})
    async def readyz() -> dict:
        """Ready once the default model (the champion alias) is loaded and the online store reads: until then
        requests are answered from popularity. A registry that goes away later leaves a ready replica ready
        (it serves the models it has loaded); ``registry_error`` then says why aliases are not being followed.
        An online store that cannot be read makes it not ready (its answers ignore the users' histories)."""
        model = service.models.default
        if not app.state.ready or not service.models_tried.is_set():
            raise HTTPException(status_code=503, detail="starting: loading the models")
        online = service.history
        if online.error is not None:
            since = datetime.fromtimestamp(online.since or time.time(), timezone.utc).isoformat(timespec="seconds")
            raise HTTPException(status_code=503, detail=f"online store unreadable since {since} ({online.error}); "
                                                        "answering from popularity, marked degraded")
        if model is None:
            why = service.models.last_error
            raise HTTPException(status_code=503, detail=(
                f"model not loaded: {service.models.default_target} "
                + (f"(registry: {why})" if why else "(not loaded yet, or no version holds it)")
                + "; answering from popularity"))
        return {"registry_error": service.models.last_error,"status": "ready", "model_version": model.version,
                "models": {t: h.current.version for t, h in service.models.holders.items() if h.current},
                "experiments_version": service.router.snapshot.version}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    _admin_routes(app, settings, service, store, tracking_uri)
    return app


# ============================================================================ admin API

_bearer = HTTPBearer(auto_error=False)


def _admin_routes(app: FastAPI, settings: EncoreSettings, service: Recommendations, store: ExperimentStore | None,
                  tracking_uri: str) -> None:
    import hashlib

    # actor -> SHA-256 of its token: comparing digests of equal length hides even the length of the tokens
    tokens = {actor: hashlib.sha256(secret.get_secret_value().encode()).digest()
              for actor, secret in settings.serve.admin_credentials().items()}

    def admin(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
        """The audit actor of the request's token, ``api:<name>`` (``serve.admin_tokens``; ``admin`` for
        ``serve.admin_token``)."""
        if not tokens:
            raise HTTPException(status_code=403, detail="admin API disabled: set ENCORE_SERVE__ADMIN_TOKENS "
                                "(or ENCORE_SERVE__ADMIN_TOKEN)")
        given = hashlib.sha256(creds.credentials.encode() if creds is not None else b"").digest()  # b"": no token
        actor = None
        for name, digest in tokens.items():  # every token is compared, so the time says nothing about which matched
            if secrets.compare_digest(given, digest):
                actor = name
        if actor is None:
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if store is None:
            raise HTTPException(status_code=409, detail="this service runs a fixed experiment (--experiment FILE)")
        return f"api:{actor}"

    def check() -> Any:
        return registry_target_checker(settings, tracking_uri)

    def apply(fn: Any) -> Any:
        try:
            result = fn()
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except Conflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        except ExperimentError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        # in force for the next request, not after the next poll; a change that needs a model not tried yet
        # (a new variant's target) is held back until it is: load it now (the registry was just asked about
        # it anyway), so that the answer means "in force". A kill, pause or stop never waits here.
        if service.reload_experiments():
            service.load_models()
        return result

    # what every admin route may answer besides its own errors
    fixed = "this service runs a fixed experiment (--experiment FILE)"
    auth = {401: {"model": ErrorOut, "description": "no or wrong bearer token"},
            403: {"model": ErrorOut, "description": "admin API disabled: no admin token is set"},
            409: {"model": ErrorOut, "description": fixed}}
    conflict = {409: {"model": ErrorOut, "description": (
        "the change clashes with the experiment's state: it exists (create without replace), it is stopped (a "
        "stopped experiment never restarts), a ramp would lower its traffic, or a new salt for one that has run; "
        f"or {fixed}")}}
    invalid = {422: {"model": InvalidOut, "description": (
        "not of the schema, or rules the schema cannot state: variant weights that do not sum to 1, ramp steps "
        "out of order or decreasing, a layer slice that overlaps a running experiment's, a model target the "
        "registry does not have")}}
    unknown = {404: {"model": ErrorOut, "description": "no experiment of that name"}}

    @app.get("/admin/experiments", response_model=ExperimentsOut, responses=auth)
    def list_experiments(actor: str = Depends(admin)) -> dict:
        snap = store.snapshot()  # type: ignore[union-attr]
        return {"version": snap.version, "kill": snap.kill,
                "experiments": [{**e.model_dump(mode="json"), "version": snap.versions[e.name]}
                                for e in snap.experiments]}

    @app.post("/admin/experiments", status_code=201, response_model=CreatedOut,
              responses={**auth, **conflict, **invalid})
    def create_experiment(exp: Experiment, replace: bool = False, rerandomise: bool = False,
                          actor: str = Depends(admin)) -> dict:
        """``replace``: save a new version of an existing experiment; ``rerandomise`` (with it): rotate its salt,
        which re-draws every user's arm and opens a new phase. A config without a salt gets a generated one,
        returned here."""
        version = apply(lambda: store.create(exp, actor=actor, check_target=check(), replace=replace,  # type: ignore[union-attr]
                                             rerandomise=rerandomise))
        saved = store.snapshot().get(exp.name)  # type: ignore[union-attr]
        return {"name": exp.name, "version": version, "salt": saved.salt, "phase": saved.phase}

    @app.get("/admin/experiments/{name}", response_model=ExperimentDetail, responses={**auth, **unknown})
    def get_experiment(name: str, actor: str = Depends(admin)) -> dict:
        snap = store.snapshot()  # type: ignore[union-attr]
        exp = apply(lambda: snap.get(name))
        return {**exp.model_dump(mode="json"), "version": snap.versions[name], "history": store.history(name),  # type: ignore[union-attr]
                "audit": store.audit(name)}  # type: ignore[union-attr]

    @app.post("/admin/experiments/{name}/ramp", response_model=Experiment,
              responses={**auth, **unknown, **conflict, **invalid})
    def ramp(name: str, body: RampIn, actor: str = Depends(admin)) -> Experiment:
        return apply(lambda: store.ramp(name, body.traffic, body.schedule, actor=actor))  # type: ignore[union-attr]

    def status_route(status: str) -> Any:
        def handler(name: str, actor: str = Depends(admin)) -> Experiment:
            return apply(lambda: store.set_status(name, status, actor=actor))  # type: ignore[union-attr]

        return handler

    for action, status in (("pause", "paused"), ("resume", "running"), ("stop", "stopped")):
        app.add_api_route(f"/admin/experiments/{{name}}/{action}", status_route(status), methods=["POST"],
                          response_model=Experiment, responses={**auth, **unknown, **conflict, **invalid},
                          name=f"{action}_experiment")

    @app.post("/admin/kill", response_model=KillOut, responses={**auth, **invalid})
    def kill(body: KillIn, actor: str = Depends(admin)) -> dict:
        version = apply(lambda: store.set_kill(body.on, actor=actor, reason=body.reason))  # type: ignore[union-attr]
        return {"kill": body.on, "version": version}

    @app.get("/admin/audit", response_model=list[AuditEntry], responses={**auth, **invalid})
    def audit(limit: int = 100, actor: str = Depends(admin)) -> list[dict]:
        return store.audit(limit=max(1, min(limit, 10_000)))  # type: ignore[union-attr]
