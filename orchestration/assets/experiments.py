"""The experiments group: served recommendations (the exposures topic) and the A/B report built from them and
the interactions they caused (``experiments.readout``)."""

import dagster as dg

from orchestration.assets.ingest import ingested_interactions
from orchestration.resources import EncoreResource, KafkaResource, MLflowResource

EXPERIMENTS = "experiments"


exposures_topic = dg.AssetSpec(
    "exposures_topic",
    description="Kafka topic of served recommendations (one record per response)",
    kinds={"kafka"},
    group_name=EXPERIMENTS,
)


@dg.asset(deps=[exposures_topic, ingested_interactions], kinds={"scipy"}, group_name=EXPERIMENTS)
def ab_report(context: dg.AssetExecutionContext, encore: EncoreResource, kafka: KafkaResource,
              mlflow_server: MLflowResource) -> dict:
    """Join exposures with the interactions they caused; per-arm metrics, Welch tests, SRM, sequential decisions
    with the boundary over time (a plot), HTML report."""
    import base64
    from pathlib import Path

    from experiments.readout import build_ab_report

    settings = encore.settings()
    result = build_ab_report(settings, kafka.resolve(settings), mlflow_server.resolve(settings))
    # Dagster renders Markdown metadata with inline images: the boundary plot shows in the asset's page.
    png = base64.b64encode(Path(result["sequential_png"]).read_bytes()).decode("ascii")
    context.add_output_metadata({
        "report": dg.MetadataValue.path(result["html"]),
        "summary": dg.MetadataValue.md(result["markdown"]),
        "sequential_boundary": dg.MetadataValue.md(f"![sequential boundary over time](data:image/png;base64,{png})"),
        "sequential_plot": dg.MetadataValue.path(result["sequential_png"]),
        "exposures": result["exposures"],
    })
    return result
