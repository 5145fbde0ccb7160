"""Distributed training as an external job: Dagster launches ``torchrun`` through Dagster Pipes.

    training_dataset ── distributed_trained_model   (its own job: distributed_training_job)

``trained_model`` trains inside the Dagster step process; this asset instead starts
``python -m torch.distributed.run ... -m models.distributed`` as a subprocess (``dg.PipesSubprocessClient``)
on the same ``training_dataset`` snapshot. The trainer's reporting rank (rank 0 on one node) streams its
per-epoch losses as Dagster logs and reports the materialisation, with the test metrics, the most-popular
baseline, the sharding plan and the model directory, through the Pipes message channel; every other rank
stays silent.

One node (the default): ``--standalone`` rendezvous on a free local port, ``nproc_per_node`` workers.
Several nodes (``nnodes > 1``): this step runs the node Dagster launched, ``--rdzv_backend c10d
--rdzv_endpoint HOST:PORT --rdzv_id <run id>``; the other nodes must run the same torchrun command with the
same endpoint and id (e.g. a Kubernetes Job or a Slurm step started next to it), and ``data_dir`` must be
on a file system every node reads (rank 0 writes the model there). See docs/training.md.
"""

import sys
from pathlib import Path

import dagster as dg

from orchestration.resources import EncoreResource

ROOT = Path(__file__).resolve().parents[1]
TRAINING = "training"


class DistributedTrainingConfig(dg.Config):
    """torchrun's shape and the training config (``models/configs/<config>.yaml`` or a YAML path)."""

    config: str = "default"
    epochs: int = 0  # 0: the config's
    max_steps: int = 0  # 0: no limit
    nproc_per_node: int = 2  # processes on this node (one per GPU with NCCL)
    nnodes: int = 1
    rdzv_endpoint: str = ""  # HOST:PORT of the c10d rendezvous; required when nnodes > 1
    rdzv_id: str = ""  # empty: the Dagster run id (every node must pass the same)
    backend: str = "auto"  # auto | gloo | nccl (auto: nccl when CUDA is available)


def torchrun_command(config: DistributedTrainingConfig, data: str, out: str, run_id: str) -> list[str]:
    """The command this node runs; every node of a multi-node job runs the same one."""
    if config.nnodes > 1 and not config.rdzv_endpoint:
        raise dg.Failure("nnodes > 1 needs rdzv_endpoint (HOST:PORT of the c10d rendezvous every node can reach)")
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if config.nnodes == 1 and not config.rdzv_endpoint:
        cmd += ["--standalone"]  # local c10d rendezvous on a free port: parallel runs never collide
    else:
        cmd += ["--nnodes", str(config.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", config.rdzv_endpoint,
                "--rdzv_id", config.rdzv_id or run_id]
    cmd += ["--nproc_per_node", str(config.nproc_per_node),
            "-m", "models.distributed", "--config", config.config, "--data", data, "--out", out,
            "--backend", config.backend]
    if config.epochs > 0:
        cmd += ["--epochs", str(config.epochs)]
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
    cmd = torchrun_command(config, training_dataset["path"], str(out), context.run.run_id)
    context.log.info("launching " + " ".join(cmd))
    reported = pipes_subprocess_client.run(context=context, command=cmd, cwd=str(ROOT)).get_materialize_result()
    meta = dict(reported.metadata or {})
    if "test_metrics" not in meta:  # the trainer exited 0 without reporting: not a trained model
        raise dg.Failure("the distributed trainer reported no metrics through Dagster Pipes")
    # "dir" is where rank 0 saved the model (its node's --out; the same shared path when nodes share one)
    value = {"dir": meta["dir"].value, "world_size": meta["world_size"].value,
             "test_metrics": meta["test_metrics"].value, "dataset": training_dataset}
    return dg.MaterializeResult(
        metadata={**meta, "command": dg.MetadataValue.text(" ".join(cmd)),
                  "dataset_snapshot": training_dataset["snapshot"]},
        data_version=reported.data_version,
        check_results=reported.check_results,
        value=value,
    )
