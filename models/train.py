"""Training: sampled-softmax next-item loss (+ optional ARGUS feedback loss), early stopping, checkpoints.

Objective for every position i of every history whose next event i + 1 is positive (autoregressive: one
forward pass trains all positions at once, causality makes them independent predictions):

    l_i = -log( exp(u_i.e_{i+1} / T) / (exp(u_i.e_{i+1} / T) + sum_r exp(u_i.e_r / T)) )

u and e are L2-normalised (cosine logits), T = temperature (0.05: cosines live in [-1, 1], so 1/T sets the
logit scale), e_r are R negatives drawn uniformly from the catalogue *for each position* independently, as the
reference's LocalNegativesSampler does; a negative that happens to be the positive is masked out, otherwise
the loss would push the target away from itself.

Per-position negatives matter: with R negatives shared by the whole batch, an item is a negative in only
R / V of the steps and the model learns the catalogue far more slowly (ML-100K, see docs/journal/2026-11-23-per-position-negatives.md).
Gathering [M, R, D] negative embeddings is memory-bound (2.6 s per ML-1M batch on 2 cores), so we score
every position against a *pool* once ([M, P] = one matmul) and gather each position's R logits from it; the
backward treats their gradient as the sparse [M, P] matrix it is (``NegativeLogits``).
The pool is the whole catalogue when its logits fit ``NEG_LOGIT_BUDGET`` (then the draw is exactly the
reference's), else P uniform draws per step, each position picking its R from them (every negative is still
uniform over the catalogue; positions of one step share the pool). See ``negative_pool_size``.

With ``feedback_weight > 0`` the ARGUS feedback task adds ``w * BCE(f(u_i, e_{i+1}), y_{i+1})`` for every
next event (positive *and* negative): y = 1 when the reaction was positive.

Optimiser (single process): AdamW over all parameters, with weight decay only on dense weights (decaying
embedding rows that a batch did not touch would shrink rare items for no reason). The EmbeddingCollection
gets the same Adam update as dense parameters here; the fused, row-wise sparse optimiser is what
DistributedModelParallel provides (``models/distributed.py``).

``train`` is the one training loop, for one process and for DistributedModelParallel alike: seeding, data
split, model, epochs, validation and the best epoch's weights, early stopping, the test log, checkpoints and
the final ranking of the held-out splits. What differs between the two is a ``StepStrategy`` (building the
train module and optimiser, an epoch's batches, one step, the reductions across ranks, the model evaluated,
the checkpoint's contents): ``SingleProcess`` here, ``models.distributed.ShardedSteps`` there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.data import (Split, UserSequences, batch_rows, build_sequences, leave_one_out, make_batch, temporal_split,
                         tile_windows, with_targets)
from models.data import Batch, ItemVocab, jagged_positions
from models.cpu_memory import retain_freed_memory
from models.evaluate import RankedTargets, evaluate, rank_targets, split_metrics
from models.recipe import BASE_RECIPE, TrainConfig, resolve_recipe
from models.recommender import Recommender, SequentialRecommender, build_model
from models.vista import Summary

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainResult:
    model: SequentialRecommender  # best-validation weights, in eval mode
    vocab: ItemVocab
    config: TrainConfig
    history: list[dict[str, float]]  # one record per epoch: losses, epoch_s, valid_* metrics when validated
    valid_metrics: dict[str, float]  # of the best epoch
    test_metrics: dict[str, float]
    best_epoch: int
    wall_s: float
    num_params: int
    # the kept weights' ranking of each held-out split ("valid", "test"): the metrics above are its means, and
    # bench.compare --users pairs two runs target by target from it
    ranked: dict[str, RankedTargets] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def tokens_processed(self) -> int:
        """History positions the training steps fed the model (the D of C ~ 6 N D): an epoch's inputs
        (``train_tokens``) per full epoch, pro rata for an epoch cut short by ``max_steps`` (an epoch is
        ceil(windows / batch_size) steps, ``models.data.batch_rows``)."""
        windows, steps = int(self.extra["train_windows"]), int(self.extra["steps"])
        steps_per_epoch = -(-windows // self.config.batch_size)
        return round(int(self.extra["train_tokens"]) * steps / steps_per_epoch)

    def recommender(self) -> Recommender:
        return Recommender(self.model, self.vocab, metadata={"train_config": asdict(self.config), "best_epoch": self.best_epoch, "test_metrics": self.test_metrics})


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


NEG_ROW_CHUNK = 1024  # rows of the [positions, pool] logit matrix computed at once (see NegativeLogits)
NEG_LOGIT_BUDGET = 128 * 2**20  # elements of the per-step [positions, pool] logit matrix (512 MiB in fp32)


def negative_pool_size(num_items: int, negatives: int, batch_size: int, max_len: int) -> int:
    """The whole catalogue if ``batch_size * max_len`` positions x ``num_items`` logits fit the budget (ML-1M:
    128 x 200 x 3,706 = 95M: exact), else the largest pool that does, but at least 8 R."""
    cap = max(8 * negatives, NEG_LOGIT_BUDGET // max(1, batch_size * max_len))
    return min(num_items, cap)


@dataclass
class NegativeDraw:
    """Negatives for every position of a (global) batch: position p of window w gets ``pool_ids[index[w, p]]``."""

    pool_ids: torch.Tensor  # [P] dense item ids
    index: torch.Tensor  # [W, L, R] int32 into pool_ids

    @classmethod
    def draw(cls, num_items: int, negatives: int, num_windows: int, window_len: int, pool_size: int,
             generator: torch.Generator | None = None) -> "NegativeDraw":
        if pool_size >= num_items:  # the catalogue itself: each negative an independent uniform item
            pool = torch.arange(1, num_items + 1)
        else:
            pool = torch.randint(1, num_items + 1, (pool_size,), generator=generator)
        index = torch.randint(0, len(pool), (num_windows, window_len, negatives), generator=generator, dtype=torch.int32)
        return cls(pool, index)


class NegativeLogits(torch.autograd.Function):
    """``(user @ pool.T).gather(1, index)``: each position's R negative logits, [M, D] x [P, D] -> [M, R].

    The forward is one matmul against the pool (in row chunks). The backward is where autograd's own version is wasteful:
    it scatters the [M, R] gradient into a zero [M, P] matrix (ML-1M: 20k x 3.7k, 300 MB to fill) and runs two
    dense matmuls through it, although only R of every row's P entries are non-zero. Here the gradient is the
    sparse matrix G [M, P] it really is (R non-zeros per row): d user = G @ pool, each row the weighted sum of
    its R negatives (``embedding_bag``), and d pool = G^T @ user (a sparse COO product). ~3x faster backward on
    ML-1M on CPU, and the [M, P] logits are not kept for it. Runs in fp32 under autocast: with T = 0.05 the
    logits span +-20 and the softmax needs their precision.
    """

    @staticmethod
    def forward(ctx, user: torch.Tensor, pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        wide = torch.promote_types(user.dtype, torch.float32)  # bf16 -> fp32; fp64 (gradcheck) stays
        user, pool = user.to(wide), pool.to(wide)
        ctx.save_for_backward(user, pool, index)
        out = user.new_empty(index.shape)  # [M, R]
        # Row chunks: a [1024, P] block stays in cache between the matmul and the gather; the whole [M, P] matrix
        # (ML-1M: 380 MB) would be written to memory and read back (2x slower on CPU).
        with torch.autocast(user.device.type, enabled=False):  # fp32 matmul under autocast too
            for lo in range(0, len(user), NEG_ROW_CHUNK):
                hi = lo + NEG_ROW_CHUNK
                torch.gather(user[lo:hi] @ pool.T, 1, index[lo:hi], out=out[lo:hi])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        user, pool, index = ctx.saved_tensors  # [M, D], [P, D], [M, R]
        grad = grad.contiguous()
        d_user = d_pool = None
        if ctx.needs_input_grad[0]:
            d_user = F.embedding_bag(index, pool, per_sample_weights=grad, mode="sum")  # [M, D]
        if ctx.needs_input_grad[1]:
            rows = torch.arange(len(index), device=index.device).repeat_interleave(index.shape[1])
            g_t = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), rows]), grad.reshape(-1), (len(pool), len(user)),
                                          check_invariants=False)  # indices in range by construction
            d_pool = torch.sparse.mm(g_t, user)  # [P, D]; duplicate (item, row) pairs add up, as they should
        return d_user, d_pool, None


def sampled_softmax_loss(
    user: torch.Tensor,  # [M, D] L2-normalised user states
    positive: torch.Tensor,  # [M, D] L2-normalised target embeddings
    pool: torch.Tensor,  # [P, D] L2-normalised embeddings of the negative pool
    positive_ids: torch.Tensor,  # [M]
    pool_ids: torch.Tensor,  # [P]
    neg_index: torch.Tensor,  # [M, R] long: row m's negatives are pool[neg_index[m]]
    temperature: float,
    reduction: str = "mean",  # "sum": the distributed trainer divides by the global batch's count itself
    pos_prior: torch.Tensor | None = None,  # [M] a score added to the cosine (VISTA's token target attention)
    neg_prior: torch.Tensor | None = None,  # [M, R] the same for each negative
) -> torch.Tensor:
    user = user.float() / temperature  # fp32 under autocast too; scale the [M, D] side, not the [M, P] logits
    positive = positive.float()
    pos_logit = (user * positive).sum(-1, keepdim=True)  # [M, 1]
    neg_logit = NegativeLogits.apply(user, pool, neg_index)  # [M, R]
    if pos_prior is not None and neg_prior is not None:  # in cosine units, so over the temperature too
        pos_logit = pos_logit + pos_prior.float()[:, None] / temperature
        neg_logit = neg_logit + neg_prior.float() / temperature
    # An "accidental hit" (negative == positive) is not a negative: drop it from the softmax denominator.
    neg_logit = neg_logit.masked_fill(pool_ids[neg_index] == positive_ids[:, None], -math.inf)
    logits = torch.cat([pos_logit, neg_logit], dim=1)  # [M, 1 + R]; the positive is class 0
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), reduction=reduction)


class RecommenderTrain(nn.Module):
    """TorchRec train-module convention (cf. DLRMTrain): ``forward(batch) -> (loss, detached outputs)``."""

    def __init__(self, model: SequentialRecommender, negatives: int, temperature: float, feedback_weight: float = 0.0,
                 negative_pool: int | None = None, recall_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.negatives = negatives
        self.temperature = temperature
        self.feedback_weight = feedback_weight
        if recall_weight > 0 and model.token_scorer is None:
            raise ValueError("vista_recall_weight > 0 trains the token scorer: it needs vista_target_attention: true")
        self.recall_weight = recall_weight
        # None: the whole catalogue (exact per-position uniform negatives)
        self.negative_pool = negative_pool or model.cfg.num_items

    @classmethod
    def from_config(cls, model: SequentialRecommender, cfg: "TrainConfig") -> "RecommenderTrain":
        pool = negative_pool_size(model.cfg.num_items, cfg.negatives, cfg.batch_size, cfg.max_len)
        return cls(model, cfg.negatives, cfg.temperature, cfg.feedback_weight, pool, cfg.vista_recall_weight)

    def draw_negatives(self, num_windows: int, window_len: int, generator: torch.Generator | None = None) -> NegativeDraw:
        return NegativeDraw.draw(self.model.cfg.num_items, self.negatives, num_windows, window_len, self.negative_pool, generator)

    def forward(
        self, batch: Batch, negatives: NegativeDraw | torch.Generator | None = None, global_counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``negatives``: drawn for a *global* batch whose windows ``batch.window_ids`` holds (distributed), or a
        generator to draw them for this batch. ``global_counts`` ([2]: next-item and feedback positions of the
        global batch) is for a batch split across ranks: each loss term is then this rank's sum divided by the
        global count, so the terms of all ranks add up to the single-process mean over the whole batch."""
        if not isinstance(negatives, NegativeDraw):
            negatives = self.draw_negatives(batch.batch_size, batch.max_length, negatives)
        # vista: the summary once, for the blocks and for the token scorer (other models: None, unread)
        summary = self.model.summarise_older(*batch.older_inputs()) if self.model.summariser is not None else None
        user = self.model(batch.features, batch.timestamps, batch.query_timestamps, summary=summary)  # [N, D]
        rank = batch.rank_mask  # [N] positions whose next event is a ranked target
        pos_ids = batch.target_ids[rank]  # [M]
        # each ranked position's negatives, addressed by (window in the global batch, position in the window)
        row, pos = jagged_positions(batch.offsets, batch.lengths)  # [N], [N]
        window = batch.window_ids[row] if batch.window_ids is not None else row
        neg_index = negatives.index.to(pos.device)[window[rank], pos[rank]].long()  # [M, R]
        pool_ids = negatives.pool_ids.to(pos_ids.device)  # [P]
        use_fb = self.feedback_weight > 0 and self.model.feedback_head is not None
        fb = batch.feedback_mask
        fb_ids = batch.target_ids[fb] if use_fb else pos_ids[:0]  # [F]
        # One EmbeddingCollection lookup for targets, negatives and feedback items.
        emb = self.model.item_embeddings(torch.cat([pos_ids, pool_ids, fb_ids]))
        pos_e, pool_e, fb_e = emb.split([len(pos_ids), len(pool_ids), len(fb_ids)])

        part = global_counts is not None  # this rank holds one part of a global batch
        # Sums over counts rather than means: a batch without ranked positions (every target in it is a
        # feedback-only event) then adds 0 to the loss and to the epoch's log, not NaN.
        next_count = global_counts[0].clamp(min=1) if part else max(len(pos_ids), 1)
        pos_prior = neg_prior = pool_prior = None
        if self.model.token_scorer is not None:  # the prior is per (window, item): one [B, P] for the pool
            pos_prior = self.model.token_scorer.pairs(summary, row[rank], pos_e)  # [M]
            pool_prior = self.model.token_scorer(summary, pool_e)  # [B, P]
            neg_prior = pool_prior[row[rank][:, None], neg_index]  # [M, R]
        next_loss = sampled_softmax_loss(user[rank], pos_e, pool_e, pos_ids, pool_ids, neg_index, self.temperature,
                                         reduction="sum", pos_prior=pos_prior, neg_prior=neg_prior) / next_count
        loss = next_loss
        out = {"next_item_loss": next_loss.detach()}
        if self.recall_weight > 0:
            recall_loss = self.recall_loss(batch, summary, pool_prior, pool_ids, pool_e)
            loss = loss + self.recall_weight * recall_loss
            out["recall_loss"] = recall_loss.detach()
        # A split batch keeps the feedback term even when this rank has no feedback position (an empty sum, 0):
        # every rank must run the same graph, or DDP waits forever for the head's gradients.
        if use_fb and (len(fb_ids) > 0 or part):
            logits = self.model.feedback_logits(user[fb], fb_e)  # [F]
            labels = batch.target_positive[fb].float()
            fb_count = global_counts[1].clamp(min=1) if part else max(len(fb_ids), 1)
            fb_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / fb_count
            loss = loss + self.feedback_weight * fb_loss
            out["feedback_loss"] = fb_loss.detach()
        out["loss"] = loss.detach()
        return loss, out


    RECALL_SAMPLES = 16  # older events recalled per window and step

    def recall_loss(self, batch: Batch, summary: Summary, pool_prior: torch.Tensor, pool_ids: torch.Tensor,
                    pool_e: torch.Tensor) -> torch.Tensor:
        """VISTA's reconstruction objective, through the token scorer: events drawn uniformly from each window's
        older prefix (the events its summary pooled) must score above the negative pool, in a sampled softmax.
        Why: the next-item targets rarely need the distant past (most are explained by the last few hundred
        events), so without it the tokens learn little of it; recalling old events makes the prior hold the
        lifelong distribution of what the user plays, which generalises through the item embeddings to unheard
        items of the same artists. Events of every type are drawn, skips too: the prefix is what the summary
        pooled (recalling only positive events is untested). [S] recalled items, [S, P] negatives from the pool."""
        older = batch.older.to_dict()["item_id"]
        lengths, starts = older.lengths(), older.offsets()[:-1]  # [B]
        windows = torch.nonzero(lengths > 0).squeeze(1)  # [B'] windows with a summary
        if windows.numel() == 0:
            return pool_prior.sum() * 0.0
        draw = (torch.rand(len(windows), self.RECALL_SAMPLES, device=lengths.device) * lengths[windows, None]).long()
        ids = older.values()[starts[windows, None] + draw].reshape(-1)  # [S]
        rows = windows.repeat_interleave(self.RECALL_SAMPLES)  # [S]
        pos = self.model.token_scorer.pairs(summary, rows, self.model.item_embeddings(ids))  # [S]
        neg = pool_prior[rows].masked_fill(pool_ids[None, :] == ids[:, None], -math.inf)  # [S, P]: no accidental hit
        logits = torch.cat([pos[:, None], neg], dim=1).float() / self.temperature  # [S, 1 + P]
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def make_optimizer(model: SequentialRecommender, cfg: TrainConfig) -> torch.optim.Optimizer:
    sparse = [p for p in model.embeddings.parameters()]
    sparse += model.summariser.table_parameters() if model.summariser is not None else []  # vista's own tables
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return torch.optim.AdamW(
        [{"params": sparse, "weight_decay": 0.0}, {"params": dense, "weight_decay": cfg.weight_decay}],
        lr=cfg.lr,
        betas=cfg.betas,
    )


# ----------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_split(seqs: UserSequences, cfg: TrainConfig) -> Split:
    """The recipe's held-out protocol (its ``split`` and ``seen_filter`` values are checked by the recipe)."""
    if cfg.split == "loo":
        split = leave_one_out(seqs, cfg.max_len, validation=cfg.validation)
    elif not cfg.validation:
        raise ValueError("validation: false is the papers' leave-one-out protocol; it needs split: loo")
    else:
        split = temporal_split(seqs, cfg.max_len, test_fraction=cfg.test_fraction, valid_fraction=cfg.valid_fraction)
    if cfg.train_windows == "all":
        split = Split(tile_windows(split.train, cfg.max_len), split.valid, split.test)
    if cfg.seen_filter == "window":
        split = Split(split.train, split.valid.seen_in_window_only(), split.test.seen_in_window_only())
    return split


def _config_fingerprint(cfg: TrainConfig) -> str:
    # Everything but the knobs that may legitimately change on resume.
    d = {k: v for k, v in asdict(cfg).items()
         if k not in ("checkpoint_dir", "epochs", "patience", "eval_every", "device", "autocast", "eval_batch_size",
                      "retain_cpu_memory", "log_test_every")
         and not (k.startswith("vista_") and cfg.model != "vista")  # keys other models ignore: old checkpoints resume
         and not (k in LATER_VISTA_KEYS and v == LATER_VISTA_KEYS[k])}  # off: a checkpoint from before them resumes
    return json.dumps(d, sort_keys=True, default=list)


# VISTA keys added after VISTA's first checkpoints; at these values a run is what it was before they existed
LATER_VISTA_KEYS = {"vista_target_attention": False, "vista_recall_weight": 0.0}


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


AUTOCAST_MODES = ("auto", "bf16", "off")


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the training forward: on by default on CUDA (matmuls and attention in bf16, 2x the
    throughput of tf32 on Hopper), off on CPU unless asked for. The loss keeps its logits in fp32
    (``sampled_softmax_loss``, ``NegativeLogits``): at temperature 0.05 they span +-20, beyond bf16's precision."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"unknown autocast mode {mode!r} (expected one of {AUTOCAST_MODES})")
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a truncated checkpoint


def catalogue_vocab(events: pd.DataFrame, catalogue: np.ndarray | None) -> ItemVocab:
    """The items of the events plus those of ``catalogue`` (items nobody interacted with yet are candidates too)."""
    items = events["item_id"].to_numpy(np.int64)
    if catalogue is not None:
        items = np.concatenate([items, np.asarray(catalogue, dtype=np.int64)])
    return ItemVocab.build(items)


# ----------------------------------------------------------------------------------------------------------
# Step strategies: what one process and N sharded processes do differently
# ----------------------------------------------------------------------------------------------------------


T = TypeVar("T")


class StepStrategy(Protocol):
    """How ``train`` takes its steps: in one process (``SingleProcess``) or with DistributedModelParallel over
    every rank of a process group (``models.distributed.ShardedSteps``). The loop around the steps (epochs,
    validation, best-epoch choice, early stopping, checkpoints, the final ranking) is ``train``'s, the same
    for both, as TorchRec's ``TrainPipeline.progress()`` is one step whatever the sharding.

    *Collective* methods must be called by every rank, in the same order (on one process they cost nothing)."""

    device: torch.device  # where the train module computes
    rank: int  # this process; rank 0 holds the evaluated model and returns the result
    world: int  # processes sharing each step
    label: str  # the start of each progress line
    progress_bar: bool  # a tqdm bar over each epoch's steps (one process); sharded runs log one line per epoch

    def prepare(self, model: SequentialRecommender, cfg: TrainConfig, seqs: UserSequences, split: Split) -> None:
        """Wrap ``model`` (just initialised, on the CPU) in the train module and make its optimiser."""

    def epoch_batches(self) -> list[np.ndarray]:
        """Rows of ``split.train`` in each global batch of the next epoch, in order (draws the epoch's shuffle);
        the train module in training mode."""

    def step(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """One optimiser step on the global batch ``rows``: this rank's share of each loss term. Collective."""

    def sum_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """An epoch's loss sums added up over the ranks. Collective."""

    def eval_model(self) -> SequentialRecommender | None:
        """The current weights as an ordinary model on rank 0; None on the other ranks. Collective."""

    def from_rank0(self, value: T) -> T:
        """Rank 0's ``value`` on every rank. Collective."""

    def checkpoint_file(self) -> str:
        """The name of this rank's checkpoint file in ``cfg.checkpoint_dir``."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's train module, optimiser and random generators, for a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state_dict()`` was taken; refuse a checkpoint of another setup."""

    def report(self) -> dict[str, Any]:
        """What the run adds to ``TrainResult.extra``. Collective."""


class SingleProcess:
    """One process: the model itself, AdamW over every parameter (``make_optimizer``), one generator for the
    shuffles and the negatives (seeded with ``cfg.seed``; the torch global generator draws the dropout masks)."""

    rank, world = 0, 1
    progress_bar = True

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, model: SequentialRecommender, cfg: TrainConfig, seqs: UserSequences, split: Split) -> None:
        self.cfg, self.seqs, self.split, self.label = cfg, seqs, split, cfg.model
        self.model = model.to(self.device)
        self.task = RecommenderTrain.from_config(model, cfg)
        self.optimizer = make_optimizer(model, cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # shuffling + negatives: reproducible, checkpointable

    def epoch_batches(self) -> list[np.ndarray]:
        self.model.train()
        return batch_rows(self.split.train, self.cfg.batch_size, shuffle=True, generator=self.generator,
                          bucket_by_length=self.cfg.length_bucketing)

    def step(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        batch = make_batch(self.seqs, self.split.train.subset(rows), older_events=self.cfg.train_older_events()).to(self.device)
        with autocast(self.cfg.autocast, self.device):
            loss, out = self.task(batch, self.generator)  # the batch's negatives come from the same generator
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return out

    def sum_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def eval_model(self) -> SequentialRecommender:
        return self.model

    def from_rank0(self, value: T) -> T:
        return value

    def checkpoint_file(self) -> str:
        return CHECKPOINT_FILE

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # map_location moved the RNG states to the device too; the generators take CPU byte tensors only
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)  # dropout masks on the GPU

    def report(self) -> dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------


def _checkpoint_path(cfg: TrainConfig, strategy: StepStrategy) -> Path | None:
    """This rank's checkpoint file, or None without ``cfg.checkpoint_dir``. A folder holding checkpoints of
    another layout (another number of processes) is refused rather than silently trained over from scratch."""
    if not cfg.checkpoint_dir:
        return None
    path = Path(cfg.checkpoint_dir) / strategy.checkpoint_file()
    others = sorted(p.name for p in path.parent.glob("checkpoint*.pt"))
    if not path.exists() and others:
        raise ValueError(f"{path.parent} holds {others} but no {path.name}: checkpoints of another number of "
                         "processes (or of a save cut short); resume with that world size or use another checkpoint_dir")
    return path


def train(
    data: pd.DataFrame | UserSequences,
    cfg: TrainConfig | None = None,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    catalogue: np.ndarray | None = None,
    strategy: StepStrategy | None = None,
    max_steps: int | None = None,
    init: Callable[[SequentialRecommender, ItemVocab], None] | None = None,
) -> TrainResult | None:
    """Train ``cfg.model`` on an events DataFrame (or prebuilt sequences); returns the best-validation model.

    ``catalogue``: raw ids of every item to rank and draw negatives from, beyond those in the events (e.g. a
    dataset's item file, ``features.datasets.load_catalogue``); None: the items of the events.
    ``strategy``: how the steps are taken, ``SingleProcess`` on ``cfg.device`` by default; under
    ``models.distributed.ShardedSteps`` every rank runs this loop and only rank 0 returns the result (the
    others None). ``on_epoch(epoch, record)`` is called on every rank with the epoch's record.
    ``max_steps``: stop after that many steps (the epoch it ends counts as the last one).
    ``init(model, vocab)``: called once on the freshly initialised model (on the CPU, with the run's item
    vocabulary: dense row i is item ``vocab.raw_ids[i - 1]``) before the train module and optimiser are made,
    to start from other weights, e.g. a pre-trained model's (``models.transfer.warm_start``). It changes
    parameter values in place, never shapes. A run resumed from a checkpoint then loads the checkpoint's
    weights over it.
    """
    cfg = cfg or resolve_recipe(BASE_RECIPE)
    strategy = strategy if strategy is not None else SingleProcess(resolve_device(cfg.device))
    t0 = time.perf_counter()
    seed_everything(cfg.seed)  # the same initial weights in every process, whatever the world size
    if isinstance(data, UserSequences):
        if catalogue is not None:
            raise ValueError("catalogue applies to an events frame: prebuilt sequences carry their own vocabulary")
        seqs = data
    else:
        seqs = build_sequences(data, vocab=catalogue_vocab(data, catalogue))
    seqs = with_targets(seqs, cfg.targets)
    split = make_split(seqs, cfg)
    if len(split.train) == 0:
        raise ValueError("no training windows: every user needs at least two events")

    # every CPU step reallocates the same large activations: keep them (models/cpu_memory.py)
    retain_freed_memory(strategy.device.type, enabled=cfg.retain_cpu_memory)
    model = build_model(cfg.model_config(len(seqs.vocab)))
    if init is not None:
        init(model, seqs.vocab)
    num_items = model.cfg.num_items
    feedback = model.feedback_head is not None  # the ARGUS head: its AUC joins each split's metrics
    num_params = sum(p.numel() for p in model.parameters())  # before sharding, which leaves each rank its rows
    strategy.prepare(model, cfg, seqs, split)

    history: list[dict[str, float]] = []
    best = {"score": -math.inf, "epoch": 0, "bad": 0, "state": None, "valid": {}}
    start_epoch, steps = 1, 0
    ckpt_path = _checkpoint_path(cfg, strategy)
    if ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=strategy.device, weights_only=True)
        if ck["fingerprint"] != _config_fingerprint(cfg) or ck["vocab"] != seqs.vocab.to_json():
            raise ValueError(f"checkpoint {ckpt_path} was written for another config or data set")
        # checkpoints written before the loop counted steps: the count (max_steps, extra["steps"]) starts over
        steps = ck.get("steps", 0)
        strategy.load_state_dict(ck)
        history = list(ck["history"])
        best = {"score": ck["best_score"], "epoch": ck["best_epoch"], "bad": ck["bad_evals"], "state": ck["best_model"], "valid": ck["best_valid"]}
        start_epoch = ck["epoch"] + 1
    # Each rank saves its own file: a crash between two ranks' saves leaves them at different epochs.
    if strategy.from_rank0(start_epoch) != start_epoch:
        raise ValueError(f"checkpoint {ckpt_path} is at another epoch than rank 0's: the ranks cannot resume together")

    stopped = cfg.patience > 0 and best["bad"] >= cfg.patience  # a resumed run may have stopped already
    out_of_steps = max_steps is not None and steps >= max_steps
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped or out_of_steps:
            break
        t_epoch = time.perf_counter()
        batches = strategy.epoch_batches()
        sums: dict[str, float] = {}
        taken = 0
        bar = tqdm(batches, desc=f"{strategy.label} epoch {epoch}/{cfg.epochs}", disable=not (progress and strategy.progress_bar),
                   leave=False)
        for rows in bar:
            out = strategy.step(rows)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{float(out['loss']):.4f}")
            taken, steps = taken + 1, steps + 1
            if max_steps is not None and steps >= max_steps:
                out_of_steps = True
                break
        sums = strategy.sum_over_ranks(sums)  # under DMP a rank's terms are its shares of each global batch's mean
        record: dict[str, float] = {"epoch": float(epoch), **{k: v / taken for k, v in sums.items()}}
        record["train_s"] = time.perf_counter() - t_epoch

        last = epoch == cfg.epochs or out_of_steps
        # this epoch's weights as an ordinary model on rank 0: gathered at most once (under DMP a collective,
        # which every rank reaches: the conditions below depend only on figures every rank shares)
        current = functools.cache(strategy.eval_model)
        validating = len(split.valid) > 0
        if validating and (epoch % cfg.eval_every == 0 or last):
            ranked_valid = valid = None
            if (evaluated := current()) is not None:
                ranked_valid = rank_targets(evaluated, seqs, split.valid, batch_size=cfg.eval_batch_size)
                valid = split_metrics(ranked_valid, num_items, feedback=feedback)
            valid = strategy.from_rank0(valid)  # so every rank takes the same best-epoch and stop decisions
            record.update({f"valid_{k}": v for k, v in valid.items()})
            if valid["ndcg@10"] > best["score"]:
                best.update(score=valid["ndcg@10"], epoch=epoch, bad=0, valid=valid, ranked=ranked_valid,
                            state=copy.deepcopy(evaluated.state_dict()) if evaluated is not None else None)
            else:
                best["bad"] += 1
            stopped = cfg.patience > 0 and best["bad"] >= cfg.patience
        elif not validating:  # nothing to validate on: keep the latest weights
            best.update(epoch=epoch, state=None)
        # this epoch's weights on the test split, for the learning curve only; never used to select anything.
        # Without validation this is the reference's per-epoch eval (every eval_every epochs); with it, every
        # log_test_every epochs (0 = never) and on the epoch a run stops.
        every = cfg.log_test_every if validating else cfg.eval_every
        if len(split.test) and every > 0 and (epoch % every == 0 or last or stopped):
            evaluated = current()
            test_now = strategy.from_rank0(evaluate(evaluated, seqs, split.test, batch_size=cfg.eval_batch_size)
                                           if evaluated is not None else None)
            record.update({f"test_{k}": v for k, v in test_now.items()})
        record["epoch_s"] = time.perf_counter() - t_epoch
        history.append(record)
        if progress and strategy.rank == 0:
            shown = {k: round(v, 4) for k, v in record.items()
                     if k in ("loss", "valid_hr@10", "valid_ndcg@10", "valid_feedback_auc", "test_hr@10", "test_ndcg@10")}
            tqdm.write(f"{strategy.label} epoch {epoch}: {shown}")
            sys.stdout.flush()  # a log read as it is written (torchrun's workers write to a pipe)
        if on_epoch is not None:
            on_epoch(epoch, record)
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {
                "epoch": epoch, "steps": steps, "history": history,
                "best_score": best["score"], "best_epoch": best["epoch"], "bad_evals": best["bad"],
                "best_model": best["state"], "best_valid": best["valid"],
                "fingerprint": _config_fingerprint(cfg), "vocab": seqs.vocab.to_json(),
                **strategy.state_dict(),
            })

    extra = strategy.report()
    model = strategy.eval_model()  # the last weights
    if model is None:
        return None  # a rank other than 0: rank 0 holds the result
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    ranked: dict[str, RankedTargets] = {}
    if len(split.valid):
        # the best epoch ranked it with the weights kept; a run resumed from a checkpoint did so before the restart
        ranked["valid"] = best.get("ranked") or rank_targets(model, seqs, split.valid, batch_size=cfg.eval_batch_size)
    if len(split.test):
        ranked["test"] = rank_targets(model, seqs, split.test, batch_size=cfg.eval_batch_size)
    test = split_metrics(ranked["test"], num_items, feedback=feedback) if "test" in ranked else {}
    return TrainResult(
        model=model,
        vocab=seqs.vocab,
        config=cfg,
        history=history,
        valid_metrics=best["valid"],
        test_metrics=test,
        best_epoch=best["epoch"],
        wall_s=time.perf_counter() - t0,
        num_params=num_params,
        ranked=ranked,
        extra={"train_windows": len(split.train), "train_tokens": split.train.num_inputs, "valid_targets": split.valid.num_ranked,
               "test_targets": split.test.num_ranked, "steps": steps, **extra},
    )


__all__ = ["autocast", "resolve_device", "NegativeDraw", "RecommenderTrain", "SingleProcess", "StepStrategy", "negative_pool_size", "TrainResult", "make_optimizer", "make_split", "sampled_softmax_loss", "seed_everything", "train"]
