"""The training group: from a snapshot of the offline store to a promoted model.

    ingested_interactions
        └─ training_dataset  (Feast offline-store snapshot: digest, Kafka offsets, feature view versions)
             ├─ trained_model  (HSTU / SASRec / ARGUS on TorchRec, inside an MLflow run)
             │    └─ evaluation  (held-out HR@K/NDCG@K vs most-popular, sanity signals, plots)
             │         └─ registered_model  (pyfunc version, alias challenger)  [blocking check: promotion_gate]
             │              └─ champion_model  (auto: alias champion; manual: awaits a person)
             └─ distributed_trained_model  (torchrun + DistributedModelParallel through Dagster Pipes)

Values passed between assets are small dicts of paths and numbers; models travel as files and MLflow
artifacts, never as pickles.
"""

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from features.offline_read import describe_snapshot, export_snapshot
from features.training_set import build_training_set
from orchestration.assets.ingest import ingested_interactions
from orchestration.resources import EncoreResource, FeastResource, MLflowResource

ROOT = Path(__file__).resolve().parents[2]
TRAINING = "training"


class TrainingConfig(dg.Config):
    """Which recipe a training run fits (``models/configs/``): empty = the settings' ``train.recipe`` with its
    overrides; else a recipe name (``hstu``, ``sasrec``, ``argus``, ``hstu-ml1m``, ...) or a YAML path. The other
    fields override single knobs of it (0 / -1 = keep)."""

    recipe: str = ""
    epochs: int = 0
    dim: int = 0
    blocks: int = 0
    seed: int = -1


def train_config(settings, config: TrainingConfig):  # noqa: ANN001, ANN201 - EncoreSettings -> TrainConfig
    """The run's recipe, resolved the one way (``models.recipe``); a history longer than serving keeps is refused
    here, before any training, since the service could not feed the model what it was trained on."""
    from models.recipe import recipe_from_settings

    overrides = {k: v for k, v in (("epochs", config.epochs), ("dim", config.dim), ("blocks", config.blocks))
                 if v > 0}
    if config.seed >= 0:
        overrides["seed"] = config.seed
    try:
        cfg = recipe_from_settings(settings.train, config.recipe, **overrides)
    except (OSError, ValueError) as exc:
        raise dg.Failure(f"recipe {config.recipe or settings.train.recipe!r}: {exc}") from exc
    if cfg.max_len > settings.ingest.history_length:
        raise dg.Failure(f"recipe reads {cfg.max_len} events per user (max_len) but the online store keeps "
                         f"{settings.ingest.history_length} (ingest.history_length): serving could not feed it. "
                         "Lower max_len or raise ENCORE_INGEST__HISTORY_LENGTH")
    return cfg


def _feature_view_versions(store) -> dict[str, str]:  # noqa: ANN001
    """Content hash of each Feast feature view's spec: changes whenever its schema, source or TTL does."""
    return {fv.name: hashlib.sha256(fv.to_proto().spec.SerializeToString()).hexdigest()[:12]
            for fv in sorted(store.list_feature_views(), key=lambda f: f.name)}


@dg.asset(deps=[ingested_interactions], kinds={"feast", "duckdb", "parquet"}, group_name=TRAINING)
def training_dataset(context: dg.AssetExecutionContext, encore: EncoreResource, feast: FeastResource) -> dict:
    """A content-addressed snapshot of the offline store (Feast's ``interactions`` source), so every model
    names the exact data it saw: snapshot digest, Kafka offset range per partition, the offline-store files
    it read and the versions of the Feast feature views; with the Iceberg backend also the table snapshot id
    it read (pinned: workers may append meanwhile) and the Kafka offsets that snapshot records."""
    settings = encore.settings()
    store = feast.store(settings)
    described = describe_snapshot(settings)
    snapshot_id = described.get("snapshot_id")
    df = build_training_set(settings, snapshot_id)  # DuckDB here or Spark, as offline.training_engine says
    if df.empty:
        raise dg.Failure("the offline store holds no interactions yet: replay data and ingest first")
    digest = hashlib.sha256(pd.util.hash_pandas_object(df[["event_id"]], index=False).values.tobytes()).hexdigest()[:16]
    out = settings.root / "datasets" / f"interactions-{digest}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        df.to_parquet(out, index=False)
    offsets = {str(p): [int(g.kafka_offset.min()), int(g.kafka_offset.max())] for p, g in df.groupby("kafka_partition")}
    files = described["files"]
    views = _feature_view_versions(store)
    manifest = {"snapshot": digest, "source": described["source"], "files": files, "offset_ranges": offsets,
                "feature_views": views, "events": len(df)}
    lineage = {}
    if snapshot_id is not None:  # an Iceberg snapshot: what a reader needs to read exactly this state again
        lineage = {"backend": described["backend"], "snapshot_id": snapshot_id, "location": described["location"],
                   "committed_at_ms": described["committed_at_ms"], "kafka_offsets": described["kafka_offsets"],
                   "engine": settings.offline.training_engine}
        manifest.update(lineage)
        export_snapshot(settings, snapshot_id)  # Feast's interactions FileSource follows the trained snapshot
    out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2))
    info = {"path": str(out), "snapshot": digest, "events": len(df), "users": int(df.user_id.nunique()),
            "items": int(df.item_id.nunique()), "offset_ranges": offsets, "feature_views": views,
            "files": len(files), **({"snapshot_id": snapshot_id} if snapshot_id is not None else {})}
    context.add_output_metadata({
        **{k: v for k, v in info.items() if k not in ("offset_ranges", "feature_views", "path", "snapshot_id")},
        "offset_ranges": dg.MetadataValue.json(offsets),
        "feature_views": dg.MetadataValue.json(views),
        "path": dg.MetadataValue.path(str(out)),
        "manifest": dg.MetadataValue.path(str(out.with_suffix(".manifest.json"))),
        "dagster/row_count": len(df),
        # a 64-bit id: text, since Dagster's UI reads integer metadata as 32-bit GraphQL ints
        **({"snapshot_id": str(snapshot_id), "kafka_offsets": dg.MetadataValue.json(lineage["kafka_offsets"]),
            "engine": lineage["engine"]} if lineage else {}),
    })
    return info


@dg.asset(kinds={"torchrec", "pytorch", "mlflow"}, group_name=TRAINING)
def trained_model(context: dg.AssetExecutionContext, config: TrainingConfig, encore: EncoreResource,
                  mlflow_server: MLflowResource, training_dataset: dict) -> dict:
    """Train a sequence model (HSTU by default, SASRec, or ARGUS two-task) inside an MLflow run that records
    its parameters, per-epoch metrics and system metrics while it trains."""
    from models.plots import loss_curves, md_image
    from models.lifecycle import tracking
    from models.lifecycle.tracking import experiment_name, log_epoch, training_run
    from models.train import train

    settings = encore.settings()
    cfg = train_config(settings, config)
    family = "argus" if cfg.feedback_weight > 0 else cfg.model
    df = pd.read_parquet(training_dataset["path"])
    uri = mlflow_server.resolve(settings)
    name = f"{family}-{training_dataset['snapshot']}-{int(time.time())}"
    context.log.info(f"training {family} on {len(df)} events, {training_dataset['users']} users")

    def on_epoch(epoch: int, row: dict) -> None:
        context.log.info(f"epoch {epoch}: " + json.dumps(_round(row)))
        log_epoch(row, epoch)

    params = {**dataclasses.asdict(cfg), "family": family, "recipe": config.recipe or settings.train.recipe,
              "dataset_snapshot": training_dataset["snapshot"], "dataset_events": training_dataset["events"]}
    with training_run(uri, experiment_name(settings.mlflow_experiment, tracking.TRAINING), run_name=name, params=params,
                      tags={"dataset_snapshot": training_dataset["snapshot"], "model": family,
                            "dagster_run_id": context.run_id},
                      artifact_root=settings.mlflow_dir / "artifacts", recipe=cfg.to_yaml()) as run:
        result = train(df, cfg, progress=False, on_epoch=on_epoch)
    run_dir = settings.root / "models" / name
    out = result.recommender().save(run_dir / "recommender")
    history = [_round(h) for h in result.history]
    curve = loss_curves(history, run_dir / "report" / "loss_curves.png")
    test = _round(result.test_metrics)
    context.add_output_metadata({
        "model": family,
        "params": result.num_params,
        "best_epoch": result.best_epoch,
        "wall_s": round(result.wall_s, 2),
        "mlflow_run_id": run.info.run_id,
        "test_metrics": dg.MetadataValue.json(test),
        "epochs": dg.MetadataValue.md(_history_table(history)),
        "loss_curves": dg.MetadataValue.md(md_image(curve, "loss curves")),
        "dir": dg.MetadataValue.path(str(out)),
        "recipe": dg.MetadataValue.md(f"```yaml\n{cfg.to_yaml()}```"),
    })
    return {"dir": str(out), "report_dir": str(run_dir / "report"), "run_id": run.info.run_id, "family": family,
            "config": {**dataclasses.asdict(cfg), "model": cfg.model}, "params": result.num_params,
            "history": history, "test_metrics": test, "valid_metrics": _round(result.valid_metrics),
            "dataset": training_dataset}


@dg.asset(kinds={"pytorch"}, group_name=TRAINING)
def evaluation(context: dg.AssetExecutionContext, encore: EncoreResource, trained_model: dict) -> dict:
    """Held-out HR@K / NDCG@K / MRR on the snapshot's leave-one-out split next to the most-popular baseline,
    plus the sanity signals the promotion gate reads (finite scores, score spread, coverage, latency)."""
    from models.lifecycle.gate import evaluate_recommender
    from models.plots import md_image, metric_bars
    from models.recommender import Recommender

    settings = encore.settings()
    rec = Recommender.load(Path(trained_model["dir"]))
    df = pd.read_parquet(trained_model["dataset"]["path"])
    report = evaluate_recommender(rec, df, sample_users=settings.promotion.sample_users)
    split = settings.promotion.split
    bars = metric_bars({trained_model["family"]: report[split], "most popular": report[f"popularity_{split}"]},
                       Path(trained_model["report_dir"]) / "metrics.png")
    path = Path(trained_model["report_dir"]) / "evaluation.json"
    path.write_text(json.dumps(report, indent=2))
    context.add_output_metadata({
        "split": split,
        **{f"{split}/{k}": round(v, 5) for k, v in report[split].items() if k in ("hr@10", "ndcg@10", "mrr")},
        "metrics": dg.MetadataValue.md(_metrics_table(report)),
        "metrics_plot": dg.MetadataValue.md(md_image(bars, "HR@K and NDCG@K")),
        "sanity": dg.MetadataValue.json(_round(report["sanity"])),
        "report": dg.MetadataValue.path(str(path)),
    })
    return {**trained_model, "evaluation": report, "evaluation_path": str(path)}


@dg.asset(kinds={"mlflow"}, group_name=TRAINING)
def registered_model(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                     evaluation: dict) -> dict:
    """Finish the MLflow run (evaluation report, plots, config, vocabulary, pyfunc model with signature and
    input example) and register a new version of the settings' model (``registry.model_name``) with the
    challenger alias."""
    from models.lifecycle.registry import Registry
    from models.recommender import Recommender

    settings = encore.settings()
    uri = mlflow_server.resolve(settings)
    rec = Recommender.load(Path(evaluation["dir"]))
    ds = evaluation["dataset"]
    report = evaluation["evaluation"]
    metrics = {f"{split}_{k}": v for split in ("valid", "test", "popularity_valid", "popularity_test")
               for k, v in report[split].items()}
    metrics.update({f"sanity_{k}": v for k, v in report["sanity"].items()})
    reg = Registry(uri, settings.registry).register(
        rec, run_id=evaluation["run_id"], metrics=metrics,
        tags={"model": evaluation["family"], "dataset_snapshot": ds["snapshot"],
              "offset_ranges": json.dumps(ds["offset_ranges"]), "events": str(ds["events"]),
              "feature_views": json.dumps(ds.get("feature_views", {})), "params": str(evaluation["params"]),
              "dagster_run_id": context.run_id,
              # the Iceberg snapshot it read: table maintenance keeps it while the version may serve
              **({"snapshot_id": str(ds["snapshot_id"])} if ds.get("snapshot_id") is not None else {})},
        input_example=_input_example(rec), artifacts={"evaluation": Path(evaluation["report_dir"])},
    )
    context.add_output_metadata({"version": reg.version, "run_id": reg.run_id,
                                 "alias": settings.registry.challenger_alias,
                                 "mlflow": dg.MetadataValue.url(f"{uri}/#/models/{reg.name}/versions/{reg.version}")
                                 if uri.startswith("http") else dg.MetadataValue.text(uri)})
    return {"version": reg.version, "run_id": reg.run_id, "metrics": evaluation["test_metrics"],
            "evaluation": report, "dataset": ds, "family": evaluation["family"]}


@dg.asset_check(asset=registered_model, blocking=True,
                description="challenger beats the champion (re-scored on the same data) by the margin, beats "
                            "most-popular, and passes sanity checks: finite scores, score spread, catalogue "
                            "coverage, latency budget")
def promotion_gate(context: dg.AssetCheckExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                   registered_model: dict) -> dg.AssetCheckResult:
    from models.lifecycle.promotion import judge
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    promo = settings.promotion
    version = registered_model["version"]
    decision = judge(Registry(mlflow_server.resolve(settings), settings.registry), version,
                     registered_model["evaluation"], registered_model["dataset"]["path"], promo, log=context.log)
    rows = ["| check | passed |", "|---|---|"] + [f"| {k} | {'yes' if v else '**no**'} |"
                                                  for k, v in decision.checks.items()]
    return dg.AssetCheckResult(
        passed=decision.passed,
        description=decision.summary,
        metadata={
            "reason": dg.MetadataValue.text(decision.summary),
            "checks": dg.MetadataValue.md("\n".join(rows)),
            "version": version,
            "champion_version": decision.champion_version if decision.champion_version is not None else -1,
            "challenger_value": decision.challenger_value,
            "champion_value": decision.champion_value if decision.champion_value is not None else -1.0,
            "mode": promo.mode,
        },
    )


@dg.asset(kinds={"mlflow"}, group_name=TRAINING)
def champion_model(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                   registered_model: dict) -> dict:
    """Runs only when the blocking ``promotion_gate`` passed. ``auto``: the challenger gets the champion alias;
    ``manual``: it waits for a person (``encore models promote VERSION`` or the alias in the MLflow UI)."""
    from models.lifecycle.promotion import GateNotPassed, conclude
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    registry = Registry(mlflow_server.resolve(settings), settings.registry)
    try:  # refuses a version without a passing verdict (materialised on its own, without the gate)
        outcome = conclude(registry, registered_model["version"], settings.promotion.mode)
    except GateNotPassed as exc:
        raise dg.Failure(str(exc)) from exc
    context.log.info(outcome["reason"])
    context.add_output_metadata({**outcome, "mode": settings.promotion.mode})
    return outcome


# ------------------------------------------------------------------------------------ distributed training
# ``trained_model`` trains inside the Dagster step process; ``distributed_trained_model`` instead starts
# ``python -m torch.distributed.run ... -m models.distributed`` as a subprocess (``dg.PipesSubprocessClient``)
# on the same ``training_dataset`` snapshot. The trainer's reporting rank (rank 0 on one node) streams its
# per-epoch losses as Dagster logs and reports the materialisation, with the test metrics, the most-popular
# baseline, the sharding plan and the model directory, through the Pipes message channel; every other rank
# stays silent.
#
# One node (the default): ``--standalone`` rendezvous on a free local port, ``nproc_per_node`` workers.
# Several nodes (``nnodes > 1``): this step runs the node Dagster launched, ``--rdzv_backend c10d
# --rdzv_endpoint HOST:PORT --rdzv_id <run id>``; the other nodes must run the same torchrun command with the
# same endpoint and id (e.g. a Kubernetes Job or a Slurm step started next to it), and ``data_dir`` must be
# on a file system every node reads (rank 0 writes the model there). See docs/training.md.


class DistributedTrainingConfig(TrainingConfig):
    """The recipe (as ``trained_model``'s: the settings' or a named one, with single knobs overridden) and
    torchrun's shape. ``max_steps`` cuts a run short for a smoke test (0: no limit)."""

    max_steps: int = 0
    nproc_per_node: int = 2  # processes on this node (one per GPU with NCCL)
    nnodes: int = 1
    rdzv_endpoint: str = ""  # HOST:PORT of the c10d rendezvous; required when nnodes > 1
    rdzv_id: str = ""  # empty: the Dagster run id (every node must pass the same)
    backend: str = "auto"  # auto | gloo | nccl (auto: nccl when CUDA is available)


def torchrun_command(config: DistributedTrainingConfig, recipe: str, data: str, out: str, run_id: str) -> list[str]:
    """The command this node runs; every node of a multi-node job runs the same one. ``recipe``: the resolved
    recipe's file (on a file system every node reads), so every rank trains exactly what this step resolved."""
    if config.nnodes > 1 and not config.rdzv_endpoint:
        raise dg.Failure("nnodes > 1 needs rdzv_endpoint (HOST:PORT of the c10d rendezvous every node can reach)")
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if config.nnodes == 1 and not config.rdzv_endpoint:
        cmd += ["--standalone"]  # local c10d rendezvous on a free port: parallel runs never collide
    else:
        cmd += ["--nnodes", str(config.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", config.rdzv_endpoint,
                "--rdzv_id", config.rdzv_id or run_id]
    cmd += ["--nproc_per_node", str(config.nproc_per_node),
            "-m", "models.distributed", "--config", recipe, "--data", data, "--out", out,
            "--backend", config.backend]
    if config.max_steps > 0:
        cmd += ["--max-steps", str(config.max_steps)]
    return cmd


@dg.asset(kinds={"torchrec", "pytorch"}, group_name=TRAINING)
def distributed_trained_model(context: dg.AssetExecutionContext, config: DistributedTrainingConfig,
                              encore: EncoreResource, pipes_subprocess_client: dg.PipesSubprocessClient,
                              training_dataset: dict) -> dg.MaterializeResult:
    """Train with TorchRec DistributedModelParallel under torchrun (item table sharded row-wise over all
    ranks), launched through Dagster Pipes; rank 0's metrics become this materialisation's metadata."""
    settings = encore.settings()
    # Named after the run, not the clock: on several nodes every node runs this same (logged) command.
    name = f"distributed-{training_dataset['snapshot']}-{context.run.run_id[:8]}"
    out = settings.root / "models" / name / "recommender"
    recipe = settings.root / "models" / name / "recipe.yaml"  # resolved here, read by every rank
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(train_config(settings, config).to_yaml())
    cmd = torchrun_command(config, str(recipe), training_dataset["path"], str(out), context.run.run_id)
    context.log.info("launching " + " ".join(cmd))
    reported = pipes_subprocess_client.run(context=context, command=cmd, cwd=str(ROOT)).get_materialize_result()
    meta = dict(reported.metadata or {})
    if "test_metrics" not in meta:  # the trainer exited 0 without reporting: not a trained model
        raise dg.Failure("the distributed trainer reported no metrics through Dagster Pipes")
    # "dir" is where rank 0 saved the model (its node's --out; the same shared path when nodes share one)
    value = {"dir": meta["dir"].value, "world_size": meta["world_size"].value,
             "test_metrics": meta["test_metrics"].value, "dataset": training_dataset}
    return dg.MaterializeResult(
        metadata={**meta, "command": dg.MetadataValue.text(" ".join(cmd)), "recipe": dg.MetadataValue.path(str(recipe)),
                  "dataset_snapshot": training_dataset["snapshot"]},
        data_version=reported.data_version,
        check_results=reported.check_results,
        value=value,
    )


def _input_example(rec) -> pd.DataFrame:  # noqa: ANN001
    sample = [int(i) for i in rec.vocab.decode(list(range(1, min(len(rec.vocab), 5) + 1)))]
    return pd.DataFrame({"item_ids": [sample], "event_types": [["listen"] * len(sample)],
                         "timestamps_ms": [[1_700_000_000_000 + 60_000 * i for i in range(len(sample))]]})


def _metrics_table(report: dict) -> str:
    keys = [k for k in ("hr@1", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr") if k in report.get("test", {})]
    lines = ["| split | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for split in ("valid", "test"):
        for who, key in (("model", split), ("most popular", f"popularity_{split}")):
            m = report.get(key, {})
            lines.append(f"| {split} | {who} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys) + " |")
    return "\n".join(lines)


def _round(row: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}


def _history_table(history: list[dict]) -> str:
    if not history:
        return "(no epochs)"
    cols = list(history[0])
    lines = ["| epoch | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, row in enumerate(history, 1):
        lines.append(f"| {i} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
