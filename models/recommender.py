"""The sequential recommender (embeddings + encoder + heads) and its inference wrapper.

``SequentialRecommender`` is the nn.Module both model families share, as in the reference code:

    e_i   = EmbeddingCollection[item](item_id_i), e'_i = EmbeddingCollection[event_type](type_i)
    x_i   = sqrt(D) * (e_i + e'_i) + P[pos_i]               # then dropout; e'_i only with cfg.event_types
    h     = encoder(x)                                      # HSTU, SASRec, GPT or Llama: causal, jagged [N, D]
    u_i   = h_i / |h_i|                                     # user state after event i
    score = u_i . (e_j / |e_j|)                             # cosine with every item j

The event type (listen / skip / like ...) is part of each history token: the ARGUS recipe keeps negative
feedback in the history as context. ``event_types = False`` reads items only, as the published HSTU and
SASRec setups do (their MovieLens protocol ignores the ratings). P is a learned position table, except for an
encoder that places positions itself (``learned_positions = False`` on its class: Llama's rotary embedding),
which gets no table at all. The optional feedback head predicts the reaction to a *given* next item.

VISTA (``model: vista``, ``models.vista``) is the same module with two changes: the encoder is HSTU blocks that
also attend to K summary tokens, and a ``Summariser`` (``self.summariser``) makes those tokens from every event
before the ``max_len`` read raw (``Batch.older`` in training and evaluation; a cached summary when serving).

``Recommender`` is what the online service and the MLflow pyfunc (``models/lifecycle/pyfunc.py``) load:
config.json + vocab.json + state_dict.pt (plain tensors: ``torch.load(weights_only=True)``, no pickle).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from features.events import EVENT_TYPE_CODES
from models.data import FEATURE_KEYS, NUM_EVENT_TYPES, ItemVocab, batch_from_histories, jagged_positions
from models.gpt import GPT, GPTConfig
from models.hstu import HSTU, HSTUConfig
from models.llama import Llama, LlamaConfig, swiglu_width
from models.sasrec import SASRec, SASRecConfig
from models.vista import (Summariser, SummariserConfig, Summary, SummaryState, TokenTargetAttention, VistaEncoder,
                          summarise_events)

FORMAT_VERSION = 1
# FBGEMM's fused table-batched kernel, which DistributedModelParallel uses for sharded tables, needs a row width
# divisible by 4 (it asserts "embedding_dim must be a multiple of 4").
TABLE_DIM_MULTIPLE = 4
# Below this catalogue size the exact matrix product beats any index (800 items: ~0.05 ms per user).
ANN_MIN_ITEMS = 200_000
# The encoders behind ``ModelConfig.model``: one forward signature, (x [N, D], offsets, timestamps,
# query_timestamps) -> [N, D]. An encoder class may say ``learned_positions = False`` when it places positions
# itself; without the attribute it reads the shared learned position table (HSTU and SASRec do).
ENCODERS: dict[str, type[nn.Module]] = {"hstu": HSTU, "sasrec": SASRec, "gpt": GPT, "llama": Llama, "vista": VistaEncoder}
MODELS = tuple(ENCODERS)
# What a saved model lacking the HSTU ablation keys was: they came after the published HSTU, which is all an
# older Encore could train, so such a config means exactly these values (and they mean nothing to the other
# backbones). A fact about old files, not a recipe default: it must not follow base.yaml if that ever changes.
PUBLISHED_HSTU = {"hstu_rab": True, "hstu_attention": "silu", "hstu_gating": True}
# A saved model lacking ``vista_tokens`` predates VISTA, so it is not a VISTA model: 0 tokens, nothing summarised.
BEFORE_VISTA = {"vista_tokens": 0}
# A saved model lacking ``vista_target_attention`` predates the token scorer: its candidates read no tokens.
BEFORE_TARGET_ATTENTION = {"vista_target_attention": False}


def ann_index(items: np.ndarray, m: int = 32, ef_search: int = 128):  # noqa: ANN201 - a faiss index
    """HNSW over L2-normalised item vectors with inner-product metric (= cosine), as faiss builds it."""
    import faiss

    index = faiss.IndexHNSWFlat(items.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = ef_search
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    return index


@dataclass
class ModelConfig:
    """The model's part of a recipe (``models.recipe.TrainConfig.model_config``) plus the catalogue size; saved
    with every model. No defaults here: ``models/configs/base.yaml`` holds them."""

    model: str  # hstu | sasrec | gpt | llama | vista
    num_items: int  # V; dense item indices are 1..V, 0 is padding
    max_len: int
    dim: int
    blocks: int
    heads: int
    attn_dim: int  # HSTU d_qk per head; 0 = dim // heads
    linear_dim: int  # HSTU d_v per head; 0 = dim // heads
    ffn_dim: int  # MLP width of SASRec / GPT / Llama; 0 = each one's own: D, 4 D, swiglu_width(D) (~8 D / 3)
    dropout: float
    num_time_buckets: int
    hstu_rab: bool  # HSTU ablations (models.hstu): relative attention bias,
    hstu_attention: str  # silu (pointwise, published) | softmax,
    hstu_gating: bool  # and U gating
    feedback_head: bool  # ARGUS: P(positive reaction | history, next item)
    event_types: bool  # add the event-type embedding to each history token
    vista_tokens: int  # vista: K summary tokens of the events before the recent max_len (0 for other models)
    vista_target_attention: bool  # vista: each candidate also attends to the tokens (``TokenTargetAttention``)

    def encoder_class(self) -> type[nn.Module]:
        if self.model not in ENCODERS:
            raise ValueError(f"unknown model {self.model!r} (expected one of {', '.join(MODELS)})")
        return ENCODERS[self.model]

    @property
    def learned_positions(self) -> bool:
        """Whether the inputs get the learned position table (every encoder but one that declares otherwise)."""
        return getattr(self.encoder_class(), "learned_positions", True)

    @property
    def reads_older(self) -> bool:
        """Whether the model reads each window's older events (through a summary): VISTA only."""
        return self.model == "vista"

    def summariser_config(self) -> SummariserConfig:
        return SummariserConfig(num_items=self.num_items, dim=self.dim, tokens=self.vista_tokens, dropout=self.dropout,
                                mass=self.vista_target_attention)

    def hstu_config(self) -> HSTUConfig:
        per_head = self.dim // self.heads
        return HSTUConfig(
            dim=self.dim,
            blocks=self.blocks,
            heads=self.heads,
            attn_dim=self.attn_dim or per_head,
            linear_dim=self.linear_dim or per_head,
            max_len=self.max_len,
            dropout=self.dropout,
            num_time_buckets=self.num_time_buckets,
            rab=self.hstu_rab,
            attention=self.hstu_attention,
            gating=self.hstu_gating,
        )

    def encoder(self) -> nn.Module:
        if self.model == "hstu":
            return HSTU(self.hstu_config())
        if self.model == "vista":  # HSTU blocks over the recent events, attending to the summary tokens too
            return VistaEncoder(self.hstu_config(), self.vista_tokens)
        if self.model == "sasrec":
            return SASRec(
                SASRecConfig(
                    dim=self.dim,
                    blocks=self.blocks,
                    heads=self.heads,
                    ffn_dim=self.ffn_dim or self.dim,
                    max_len=self.max_len,
                    dropout=self.dropout,
                )
            )
        if self.model == "gpt":
            return GPT(GPTConfig(dim=self.dim, blocks=self.blocks, heads=self.heads,
                                 ffn_dim=self.ffn_dim or 4 * self.dim, max_len=self.max_len, dropout=self.dropout))
        if self.model == "llama":
            return Llama(LlamaConfig(dim=self.dim, blocks=self.blocks, heads=self.heads,
                                     ffn_dim=self.ffn_dim or swiglu_width(self.dim), max_len=self.max_len,
                                     dropout=self.dropout))
        raise ValueError(f"unknown model {self.model!r} (expected one of {', '.join(MODELS)})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        d = {**PUBLISHED_HSTU, **BEFORE_VISTA, **BEFORE_TARGET_ATTENTION, **d}  # only these keys may be missing: see their comments
        missing = sorted(known - set(d))
        if missing:  # a model saved by a version of Encore older than one of these keys: retrain it
            raise ValueError(f"saved model config lacks {missing}: it was saved by an older Encore; retrain it")
        return cls(**{k: v for k, v in d.items() if k in known})


def table_dim(dim: int) -> int:
    """Stored row width of the embedding tables: ``dim`` rounded up to a multiple of 4.

    The published ML-1M setups use d = 50, which FBGEMM's fused kernel cannot shard. The tables are stored 52
    wide and every lookup keeps the first 50 columns: the two spare columns never reach the model, get zero
    gradients and stay as initialised, so the model computes exactly what a 50-wide table would. (One side
    effect: the sharded CPU optimiser, row-wise Adagrad, averages squared gradients over all 52 columns, so its
    steps on such a table are sqrt(52/50) = 2% larger.) For the usual widths (multiples of 4) nothing is padded.
    """
    return -(-dim // TABLE_DIM_MULTIPLE) * TABLE_DIM_MULTIPLE


class FeedbackHead(nn.Module):
    """ARGUS second task: logit of a positive reaction to item e given user state u (both L2-normalised)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        # user, item: [M, D] unit vectors -> [M] logits. Their components are O(1/sqrt(D)): rescale to O(1)
        # so the MLP starts in its useful range (held-out AUC 0.56 -> 0.63 on the default world).
        # u*e lets the MLP see their agreement directly.
        s = math.sqrt(user.shape[-1])
        return self.mlp(torch.cat([s * user, s * item, s * s * user * item], dim=-1)).squeeze(-1)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


class SequentialRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_items < 1:
            raise ValueError("ModelConfig.num_items must be set (the vocabulary size)")
        self.cfg = cfg
        init = partial(nn.init.trunc_normal_, std=0.02, a=-0.04, b=0.04)  # reference: truncated normal
        width = table_dim(cfg.dim)  # >= cfg.dim; lookups keep the first cfg.dim columns
        self.embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name="item", num_embeddings=cfg.num_items + 1, embedding_dim=width,
                    feature_names=["item_id"], init_fn=init,
                ),
                EmbeddingConfig(
                    name="event_type", num_embeddings=NUM_EVENT_TYPES, embedding_dim=width,
                    feature_names=["event_type"], init_fn=init,
                ),
            ],
            device=torch.device("cpu"),
        )
        # No table at all for an encoder that places positions itself: no weights that nothing reads. The others
        # create it here, before the encoder, so their initialisation draws from the RNG in the same order.
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim) if cfg.learned_positions else None
        # The reference initialises positions differently per family: a truncated normal of std sqrt(1/D), which
        # its HSTU then overwrites with Xavier-normal (HSTU.reset_params re-initialises every parameter outside the
        # blocks and the item table), while its SASRec keeps it. GPT takes SASRec's: the same inputs as SASRec,
        # so the two differ in their block stacks only.
        if self.pos_emb is not None:
            if cfg.model in ("hstu", "vista"):  # vista's recent events go through HSTU blocks
                nn.init.xavier_normal_(self.pos_emb.weight)
            else:
                std = math.sqrt(1.0 / cfg.dim)
                nn.init.trunc_normal_(self.pos_emb.weight, std=std, a=-2 * std, b=2 * std)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.encoder = cfg.encoder()
        self.feedback_head = FeedbackHead(cfg.dim) if cfg.feedback_head else None
        # VISTA's stage 1, created last so that the other families draw their initial weights exactly as before
        self.summariser = Summariser(cfg.summariser_config()) if cfg.reads_older else None
        # and its target attention, after it for the same reason: None unless vista_target_attention
        self.token_scorer = TokenTargetAttention(cfg.dim) if cfg.reads_older and cfg.vista_target_attention else None

    def forward(
        self,
        features: KeyedJaggedTensor,  # keys item_id, event_type; B sequences, N events
        timestamps: torch.Tensor,  # [N] seconds
        query_timestamps: torch.Tensor,  # [N] seconds at which each position predicts
        older: KeyedJaggedTensor | None = None,  # vista: each sequence's events before it (B jagged rows)
        older_timestamps: torch.Tensor | None = None,  # [M] seconds of the older events
        summary: Summary | None = None,  # vista: the older events already summarised (instead of ``older``)
    ) -> torch.Tensor:
        """L2-normalised user state after each event: [N, D], aligned with features["item_id"].values().

        A vista model also reads what came before each sequence: its older events (``Batch.older``, summarised
        here by a full pass, differentiable) or their ``summary`` (``Summariser.summarise`` of a cached state)."""
        emb = self.embeddings(features)  # dict[str, JaggedTensor]
        items = emb["item_id"]
        lengths = items.lengths()
        offsets = items.offsets()
        d = self.cfg.dim
        tokens = items.values()[:, :d]  # [N, D] (the table may be stored wider: see table_dim)
        if self.cfg.event_types:
            tokens = tokens + emb["event_type"].values()[:, :d]
        x = math.sqrt(d) * tokens
        if self.pos_emb is not None:
            # position of each event inside its own sequence: 0, 1, ..., len-1 (counted from the start, so a
            # later event never changes an earlier position: causality holds for the embeddings too)
            _, pos = jagged_positions(offsets, lengths)
            x = x + self.pos_emb(pos)
        x = self.input_dropout(x)  # [N, D]
        if self.summariser is None:
            h = self.encoder(x, offsets, timestamps, query_timestamps)  # [N, D]
        else:
            summary = summary if summary is not None else self.summarise_older(older, older_timestamps)
            h = self.encoder(x, offsets, timestamps, query_timestamps, summary)  # [N, D]
        return _l2(h)

    def summarise_older(self, older: KeyedJaggedTensor | None = None, older_timestamps: torch.Tensor | None = None) -> Summary:
        """VISTA: the summary of each sequence's older events, from scratch (linear in their number)."""
        if older is None or older_timestamps is None:
            raise ValueError("a vista model reads each window's older events: build its batches with "
                             "make_batch(..., older_events=...) and pass Batch.older, or pass a summary")
        jt = older.to_dict()
        items, types = jt["item_id"], jt["event_type"]
        state = self.summariser.update(self.summariser.init_state(items.lengths().numel()), items.values(),
                                       types.values(), older_timestamps, items.offsets())
        return self.summariser.summarise(state)

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of dense item ids [M] -> [M, D], looked up through the EmbeddingCollection
        (not via .weight) so the same code works when DistributedModelParallel shards the table."""
        ids = ids.reshape(-1)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(FEATURE_KEYS),
            values=ids,
            lengths=torch.tensor([ids.numel(), 0], dtype=torch.int64, device=ids.device),
        )
        return _l2(self.embeddings(kjt)["item_id"].values()[:, : self.cfg.dim])

    def all_item_embeddings(self) -> torch.Tensor:
        """[V + 1, D]; row 0 is padding and must be masked by callers."""
        device = next(self.encoder.parameters()).device  # the encoder always has weights; pos_emb may not exist
        return self.item_embeddings(torch.arange(self.cfg.num_items + 1, device=device))

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding tables: the encoder (HSTU's relative attention bias included: it is
        part of each block) and the heads; not the item, event-type or position tables.

        Scaling laws are stated in this count (Kaplan et al., 2020, "N excludes embeddings"): the tables grow
        with the catalogue and the history length rather than with the model's capacity to compute, and at
        recommender sizes they dominate the total (``TrainResult.num_params`` counts everything)."""
        tables = [m for m in (self.embeddings, self.pos_emb) if m is not None]
        skip = {id(p) for m in tables for p in m.parameters()}
        skip |= {id(p) for p in (self.summariser.table_parameters() if self.summariser is not None else [])}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def feedback_logits(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        if self.feedback_head is None:
            raise RuntimeError("model was built without the feedback head (feedback_weight = 0)")
        return self.feedback_head(user, item)


def build_model(cfg: ModelConfig) -> SequentialRecommender:
    return SequentialRecommender(cfg)


# ----------------------------------------------------------------------------------------------------------
# Inference wrapper
# ----------------------------------------------------------------------------------------------------------


def _get(h: Mapping[str, Any], key: str, default: Any) -> Any:
    """dict.get that treats None as missing (histories may come from JSON or DataFrame rows)."""
    value = h.get(key)
    return default if value is None else value


def _event_codes(types: Sequence[Any] | None, n: int) -> np.ndarray:
    """Event types as names or codes -> codes; a missing list means plain listens, unknown names -> 0."""
    if types is None:
        return np.full(n, EVENT_TYPE_CODES["listen"], np.int64)
    if len(types) != n:
        raise ValueError("event_types must have one entry per item_id")
    if isinstance(types, np.ndarray) and types.dtype.kind in "iu":
        return types.astype(np.int64)
    # each distinct value once: a lifelong history has 10^4-10^5 events but a handful of types
    which, distinct = pd.factorize(pd.Series(list(types), dtype=object), use_na_sentinel=False)
    codes = np.array([EVENT_TYPE_CODES.get(t, 0) if isinstance(t, str) else int(t) for t in distinct], np.int64)
    return codes[which] if len(distinct) else np.zeros(0, np.int64)


class Recommender:
    """Batched top-k retrieval for raw histories. Thread-safe for concurrent ``recommend`` calls."""

    def __init__(self, model: SequentialRecommender, vocab: ItemVocab, metadata: Mapping[str, Any] | None = None,
                 *, ann_min_items: int = ANN_MIN_ITEMS):
        if len(vocab) != model.cfg.num_items:
            raise ValueError(f"vocab has {len(vocab)} items, model expects {model.cfg.num_items}")
        self.model = model.eval()
        self.vocab = vocab
        self.metadata = dict(metadata or {})
        if model.summariser is not None:
            # ties this model to the summariser that makes its summaries (cached ones must carry the same version)
            version = model.summariser.version()
            saved = self.metadata.get("summariser_version")
            if saved is not None and saved != version:
                raise ValueError(f"metadata says summariser {saved}, the weights are summariser {version}")
            self.metadata["summariser_version"] = version
        with torch.inference_mode():
            # Scoring a user is one mat-vec against this cached, normalised item matrix.
            self.item_matrix = model.all_item_embeddings().clone()  # [V + 1, D]
        # Large catalogues: an HNSW index (faiss) over the same vectors replaces the exact scan.
        self.index = ann_index(self.item_matrix[1:].numpy()) if model.cfg.num_items >= ann_min_items else None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, "model": asdict(self.config), "metadata": self.metadata}
        (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (path / "vocab.json").write_text(self.vocab.to_json())
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        torch.save(state, path / "state_dict.pt")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Recommender":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported model format {config.get('format_version')!r}")
        model = build_model(ModelConfig.from_dict(config["model"]))
        state = torch.load(path / "state_dict.pt", map_location=device, weights_only=True)
        model.load_state_dict(state, strict=True)
        vocab = ItemVocab.from_json((path / "vocab.json").read_text())
        return cls(model.to(device), vocab, config.get("metadata"))

    # -- inference --------------------------------------------------------------------------------------
    @property
    def summariser_version(self) -> str | None:
        """The version of this model's summariser (VISTA), None for a model that summarises nothing."""
        return self.metadata.get("summariser_version")

    @property
    def events_read(self) -> int:
        """The most events of a user's history the model reads (``max_len``): the service refuses a model that
        reads more than the online store keeps (``models.served_ranker.ServedRanker`` answers the same)."""
        return int(self.config.max_len)

    def read_order(self, item_ids: np.ndarray, timestamps_ms: np.ndarray) -> np.ndarray:
        """Positions of the events this model reads, in the order it reads them: unknown items (new since
        training) dropped, the rest stably sorted by time. One rule for scoring and for the cached summaries
        (``models.summaries``), whose exactness depends on both reading the same events in the same order."""
        known = np.flatnonzero(self.vocab.encode(item_ids) > 0)
        return known[np.argsort(timestamps_ms[known], kind="stable")]

    def _encoded(self, h: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A history dict -> its known events, time-sorted: (dense item ids, event codes, ms)."""
        raw = np.asarray(_get(h, "item_ids", []), np.int64).reshape(-1)
        n = len(raw)
        codes = _event_codes(_get(h, "event_types", None), n)
        ts_ms = np.asarray(_get(h, "timestamps_ms", np.zeros(n)), np.int64).reshape(-1)
        if len(ts_ms) != n:
            raise ValueError("timestamps_ms must have one entry per item_id")
        order = self.read_order(raw, ts_ms)
        return self.vocab.encode(raw[order]), codes[order], ts_ms[order]

    def summarise(self, histories: Sequence[Mapping[str, Any]], states: SummaryState | None = None) -> SummaryState:
        """VISTA: fold every known event of each history dict into ``states`` (one row per history; empty states
        if None): what an incremental refresh of cached summaries runs on the events that arrived since."""
        if self.model.summariser is None:
            raise ValueError(f"a {self.config.model} model has no summariser")
        events = [self._encoded(h) for h in histories]
        with torch.inference_mode():
            return summarise_events(self.model.summariser, [e[0] for e in events], [e[1] for e in events],
                                    [e[2] // 1000 for e in events], states)

    def user_embeddings(self, histories: Sequence[Mapping[str, Any]], now_ms: int | None = None, *,
                        summaries: Sequence[Summary | SummaryState | None] | None = None):
        """-> (rows [B'] of histories that had a known item, user vectors [B', D], seen item lists).

        A vista model reads each history's last ``max_len`` events raw and a summary of everything before them:
        by default summarised here from the history itself (linear in its length); with ``summaries[r]`` (one
        user's cached ``Summary`` or ``SummaryState``, made by this model's summariser) that summary stands for
        every event before the last ``max_len`` of history r, whose older events are then not read, so the
        cost no longer grows with the history."""
        rows, users, seen, _ = self._encode(histories, now_ms, summaries)
        return rows, users, seen

    def _encode(self, histories: Sequence[Mapping[str, Any]], now_ms: int | None,
                summaries: Sequence[Summary | SummaryState | None] | None):
        """``user_embeddings`` plus the batch's ``Summary`` (vista; None for other models), which the token
        scorer reads: -> (rows, users [B', D], seen, summary of the B' rows)."""
        max_len = self.config.max_len
        vista = self.model.summariser is not None
        if summaries is not None and (not vista or len(summaries) != len(histories)):
            raise ValueError("summaries: one per history, for a vista model only")
        rows, items, types, times, queries, seen, older, given = [], [], [], [], [], [], [], []
        for r, h in enumerate(histories):
            idx, codes, ts_ms = self._encoded(h)
            if len(idx) == 0:
                continue  # empty history: the caller falls back to popularity
            query_ms = now_ms if now_ms is not None else _get(h, "request_ms", int(ts_ms[-1]))
            rows.append(r)
            seen.append(idx)
            items.append(idx[-max_len:])
            types.append(codes[-max_len:])
            times.append(ts_ms[-max_len:] // 1000)
            queries.append(int(query_ms) // 1000)
            cached = summaries[r] if summaries is not None else None
            given.append(cached)
            cut = 0 if cached is not None else max(len(idx) - max_len, 0)  # older events summarised here
            older.append((idx[:cut], codes[:cut], ts_ms[:cut] // 1000))
        if not rows:
            return [], torch.zeros(0, self.config.dim), [], None
        batch = batch_from_histories(items, types, times, queries)
        with torch.inference_mode():
            summary = self._summaries(older, given) if vista else None
            h = self.model(batch.features, batch.timestamps, batch.query_timestamps, summary=summary)  # [N, D]
            users = h[batch.offsets[1:] - 1]  # state after each user's last event: [B', D]
        return rows, users, seen, summary

    def _summaries(self, older: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   given: list[Summary | SummaryState | None]) -> Summary:
        """One batch ``Summary``: each row's given one, or its older events summarised from scratch."""
        summariser = self.model.summariser
        state = summarise_events(summariser, [o[0] for o in older], [o[1] for o in older], [o[2] for o in older])
        summary = summariser.summarise(state)  # [B', K, D]
        for b, g in enumerate(given):
            if g is None:
                continue
            one = summariser.summarise(g) if isinstance(g, SummaryState) else g
            if one.tokens.shape != (1, *summary.tokens.shape[1:]):
                raise ValueError(f"summary of shape {tuple(one.tokens.shape)}; this model reads (1, "
                                 f"{self.config.vista_tokens}, {self.config.dim})")
            summary.tokens[b] = one.tokens[0].to(summary.tokens.dtype)
            summary.last_time[b] = one.last_time[0]
            summary.count[b] = one.count[0]
        return summary

    def recommend(
        self,
        histories: Sequence[Mapping[str, Any]],
        k: int = 10,
        exclude_seen: bool = True,
        *,
        now_ms: int | None = None,
        batch_size: int = 256,
        summaries: Sequence[Summary | SummaryState | None] | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Top-k (raw item id, cosine score) per history dict (item_ids, event_types, timestamps_ms).

        ``now_ms`` (or a history's ``request_ms``) is the request time HSTU's time bias measures gaps from;
        without it the last event's time is used. ``summaries``: a vista model's cached summaries
        (``user_embeddings``).
        """
        return self.retrieve(histories, k, exclude_seen, now_ms=now_ms, batch_size=batch_size, summaries=summaries)[0]

    def retrieve(
        self,
        histories: Sequence[Mapping[str, Any]],
        k: int = 10,
        exclude_seen: bool = True,
        *,
        now_ms: int | None = None,
        batch_size: int = 256,
        summaries: Sequence[Summary | SummaryState | None] | None = None,
    ) -> tuple[list[list[tuple[int, float]]], list[torch.Tensor | None]]:
        """``recommend``'s answer and each history's user state [D] (None: no known item), which a ranker
        sharing this model's encoder reuses instead of encoding the history again (``feedback_probs``)."""
        out: list[list[tuple[int, float]]] = [[] for _ in histories]
        states: list[torch.Tensor | None] = [None] * len(histories)
        for lo in range(0, len(histories), batch_size):
            chunk = histories[lo : lo + batch_size]
            rows, users, seen, summary = self._encode(
                chunk, now_ms, summaries[lo : lo + batch_size] if summaries is not None else None)
            if not rows:
                continue
            for b, r in enumerate(rows):
                states[lo + r] = users[b]
            scorer = self.model.token_scorer
            if self.index is not None and scorer is None:  # the token prior is not in the index: score exactly
                for b, r in enumerate(rows):
                    out[lo + r] = self._ann_top_k(users[b], seen[b] if exclude_seen else np.zeros(0, np.int64), k)
                continue
            with torch.inference_mode():
                scores = users @ self.item_matrix.T  # [B', V + 1]
                if scorer is not None:  # vista: each item attends to the user's summary tokens too
                    scores = scores + scorer(summary, self.item_matrix)
                scores[:, 0] = -math.inf  # padding row
                if exclude_seen:
                    r = torch.from_numpy(np.repeat(np.arange(len(rows)), [len(s) for s in seen]))
                    scores[r, torch.from_numpy(np.concatenate(seen))] = -math.inf
                top = scores.topk(min(k, self.config.num_items), dim=1)
            vals, idx = top.values.numpy(), top.indices.numpy()
            for b, r in enumerate(rows):
                ok = np.isfinite(vals[b])
                raw = self.vocab.decode(idx[b][ok]) if ok.any() else np.zeros(0, np.int64)
                out[lo + r] = list(zip(raw.tolist(), vals[b][ok].tolist()))
        return out, states

    def score_candidates(
        self,
        histories: Sequence[Mapping[str, Any]],
        candidates: Sequence[Sequence[int]],
        *,
        now_ms: int | None = None,
        states: Sequence[torch.Tensor | None] | None = None,
    ) -> list[np.ndarray | None]:
        """ARGUS ranking: P(positive reaction | history, candidate) for each raw candidate id of each history.

        The history is encoded once (the user state u after its last event, at the request time) and the
        feedback head scores every candidate against u: m candidates cost one forward pass plus m head rows.
        Returns, per history, float32 probabilities aligned with its candidates (NaN for an item the model
        does not know), or None when the history has no known item (no user state: the caller keeps the
        retrieval order).

        ``states``: each history's user state from ``retrieve`` of a model with this encoder (``same_encoder``),
        so the histories are not encoded a second time."""
        if self.model.feedback_head is None:
            raise ValueError("this model has no feedback head (trained with feedback_weight = 0): it cannot rank")
        if len(candidates) != len(histories):
            raise ValueError(f"{len(histories)} histories but {len(candidates)} candidate lists")
        out: list[np.ndarray | None] = [None] * len(histories)
        if states is None:
            rows, users, _ = self.user_embeddings(histories, now_ms)
        else:
            rows = [r for r, u in enumerate(states) if u is not None]
            users = torch.stack([states[r] for r in rows]) if rows else None
        if not rows:
            return out
        for r, p in zip(rows, self.feedback_probs(users, [candidates[r] for r in rows])):
            out[r] = p
        return out

    def feedback_probs(self, users: torch.Tensor, candidates: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """The feedback head on given user states [B, D], one candidate list per row: P(positive) per raw id
        (NaN for an item this model does not know). The states must come from this model's encoder, or from
        one with the same weights (a ranker whose encoder was frozen while its head was fine-tuned)."""
        idx = [self.vocab.encode(np.asarray(c, np.int64).reshape(-1)) for c in candidates]
        lengths = [len(i) for i in idx]
        flat = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        with torch.inference_mode():
            u = users.repeat_interleave(torch.tensor(lengths, dtype=torch.int64), dim=0)  # [M, D]: per candidate
            p = torch.sigmoid(self.model.feedback_logits(u, self.item_matrix[torch.from_numpy(flat)])).numpy()
        p = np.where(flat > 0, p, np.nan).astype(np.float32)
        return np.split(p, np.cumsum(lengths)[:-1]) if lengths else []

    def same_encoder(self, other: "Recommender") -> bool:
        """Whether ``other`` computes the same user states as this model: the same vocabulary and every weight
        but the feedback head's equal (a ranker fine-tuned with its encoder frozen, against its base). A ranker
        of another family (``models.served_ranker.ServedRanker``) never does."""
        if not isinstance(other, Recommender):
            return False
        if list(self.vocab.raw_ids) != list(other.vocab.raw_ids) or self.config != other.config:
            return False
        a, b = self.model.state_dict(), other.model.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("feedback_head."))

    def _ann_top_k(self, user: torch.Tensor, seen: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Approximate top-k by inner product; over-fetch by the history length, then drop seen items."""
        seen_set = set(int(i) for i in seen)
        want = min(k + len(seen_set), self.config.num_items)
        scores, ids = self.index.search(user.numpy()[None, :].astype(np.float32), want)  # ids are idx - 1
        picked = [(int(i) + 1, float(sc)) for i, sc in zip(ids[0], scores[0]) if i >= 0 and int(i) + 1 not in seen_set]
        picked = picked[:k]
        raw = self.vocab.decode(np.array([i for i, _ in picked], np.int64)) if picked else []
        return [(int(r), s) for r, (_, s) in zip(raw, picked)]
