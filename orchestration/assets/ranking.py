"""The ranking group: from what was served and how users reacted to a promoted ranker.

    exposures_topic + ingested_interactions
        └─ ranking_dataset  (snapshot: exposures + interactions; shown items with reactions, split by time)
             └─ trained_ranker  (the champion retriever's ARGUS feedback head, fine-tuned, in an MLflow run; or,
                  │              with ``ranking.recipe`` naming a wukong / dlrm / hstu recipe, that model trained)
                  └─ ranker_evaluation  (AUC / GAUC / logloss on the later requests: the ranker, the head it
                       │                   started from (ARGUS only), popularity)
                       └─ registered_ranker  (registry.ranker_model_name, alias challenger)  [blocking check:
                            │                  ranker_gate]
                            └─ champion_ranker  (auto: alias champion; manual: awaits a person)

Why these examples: a ranker reorders what retrieval offered, so it learns from the slates the service
actually served (``models.ranking_data.build_ranking_examples``: each served item, labelled by the reactions
that carry its request id within the attribution window). Why fine-tune the retriever: ARGUS pre-trains one
model on whole histories with both tasks (next item, feedback), then the feedback head is tuned on ranking
examples; the pre-trained checkpoint is the registry's champion retriever, named in the ranker's tags.

The gate compares on the held-out later requests: the fine-tuned ranker must beat the head it started from,
the popularity order, and the current champion ranker re-scored on the same examples.

Other ranking families. ``ranking.recipe`` naming a recipe whose ``model`` is wukong, dlrm or hstu
(``models/configs/ranking/``) trains that model on the same training examples instead
(``models.served_ranker.train_served_ranker``: the recipe's sizes and training values, the history-length
feature capped at ``ingest.history_length``, the snapshot's item counts frozen into the artefact; a recipe with
``item_vectors``, as the shipped wukong, dlrm and hstu are, reads the champion retriever's item embeddings, frozen into
the artefact, and the run records that retriever's version as ``item_vectors_version``). It is saved
as a ``ServedRanker`` (``ranker_family`` in its config), registered in the same rankers' registry, gated on
the same test examples (there is no head it started from: popularity and the champion ranker re-scored,
whatever the champion's family) and served by the cascade like an ARGUS ranker (``models.served_ranker``).
Unset, or an ``argus`` recipe, the path above is unchanged.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from orchestration.assets.experiments import exposures_topic
from orchestration.assets.ingest import ingested_interactions
from orchestration.resources import EncoreResource, KafkaResource, MLflowResource

RANKING = "ranking"
EXPOSURE_COLUMNS = ("request_id", "user_id", "timestamp_ms", "items", "model_version", "ranker_version")
INTERACTION_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp_ms", "played_ratio", "request_id")


def ranking_examples(dataset: dict):  # noqa: ANN201 - RankingExamples
    """Every ranking example of a ``ranking_dataset`` value, rebuilt from its snapshot files (cheap and
    deterministic, so no pickled frames travel between assets), with the user and item attributes read for
    them when the snapshot holds some (``attributes``: one row per example, in this order)."""
    from models.ranking_data import build_ranking_examples, with_attributes

    interactions = pd.read_parquet(dataset["interactions"])
    exposures = pd.read_parquet(dataset["exposures"])
    exposures = exposures[exposures["timestamp_ms"] <= dataset["labels_complete_ms"]]
    negatives = int(dataset.get("sampled_negatives", 0))
    examples = build_ranking_examples(interactions, exposures, window_s=dataset["window_s"],
                                      sampled_negatives=negatives, seed=int(dataset.get("seed", 0)),
                                      catalogue=np.unique(interactions["item_id"].to_numpy()) if negatives else None)
    if dataset.get("attributes"):
        examples = with_attributes(examples, pd.read_parquet(dataset["attributes"]))
    return examples


def read_attributes(settings, dataset: dict, out: Path) -> str | None:  # noqa: ANN001 - EncoreSettings
    """The user and item attributes of every example as of its request time, through Feast
    ``get_historical_features`` over the ``user_attributes`` / ``item_attributes`` views (the rows serving
    reads online), kept in the snapshot as ``attributes.parquet``; None when nothing was written to the views."""
    from features.attributes import attributes_written, historical_attributes
    from features.feature_repo import feature_store
    from models.ranking_data import attribute_entities

    if not attributes_written(settings):
        return None
    entities = attribute_entities(ranking_examples({**dataset, "attributes": None}))
    frame = historical_attributes(feature_store(settings), settings, entities)
    frame.to_parquet(out / "attributes.parquet", index=False)
    return str(out / "attributes.parquet")


def ranking_split(dataset: dict):  # noqa: ANN201 - (RankingExamples, RankingExamples)
    """(train, test) ranking examples of a ``ranking_dataset`` value (``ranking_examples``). Training requests
    carry ``sampled_negatives`` catalogue items each; the test examples are the served items only (what the gate
    measures is how the ranker orders what was shown, not how easily it rejects random items)."""
    from dataclasses import replace

    from models.ranking_data import SHOWN

    examples = ranking_examples(dataset)
    # No gap before the cutoff: the snapshot already holds every reaction of the training requests (the label
    # wait above saw to that), and the test requests' labels never enter training.
    train, test = examples.split_by_time(dataset["cutoff_ms"])
    shown = test.examples["source"].to_numpy() == SHOWN
    return train, replace(test, examples=test.examples[shown].reset_index(drop=True))


@dg.asset(deps=[exposures_topic, ingested_interactions], kinds={"kafka", "parquet"}, group_name=RANKING)
def ranking_dataset(context: dg.AssetExecutionContext, encore: EncoreResource, kafka: KafkaResource) -> dict:
    """A snapshot of the exposures log and the interactions, and the time split of the ranking examples they
    make: training on the earlier requests, the gate's test on the latest ``ranking.test_share``."""
    from experiments.readout import read_exposures
    from features.offline_read import read_interactions

    settings = encore.settings()
    exposures = read_exposures(kafka.resolve(settings), settings.topics.exposures)
    if exposures.empty or "items" not in exposures:
        raise dg.Failure("no exposures yet: a ranker learns from served slates and their reactions. Serve traffic "
                         "first (`make run`'s A/B test does) and ingest its interactions")
    exposures = exposures[[c for c in EXPOSURE_COLUMNS if c in exposures]]
    interactions = read_interactions(settings, columns=list(INTERACTION_COLUMNS))
    window_s = settings.experiment.attribution_window_s
    labels_complete_ms = int(time.time() * 1000) - settings.ranking.label_wait_s * 1000
    times = np.sort(exposures["timestamp_ms"].to_numpy(np.int64))
    times = times[times <= labels_complete_ms]
    if not len(times):
        raise dg.Failure(f"no served slate is older than ranking.label_wait_s = {settings.ranking.label_wait_s} s: "
                         "their reactions may still be on the way; try again later")
    cutoff_ms = int(times[min(int(len(times) * (1 - settings.ranking.test_share)), len(times) - 1)])

    digest = hashlib.sha256(
        pd.util.hash_pandas_object(exposures[["request_id"]], index=False).values.tobytes()
        + pd.util.hash_pandas_object(interactions[["event_id"]], index=False).values.tobytes()
    ).hexdigest()[:16]
    out = settings.root / "datasets" / f"ranking-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    exposures.to_parquet(out / "exposures.parquet", index=False)
    interactions.to_parquet(out / "interactions.parquet", index=False)
    info = {"snapshot": digest, "exposures": str(out / "exposures.parquet"),
            "interactions": str(out / "interactions.parquet"), "cutoff_ms": cutoff_ms, "window_s": window_s,
            "labels_complete_ms": labels_complete_ms, "sampled_negatives": settings.ranking.sampled_negatives,
            "seed": settings.ranking.seed}
    info["attributes"] = read_attributes(settings, info, out)
    train, test = ranking_split(info)
    task = settings.ranking.task
    counts = {"requests": int(len(exposures)), "train_examples": len(train), "test_examples": len(test),
              f"train_{task}_rate": float(train.examples[task].mean()) if len(train) else float("nan"),
              f"test_{task}_rate": float(test.examples[task].mean()) if len(test) else float("nan")}
    info.update(counts)
    context.add_output_metadata({
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in counts.items()},
        "snapshot": digest, "task": task,
        "cutoff": pd.Timestamp(cutoff_ms, unit="ms", tz="UTC").isoformat(),
        "dir": dg.MetadataValue.path(str(out)),
        "dagster/row_count": len(train) + len(test),
    })
    return info


def ranker_family(settings) -> str:  # noqa: ANN001 - EncoreSettings
    """The family ``ranking_job`` trains: the model of ``ranking.recipe`` (wukong, dlrm, hstu, argus); argus
    without a recipe."""
    from models.ranking_recipe import resolve_ranking_recipe

    return resolve_ranking_recipe(settings.ranking.recipe).model if settings.ranking.recipe else "argus"


@dg.asset(kinds={"pytorch", "mlflow"}, group_name=RANKING)
def trained_ranker(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                   ranking_dataset: dict) -> dict:
    """Fine-tune the champion retriever's ARGUS feedback head on the training period's shown items, inside an
    MLflow run; the pre-trained version is recorded as the ranker's base. With ``ranking.recipe`` naming a
    wukong / dlrm / hstu recipe: that model, trained on the same examples (``_train_family``)."""
    from models.argus_ranker import fine_tune_ranker
    from models.lifecycle import tracking
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import experiment_name, training_run
    from models.ranking_recipe import platform_fine_tune

    settings = encore.settings()
    r = settings.ranking.model_copy(update=platform_fine_tune(settings.ranking))
    train, _ = ranking_split(ranking_dataset)
    shown = int((train.examples["source"] == "shown").sum())
    if shown < r.min_examples:
        raise dg.Failure(f"{shown} served items in the training period (ranking.min_examples = {r.min_examples}): "
                         "serve more traffic before training a ranker")
    uri = mlflow_server.resolve(settings)
    if ranker_family(settings) != "argus":
        return _train_family(context, settings, uri, ranking_dataset, train, r.task)
    base, base_version = Registry(uri, settings.registry).load(alias=settings.registry.champion_alias)
    if base.model.feedback_head is None:
        raise dg.Failure(f"champion retriever v{base_version} has no feedback head (a recipe with "
                         "feedback_weight 0): train an ARGUS recipe first, the ranker fine-tunes its head")
    name = f"ranker-{ranking_dataset['snapshot']}-{int(time.time())}"
    params = {"task": r.task, "epochs": r.epochs, "lr": r.lr, "encoder_lr": r.encoder_lr, "batch_size": r.batch_size,
              "seed": r.seed,
              "base_version": base_version, "train_examples": len(train),
              "dataset_snapshot": ranking_dataset["snapshot"]}
    with training_run(uri, experiment_name(settings.mlflow_experiment, tracking.TRAINING), run_name=name,
                      params=params, tags={"model": "argus-ranker", "dataset_snapshot": ranking_dataset["snapshot"],
                                           "base_version": str(base_version), "dagster_run_id": context.run.run_id},
                      artifact_root=settings.mlflow_dir / "artifacts") as run:
        t0 = time.perf_counter()
        ranker = fine_tune_ranker(base, train, task=r.task, epochs=r.epochs, lr=r.lr, encoder_lr=r.encoder_lr,
                                  batch_size=r.batch_size, seed=r.seed)
        wall_s = time.perf_counter() - t0
    ranker.metadata.update({"ranker_task": r.task, "base_version": base_version})
    out = ranker.save(settings.root / "models" / name / "ranker")
    context.add_output_metadata({"task": r.task, "base_version": base_version, "train_examples": len(train),
                                 "wall_s": round(wall_s, 2), "mlflow_run_id": run.info.run_id,
                                 "dir": dg.MetadataValue.path(str(out))})
    return {"dir": str(out), "run_id": run.info.run_id, "base_version": base_version, "task": r.task,
            "dataset": ranking_dataset, "family": "argus"}


def _train_family(context: dg.AssetExecutionContext, settings, uri: str, dataset: dict, train,  # noqa: ANN001
                  task: str) -> dict:
    """``trained_ranker`` for a wukong / dlrm / hstu recipe: the model trained on ``train`` in an MLflow run,
    saved as a ``ServedRanker`` (the snapshot's item counts frozen in; the history-length feature capped at the
    online store's ``ingest.history_length``, what a served history holds)."""
    from models.lifecycle import tracking
    from models.lifecycle.tracking import experiment_name, training_run
    from models.ranking_recipe import resolve_ranking_recipe
    from models.served_ranker import train_served_ranker

    recipe = resolve_ranking_recipe(settings.ranking.recipe)
    vectors, vectors_version = _champion_item_vectors(settings, uri) if recipe.item_vectors else (None, None)
    name = f"ranker-{dataset['snapshot']}-{int(time.time())}"
    params = {"recipe": settings.ranking.recipe, "family": recipe.model, "task": task, "epochs": recipe.epochs,
              "lr": recipe.lr, "batch_size": recipe.batch_size, "seed": settings.ranking.seed,
              "train_examples": len(train), "dataset_snapshot": dataset["snapshot"],
              **({"item_vectors_version": vectors_version} if vectors is not None else {})}
    with training_run(uri, experiment_name(settings.mlflow_experiment, tracking.TRAINING), run_name=name,
                      params=params, tags={"model": f"{recipe.model}-ranker", "dataset_snapshot": dataset["snapshot"],
                                           "dagster_run_id": context.run.run_id},
                      artifact_root=settings.mlflow_dir / "artifacts") as run:
        t0 = time.perf_counter()
        try:
            ranker = train_served_ranker(recipe, train, task, seed=settings.ranking.seed,
                                         max_history=settings.ingest.history_length,
                                         metadata={"ranking_recipe": settings.ranking.recipe,
                                                   "recipe": recipe.to_dict(),
                                                   **({"item_vectors_version": vectors_version}
                                                      if vectors is not None else {})},
                                         item_vectors=vectors)
        except ValueError as exc:  # e.g. a recipe with attributes but no attribute was ever written
            raise dg.Failure(f"ranking.recipe {settings.ranking.recipe}: {exc}") from exc
        wall_s = time.perf_counter() - t0
    out = ranker.save(settings.root / "models" / name / "ranker")
    context.add_output_metadata({"task": task, "family": recipe.model, "recipe": settings.ranking.recipe,
                                 **({"item_vectors_version": vectors_version} if vectors is not None else {}),
                                 "train_examples": len(train), "wall_s": round(wall_s, 2),
                                 "mlflow_run_id": run.info.run_id, "dir": dg.MetadataValue.path(str(out))})
    return {"dir": str(out), "run_id": run.info.run_id, "base_version": None, "task": task, "dataset": dataset,
            "family": recipe.model}


def _champion_item_vectors(settings, uri: str):  # noqa: ANN001, ANN202 - EncoreSettings -> (ItemVectors, version)
    """A recipe with ``item_vectors``: the champion retriever's item embeddings, frozen into the ranker, and
    that retriever's registry version (recorded on the run and the ranker). No champion yet: a clear failure."""
    from models.lifecycle.registry import Registry
    from models.ranker import ItemVectors

    alias = settings.registry.champion_alias
    try:
        retriever, version = Registry(uri, settings.registry).load(alias=alias)
    except Exception as exc:  # noqa: BLE001 - the registry's own error says which lookup failed
        raise dg.Failure(f"ranking.recipe {settings.ranking.recipe} reads item vectors from the @{alias} "
                         f"retriever, and none could be loaded ({exc}): promote a retriever first") from exc
    return ItemVectors.of_recommender(retriever, source=f"retriever v{version}"), version


def ranker_report(ranker, base, test, task: str) -> dict:  # noqa: ANN001 - any ranker, Recommender | None, examples
    """AUC, GAUC (per request) and logloss of the task on the test examples: the ranker, the head it started
    from (an ARGUS ranker's ``base``; None for the other families, which start from nothing), and the
    popularity order (the item's events before the request); plus how many it scored."""
    from models.argus_ranker import encode_requests, score_examples
    from models.ranker import auc, gauc, item_popularity_before
    from models.served_ranker import ranker_scores

    labels = test.examples[task].to_numpy(np.float64)
    groups = test.examples["request_id"].astype(str).to_numpy()
    if base is None:
        scores = {"ranker": np.asarray(ranker_scores(ranker, test), np.float64)}
    else:
        # a head fine-tuned on a frozen encoder reads its base's user states: encode the test requests once
        states = encode_requests(base, test) if base.same_encoder(ranker) else None
        scores = {"ranker": score_examples(ranker, test, states), "base": score_examples(base, test, states)}
    known = np.isfinite(scores["ranker"])  # unknown items / histories: the cascade keeps them unranked
    scores["popularity"] = item_popularity_before(test).astype(np.float64)
    report: dict = {"task": task, "examples": int(len(labels)), "scored": int(known.sum()),
                    "positive_rate": float(labels[known].mean()) if known.any() else float("nan")}
    for who, s in scores.items():
        y, s = labels[known], np.asarray(s, np.float64)[known]
        report[who] = {"auc": auc(y, s), "gauc": gauc(y, s, groups[known])}
        if who != "popularity":
            p = np.clip(s, 1e-7, 1 - 1e-7)
            report[who]["logloss"] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else math.nan
    report["finite_scores"] = bool(np.isfinite(scores["ranker"][known]).all())
    return report


@dg.asset(kinds={"pytorch"}, group_name=RANKING)
def ranker_evaluation(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                      trained_ranker: dict) -> dict:
    """The trained ranker on the later requests, beside the pre-trained head it started from (ARGUS) and
    popularity."""
    from models.lifecycle.registry import Registry
    from models.served_ranker import load_artifact

    settings = encore.settings()
    ranker = load_artifact(Path(trained_ranker["dir"]))
    base = None
    if trained_ranker.get("base_version") is not None:
        base, _ = Registry(mlflow_server.resolve(settings), settings.registry).load(
            version=trained_ranker["base_version"])
    _, test = ranking_split(trained_ranker["dataset"])
    if not len(test):
        raise dg.Failure("no test examples after the cutoff: serve more traffic (or lower ranking.test_share)")
    report = ranker_report(ranker, base, test, trained_ranker["task"])
    path = Path(trained_ranker["dir"]).parent / "evaluation.json"
    path.write_text(json.dumps(report, indent=2))
    rows = ["| scorer | AUC | GAUC | logloss |", "|---|---|---|---|"] + [
        f"| {who} | {report[who]['auc']:.4f} | {report[who]['gauc']:.4f} | {report[who].get('logloss', math.nan):.4f} |"
        for who in ("ranker", "base", "popularity") if who in report]
    context.add_output_metadata({"task": report["task"], "test_examples": report["examples"],
                                 "scored": report["scored"], "auc": round(report["ranker"]["auc"], 4),
                                 "base_auc": round(report["base"]["auc"], 4) if "base" in report else None,
                                 "family": trained_ranker.get("family", "argus"),
                                 "metrics": dg.MetadataValue.md("\n".join(rows)),
                                 "report": dg.MetadataValue.path(str(path))})
    return {**trained_ranker, "evaluation": report}


@dg.asset(kinds={"mlflow"}, group_name=RANKING)
def registered_ranker(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                      ranker_evaluation: dict) -> dict:
    """A new version of the rankers' registered model (``registry.ranker_model_name``), alias challenger, tagged
    with its family, its task, its base retriever version (ARGUS) and its test metrics."""
    from models.lifecycle.registry import Registry
    from models.served_ranker import ServedRanker, load_artifact
    from orchestration.assets.training import _input_example

    settings = encore.settings()
    uri = mlflow_server.resolve(settings)
    rec = load_artifact(Path(ranker_evaluation["dir"]))
    report = ranker_evaluation["evaluation"]
    metrics = {f"{who}_{k}": v for who in ("ranker", "base", "popularity") if who in report
               for k, v in report[who].items()}
    ds = ranker_evaluation["dataset"]
    family = ranker_evaluation.get("family", "argus")
    base = {"base_version": str(ranker_evaluation["base_version"])} if ranker_evaluation.get("base_version") else {}
    reg = Registry(uri, settings.registry.for_rankers()).register(
        rec, run_id=ranker_evaluation["run_id"], metrics=metrics,
        tags={"model": f"{family}-ranker", "task": ranker_evaluation["task"], **base,
              "dataset_snapshot": ds["snapshot"], "dagster_run_id": context.run.run_id},
        input_example=_ranker_input_example(settings, rec, ds) if isinstance(rec, ServedRanker)
        else _input_example(rec),
    )
    context.add_output_metadata({"version": reg.version, "run_id": reg.run_id, "name": reg.name,
                                 "alias": settings.registry.challenger_alias})
    return {"version": reg.version, "run_id": reg.run_id, "evaluation": report, "dataset": ds,
            "task": ranker_evaluation["task"]}


def _ranker_input_example(settings, ranker, dataset: dict) -> pd.DataFrame:  # noqa: ANN001 - settings, a ServedRanker
    """The pyfunc input example of a ServedRanker: one user of the snapshot, a few of their events, and a few
    candidates (``models.lifecycle.pyfunc``). A ranker that reads attributes gets them as columns, read from the
    offline store as of the example's time (Feast ``get_historical_features``, as training read them): the
    registered model is scored on its example, by this code and by MLflow's validation, with no online store
    (``models.served_ranker``: attributes in the pyfunc model)."""
    events = pd.read_parquet(dataset["interactions"], columns=["user_id", "item_id", "event_type", "timestamp_ms"])
    user = int(events["user_id"].iloc[0])
    mine = events[events["user_id"] == user].sort_values("timestamp_ms", kind="stable").tail(5)
    candidates = [int(i) for i in events["item_id"].drop_duplicates().head(5)]
    now_ms = int(events["timestamp_ms"].max()) + 1
    example = {"user_id": [user], "item_ids": [mine["item_id"].astype(int).tolist()],
               "event_types": [mine["event_type"].astype(str).tolist()],
               "timestamps_ms": [mine["timestamp_ms"].astype(int).tolist()], "candidates": [candidates],
               "now_ms": [now_ms]}
    if ranker.reads_attributes:
        from features.attributes import historical_attributes
        from features.feature_repo import feature_store
        from models.served_ranker import attribute_columns

        entity = pd.DataFrame({"user_id": user, "item_id": candidates, "t_ms": now_ms})
        columns = attribute_columns(historical_attributes(feature_store(settings), settings, entity))
        example.update({name: [value] for name, value in columns.items()})
    return pd.DataFrame(example)


@dg.asset_check(asset=registered_ranker, blocking=True,
                description="the ranker beats the head it started from (ARGUS) and the popularity order on the "
                            "later requests (AUC), and the champion ranker re-scored on the same examples")
def ranker_gate(context: dg.AssetCheckExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                registered_ranker: dict) -> dg.AssetCheckResult:
    from models.lifecycle.promotion import judge_ranker
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    _, test = ranking_split(registered_ranker["dataset"])
    registry = Registry(mlflow_server.resolve(settings), settings.registry.for_rankers())

    def rescore(champion) -> float:  # noqa: ANN001 - a Recommender or a ServedRanker, whichever family
        from models.ranker import auc
        from models.served_ranker import ranker_scores

        s = ranker_scores(champion, test)
        known = np.isfinite(s)
        return auc(test.examples[registered_ranker["task"]].to_numpy()[known], s[known])

    decision = judge_ranker(registry, registered_ranker["version"], registered_ranker["evaluation"], rescore,
                            margin=settings.ranking.margin, log=context.log)
    rows = ["| check | passed |", "|---|---|"] + [f"| {k} | {'yes' if v else '**no**'} |"
                                                  for k, v in decision.checks.items()]
    return dg.AssetCheckResult(passed=decision.passed, description=decision.summary,
                               metadata={"reason": dg.MetadataValue.text(decision.summary),
                                         "checks": dg.MetadataValue.md("\n".join(rows)),
                                         "version": registered_ranker["version"],
                                         "auc": decision.challenger_value})


@dg.asset(kinds={"mlflow"}, group_name=RANKING)
def champion_ranker(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                    registered_ranker: dict) -> dict:
    """Runs only when the blocking ``ranker_gate`` passed. ``promotion.mode`` auto: the challenger ranker gets
    the champion alias (what ``ranker: alias:champion`` serves); manual: it waits for a person."""
    from models.lifecycle.promotion import GateNotPassed, conclude
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    registry = Registry(mlflow_server.resolve(settings), settings.registry.for_rankers())
    try:
        outcome = conclude(registry, registered_ranker["version"], settings.promotion.mode)
    except GateNotPassed as exc:
        raise dg.Failure(str(exc)) from exc
    context.log.info(outcome["reason"])
    context.add_output_metadata({**outcome, "mode": settings.promotion.mode})
    return outcome
