"""The studies group: experiments on the models themselves (scaling sweeps), each its own job."""

import time
from pathlib import Path

import dagster as dg
import pandas as pd

from orchestration.resources import EncoreResource, MLflowResource

STUDIES = "studies"


@dg.asset(kinds={"pytorch", "mlflow", "scipy"}, group_name=STUDIES)
def scaling_study(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                  training_dataset: dict) -> dict:
    """Train a sweep of model sizes (and data fractions) and fit power laws of evaluation loss and NDCG@10
    against parameters and training compute; the fit and plot go to MLflow and to this asset's metadata."""
    from models.lifecycle.tracking import SCALING, experiment_name
    from models.plots import md_image
    from models.scaling import run_study

    settings = encore.settings()
    df = pd.read_parquet(training_dataset["path"])
    out_dir = settings.root / "studies" / f"scaling-{training_dataset['snapshot']}-{int(time.time())}"
    study = run_study(df, settings.train, settings.scaling, out_dir=out_dir,
                      tracking_uri=mlflow_server.resolve(settings),
                      experiment=experiment_name(settings.mlflow_experiment, SCALING),
                      artifact_root=settings.mlflow_dir / "artifacts", log=context.log.info)
    context.add_output_metadata({
        "points": len(study["points"]),
        "fits": dg.MetadataValue.md(study["fits_markdown"]),
        "sweep": dg.MetadataValue.md(study["points_markdown"]),
        "plot": dg.MetadataValue.md(md_image(Path(study["plot"]), "scaling")),
        "mlflow_run_id": study["run_id"],
        "dir": dg.MetadataValue.path(str(out_dir)),
    })
    return study
