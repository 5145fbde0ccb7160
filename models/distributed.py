"""Multi-process training with TorchRec's DistributedModelParallel (DMP).

    torchrun --nproc_per_node 2 -m models.distributed --config default --data events.csv --out model_dir

What changes versus ``models.train`` (single process):

* The item table is sharded **row-wise** across ranks (each rank owns ~V / world rows) by the
  ``EmbeddingShardingPlanner``; the tiny event-type table is placed table-wise. ``SequentialRecommender``
  looks items up through its ``EmbeddingCollection`` (never ``.weight``), so the same model code runs sharded.
* The embedding update is a **fused sparse optimiser**: declared with ``apply_optimizer_in_backward`` before
  sharding, FBGEMM's table-batched kernel applies it to the touched rows only, inside the backward pass
  (row-wise Adagrad on CPU, whose FBGEMM kernel lacks Adam; Adam on GPU).
  Dense parameters are replicated (DMP wraps them in DDP) and stepped by AdamW, combined with the fused one
  in a ``CombinedOptimizer``.
* Every rank trains on its own slice of the training windows, the same number of equal-size batches per
  rank (collectives need every rank in every step); negatives are sampled per rank.
* No per-epoch validation / early stopping (it would need the unsharded model each epoch): a fixed number of
  epochs, then the shards are gathered into an ordinary ``SequentialRecommender`` on rank 0, which evaluates
  on the test split and can save a ``Recommender`` directory loadable by the serving code.

CPU + gloo is what this machine has; on GPUs pass ``--backend nccl`` and the planner places shards in HBM.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec import optim as trec_optim
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torch.distributed.optim import _apply_optimizer_in_backward

from models.data import build_sequences, iterate_batches, read_movielens
from models.evaluate import evaluate
from models.recommender import Recommender, SequentialRecommender, build_model
from models.train import RecommenderTrain, TrainConfig, TrainResult, make_split, seed_everything


def init_distributed(backend: str = "gloo") -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; a single process works too (world of one)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shard(
    task: RecommenderTrain, cfg: TrainConfig, world_size: int, device: torch.device, sparse_lr: float | None = None
) -> DistributedModelParallel:
    """Declare the fused embedding optimiser, plan (row-wise items) and wrap the train module in DMP."""
    embeddings = task.model.embeddings
    # torchrec.optim classes are placeholders whose kwargs go straight to FBGEMM's fused kernel. FBGEMM's CPU
    # kernel has no Adam, so on CPU the tables use row-wise Adagrad (TorchRec's usual choice: one state value
    # per row); on GPU, Adam keeps parity with train.py (FBGEMM spells betas beta1/beta2).
    if device.type == "cpu":
        opt_cls, kwargs = trec_optim.RowWiseAdagrad, {"lr": sparse_lr or 0.02, "eps": 1e-8}
    else:
        opt_cls, kwargs = trec_optim.Adam, {"lr": sparse_lr or cfg.lr, "beta1": cfg.betas[0], "beta2": cfg.betas[1]}
    _apply_optimizer_in_backward(opt_cls, embeddings.parameters(), kwargs)
    constraints = {
        "item": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]),
        "event_type": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type), constraints=constraints, debug=False
    )
    sharders = [EmbeddingCollectionSharder()]
    plan = planner.collective_plan(task, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(module=task, device=device, plan=plan, sharders=sharders)


def unsharded_model(dmp: DistributedModelParallel, template: SequentialRecommender, rank: int) -> SequentialRecommender | None:
    """Gather every shard into an ordinary model on rank 0 (collective: all ranks must call it)."""
    full: dict[str, torch.Tensor] = {}
    for name, value in dmp.state_dict().items():
        key = name.removeprefix("model.")
        if hasattr(value, "gather") and hasattr(value, "local_shards"):  # ShardedTensor
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if rank == 0:
                full[key] = out
        else:
            full[key] = value.detach().cpu()
    if rank != 0:
        return None
    template.load_state_dict(full, strict=True)
    return template.eval()


def train_distributed(
    df: pd.DataFrame,
    cfg: TrainConfig,
    *,
    max_steps: int | None = None,
    backend: str = "gloo",
    sparse_lr: float | None = None,
    progress: bool = True,
) -> TrainResult | None:
    """Train with DMP on every rank of the process group; rank 0 returns the result, the others None."""
    t0 = time.perf_counter()
    rank, world = init_distributed(backend)
    device = torch.device(cfg.device)
    seed_everything(cfg.seed)  # same init on every rank: dense replicas start equal
    seqs = build_sequences(df)
    split = make_split(seqs, cfg)
    model = build_model(cfg.model_config(len(seqs.vocab)))
    task = RecommenderTrain(model, cfg.negatives, cfg.temperature, cfg.feedback_weight)
    dmp = shard(task, cfg, world, device, sparse_lr)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])

    # This rank's training windows: an equal-size slice per rank -> the same number of steps everywhere.
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)  # identical on all ranks: a common permutation
    neg_gen = torch.Generator().manual_seed(cfg.seed + 1000 * (rank + 1))  # per-rank negatives
    per_rank = len(split.train) // world
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(len(split.train), generator=shuffle_gen).numpy()
        mine = split.train.subset(np.sort(perm[rank * per_rank : (rank + 1) * per_rank]))
        dmp.train()
        losses = []
        for batch in iterate_batches(seqs, mine, cfg.batch_size, shuffle=True, generator=shuffle_gen, bucket_by_length=cfg.length_bucketing):
            loss, out = dmp(batch.to(device), neg_gen)
            optimizer.zero_grad()
            loss.backward()  # the fused optimiser updates the embedding shards here
            optimizer.step()  # AdamW on the (DDP-averaged) dense parameters
            losses.append(float(out["loss"]))
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        mean = torch.tensor([float(np.mean(losses)) if losses else math.nan])
        dist.all_reduce(mean)
        record = {"epoch": float(epoch), "loss": float(mean) / world, "steps": float(step)}
        history.append(record)
        if progress and rank == 0:
            print(f"[dmp x{world}] epoch {epoch}: loss {record['loss']:.4f} ({step} steps)", flush=True)
        if max_steps is not None and step >= max_steps:
            break

    # Dense replicas must be bit-identical across ranks (DDP all-reduces their gradients): check it.
    dense_sum = torch.tensor([sum(float(p.detach().double().sum()) for _, p in in_backward_optimizer_filter(dmp.named_parameters()))])
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, dense_sum.double())
    in_sync = all(torch.allclose(x, sums[0], rtol=0, atol=1e-9) for x in sums)
    sharding = {f"{module}.{table}": ps.sharding_type for module, tables in dmp.plan.plan.items() for table, ps in tables.items()}

    template = build_model(cfg.model_config(len(seqs.vocab)))
    full = unsharded_model(dmp, template, rank)
    if rank != 0:
        return None
    assert full is not None
    test = evaluate(full, seqs, split.test, batch_size=cfg.eval_batch_size) if len(split.test) else {}
    return TrainResult(
        model=full,
        vocab=seqs.vocab,
        config=cfg,
        history=history,
        valid_metrics={},
        test_metrics=test,
        best_epoch=len(history),
        wall_s=time.perf_counter() - t0,
        num_params=sum(p.numel() for p in full.parameters()),
        extra={"world_size": world, "steps_per_rank": step, "sharding": sharding, "dense_replicas_in_sync": in_sync},
    )


def _read_events(path: str) -> pd.DataFrame:
    if "u.data" in path or path.endswith("ratings.dat"):
        return read_movielens(path)
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DistributedModelParallel training (run under torchrun)")
    parser.add_argument("--config", default="default", help="name in models/configs or a YAML path")
    parser.add_argument("--data", required=True, help="events CSV/parquet, or a MovieLens ratings file")
    parser.add_argument("--out", default=None, help="directory for the trained Recommender (rank 0)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--sparse-lr", type=float, default=None, help="fused embedding optimiser learning rate")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {} if args.epochs is None else {"epochs": args.epochs}
    cfg = TrainConfig.from_yaml(args.config, **overrides)
    result = train_distributed(_read_events(args.data), cfg, max_steps=args.max_steps, backend=args.backend, sparse_lr=args.sparse_lr)
    if result is not None:
        print("sharding", result.extra["sharding"], "dense in sync", result.extra["dense_replicas_in_sync"], flush=True)
        print("test", {k: round(v, 4) for k, v in result.test_metrics.items()}, f"wall_s {result.wall_s:.1f}", flush=True)
        if args.out:
            Recommender(result.model, result.vocab, metadata={"distributed": result.extra["world_size"]}).save(Path(args.out))
            print(f"saved to {args.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
