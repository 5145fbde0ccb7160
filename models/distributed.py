"""Multi-process, multi-node training with TorchRec's DistributedModelParallel (DMP).

    # one machine, N processes (CPU + gloo here; one process per GPU + NCCL on a GPU box)
    torchrun --standalone --nproc_per_node N -m models.distributed --config default --data events.csv --out model_dir
    # several machines: the same command on every node, meeting at a c10d rendezvous
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 --rdzv_id JOB \\
        -m models.distributed --config default --data /shared/events.parquet --out /shared/model_dir

What changes versus ``models.train`` (single process):

* The item table is sharded **row-wise** across all ranks of all nodes (each owns ~V / world rows) by the
  ``EmbeddingShardingPlanner``; the tiny event-type table is placed table-wise. ``SequentialRecommender``
  looks items up through its ``EmbeddingCollection`` (never ``.weight``), so the same model code runs sharded.
* The embedding update is a **fused sparse optimiser**: declared with ``apply_optimizer_in_backward`` before
  sharding, FBGEMM's table-batched kernel applies it to the touched rows only, inside the backward pass
  (row-wise Adagrad on CPU, whose FBGEMM kernel lacks Adam; Adam on GPU).
  Dense parameters are replicated (DMP wraps them in DDP) and stepped by AdamW, combined with the fused one
  in a ``CombinedOptimizer``.
* **One step is one global batch, whatever the world size.** ``cfg.batch_size`` is the global batch; every
  rank builds the same list of global batches (same seed) and takes every world-th window of each, so a
  rank's batch is ``batch_size / world``. The loss of each rank is its share of the global mean (its sum over
  positions divided by the whole batch's count), the sampled negatives are the same on every rank, and the
  gradients add up over ranks. Up to floating-point summation order, N processes therefore take exactly
  the steps one process takes (with dropout > 0 they differ in the dropout masks, drawn per rank);
  tests/test_distributed_training.py checks it on 1 vs 2 processes.
* **The loop is ``models.train.train``'s**, with ``ShardedSteps`` taking its steps: the same validation and
  choice of the best epoch on valid NDCG@10, early stopping (``patience``), test log (``log_test_every``, or
  every ``eval_every`` epochs under the papers' protocol) and checkpoints (``--checkpoint-dir``: one file per
  rank, resumed by the same world size). For each evaluation the shards are gathered into an ordinary model on
  rank 0, which ranks the held-out split and broadcasts its figures, so every rank takes the same decisions
  and stops together; rank 0 keeps the best epoch's gathered weights. ``--validate-every K`` overrides the
  config's ``eval_every``. At the end rank 0 holds an ordinary ``SequentialRecommender`` with the best
  weights, evaluates it on the test split (next to the most-popular baseline) and can save a ``Recommender``
  directory loadable by the serving code. On several nodes ``--out`` must be on a file system rank 0's node
  can write and the others (or the caller) can read.

Devices follow the backend: ``--backend auto`` is NCCL with one GPU per process (``cuda:LOCAL_RANK``) when
CUDA is available, else gloo on CPU. Launched by Dagster Pipes (``orchestration/assets/training.py``),
one rank streams per-epoch logs and the final metrics back to the Dagster asset.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec import optim as trec_optim
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torch.distributed.optim import _apply_optimizer_in_backward

from models.data import Split, UserSequences, batch_rows, make_batch
from models.evaluate import popularity_ranks, ranking_metrics
from models.recommender import Recommender, SequentialRecommender, build_model
from models.recipe import TrainConfig, resolve_recipe
from models.train import RecommenderTrain, TrainResult, autocast, train

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"  # set by Dagster's Pipes client; torchrun copies it to every worker
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------
# process group and sharding
# ----------------------------------------------------------------------------------------------------------


def init_distributed(backend: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a plain ``python -m`` run is a world of one.

    torchrun (any rendezvous: ``--standalone``, c10d across nodes) exports RANK, WORLD_SIZE, LOCAL_RANK and
    MASTER_ADDR/PORT; ``init_process_group`` reads them. LOCAL_RANK, not RANK, picks the GPU: ranks are global,
    GPUs are numbered per node."""
    if dist.is_initialized():
        backend = dist.get_backend()
    elif backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init: NCCL binds each process to its own GPU
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


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
    # The planner needs the whole cluster (world_size) and its shape (ranks per node): it prices intra- vs
    # inter-node traffic differently and caps each shard by the memory of the device it lands on.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    topology = Topology(world_size=world_size, compute_device=device.type, local_world_size=local_world)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, debug=False)
    sharders = [EmbeddingCollectionSharder()]
    plan = planner.collective_plan(task, sharders, dist.GroupMember.WORLD)  # rank 0 plans, all ranks agree
    return DistributedModelParallel(module=task, device=device, plan=plan, sharders=sharders)


def unsharded_model(dmp: DistributedModelParallel, template: SequentialRecommender, rank: int, device: torch.device) -> SequentialRecommender | None:
    """Gather every shard into an ordinary model on rank 0 (collective: all ranks must call it)."""
    full: dict[str, torch.Tensor] = {}
    for name, value in dmp.state_dict().items():
        key = name.removeprefix("model.")
        if hasattr(value, "gather") and hasattr(value, "local_shards"):  # ShardedTensor
            # the receive buffer lives on the communication device (NCCL cannot gather into host memory)
            out = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=out)
            if rank == 0:
                full[key] = out.cpu()
        else:
            full[key] = value.detach().cpu()
    if rank != 0:
        return None
    template.load_state_dict(full, strict=True)
    return template.eval()


# ----------------------------------------------------------------------------------------------------------
# training: models.train's loop, its steps taken by DMP
# ----------------------------------------------------------------------------------------------------------


def _local_shards(state: dict[str, Any]) -> dict[str, Any]:
    """A (nested) state dict with each ShardedTensor replaced by this rank's part of it, as plain tensors a
    checkpoint can hold: {"offsets": [[row, col] of each local shard], "shards": [tensor, ...]}."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            shards = value.local_shards()
            out[key] = {"offsets": [list(s.metadata.shard_offsets) for s in shards], "shards": [s.tensor for s in shards]}
        elif isinstance(value, dict):
            out[key] = _local_shards(value)
        else:
            out[key] = value
    return out


def _copy_local_shards(live: dict[str, Any], saved: dict[str, Any]) -> None:
    """Copy ``_local_shards``' output back into ``live``, a state dict whose tensors (and ShardedTensors' local
    shards) are views of the train module's and optimiser's own storage."""
    for key, value in live.items():
        if isinstance(value, ShardedTensor):
            shards = value.local_shards()
            if [list(s.metadata.shard_offsets) for s in shards] != saved[key]["offsets"]:
                raise ValueError(f"checkpoint: {key} was sharded otherwise (another sharding plan)")
            for shard, tensor in zip(shards, saved[key]["shards"], strict=True):
                shard.tensor.detach().copy_(tensor)
        elif isinstance(value, dict):
            _copy_local_shards(value, saved[key])
        else:
            value.detach().copy_(saved[key])


def _fused_kernels(dmp: DistributedModelParallel) -> list[Any]:
    """FBGEMM's table-batched kernels of the sharded EmbeddingCollection, where the fused optimiser counts its
    steps (Adam's bias correction); TorchRec keeps them in private attributes and the counter in no state dict."""
    return [kernel._emb_module for lookup in dmp.module.model.embeddings._lookups for kernel in lookup._emb_modules]


class ShardedSteps:
    """The steps of ``models.train.train`` under DistributedModelParallel, on every rank of the process group.

    One step is one global batch whatever the world size: every rank draws the same global batches (the
    shuffle generator, seeded alike everywhere) and takes every world-th window of each; its loss is its share
    of the global batch's mean; the negatives are drawn for every (window, position) of the *global* batch (the
    negatives generator, seeded alike) and each rank reads its windows' rows, so a position's negatives do not
    depend on the world size. Rank 0 evaluates: the shards are gathered into an ordinary model there.

    A checkpoint is one file per rank (``checkpoint-rank{r}-of-{world}.pt``): this rank's shards of the tables
    and of their fused optimiser state (and its step counters), the dense replica and its AdamW state, and the
    rank's random generators (dropout masks are drawn per rank); rank 0's file also holds the loop's best weights, gathered. Resuming
    needs the same world size (the files are named by it, and hold the shards of its plan), device type and
    sparse learning rate."""

    progress_bar = False  # the per-epoch lines are the log (usually a file or a pipe, where a bar is noise)

    def __init__(self, backend: str = "auto", sparse_lr: float | None = None):
        self.rank, self.world, self.device = init_distributed(backend)
        self.sparse_lr = sparse_lr
        self.label = f"[dmp x{self.world}]"

    def prepare(self, model: SequentialRecommender, cfg: TrainConfig, seqs: UserSequences, split: Split) -> None:
        self.cfg, self.seqs, self.split = cfg, seqs, split
        self.task = RecommenderTrain.from_config(model, cfg)
        # The model is built with real weights (not on the meta device), so DMP copies them into the shards: every
        # world size starts from the same weights as one process (FBGEMM's own uniform init is not used).
        self.dmp = shard(self.task, cfg, self.world, self.device, self.sparse_lr)
        self.dense_params = dict(in_backward_optimizer_filter(self.dmp.named_parameters()))
        self.dense = torch.optim.AdamW(list(self.dense_params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        # the wrapper wants a factory; the AdamW is kept for the checkpoints (its state, step counts included)
        self.optimizer = CombinedOptimizer([self.dmp.fused_optimizer, KeyedOptimizerWrapper(self.dense_params, lambda _: self.dense)])
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.neg_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.template = build_model(model.cfg)  # receives the gathered shards (rank 0)

    def epoch_batches(self) -> list[np.ndarray]:
        self.dmp.train()
        batches = batch_rows(self.split.train, self.cfg.batch_size, shuffle=True, generator=self.shuffle_gen,
                             bucket_by_length=self.cfg.length_bucketing)
        # Collectives need every rank in every step: a final partial batch smaller than the world is dropped.
        return [rows for rows in batches if len(rows) >= self.world]

    def step(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        rank, world, train = self.rank, self.world, self.split.train
        # Every world-th window: under length bucketing the rows are sorted by length, so striding gives
        # every rank a similar mix of long and short histories (and similar work).
        batch = make_batch(self.seqs, train.subset(rows[rank::world])).to(self.device)
        batch.window_ids = torch.arange(rank, len(rows), world, device=self.device)
        window_len = int((train.end[rows] - 1 - train.start[rows]).max())  # longest input, all ranks
        negatives = self.task.draw_negatives(len(rows), window_len, self.neg_gen)
        counts = torch.stack([batch.rank_mask.sum(), batch.feedback_mask.sum()]).to(self.device)
        dist.all_reduce(counts)  # positions of the whole global batch: the loss's denominators
        with autocast(self.cfg.autocast, self.device):  # bf16 on GPU (cfg.autocast = auto)
            loss, out = self.dmp(batch, negatives, counts)  # loss = this rank's share of the global batch's mean
        self.optimizer.zero_grad()
        # DDP *averages* the dense gradients over ranks, and TorchRec does the same for the embedding
        # gradients (its "gradient division", on by default): x world turns both averages of shares into
        # sums, i.e. the gradient one process computes for the whole global batch.
        (loss * world).backward()  # the fused optimiser updates the embedding shards in here
        self.optimizer.step()  # AdamW on the dense parameters
        return out

    def sum_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        keys = list(sums)  # the same terms in the same order on every rank: each rank's batch is a split one
        total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)  # shares add up to each global batch's mean loss
        return dict(zip(keys, total.tolist()))

    def eval_model(self) -> SequentialRecommender | None:
        return unsharded_model(self.dmp, self.template, self.rank, self.device)

    def from_rank0(self, value: T) -> T:
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def checkpoint_file(self) -> str:
        return f"checkpoint-rank{self.rank}-of-{self.world}.pt"

    def _setup(self) -> dict[str, Any]:
        """What a checkpoint must have been written under, beyond the config: the optimiser of the tables
        depends on the device type (row-wise Adagrad on CPU, Adam on GPU) and on ``sparse_lr``."""
        return {"world_size": self.world, "device": self.device.type, "sparse_lr": self.sparse_lr}

    def state_dict(self) -> dict[str, Any]:
        return {
            "setup": self._setup(),
            "model": _local_shards(self.dmp.state_dict()),
            "sparse_optimizer": _local_shards(self.dmp.fused_optimizer.state_dict()["state"]),
            "sparse_optimizer_steps": [int(kernel.iter) for kernel in _fused_kernels(self.dmp)],
            "dense_optimizer": self.dense.state_dict(),
            "shuffle_generator": self.shuffle_gen.get_state(),
            "negatives_generator": self.neg_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["setup"] != self._setup():
            raise ValueError(f"checkpoint written under {state['setup']}, this run is {self._setup()}")
        with torch.no_grad():
            _copy_local_shards(self.dmp.state_dict(), state["model"])
            _copy_local_shards(self.dmp.fused_optimizer.state_dict()["state"], state["sparse_optimizer"])
        # one count per kernel, not the loop's steps: each lookup of a step (history, then targets and negatives)
        # is an update of its own (the GPU's Adam uses it; the CPU's row-wise Adagrad does not)
        for kernel, count in zip(_fused_kernels(self.dmp), state["sparse_optimizer_steps"], strict=True):
            kernel.set_optimizer_step(count)
        self.dense.load_state_dict(state["dense_optimizer"])
        # map_location moved the RNG states to the device too; the generators take CPU byte tensors only
        self.shuffle_gen.set_state(state["shuffle_generator"].cpu())
        self.neg_gen.set_state(state["negatives_generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def report(self) -> dict[str, Any]:
        # Dense replicas must be bit-identical across ranks (DDP all-reduces their gradients): check it.
        dense_sum = torch.tensor([sum(float(p.detach().double().sum()) for p in self.dense_params.values())], dtype=torch.float64)
        sums_all = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sums_all, dense_sum.to(self.device))
        in_sync = all(torch.allclose(x, sums_all[0], rtol=0, atol=1e-9) for x in sums_all)
        sharding = {f"{module}.{table}": ps.sharding_type for module, tables in self.dmp.plan.plan.items() for table, ps in tables.items()}
        test = self.split.test
        popularity = ranking_metrics(popularity_ranks(self.seqs, test), len(self.seqs.vocab)) if self.rank == 0 and len(test) else {}
        return {"world_size": self.world, "sharding": sharding, "dense_replicas_in_sync": in_sync, "popularity_test": popularity,
                "backend": dist.get_backend(), "device": self.device.type}


def train_distributed(
    df: pd.DataFrame,
    cfg: TrainConfig,
    *,
    max_steps: int | None = None,
    backend: str = "auto",
    sparse_lr: float | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    validate_every: int = 0,
    catalogue: np.ndarray | None = None,
) -> TrainResult | None:
    """``models.train.train`` with DMP on every rank of the process group; rank 0 returns the result, the others None.

    ``catalogue``: raw ids of every item to rank and draw negatives from, rated or not, as in ``models.train.train``.
    ``validate_every``: overrides the config's ``eval_every`` (0: keep it). ``on_epoch(epoch, record)`` is called
    on *every* rank with the epoch's record (losses of the global batches, validation figures from rank 0)."""
    if validate_every:
        cfg = cfg.replace(eval_every=validate_every)
    return train(df, cfg, progress=progress, on_epoch=on_epoch, catalogue=catalogue,
                 strategy=ShardedSteps(backend, sparse_lr), max_steps=max_steps)


# ----------------------------------------------------------------------------------------------------------
# Dagster Pipes
# ----------------------------------------------------------------------------------------------------------


def pipes_reporter(rank: int, world: int, device: torch.device) -> tuple[int, Any]:
    """(reporting rank, its Pipes context or None): the one rank that talks to Dagster (collective).

    Every worker inherits the Pipes environment from torchrun, but a materialisation may be reported only
    once and the message file has one writer. The lowest rank that carries the environment reports: rank 0
    on one node; on several nodes, a rank of the node Dagster launched (a c10d rendezvous numbers nodes in
    an order of its own). Without Pipes (a plain torchrun) the reporting rank is ``world`` and nobody
    reports; ``dagster_pipes`` is not even imported."""
    launched = torch.tensor([rank if os.environ.get(PIPES_ENV) else world], device=device)
    dist.all_reduce(launched, op=dist.ReduceOp.MIN)
    reporter = int(launched)
    if rank != reporter:
        return reporter, None
    from dagster_pipes import open_dagster_pipes

    return reporter, open_dagster_pipes()


def _finite(x: Any) -> Any:
    """NaN / inf are not JSON (Dagster metadata, config.json): None instead."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def summary(result: TrainResult, out: str | None) -> dict[str, Any]:
    """The figures rank 0 prints and the Pipes reporter sends to Dagster (plain JSON values)."""
    return _finite({
        "world_size": result.extra["world_size"],
        "nodes": result.extra["world_size"] // int(os.environ.get("LOCAL_WORLD_SIZE", result.extra["world_size"])),
        "backend": result.extra["backend"],
        "steps": result.extra["steps"],
        "train_tokens_per_epoch": result.extra["train_tokens"],
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "final_loss": result.history[-1]["loss"] if result.history else math.nan,
        "wall_s": result.wall_s,
        "params": result.num_params,
        "dense_replicas_in_sync": result.extra["dense_replicas_in_sync"],
        "sharding": result.extra["sharding"],
        "valid_metrics": result.valid_metrics,
        "test_metrics": result.test_metrics,
        "popularity_test_metrics": result.extra["popularity_test"],
        "history": result.history,
        "dir": out,
    })


def pipes_metadata(s: dict[str, Any]) -> dict[str, Any]:
    """Dagster metadata: headline numbers as plain values (plottable in the UI), the rest as JSON."""
    def as_json(v: Any) -> dict[str, Any]:
        return {"raw_value": v, "type": "json"}  # Pipes rejects a dict that does not say its type

    test, pop = s["test_metrics"], s["popularity_test_metrics"]
    meta: dict[str, Any] = {
        **{f"test/{k}": test[k] for k in ("hr@10", "ndcg@10", "mrr") if k in test},
        **{f"popularity/{k}": pop[k] for k in ("hr@10", "ndcg@10", "mrr") if k in pop},
        **{k: s[k] for k in ("world_size", "nodes", "backend", "steps", "epochs", "best_epoch", "final_loss", "wall_s",
                             "params", "dense_replicas_in_sync")},
        "valid_metrics": as_json(s["valid_metrics"]),
        "test_metrics": as_json(test),
        "popularity_test_metrics": as_json(pop),
        "sharding": as_json(s["sharding"]),
        "history": as_json(s["history"]),
    }
    if s["dir"]:
        meta["dir"] = {"raw_value": s["dir"], "type": "path"}
    return meta


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def read_events(path: str) -> tuple[pd.DataFrame, np.ndarray | None]:
    """``--data``: the events and the catalogue to rank. A MovieLens ratings file (``u.data``, ``ratings.dat``) is
    read by the dataset loaders (``features.datasets``, the one reader of each format, as ``encore train`` and
    ``bench quality`` read it), with its folder's item file (``u.item``, ``movies.dat``) as the catalogue, unrated
    movies included; anything else is an events parquet or CSV, its catalogue the items of its events."""
    from features.datasets import load_catalogue, load_frame, movielens_dataset_of

    name = movielens_dataset_of(path)
    if name is not None:
        folder = Path(path).parent
        return load_frame(name, folder), load_catalogue(name, folder)
    return (pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)), None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DistributedModelParallel training (run under torchrun)")
    parser.add_argument("--config", default="default", help="a recipe: a name in models/configs or a YAML path")
    parser.add_argument("--data", help="(required unless --print-recipe) ""events CSV/parquet, or a MovieLens ratings file (u.data, ratings.dat): its folder's "
                        "item file (u.item, movies.dat), where present, is the catalogue ranked, unrated items included")
    parser.add_argument("--out", default=None, help="directory for the trained Recommender (rank 0)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="auto: nccl (one GPU per process) when CUDA is available, else gloo on CPU")
    parser.add_argument("--sparse-lr", type=float, default=None, help="fused embedding optimiser learning rate")
    parser.add_argument("--validate-every", type=int, default=0, metavar="K",
                        help="the config's eval_every: validate (without a validation split: score the test split, for the "
                        "log) every K epochs and on the last; 0: the config's")
    parser.add_argument("--checkpoint-dir", default=None, help="the config's checkpoint_dir: one file per rank, saved every "
                        "epoch; a run started again with the same world size resumes from it")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {} if args.epochs is None else {"epochs": args.epochs}
    if args.checkpoint_dir is not None:
        overrides["checkpoint_dir"] = args.checkpoint_dir
    cfg = resolve_recipe(args.config, **overrides)
    if args.print_recipe:  # what every rank would train, as models.recipe resolved it; nothing runs
        print(cfg.to_yaml(), end="")
        return
    if not args.data:
        parser.error("--data is required")
    rank, world, device = init_distributed(args.backend)
    reporter, pipes = pipes_reporter(rank, world, device)
    with pipes if pipes is not None else contextlib.nullcontext():  # closing it tells Dagster we are done
        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            if pipes is not None:
                shown = {k: round(v, 4) for k, v in record.items() if k != "epoch"}
                pipes.log.info(f"[dmp x{world}] epoch {epoch}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))

        events, catalogue = read_events(args.data)
        result = train_distributed(events, cfg, max_steps=args.max_steps, backend=args.backend,
                                   sparse_lr=args.sparse_lr, on_epoch=on_epoch, validate_every=args.validate_every,
                                   catalogue=catalogue)
        report = None
        if result is not None:
            print("sharding", result.extra["sharding"], "dense in sync", result.extra["dense_replicas_in_sync"], flush=True)
            print("test", {k: round(v, 4) for k, v in result.test_metrics.items()}, f"wall_s {result.wall_s:.1f}", flush=True)
            report = summary(result, args.out)
            if args.out:
                Recommender(result.model, result.vocab, metadata={"distributed": world, "training": report}).save(Path(args.out))
                print(f"saved to {args.out}", flush=True)
        if 0 < reporter < world:  # the reporter sits on another node than rank 0: hand it the figures
            box = [report]
            dist.broadcast_object_list(box, src=0, device=device)
            report = box[0]
        if pipes is not None:
            pipes.report_asset_materialization(metadata=pipes_metadata(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
