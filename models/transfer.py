"""Transfer across domains: pre-train on a broad corpus, fine-tune on a small domain, against training from scratch.

The question (Mercado Libre's SRT): does a model pre-trained on several catalogues, then fine-tuned on a small
domain, beat the same model trained on that domain alone, at the same fine-tuning compute, and does the gain
grow with the model's size?

Data. Each domain (Amazon Beauty, Sports, Toys 5-core) numbers its items and users from 1, so ids are made
domain-qualified before the frames are joined:

    qualified id = (domain index + 1) * DOMAIN_STRIDE + raw id        # domain index: position in sorted names

The target domain's users are split once, by a seeded draw, into *target users* (a ``target_share`` of them)
and the rest. Target users never reach pre-training, not one of their events: the pre-training corpus is the
other domains plus the target domain's other users. ``finetune_frame`` then takes a ``fraction`` of the
target users with their whole sequences ("the target domain with a fraction of its training data"); ``train``
applies its usual leave-one-out protocol to it (train on each user's prefix, validate and test on their last
events), so the fine-tuned and the from-scratch models are tested on exactly the same held-out events.

Warm start (``warm_start`` / ``copy_pretrained``). The fine-tuned model is a new model over the fine-tune
vocabulary (the target catalogue only: it ranks exactly the candidates the from-scratch model ranks). Every
tensor but the item table is copied from the pre-trained model (encoder, positions, event types, heads: same
shapes, since both come from the same recipe and size); each item's row is copied from the pre-trained row of
the same qualified id. Target items that no pre-training event holds keep their fresh initialisation, and are
counted. Nothing here is specific to the next-item task: the ARGUS ranker (``models.argus_ranker``), which
fine-tunes a pre-trained model's head, can start from the same ``copy_pretrained``.

Compute. Pre-training records its wall time and C ~ 6 * N * tokens with N the non-embedding parameters (the
embedding rows a step touches are a sliver of the tables, as in the scaling literature) and tokens the history
positions processed over all epochs; the total N is recorded too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from models.data import ItemVocab
from models.evaluate import RankedTargets
from models.recipe import resolve_recipe
from models.recommender import SequentialRecommender
from models.train import train

DOMAIN_STRIDE = 10**9  # raw ids of every domain stay below this (Amazon's are < 10^5)
ITEM_TABLE = "embeddings.embeddings.item.weight"  # the item rows of SequentialRecommender's EmbeddingCollection
EMBEDDING_PREFIX = "embeddings."  # every EmbeddingCollection table (items, event types)
ARMS = ("pretrain", "finetune", "scratch")


# ----------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Several domains in one catalogue (qualified ids), with the target domain's users split in two."""

    domains: tuple[str, ...]  # sorted; a domain's index is its position here
    target: str
    events: pd.DataFrame  # every domain's events, qualified user and item ids, EVENT_COLUMNS
    target_users: np.ndarray  # qualified ids of the held-out target users (never in pre-training), sorted
    target_items: np.ndarray  # qualified ids of the whole target catalogue (every item its frame holds), sorted
    pretrain: pd.DataFrame  # the other domains + the target domain's other users

    def domain_index(self, name: str) -> int:
        return self.domains.index(name)

    def summary(self) -> dict[str, int]:
        target_rows = self.events["user_id"].isin(self.target_users)
        return {"events": len(self.events), "pretrain_events": len(self.pretrain),
                "pretrain_users": int(self.pretrain["user_id"].nunique()),
                "pretrain_items": int(self.pretrain["item_id"].nunique()),
                "target_users": len(self.target_users), "target_events": int(target_rows.sum()),
                "target_items": len(self.target_items)}


def qualify(ids: np.ndarray | pd.Series, domain_index: int) -> np.ndarray:
    """Domain-local raw ids -> ids unique across domains."""
    raw = np.asarray(ids, dtype=np.int64)
    if len(raw) and (raw.min() < 0 or raw.max() >= DOMAIN_STRIDE):
        raise ValueError(f"raw ids must lie in [0, {DOMAIN_STRIDE}) to be qualified by domain")
    return (domain_index + 1) * DOMAIN_STRIDE + raw


def unqualify(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Qualified ids -> (domain index, raw id)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids // DOMAIN_STRIDE - 1, ids % DOMAIN_STRIDE


def three_domain_corpus(frames: Mapping[str, pd.DataFrame], target: str = "beauty", target_share: float = 0.5,
                        seed: int = 0) -> Corpus:
    """One catalogue from per-domain event frames (``features.datasets.load_frame``'s format), with a seeded
    ``target_share`` of the ``target`` domain's users held out of pre-training. Any number of domains works; the
    experiment uses three."""
    if target not in frames:
        raise ValueError(f"target domain {target!r} is not among the frames ({', '.join(sorted(frames))})")
    if not 0.0 < target_share < 1.0:
        raise ValueError(f"target_share must be in (0, 1), got {target_share}")
    domains = tuple(sorted(frames))
    parts = []
    for index, name in enumerate(domains):
        part = frames[name].copy()
        part["user_id"] = qualify(part["user_id"], index)
        part["item_id"] = qualify(part["item_id"], index)
        parts.append(part)
    events = pd.concat(parts, ignore_index=True)

    t = domains.index(target)
    target_rows = events["item_id"].to_numpy() // DOMAIN_STRIDE == t + 1
    users = np.unique(events["user_id"].to_numpy()[target_rows])  # sorted: the draw depends on the seed only
    n_held = int(round(target_share * len(users)))
    if not 0 < n_held < len(users):
        raise ValueError(f"target_share {target_share} of {len(users)} users leaves one side empty")
    held = np.sort(np.random.default_rng(seed).permutation(users)[:n_held])
    pretrain = events[~events["user_id"].isin(held)].reset_index(drop=True)
    items = np.unique(events["item_id"].to_numpy()[target_rows])
    return Corpus(domains, target, events, held, items, pretrain)


def finetune_frame(corpus: Corpus, fraction: float, seed: int = 0) -> pd.DataFrame:
    """The events of a seeded ``fraction`` of the target users, whole sequences (at least two users)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    users = corpus.target_users
    n = max(2, int(round(fraction * len(users))))
    keep = np.random.default_rng(seed).choice(users, size=min(n, len(users)), replace=False)
    return corpus.events[corpus.events["user_id"].isin(keep)].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmStartReport:
    items: int  # rows of the new item table (its vocabulary), padding aside
    copied: int  # item rows taken from the pre-trained table
    unseen: int  # items the pre-trained vocabulary lacks: fresh initialisation
    tensors: int  # other tensors copied whole (encoder, positions, event types, heads)


def copy_pretrained(model: SequentialRecommender, vocab: ItemVocab, source: SequentialRecommender,
                    source_vocab: ItemVocab) -> WarmStartReport:
    """Load ``source``'s weights into ``model`` (in place): every tensor but the item table as is, and each item
    row of ``vocab`` from ``source``'s row of the same raw id. The two must share everything but the catalogue."""
    src_cfg, dst_cfg = vars(source.cfg) | {"num_items": 0}, vars(model.cfg) | {"num_items": 0}
    if src_cfg != dst_cfg:
        diff = {k: (src_cfg[k], dst_cfg[k]) for k in src_cfg if src_cfg[k] != dst_cfg[k]}
        raise ValueError(f"the pre-trained model differs beyond its catalogue: {diff}")
    if len(vocab) != model.cfg.num_items or len(source_vocab) != source.cfg.num_items:
        raise ValueError("each vocabulary must be its model's (len(vocab) == cfg.num_items)")
    src, state = source.state_dict(), model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == ITEM_TABLE:
            continue
        if src[key].shape != value.shape:
            raise ValueError(f"{key}: pre-trained shape {tuple(src[key].shape)} vs {tuple(value.shape)}")
        new[key] = src[key].detach().clone()
    # rows: dense index i of the new table is raw id vocab.raw_ids[i - 1]; 0 in source_index = unknown there
    table = state[ITEM_TABLE].detach().clone()  # [V + 1, W], fresh init
    source_index = source_vocab.encode(vocab.raw_ids)  # [V]
    seen = np.flatnonzero(source_index > 0)
    table[torch.from_numpy(seen + 1)] = src[ITEM_TABLE][torch.from_numpy(source_index[seen])].to(table.dtype)
    new[ITEM_TABLE] = table
    model.load_state_dict(new)
    return WarmStartReport(items=len(vocab), copied=len(seen), unseen=len(vocab) - len(seen), tensors=len(new) - 1)


@dataclass
class WarmStart:
    """``train(..., init=WarmStart(model, vocab))``: start from a pre-trained model; ``report`` says what it copied."""

    source: SequentialRecommender
    source_vocab: ItemVocab
    report: WarmStartReport | None = None

    def __call__(self, model: SequentialRecommender, vocab: ItemVocab) -> None:
        self.report = copy_pretrained(model, vocab, self.source, self.source_vocab)


# ----------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TransferRow:
    """One trained model: the pre-training of a size, or one seed's fine-tuned or from-scratch run."""

    size: str  # the size's recipe overrides, "dim=32,blocks=2"
    arm: str  # pretrain | finetune | scratch
    seed: int
    hr10: float  # test HR@10 (pre-training: on the pre-training users' held-out events)
    ndcg10: float
    best_epoch: int
    epochs: int  # epochs run
    steps: int
    windows: int  # training windows of an epoch (one per user unless a history is longer than max_len)
    wall_s: float
    step_s: float  # mean seconds of a training step: a full epoch takes ~ step_s * ceil(windows / batch_size)
    valid_s: float  # mean seconds an epoch spent after its steps (validation, test logging)
    params: int
    non_embedding_params: int
    tokens: int  # history positions processed, all epochs
    compute: float  # 6 * non_embedding_params * tokens
    items: int  # catalogue size ranked
    warm_start: WarmStartReport | None = None
    ranked: RankedTargets | None = field(default=None, repr=False)  # test split, per target: for the pairing

    def record(self) -> dict[str, Any]:
        """The row as JSON-ready values (ranks left out)."""
        out = {k: v for k, v in vars(self).items() if k not in ("ranked", "warm_start")}
        out["warm_start"] = vars(self.warm_start) if self.warm_start else None
        return out


def size_label(size: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in size.items()) or "recipe"


def _row(size: str, arm: str, seed: int, result: Any, warm: WarmStartReport | None = None) -> TransferRow:
    windows, steps = int(result.extra["train_windows"]), int(result.extra["steps"])
    tokens = result.tokens_processed()
    n = result.model.non_embedding_params()
    train_s = [h["train_s"] for h in result.history]
    return TransferRow(
        size=size, arm=arm, seed=seed,
        hr10=float(result.test_metrics.get("hr@10", np.nan)), ndcg10=float(result.test_metrics.get("ndcg@10", np.nan)),
        best_epoch=int(result.best_epoch), epochs=len(result.history), steps=steps, windows=windows,
        wall_s=float(result.wall_s), step_s=float(sum(train_s) / max(steps, 1)),
        valid_s=float(np.mean([h["epoch_s"] - h["train_s"] for h in result.history])),
        params=int(result.num_params), non_embedding_params=n, tokens=tokens, compute=6.0 * n * tokens,
        items=int(result.model.cfg.num_items), warm_start=warm, ranked=result.ranked.get("test"),
    )


def run_transfer(
    corpus: Corpus,
    sizes: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    fraction: float,
    recipe: str = "hstu-beauty",
    *,
    pretrain_epochs: int | None = None,
    finetune_epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    frame_seed: int = 0,
    pretrain_seed: int = 0,
    pretrain_max_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> list[TransferRow]:
    """Per size (recipe overrides such as ``{"dim": 32}``): pre-train once on ``corpus.pretrain``, then per seed
    fine-tune from it and train from scratch on one fine-tune frame (``finetune_frame(corpus, fraction,
    frame_seed)``: the same users for every seed and size, so every run ranks the same test targets).

    Fine-tuned and from-scratch runs use the same recipe, seed and epochs, with early stopping off (patience 0):
    the same steps, so the same fine-tuning compute; validation still picks the epoch whose weights are tested.
    Both rank the whole target catalogue (``corpus.target_items``), the fine-tune frame's items or not.
    ``overrides`` apply to every run (e.g. ``device``); ``*_epochs`` None keeps the recipe's.
    """
    if not sizes or not seeds:
        raise ValueError("run_transfer needs at least one size and one seed")
    frame = finetune_frame(corpus, fraction, frame_seed)
    log(f"transfer: pre-training corpus {corpus.summary()}; fine-tune frame {len(frame)} events of "
        f"{frame['user_id'].nunique()} target users, catalogue {len(corpus.target_items)} items")
    common = dict(overrides or {})
    rows: list[TransferRow] = []
    for size in sizes:
        label = size_label(size)
        pre_cfg = resolve_recipe(recipe, **{**common, **size, "seed": pretrain_seed,
                                            **({"epochs": pretrain_epochs} if pretrain_epochs else {})})
        t0 = time.perf_counter()
        pre = train(corpus.pretrain, pre_cfg, progress=False, max_steps=pretrain_max_steps)
        assert pre is not None  # one process
        p = _row(label, "pretrain", pretrain_seed, pre)
        rows.append(p)
        log(f"transfer {label}: pre-trained in {time.perf_counter() - t0:.1f} s, {p.epochs} epochs, {p.steps} steps "
            f"of {p.step_s:.3f} s, {p.valid_s:.1f} s validating per epoch; N={p.non_embedding_params} non-embedding, "
            f"C={p.compute:.3g}, test hr@10 {p.hr10:.4f}")
        for seed in seeds:
            cfg = resolve_recipe(recipe, **{**common, **size, "seed": seed, "patience": 0,
                                            **({"epochs": finetune_epochs} if finetune_epochs else {})})
            warm = WarmStart(pre.model, pre.vocab)
            tuned = train(frame, cfg, progress=False, catalogue=corpus.target_items, init=warm)
            scratch = train(frame, cfg, progress=False, catalogue=corpus.target_items)
            report = warm.report
            assert tuned is not None and scratch is not None and report is not None  # one process; init ran
            rows += [_row(label, "finetune", seed, tuned, report), _row(label, "scratch", seed, scratch)]
            log(f"transfer {label} seed {seed}: fine-tuned hr@10 {tuned.test_metrics['hr@10']:.4f} ndcg@10 "
                f"{tuned.test_metrics['ndcg@10']:.4f} ({report.unseen} of {report.items} items unseen in "
                f"pre-training) vs scratch hr@10 {scratch.test_metrics['hr@10']:.4f} ndcg@10 "
                f"{scratch.test_metrics['ndcg@10']:.4f}")
    return rows


__all__ = ["ARMS", "Corpus", "DOMAIN_STRIDE", "TransferRow", "WarmStart", "WarmStartReport", "copy_pretrained",
           "finetune_frame", "qualify", "run_transfer", "three_domain_corpus", "unqualify"]
