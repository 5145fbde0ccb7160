"""The online recommendation service (FastAPI + uvicorn): ``encore serve``.

Per request: assign the user to an experiment variant (deterministic salted hash), read the user's history
from the Feast online store (an event ingested seconds ago is visible), score the full catalogue with the
variant's model (or popularity), drop what the user has seen, log an exposure to Kafka, answer.

Models come from the MLflow registry by alias; a background thread watches the alias and swaps the model
in when it moves (the swap is one reference assignment, so in-flight requests finish on the old model).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from features.feature_repo import feature_store
from features.ingest import HISTORY_FEATURES
from features.kafka_io import make_producer
from features.offline_store import OfflineStore
from infra.settings import EncoreSettings
from serving.assignment import Experiment, Variant, assign

log = logging.getLogger("encore.serving")

POPULARITY = "popularity"


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(ge=0, le=2**63 - 1)
    k: int = Field(default=10, ge=1, le=1000)
    exclude_seen: bool = True
    context: dict[str, str] | None = Field(default=None, description="free-form request context (device, page)")


class RecommendationResponse(BaseModel):
    request_id: str
    user_id: int
    items: list[int]
    scores: list[float]
    variant: str | None
    experiment: str | None
    model_version: int | None
    source: str = Field(description="'model' or 'popularity' (cold start or baseline arm)")


@dataclass
class LoadedModel:
    recommender: Any
    version: int


class ModelHolder:
    """Holds the model of one alias and swaps it when the alias moves in the registry."""

    def __init__(self, tracking_uri: str, name: str, alias: str, poll_s: float = 5.0) -> None:
        self.tracking_uri, self.name, self.alias, self.poll_s = tracking_uri, name, alias, poll_s
        self.current: LoadedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        from mlflow import MlflowClient

        from models.recommender import Recommender
        from models.registry import download_recommender_dir

        version = int(MlflowClient(self.tracking_uri).get_model_version_by_alias(self.name, self.alias).version)
        if self.current is not None and self.current.version == version:
            return
        path, version = download_recommender_dir(self.tracking_uri, version=version, name=self.name)
        self.current = LoadedModel(Recommender.load(path), version)  # atomic reference swap
        log.info("serving %s@%s = version %d", self.name, self.alias, version)

    def start_watching(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                try:
                    self.load()
                except Exception:  # noqa: BLE001 - keep serving the old model if the registry hiccups
                    log.warning("model refresh failed; keeping version %s", getattr(self.current, "version", None),
                                exc_info=True)

        self._thread = threading.Thread(target=loop, name="model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def default_experiment(settings: EncoreSettings) -> Experiment:
    e = settings.experiment
    return Experiment(
        name=e.name,
        salt=e.salt,
        variants=[
            Variant(name="control", weight=1 - e.treatment_share, target=POPULARITY),
            Variant(name="treatment", weight=e.treatment_share, target=f"alias:{settings.serve.model_alias}"),
        ],
    )


class Recommendations:
    """Everything a request needs, built once at start-up."""

    def __init__(self, settings: EncoreSettings, kafka_bootstrap: str, tracking_uri: str,
                 experiment: Experiment | None) -> None:
        self.settings = settings
        self.store = feature_store(settings, apply=False)
        self.model = ModelHolder(tracking_uri, settings.serve.model_name, settings.serve.model_alias)
        self.experiment = experiment
        self.producer = make_producer(kafka_bootstrap, linger_ms=20)
        self.popular: list[tuple[int, float]] = []
        self.registry = CollectorRegistry()
        self.requests = Counter("encore_requests_total", "recommendation requests", ["variant", "source"],
                                registry=self.registry)
        self.latency = Histogram("encore_request_seconds", "recommendation latency", registry=self.registry,
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))

    def start(self) -> None:
        self.model.load()
        self.model.start_watching()
        self.refresh_popularity()

    def refresh_popularity(self) -> None:
        store = OfflineStore(self.settings.offline_dir)
        try:
            stats = store.item_stats()
        finally:
            store.close()
        stats = stats.sort_values(["positives", "events", "item_id"], ascending=[False, False, True])
        total = max(int(stats["positives"].sum()), 1)
        self.popular = [(int(i), float(p) / total) for i, p in zip(stats["item_id"], stats["positives"])]

    def history(self, user_id: int) -> dict[str, list]:
        row = self.store.get_online_features(HISTORY_FEATURES, [{"user_id": user_id}]).to_dict()
        return {
            "item_ids": row["item_ids"][0] or [],
            "event_types": row["event_types"][0] or [],
            "timestamps_ms": row["timestamps_ms"][0] or [],
        }

    def recommend(self, req: RecommendationRequest) -> RecommendationResponse:
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        variant = assign(self.experiment, req.user_id) if self.experiment else None
        target = self._target(variant)
        history = self.history(req.user_id)
        items: list[tuple[int, float]] = []
        source = POPULARITY
        loaded = self.model.current
        if target != POPULARITY and history["item_ids"] and loaded is not None:
            items = loaded.recommender.recommend([history], k=req.k, exclude_seen=req.exclude_seen,
                                                 now_ms=int(time.time() * 1000))[0]
            source = "model"
        if not items:
            seen = set(history["item_ids"]) if req.exclude_seen else set()
            items = [(i, s) for i, s in self.popular if i not in seen][: req.k]
        response = RecommendationResponse(
            request_id=request_id, user_id=req.user_id, items=[int(i) for i, _ in items],
            scores=[float(s) for _, s in items], variant=variant,
            experiment=self.experiment.name if self.experiment and variant else None,
            model_version=loaded.version if source == "model" and loaded else None, source=source,
        )
        self._log_exposure(response)
        self.requests.labels(variant or "none", source).inc()
        self.latency.observe(time.perf_counter() - t0)
        return response

    def _target(self, variant: str | None) -> str:
        if self.experiment is None or variant is None:
            return f"alias:{self.settings.serve.model_alias}"
        for v in self.experiment.variants:
            if v.name == variant:
                return v.target
        return POPULARITY

    def _log_exposure(self, r: RecommendationResponse) -> None:
        payload = r.model_dump_json(include={"request_id", "user_id", "items", "variant", "experiment",
                                             "model_version", "source"})
        # the exposure carries the serving time; analysis attributes later interactions to it
        payload = payload[:-1] + f',"timestamp_ms":{int(time.time() * 1000)}}}'
        self.producer.send(self.settings.topics.exposures, key=str(r.user_id).encode(), value=payload.encode())

    def close(self) -> None:
        self.model.stop()
        self.producer.flush(timeout=5)
        self.producer.close(timeout=5)


def create_app(settings: EncoreSettings, kafka_bootstrap: str, tracking_uri: str,
               experiment: Experiment | None = None) -> FastAPI:
    service = Recommendations(settings, kafka_bootstrap, tracking_uri, experiment)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        service.start()
        app.state.ready = True
        yield
        service.close()

    app = FastAPI(title="Encore recommendations", version="1", lifespan=lifespan)
    app.state.ready = False
    app.state.service = service

    @app.post("/v1/recommendations", response_model=RecommendationResponse)
    def recommendations(req: RecommendationRequest) -> RecommendationResponse:
        try:
            return service.recommend(req)
        except Exception as exc:  # noqa: BLE001 - a dependency failed: say so with a 503, never a bare 500
            log.exception("recommendation failed")
            raise HTTPException(status_code=503, detail=f"temporarily unavailable: {type(exc).__name__}") from exc

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        if not app.state.ready or service.model.current is None:
            raise HTTPException(status_code=503, detail="model not loaded")
        return {"status": "ready", "model_version": service.model.current.version}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return app
