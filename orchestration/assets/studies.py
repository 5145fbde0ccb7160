"""The studies group: experiments on the models themselves. The scaling study, one partition per point:

    scaling_corpus ──> scaling_point  (dynamic partitions "scaling_points": one per backbone x size x data x seed)
                            └──> scaling_laws  (fits, intervals, iso-FLOP frontier, plots; an MLflow run)

``scaling_corpus`` freezes the study's events (``scaling.dataset``) and registers the settings' grid as
partitions; each ``scaling_point`` partition trains and measures one point (its own MLflow run, its own JSON
file), so a sweep is resumable and can be spread over runs, days or machines; ``scaling_laws`` fits every
point of the grid that was trained on the current corpus. ``encore study scaling`` drives all three.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from orchestration.resources import EncoreResource, MLflowResource

STUDIES = "studies"

scaling_partitions = dg.DynamicPartitionsDefinition(name="scaling_points")


def study_dir(settings) -> Path:  # noqa: ANN001 - EncoreSettings
    return settings.root / "studies" / "scaling" / settings.scaling.name


def point_file(settings, key: str) -> Path:  # noqa: ANN001
    return study_dir(settings) / "points" / f"{key}.json"


def corpus_info(settings) -> dict:  # noqa: ANN001
    """What ``scaling_corpus`` last froze (read from its file, so points and fits run in runs of their own)."""
    path = study_dir(settings) / "corpus.json"
    if not path.exists():
        raise dg.Failure(f"study {settings.scaling.name!r} has no corpus yet: materialise scaling_corpus first")
    return json.loads(path.read_text())


@dg.asset(kinds={"parquet"}, group_name=STUDIES)
def scaling_corpus(context: dg.AssetExecutionContext, encore: EncoreResource) -> dict:
    """The study's events, frozen (``scaling.dataset``: a simulated world, the offline store, or a named data
    set), and the settings' grid added as ``scaling_point`` partitions."""
    import hashlib

    from models.scaling import grid, load_corpus

    settings = encore.settings()
    df = load_corpus(settings)
    digest = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:16]
    out = study_dir(settings) / "corpus.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    keys = [p.key for p in grid(settings.scaling)]
    known = set(context.instance.get_dynamic_partitions(scaling_partitions.name))
    context.instance.add_dynamic_partitions(scaling_partitions.name, [k for k in keys if k not in known])
    info = {"path": str(out), "digest": digest, "study": settings.scaling.name, "dataset": settings.scaling.dataset,
            "events": len(df), "users": int(df.user_id.nunique()), "items": int(df.item_id.nunique()),
            "points": keys}
    (out.parent / "corpus.json").write_text(json.dumps(info, indent=2))
    context.add_output_metadata({
        **{k: v for k, v in info.items() if k not in ("points", "path")},
        "grid": len(keys), "path": dg.MetadataValue.path(str(out)), "dagster/row_count": len(df),
    })
    return info


@dg.asset(partitions_def=scaling_partitions, deps=[scaling_corpus], kinds={"pytorch", "mlflow"}, group_name=STUDIES)
def scaling_point(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource) -> dict:
    """One point of the sweep (partition key = ``models.scaling.PointSpec.key``): train it, measure its exact
    full-catalogue loss, NDCG@10 and HR@10, log it as an MLflow run tagged with the study."""
    from models.lifecycle.tracking import SCALING, experiment_name, log_study_point
    from models.scaling import PointSpec, run_point

    settings = encore.settings()
    spec = PointSpec.from_key(context.partition_key)
    corpus = corpus_info(settings)
    df = pd.read_parquet(corpus["path"])
    point = run_point(df, spec, settings.scaling.recipe, settings.scaling.overrides)
    point |= {"corpus": corpus["digest"], "study": settings.scaling.name}
    uri = mlflow_server.resolve(settings)
    if uri:
        point["mlflow_run_id"] = log_study_point(
            uri, experiment_name(settings.mlflow_experiment, SCALING), study=settings.scaling.name, key=spec.key,
            params={k: point[k] for k in ("backbone", "dim", "blocks", "fraction", "epochs", "seed", "corpus")},
            metrics={k: v for k, v in point.items() if isinstance(v, (int, float)) and k not in ("dim", "blocks",
                                                                                                "fraction", "seed")},
            artifact_root=settings.mlflow_dir / "artifacts")
    path = point_file(settings, spec.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point, indent=2))
    context.log.info(f"{spec.key}: N={point['params']} D={point['tokens']} loss={point['eval_loss']:.4f} "
                     f"ndcg@10={point['ndcg@10']:.4f} in {point['wall_s']:.0f} s")
    context.add_output_metadata({k: v for k, v in point.items() if isinstance(v, (int, float, str))})
    return point


@dg.asset(deps=[scaling_point], kinds={"scipy", "mlflow"}, group_name=STUDIES)
def scaling_laws(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource) -> dict:
    """Fits over the grid's points trained on the current corpus: L(N) = E + A·N^-α per backbone with bootstrap
    intervals and the held-out largest size predicted, L(D), the L(N, D) surface and the compute-optimal
    N*(C); tables and log-log plots in this asset's metadata and in an MLflow run."""
    from models.lifecycle.tracking import SCALING, experiment_name, log_study_result
    from models.plots import md_image
    from models.scaling import grid
    from models.scaling_laws import plot_all, summarise, to_markdown, write_summary

    settings = encore.settings()
    corpus = corpus_info(settings)
    points, missing, stale = collect_points(settings, corpus["digest"])
    if missing:
        context.log.warning(f"{len(missing)} of the grid's points are not trained yet (first: {missing[0]}); "
                            "fitting the others")
    if stale:
        context.log.warning(f"{len(stale)} points were trained on another corpus and are left out: retrain them")
    if not points:
        raise dg.Failure(f"no point of the grid ({len(grid(settings.scaling))}) is trained on this corpus yet: "
                         "materialise scaling_point partitions first")
    out = study_dir(settings) / "fits"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(points)
    report = to_markdown(summary)
    plots = plot_all(points, out)
    pd.DataFrame(points).to_csv(out / "points.csv", index=False)
    write_summary(summary, out / "summary.json")
    (out / "report.md").write_text(report)
    run_id = ""
    uri = mlflow_server.resolve(settings)
    if uri:
        run_id = log_study_result(
            uri, experiment_name(settings.mlflow_experiment, SCALING), study=settings.scaling.name,
            params={"points": len(points), "corpus": corpus["digest"], "dataset": settings.scaling.dataset},
            metrics=summary_metrics(summary), folder=out, artifact_path="scaling",
            artifact_root=settings.mlflow_dir / "artifacts")
    context.add_output_metadata({
        "points": len(points), "missing": len(missing), "stale": len(stale),
        "report": dg.MetadataValue.md(report),
        **{f"plot_{name}": dg.MetadataValue.md(md_image(path, name)) for name, path in plots.items()},
        "mlflow_run_id": run_id, "dir": dg.MetadataValue.path(str(out)),
    })
    return {"summary": summary, "report": report, "plots": {k: str(v) for k, v in plots.items()},
            "points": len(points), "missing": missing, "stale": stale, "run_id": run_id, "dir": str(out)}


def collect_points(settings, corpus: str) -> tuple[list[dict], list[str], list[str]]:  # noqa: ANN001
    """The grid's trained points on ``corpus``; the keys not trained yet; those trained on another corpus."""
    from models.scaling import grid

    points, missing, stale = [], [], []
    for spec in grid(settings.scaling):
        path = point_file(settings, spec.key)
        if not path.exists():
            missing.append(spec.key)
            continue
        point = json.loads(path.read_text())
        if point.get("corpus") == corpus:
            points.append(point)
        else:
            stale.append(spec.key)
    return points, missing, stale


def summary_metrics(summary: dict) -> dict[str, float]:
    """The headline numbers of a summary, flat, for MLflow (each backbone's exponent, R², extrapolation error)."""
    out: dict[str, float] = {}
    for backbone, b in summary.get("backbones", {}).items():
        fit, ext = b.get("L_N") or {}, b.get("extrapolation") or {}
        for name, value in (("alpha", fit.get("alpha")), ("E", fit.get("E")), ("r2_log", fit.get("r2_log")),
                            ("extrapolation_rel_error", ext.get("rel_error"))):
            if isinstance(value, (int, float)):
                out[f"{backbone}_{name}"] = float(value)
    return out
