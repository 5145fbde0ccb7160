"""HSTU: Hierarchical Sequential Transduction Unit (Zhai et al., 2024, "Actions Speak Louder than Words").

Follows the reference implementation (facebookresearch/generative-recommenders, research/modeling/sequential/
hstu.py). One HSTU block, on a jagged batch x [N, D] (N = total events of the batch):

    U, V, Q, K = split(SiLU(LayerNorm(x) @ W_uvqk))            # one fused projection, SiLU on all four
    A          = SiLU(Q K^T + rab(pos, time)) / max_len * causal # pointwise attention: no softmax
    y          = x + W_o(dropout(U * LayerNorm(A V)))           # U gates the normalised attention output

Why no softmax: softmax normalises the attention weights to sum to 1, which throws away *how much* relevant
history there is (the paper's "intensity" argument); pointwise SiLU keeps it. Dividing by the constant
``max_len`` (the reference pads to it and divides by the padded length) keeps magnitudes bounded while
leaving each position's output independent of batch padding and of future events.

The relative attention bias ``rab`` adds, for query position i and key j <= i, a learned bias per position
offset ``i - j`` plus a learned bias per log-bucket of the time gap between the query's prediction time
(the time of event i + 1, or the request time when serving) and event j.

Ablations (``HSTUConfig.rab``, ``attention``, ``gating``; recipe keys ``hstu_rab``, ``hstu_attention``,
``hstu_gating``) switch off one ingredient of the published block each, for studies of what each is worth:

    rab = False          scores = Q K^T                                     # no relative bias (no rab weights)
    attention = softmax  A = softmax_causal(Q K^T / sqrt(d_qk) + rab)       # replaces SiLU(.) / max_len
    gating = False       y = x + W_o(dropout(LayerNorm(A V)))               # no U: W_uvqk loses its U columns

The defaults are the published block: with them the parameters, their initialisation and every output are
those of the block above.

Input embedding, output L2 normalisation, item embeddings and losses live in ``models.recommender`` /
``models.train`` and are shared with SASRec, as they are in the reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.* jagged ops)


LN_EPS = 1e-6  # the reference's LayerNorm epsilon
ATTENTIONS = ("silu", "softmax")  # HSTUConfig.attention: the published pointwise SiLU, or the softmax ablation


@dataclass
class HSTUConfig:
    """Sizes of one HSTU stack; built from a recipe (``ModelConfig.encoder``), which holds the defaults."""

    dim: int  # D, the embedding / residual width
    blocks: int
    heads: int
    attn_dim: int  # d_qk per head
    linear_dim: int  # d_v per head (U and V width)
    max_len: int  # longest history; also the attention normaliser
    dropout: float
    num_time_buckets: int
    rab: bool  # relative attention bias (position + time); False: no bias and no bias weights
    attention: str  # "silu": pointwise SiLU(.) / max_len (published) | "softmax": causal softmax, 1/sqrt(d_qk)
    gating: bool  # U gating of the attention output; False: no U projection

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"HSTU attention {self.attention!r}: expected one of {', '.join(ATTENTIONS)}")


def bucketize_time_gap(gap_s: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Reference bucketing: floor(ln(max(|gap|, 1)) / 0.301), clamped to [0, num_buckets].

    ln-buckets of width 0.301 (~1.35x per bucket) resolve seconds-vs-minutes finely and months coarsely.
    """
    gap = gap_s.abs().clamp(min=1).float()
    return (torch.log(gap) / 0.301).long().clamp(0, num_buckets)


class BiasLookup(torch.autograd.Function):
    """``w[idx]`` for a small bias vector w and a large index tensor, with a bincount backward.

    Autograd's own backward of ``w[idx]`` is an accumulating index_put, serial over the [B, n, n] index: 0.2 s
    per block and step for an ML-1M batch (128 x 200 x 200 into 129 buckets) on 2 CPU cores, the largest
    single cost of a training step. The gradient of each bucket is the sum of the gradients of the positions
    that read it, which is exactly ``bincount(idx, weights=grad)``: 4 ms for the same tensors.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(idx)
        ctx.size = w.numel()
        return w[idx]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        (idx,) = ctx.saved_tensors
        d_w = torch.bincount(idx.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.size)
        return d_w.to(grad.dtype), None


class RelativeAttentionBias(nn.Module):
    """rab[b, i, j] = w_pos[i - j] + w_time[bucket(t_query[b, i] - t[b, j])]."""

    def __init__(self, max_len: int, num_time_buckets: int):
        super().__init__()
        self.pos_w = nn.Parameter(torch.empty(max_len).normal_(0, 0.02))  # causal: offsets 0..max_len-1
        self.time_w = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(0, 0.02))

    def forward(self, offset_idx: torch.Tensor, time_bucket: torch.Tensor) -> torch.Tensor:
        # offset_idx: [n, n] long, time_bucket: [B, n, n] long  ->  [B, n, n]
        return BiasLookup.apply(self.pos_w, offset_idx).unsqueeze(0) + BiasLookup.apply(self.time_w, time_bucket)


class HSTUBlock(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        h, dqk, dv = cfg.heads, cfg.attn_dim, cfg.linear_dim
        self.splits = [h * dv] * (2 if cfg.gating else 1) + [h * dqk] * 2  # widths of ([U,] V, Q, K)
        self.uvqk = nn.Linear(cfg.dim, sum(self.splits), bias=False)  # fused U, V, Q, K projection
        self.out = nn.Linear(h * dv, cfg.dim)
        # Created (and drawn from the RNG) only when used, in the published order: the ablations add no dead
        # weights, and the published block initialises exactly as before they existed.
        self.rab = RelativeAttentionBias(cfg.max_len, cfg.num_time_buckets) if cfg.rab else None
        nn.init.normal_(self.uvqk.weight, mean=0.0, std=0.02)  # reference init
        nn.init.xavier_uniform_(self.out.weight)  # the bias keeps nn.Linear's default, as in the reference

    def forward(
        self,
        x: torch.Tensor,  # [N, D] jagged values
        offsets: torch.Tensor,  # [B + 1]
        n: int,  # padded length = longest sequence in this batch
        offset_idx: torch.Tensor | None,  # [n, n] clamp(i - j); None without rab
        time_bucket: torch.Tensor | None,  # [B, n, n]; None without rab
        causal_over_n: torch.Tensor,  # [n, n] lower-triangular ones / max_len
    ) -> torch.Tensor:
        cfg = self.cfg
        B, h, dqk, dv = offsets.numel() - 1, cfg.heads, cfg.attn_dim, cfg.linear_dim
        u, v, q, k = self.project(x)  # [N, h*dv] x 2, [N, h*dqk] x 2

        # Attention needs a dense [B, n, ...] layout; pad only up to this batch's longest sequence.
        def pad(t: torch.Tensor, d: int) -> torch.Tensor:
            return torch.ops.fbgemm.jagged_to_padded_dense(t, [offsets], [n], 0.0).view(B, n, h, d)

        qp, kp, vp = pad(q, dqk), pad(k, dqk), pad(v, dv)
        scores = torch.einsum("bnhd,bmhd->bhnm", qp, kp)  # [B, h, n, n]
        if cfg.attention == "softmax":
            scores = scores / math.sqrt(dqk)  # the usual temperature: softmax is not scale-free as SiLU/n is
        if self.rab is not None:
            scores = scores + self.rab(offset_idx, time_bucket).unsqueeze(1)  # one bias shared by heads
        # Right padding + causal mask: a real query i < len never sees a padded key j > i. Padded queries
        # compute garbage that dense_to_jagged drops.
        if cfg.attention == "silu":
            attn = F.silu(scores) * causal_over_n  # = SiLU(scores) / max_len * causal, one pass: [B, h, n, n]
        else:  # weights over the keys j <= i sum to 1 (key 0 is always visible: no empty row)
            attn = scores.masked_fill(causal_over_n == 0, float("-inf")).softmax(dim=-1)  # [B, h, n, n]
        attn_out = torch.einsum("bhnm,bmhd->bnhd", attn, vp).reshape(B, n, h * dv)
        attn_out = torch.ops.fbgemm.dense_to_jagged(attn_out, [offsets], x.shape[0])[0]  # [N, h*dv]; N given: no host sync
        return self.output(x, u, attn_out)

    # The two halves around the attention, shared with callers that arrange the attention differently
    # (models.hstu_ranker's M-FALCON: candidates attend to a cached history): same weights, same math.

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, V, Q, K = split(SiLU(LayerNorm(x) @ W_uvqk)): [..., D] -> [..., h*dv] x 2, [..., h*dqk] x 2.
        Without gating U is None (the projection has no U columns)."""
        cfg = self.cfg
        # LayerNorm without affine parameters (eps 1e-6), as in the reference: the projection that follows is affine.
        uvqk = F.silu(self.uvqk(F.layer_norm(x, (cfg.dim,), eps=LN_EPS)))  # [..., h*(2dv+2dqk)]
        parts = uvqk.split(self.splits, dim=-1)
        return parts if cfg.gating else (None, *parts)

    def output(self, x: torch.Tensor, u: torch.Tensor | None, attn_out: torch.Tensor) -> torch.Tensor:
        """y = x + W_o(dropout(U * LayerNorm(A V))): x [..., D], u and attn_out [..., h*dv] -> [..., D].
        Without gating (u None): y = x + W_o(dropout(LayerNorm(A V)))."""
        cfg = self.cfg
        normed = F.layer_norm(attn_out, (cfg.heads * cfg.linear_dim,), eps=LN_EPS)  # [..., h*dv]
        gated = u * normed if cfg.gating else normed
        return x + self.out(F.dropout(gated, p=cfg.dropout, training=self.training))


class HSTU(nn.Module):
    """Stack of HSTU blocks over a jagged batch. Input and output: [N, D] jagged values."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([HSTUBlock(cfg) for _ in range(cfg.blocks)])

    def forward(
        self,
        x: torch.Tensor,  # [N, D] embedded inputs
        offsets: torch.Tensor,  # [B + 1]
        timestamps: torch.Tensor,  # [N] seconds of each event
        query_timestamps: torch.Tensor,  # [N] seconds at which each position predicts
    ) -> torch.Tensor:
        B = offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]
        n = int(lengths.max()) if B > 0 else 0
        if n > self.cfg.max_len:
            raise ValueError(f"sequence of length {n} exceeds max_len {self.cfg.max_len}")

        offset_idx = time_bucket = None
        if self.cfg.rab:  # shared by all blocks (each block has its own bias weights): index tensors, not values
            pos = torch.arange(n, device=x.device)
            offset_idx = (pos[:, None] - pos[None, :]).clamp(0, self.cfg.max_len - 1)  # [n, n]
            t = torch.ops.fbgemm.jagged_to_padded_dense(timestamps.unsqueeze(-1), [offsets], [n], 0)[..., 0]  # [B, n]
            tq = torch.ops.fbgemm.jagged_to_padded_dense(query_timestamps.unsqueeze(-1), [offsets], [n], 0)[..., 0]
            # gap[b, i, j] = (prediction time of query i) - (time of key j), in integer seconds
            time_bucket = bucketize_time_gap(tq.unsqueeze(2) - t.unsqueeze(1), self.cfg.num_time_buckets)  # [B, n, n]
        # key j <= query i, with the 1/max_len normaliser folded in (saves a pass over [B, h, n, n])
        causal_over_n = torch.tril(torch.ones(n, n, device=x.device, dtype=x.dtype)) / self.cfg.max_len

        for block in self.blocks:
            x = block(x, offsets, n, offset_idx, time_bucket, causal_over_n)
        return x


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ATTENTIONS", "BiasLookup", "HSTU", "HSTUBlock", "HSTUConfig", "RelativeAttentionBias", "bucketize_time_gap",
           "num_params"]
