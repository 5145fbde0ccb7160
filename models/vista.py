"""VISTA: a user's whole history as K summary tokens, plus the recent raw events (Meta's "Virtual Sequential
Target Attention"; issue #36). Two stages, trained end to end by ``models.train.train`` as model ``vista``:

Stage 1, the ``Summariser``: K learned queries pool every *older* event (each event before the recent window)
by softmax attention. Keys and values come from each event alone, so the pooling is a sum over events and
can be kept as a running, fixed-size state that new events update without re-reading the past:

    f_j   = LN(E_item[i_j] + E_type[c_j] + W_t time(t_j))               # [D]   one event; time(t): sin/cos of
                                                                         #       time of day, week and year
    w_kj  = q_k . (W_k f_j) / sqrt(D) - lambda_k (T - t_j)               # [K]   log-weight of event j for query k
    Z_k   = sum_j exp(w_kj)                                              # [K]   (kept as log Z: log-sum-exp)
    P_k   = sum_j exp(w_kj) / Z_k * (W_v f_j)                            # [K, D] pooled values
    state = (log Z [K], P [K, D], T = time of the latest event, n = event count)

lambda_k is query k's decay rate (``DECAY_HALF_LIVES_DAYS``, one per group of queries; 0 for the first group):
an event's weight shrinks by exp(-lambda dt) as newer events arrive, so some queries summarise the last weeks
and others the whole life (seasonal tastes need the latter, with time-of-year in f). Folding new events B into
a state of events A is exact, with T' = max(T_A, latest t in B):

    log Z'  = logaddexp(log Z_A - lambda (T' - T_A), logsumexp_{j in B} w_kj)
    P'      = exp(log Z_A - lambda (T' - T_A) - log Z') P_A + sum_{j in B} exp(w_kj - log Z') W_v f_j

which is the formula above over A + B (``update`` is also the training path: from the empty state). Cost is
linear in the number of events; the state's size does not depend on it. The tokens the downstream reads:

    h      = W_p P + E_token + w_n log(1 + n)                            # [K, D] (E_token: which query)
    tokens = h + MLP(LN(h))                                              # [K, D]

Stage 2, ``VistaEncoder``: the recent raw events (the last ``max_len``, the window every model reads) go
through HSTU blocks (``models.hstu.HSTUBlock``: its projections and output, unchanged) whose attention has K
extra keys, the summary tokens, projected by each block's own W_uvqk (cross-attention: the tokens are keys
and values only, the blocks do not rewrite them, so serving can read them from a cache as they are):

    scores = [Q K_s^T + b_k + rab_t(t_query - T)  |  Q K_r^T + rab(i - j, t_query - t_j)]   # [n, K + n]
    A      = SiLU(scores) / (max_len + K) * [n > 0 ... n > 0 | causal]                      # or causal softmax
    y      = x + W_o(U * LN(A [V_s; V_r]))

Every recent position sees all K tokens (they summarise events before the window: no future leaks) and the
recent events up to itself. A user with nothing before the window (n = 0) has no tokens to see: the blocks
then compute what HSTU's would. The output is the user state after each position, scored against every item by
cosine exactly as ``models.recommender.SequentialRecommender`` does for the other families.

Optional (``vista_target_attention``), ``TokenTargetAttention``: every candidate item also attends to the tokens,
and the tokens also read each query's log-mass per event (h += w_m (log Z - log(1 + n))):

    score(u, c) = cos(u, e_c) + sum_k softmax_k((W_q e_c) . (W_k t_k) / sqrt(D)) (W_v t_k) . e_c

and (``vista_recall_weight``, models/train.py) a recall loss trains that prior to score events drawn from the
summarised prefix above the negatives: the issue's reconstruction objective.

What is cached: the *state* (``SummaryState``: P in fp16, log Z in fp32, T, n: ``STATE_BYTES``) is what an
incremental refresh needs; the *tokens* (``Summary``: K x D fp16 and T) are what the downstream model reads
and what the online store serves (the issue's ``user_summary`` view). Both are constant in history length;
the tokens are a pure function of the state (``Summariser.summarise``), so a store may keep either and
derive the tokens. ``Summariser.version()`` fingerprints the weights that produced them.

The summariser owns its item and event-type tables (it does not read the downstream model's): a summary
depends on the summariser's weights alone, so its version is the hash of one module, and a refresh job needs
only that module.

Training reads each window's older events from the batch (``models.data.make_batch(..., older_events=)``;
recipe key ``vista_train_older`` caps how many); evaluation and ``Recommender.user_embeddings`` summarise the
whole history. The sharded trainer (``models.distributed``) builds no older prefixes yet: the model refuses
such batches rather than train without its summary.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.* jagged ops)

from models.data import NUM_EVENT_TYPES, offsets_of
from models.hstu import LN_EPS, BiasLookup, HSTUBlock, HSTUConfig, bucketize_time_gap

DAY_S = 86_400
# Decay half-lives of the query groups, in days (inf: no decay). Queries k, k + 4, k + 8, ... share one. Fixed,
# not learned: they are part of what makes the incremental update exact and cheap (one rate per query).
DECAY_HALF_LIVES_DAYS = (math.inf, 365.0, 30.0, 7.0)
# Periods of the time features (seconds): time of day, of week, of year. Seasonal tastes need the last one.
TIME_PERIODS_S = (DAY_S, 7 * DAY_S, 365.2425 * DAY_S)
PAD_LOG_WEIGHT = -1e9  # log-weight of padding: exp() is 0, and a row of padding alone stays finite (no NaN grads)


@dataclass
class SummariserConfig:
    """Sizes of the summariser; built from a recipe (``ModelConfig.summariser_config``)."""

    num_items: int  # V: its own item table has V + 1 rows (0 = padding)
    dim: int  # D of the events, the pooled values and the tokens (= the downstream model's width)
    tokens: int  # K learned queries = K summary tokens
    dropout: float  # on each event's features, in training only
    mass: bool = False  # tokens also read each query's log-mass per event (recipe key vista_target_attention)


@dataclass
class SummaryState:
    """The incremental state of B users: fixed size whatever the number of events summarised.

    An empty user has log_mass = -inf, pooled = 0, last_time = 0, count = 0."""

    log_mass: torch.Tensor  # [B, K] float32: log Z_k, relative to decay time last_time
    pooled: torch.Tensor  # [B, K, D] float32: P_k, the softmax-weighted mean of the values
    last_time: torch.Tensor  # [B] int64 seconds of the latest summarised event
    count: torch.Tensor  # [B] int64 events summarised

    @property
    def batch_size(self) -> int:
        return int(self.count.numel())

    def select(self, rows: torch.Tensor | list[int]) -> "SummaryState":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return SummaryState(self.log_mass[rows], self.pooled[rows], self.last_time[rows], self.count[rows])

    @staticmethod
    def cat(states: list["SummaryState"]) -> "SummaryState":
        return SummaryState(*(torch.cat([getattr(s, f) for s in states]) for f in ("log_mass", "pooled", "last_time", "count")))

    def to_bytes(self) -> list[bytes]:
        """One fixed-size record per user (``state_bytes(K, D)``): P in fp16 (a mean of values: small, bounded),
        log Z in fp32 (it grows with the history, and exp() of it needs the precision), T and n as int64."""
        out = []
        for b in range(self.batch_size):
            out.append(self.pooled[b].detach().to(torch.float16).numpy().tobytes()
                       + self.log_mass[b].detach().to(torch.float32).numpy().tobytes()
                       + np.array([int(self.last_time[b]), int(self.count[b])], np.int64).tobytes())
        return out

    @staticmethod
    def from_bytes(records: list[bytes], tokens: int, dim: int) -> "SummaryState":
        """Inverse of ``to_bytes`` (P comes back in float32, rounded to fp16 precision)."""
        k, d = tokens, dim
        pooled, log_mass, times = [], [], []
        for r in records:
            if len(r) != state_bytes(k, d):
                raise ValueError(f"summary state record of {len(r)} bytes; expected {state_bytes(k, d)} for K={k}, D={d}")
            pooled.append(np.frombuffer(r, np.float16, k * d).reshape(k, d).astype(np.float32))
            log_mass.append(np.frombuffer(r, np.float32, k, offset=2 * k * d))
            times.append(np.frombuffer(r, np.int64, 2, offset=2 * k * d + 4 * k))
        t = np.stack(times) if times else np.zeros((0, 2), np.int64)
        return SummaryState(torch.from_numpy(np.stack(log_mass) if log_mass else np.zeros((0, k), np.float32)),
                            torch.from_numpy(np.stack(pooled) if pooled else np.zeros((0, k, d), np.float32)),
                            torch.from_numpy(t[:, 0].copy()), torch.from_numpy(t[:, 1].copy()))


def state_bytes(tokens: int, dim: int) -> int:
    """Stored bytes of one user's ``SummaryState``: 2 K D + 4 K + 16, whatever the history length."""
    return 2 * tokens * dim + 4 * tokens + 16


@dataclass
class Summary:
    """What the downstream model reads for B users: the summary tokens, the time of the latest summarised event
    (its gap to each query gets a learned bias) and how many events they summarise (0: no tokens to attend to,
    the user has no history before the window). The online store's feature (K x D fp16 + T + n)."""

    tokens: torch.Tensor  # [B, K, D]
    last_time: torch.Tensor  # [B] int64 seconds
    count: torch.Tensor  # [B] int64 events summarised

    @staticmethod
    def cat(summaries: list["Summary"]) -> "Summary":
        return Summary(*(torch.cat([getattr(s, f) for s in summaries]) for f in ("tokens", "last_time", "count")))

    def to_bytes(self) -> list[bytes]:
        """One record per user: the K x D tokens in fp16, then T and n as int64 (2 K D + 16 bytes)."""
        return [self.tokens[b].detach().to(torch.float16).numpy().tobytes()
                + np.array([int(self.last_time[b]), int(self.count[b])], np.int64).tobytes() for b in range(len(self.count))]

    @staticmethod
    def from_bytes(records: list[bytes], tokens: int, dim: int) -> "Summary":
        """Inverse of ``to_bytes``: tokens back in float32 (fp16 precision)."""
        size = 2 * tokens * dim
        if any(len(r) != size + 16 for r in records):
            raise ValueError(f"summary records must be {size + 16} bytes for K={tokens}, D={dim}")
        t = np.stack([np.frombuffer(r, np.float16, tokens * dim).reshape(tokens, dim).astype(np.float32) for r in records]) \
            if records else np.zeros((0, tokens, dim), np.float32)
        tn = np.stack([np.frombuffer(r, np.int64, 2, offset=size) for r in records]) if records else np.zeros((0, 2), np.int64)
        return Summary(torch.from_numpy(t), torch.from_numpy(tn[:, 0].copy()), torch.from_numpy(tn[:, 1].copy()))


def time_features(t: torch.Tensor) -> torch.Tensor:
    """[M] int64 seconds -> [M, 6]: sin and cos of the phase within a day, a week and a year."""
    # float64 for the phase: t ~ 1.7e9 s does not fit float32's 24 bits to the second
    phase = torch.stack([(t.double() % p) / p for p in TIME_PERIODS_S], dim=-1) * (2 * math.pi)  # [M, 3]
    return torch.cat([phase.sin(), phase.cos()], dim=-1).float()


def decay_rates(tokens: int) -> torch.Tensor:
    """[K] per-second decay rate of each query: ln 2 / half-life, 0 for an infinite half-life."""
    rates = torch.tensor([0.0 if math.isinf(h) else math.log(2) / (h * DAY_S) for h in DECAY_HALF_LIVES_DAYS],
                         dtype=torch.float64)
    return rates[torch.arange(tokens) % len(rates)]


class Summariser(nn.Module):
    """Stage 1 (module docstring): events -> ``SummaryState`` (exact, incremental) -> ``Summary`` tokens."""

    def __init__(self, cfg: SummariserConfig):
        super().__init__()
        self.cfg = cfg
        d, k = cfg.dim, cfg.tokens
        self.item_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        self.type_emb = nn.Embedding(NUM_EVENT_TYPES, d, padding_idx=0)
        for table in (self.item_emb, self.type_emb):
            nn.init.trunc_normal_(table.weight, std=0.02, a=-0.04, b=0.04)  # as the model's own tables
        self.time_proj = nn.Linear(2 * len(TIME_PERIODS_S), d)
        self.queries = nn.Parameter(torch.randn(k, d) / math.sqrt(d))  # q_k: [K, D]
        self.key = nn.Linear(d, d, bias=False)  # W_k
        self.value = nn.Linear(d, d, bias=False)  # W_v
        self.token_emb = nn.Parameter(torch.randn(k, d) * 0.02)  # E_token: which query a token came from
        self.pooled_proj = nn.Linear(d, d)  # W_p
        self.size_w = nn.Parameter(torch.zeros(d))  # w_n: how long the summarised history is
        # w_m: how strongly the history matches each query, per event (a soft histogram over K "topics"). P alone is
        # a weighted *mean*: it says which events a query matched, not how many; target attention needs how many
        self.mass_w = nn.Parameter(torch.zeros(d)) if cfg.mass else None
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.register_buffer("rates", decay_rates(k), persistent=False)  # [K] float64 lambda_k

    # -- the state ----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> SummaryState:
        """B empty states (no event summarised)."""
        k, d = self.cfg.tokens, self.cfg.dim
        device = self.queries.device
        return SummaryState(
            log_mass=torch.full((batch_size, k), -math.inf, device=device),
            pooled=torch.zeros(batch_size, k, d, device=device),
            last_time=torch.zeros(batch_size, dtype=torch.int64, device=device),
            count=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def event_logits_values(self, items: torch.Tensor, event_types: torch.Tensor,
                            timestamps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each event alone: [M] ids, codes, seconds -> scores q_k . W_k f_j / sqrt(D) [M, K], values W_v f_j [M, D]."""
        d = self.cfg.dim
        f = self.item_emb(items) + self.type_emb(event_types) + self.time_proj(time_features(timestamps))  # [M, D]
        f = F.dropout(F.layer_norm(f, (d,), eps=LN_EPS), p=self.cfg.dropout, training=self.training)
        scores = self.key(f) @ self.queries.T / math.sqrt(d)  # [M, K]
        return scores, self.value(f)  # [M, K], [M, D]

    def update(self, state: SummaryState, items: torch.Tensor, event_types: torch.Tensor, timestamps: torch.Tensor,
               offsets: torch.Tensor) -> SummaryState:
        """Fold new events into ``state`` (B users; user b's new events are ``[offsets[b], offsets[b + 1])`` of the
        flat [M] tensors, in any order). Equal to a pass over the old and the new events together from the empty
        state (module docstring); differentiable (the training path is ``update(init_state(B), older...)``)."""
        B = offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]  # [B]
        n = int(lengths.max()) if B > 0 else 0
        if n == 0:  # nothing new: the state as it is
            return state
        # fp32 even under autocast: exp() of bf16 log-weights would lose the exactness the update promises
        with torch.autocast(offsets.device.type, enabled=False):
            scores, values = self.event_logits_values(items, event_types, timestamps)  # [M, K], [M, D]

            def pad(x: torch.Tensor, value: float) -> torch.Tensor:  # jagged [M, ...] -> [B, n, ...]
                return torch.ops.fbgemm.jagged_to_padded_dense(x, [offsets], [n], value)

            last = torch.maximum(state.last_time, pad(timestamps.unsqueeze(-1), 0)[..., 0].amax(dim=1))  # T' [B]
            row = torch.repeat_interleave(torch.arange(B, device=offsets.device), lengths)  # [M] user of each event
            # log-weights relative to T'; the decay lambda (T' - t) in float64 (gaps of years, in seconds)
            decay_new = self.rates[None, :] * (last[row] - timestamps).double()[:, None]  # [M, K]
            w_pad = pad((scores.double() - decay_new).float(), PAD_LOG_WEIGHT)  # [B, n, K]
            old = (state.log_mass.double() - self.rates[None, :] * (last - state.last_time).double()[:, None]).float()  # [B, K]
            count = state.count + lengths  # [B]
            log_mass = torch.logaddexp(old, torch.logsumexp(w_pad, dim=1))  # [B, K]
            log_mass = torch.where((count > 0)[:, None], log_mass, torch.full_like(log_mass, -math.inf))
            safe = torch.where(torch.isfinite(log_mass), log_mass, torch.zeros_like(log_mass))  # [B, K]
            share = torch.exp(w_pad - safe[:, None, :])  # [B, n, K]: each new event's share of the mass (padding: 0)
            pooled = torch.exp(old - safe)[..., None] * state.pooled.float()  # [B, K, D] the old mean, reweighted
            pooled = pooled + torch.einsum("bnk,bnd->bkd", share, pad(values, 0.0))  # [B, K, D]
        return SummaryState(log_mass=log_mass, pooled=pooled, last_time=last, count=count)

    # -- the tokens ---------------------------------------------------------------------------------------
    def tokens(self, state: SummaryState) -> torch.Tensor:
        """[B, K, D] summary tokens of a state: h = W_p P + E_token + w_n log(1 + n) [+ w_m (log Z - log(1 + n))];
        tokens = h + MLP(LN(h))."""
        size = torch.log1p(state.count.to(state.pooled.dtype))[:, None, None]  # [B, 1, 1]
        h = self.pooled_proj(state.pooled) + self.token_emb + size * self.size_w  # [B, K, D]
        if self.mass_w is not None:  # an empty state's log Z is -inf: its tokens are never read (count 0)
            mass = torch.nan_to_num(state.log_mass.to(h.dtype)[..., None] - size, neginf=0.0)  # [B, K, 1]
            h = h + mass * self.mass_w
        return h + self.mlp(h)

    def summarise(self, state: SummaryState) -> Summary:
        return Summary(self.tokens(state), state.last_time, state.count)

    def table_parameters(self) -> list[nn.Parameter]:
        """The item and event-type tables (no weight decay: rows a batch does not touch must not shrink)."""
        return [self.item_emb.weight, self.type_emb.weight]

    def version(self) -> str:
        """A stable fingerprint of this summariser: sha256 of its config and every weight's bytes, 12 hex
        digits. Summaries made by weights with another version are not this model's summaries."""
        cfg = asdict(self.cfg)
        if not cfg["mass"]:  # a summariser without the mass feature hashes as it did before the feature existed
            del cfg["mass"]
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]


class VistaEncoder(nn.Module):
    """Stage 2 (module docstring): HSTU blocks over the recent events that also attend to the K summary tokens.
    Input and output: [N, D] jagged values, as every encoder; plus the batch's ``Summary``."""

    learned_positions = True  # the recent events get SequentialRecommender's position table, as HSTU's

    def __init__(self, cfg: HSTUConfig, tokens: int):
        super().__init__()
        self.cfg = cfg
        self.num_tokens = tokens
        self.blocks = nn.ModuleList([HSTUBlock(cfg) for _ in range(cfg.blocks)])
        # b_k: a learned bias per block and token (the tokens have no position offset for the rab to read)
        self.token_bias = nn.Parameter(torch.zeros(cfg.blocks, tokens)) if cfg.rab else None

    def forward(
        self,
        x: torch.Tensor,  # [N, D] embedded recent events
        offsets: torch.Tensor,  # [B + 1]
        timestamps: torch.Tensor,  # [N] seconds of each event
        query_timestamps: torch.Tensor,  # [N] seconds at which each position predicts
        summary: Summary,  # tokens [B, K, D], last_time [B]
    ) -> torch.Tensor:
        cfg, K = self.cfg, self.num_tokens
        B = offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]
        n = int(lengths.max()) if B > 0 else 0
        if n > cfg.max_len:
            raise ValueError(f"sequence of length {n} exceeds max_len {cfg.max_len}")
        if summary.tokens.shape[:2] != (B, K):
            raise ValueError(f"summary tokens {tuple(summary.tokens.shape)} for {B} sequences of {K} tokens")

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.ops.fbgemm.jagged_to_padded_dense(t, [offsets], [n], 0)

        tq = pad(query_timestamps.unsqueeze(-1))[..., 0]  # [B, n]
        if cfg.rab:  # indices shared by all blocks, as HSTU.forward builds them
            pos = torch.arange(n, device=x.device)
            offset_idx = (pos[:, None] - pos[None, :]).clamp(0, cfg.max_len - 1)  # [n, n]
            t = pad(timestamps.unsqueeze(-1))[..., 0]  # [B, n]
            time_bucket = bucketize_time_gap(tq.unsqueeze(2) - t.unsqueeze(1), cfg.num_time_buckets)  # [B, n, n]
            # the tokens' time: the latest summarised event (gap[b, i] = query time of i - T_b)
            token_bucket = bucketize_time_gap(tq - summary.last_time[:, None], cfg.num_time_buckets)  # [B, n]
        # every token is visible to every position of a user with older events (a user without has no summary:
        # K constant tokens would only blur the recent events); recent keys j <= i; 1 / (max_len + K): the
        # widest row's number of keys
        has_summary = (summary.count > 0).to(x.dtype)[:, None, None, None].expand(B, 1, n, K)  # [B, 1, n, K]
        causal = torch.tril(torch.ones(n, n, device=x.device, dtype=x.dtype)).expand(B, 1, n, n)  # [B, 1, n, n]
        mask = torch.cat([has_summary, causal], dim=3) / (cfg.max_len + K)  # [B, 1, n, K + n]
        tokens = summary.tokens.to(x.dtype)  # [B, K, D]
        h, dqk, dv = cfg.heads, cfg.attn_dim, cfg.linear_dim
        for i, block in enumerate(self.blocks):
            u, v, q, k = block.project(x)  # [N, h*dv] x 2, [N, h*dqk] x 2
            _, v_s, _, k_s = block.project(tokens)  # the tokens as keys and values: [B, K, h*dv], [B, K, h*dqk]
            qp = pad(q).view(B, n, h, dqk)
            kp = torch.cat([k_s, pad(k)], dim=1).view(B, K + n, h, dqk)  # [B, K + n, h, dqk]
            vp = torch.cat([v_s, pad(v)], dim=1).view(B, K + n, h, dv)  # [B, K + n, h, dv]
            scores = torch.einsum("bnhd,bmhd->bhnm", qp, kp)  # [B, h, n, K + n]
            if cfg.attention == "softmax":
                scores = scores / math.sqrt(dqk)
            if block.rab is not None:
                recent = block.rab(offset_idx, time_bucket)  # [B, n, n]
                to_tokens = (BiasLookup.apply(block.rab.time_w, token_bucket)[..., None]
                             + self.token_bias[i][None, None, :])  # [B, n, K]
                scores = scores + torch.cat([to_tokens, recent], dim=2).unsqueeze(1)  # one bias shared by heads
            if cfg.attention == "silu":
                attn = F.silu(scores) * mask  # [B, h, n, K + n]
            else:
                attn = scores.masked_fill(mask == 0, float("-inf")).softmax(dim=-1)
            attn_out = torch.einsum("bhnm,bmhd->bnhd", attn, vp).reshape(B, n, h * dv)
            attn_out = torch.ops.fbgemm.dense_to_jagged(attn_out, [offsets], x.shape[0])[0]  # [N, h*dv]
            x = block.output(x, u, attn_out)
        return x


class TokenTargetAttention(nn.Module):
    """The candidate attends to the summary tokens (VISTA's target attention, for every item of a catalogue):

        a_k(c)   = softmax_k( (W_q e_c) . (W_k t_k) / sqrt(D) )      # [K] which tokens the candidate reads
        score(c) = sum_k a_k(c) (W_v t_k) . e_c                        # a lifelong prior over items

    added to the user state's cosine with e_c (in the same units: e_c is L2-normalised). Why: the user state is
    one D-dimensional vector, and a cosine with it can only express a D-dimensional family of preferences over
    items; a lifelong taste (say a hundred favourite artists of a thousand) is not in that family. Each candidate
    reading its own tokens can express one. The prior depends on the user's summary and the item alone, not on
    the position in the recent window, so one [B, C] matrix serves every position of a window. W_v starts at 0:
    an untrained scorer adds nothing."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.value.weight)

    # [B, C, K] intermediates are built CHUNK_CELLS cells at a time: a whole catalogue at once would need
    # B x V x K floats (13 GB for 256 users, 200k items, K 64)
    CHUNK_CELLS = 1 << 24

    def forward(self, summary: Summary, items: torch.Tensor) -> torch.Tensor:
        """``summary`` of B users, items [C, D] (L2-normalised) -> [B, C] scores (0 for a user with no summary).
        In fp32 under autocast too: the prior joins cosine logits that are divided by a small temperature."""
        with torch.autocast(items.device.type, enabled=False):
            tokens = summary.tokens.float()  # [B, K, D]
            keys, values = self.key(tokens), self.value(tokens)  # [B, K, D] each
            B, K = keys.shape[:2]
            step = max(1, self.CHUNK_CELLS // max(B * K, 1))
            out = []
            for lo in range(0, len(items), step):
                chunk = items[lo : lo + step].float()  # [c, D]
                logits = torch.einsum("cd,bkd->bck", self.query(chunk), keys) / math.sqrt(self.dim)  # [B, c, K]
                per_token = torch.einsum("bkd,cd->bck", values, chunk)  # [B, c, K]: (W_v t_k) . e_c
                out.append((logits.softmax(dim=-1) * per_token).sum(-1))  # [B, c]
            scores = torch.cat(out, dim=1) if out else items.new_zeros(B, 0, dtype=torch.float32)
            return scores * (summary.count > 0).to(scores.dtype)[:, None]

    def pairs(self, summary: Summary, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """One item per row: user ``rows[m]`` of ``summary`` against items[m] [M, D] -> [M] scores (fp32)."""
        with torch.autocast(items.device.type, enabled=False):
            tokens = summary.tokens.float()  # [B, K, D]: projected once per user, then gathered per row
            keys, values = self.key(tokens)[rows], self.value(tokens)[rows]  # [M, K, D]
            items = items.float()
            logits = torch.einsum("md,mkd->mk", self.query(items), keys) / math.sqrt(self.dim)  # [M, K]
            per_token = torch.einsum("mkd,md->mk", values, items)  # [M, K]
            return (logits.softmax(dim=-1) * per_token).sum(-1) * (summary.count[rows] > 0).to(torch.float32)


def summarise_events(summariser: Summariser, items: list[np.ndarray], event_types: list[np.ndarray],
                     timestamps_s: list[np.ndarray], state: SummaryState | None = None) -> SummaryState:
    """Numpy convenience: fold each user's (dense item ids, event codes, seconds) into ``state`` (empty if None)."""
    lengths = torch.tensor([len(x) for x in items], dtype=torch.int64)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64)) if len(xs) else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    state = state if state is not None else summariser.init_state(len(items))
    return summariser.update(state, cat(items), cat(event_types), cat(timestamps_s), offsets_of(lengths))


__all__ = ["DECAY_HALF_LIVES_DAYS", "Summariser", "SummariserConfig", "Summary", "SummaryState", "TokenTargetAttention",
           "VistaEncoder",
           "decay_rates", "state_bytes", "summarise_events", "time_features"]
