"""Llama: the decoder-only transformer of Llama (Touvron et al., 2023) at recommender scale.

One block on a padded batch x [B, n, D], pre-RMSNorm, no biases anywhere:

    Q, K, V = split(RMSNorm(x) @ W_qkv)                                # [B, h, n, d] each, d = D / heads
    x = x + dropout(W_proj(softmax(R(Q) R(K)^T / sqrt(d) + causal) V))  # R: rotary position embedding
    x = x + dropout(W_proj'(SiLU(RMSNorm(x) @ W_gate) * (RMSNorm(x) @ W_up)))   # SwiGLU MLP of width F

and a final RMSNorm after the last block.

Positions: rotary embeddings only (Su et al., RoFormer). R rotates each pair of q/k features (i, i + d/2) of the
token at position p by the angle p * theta^(-2i/d), so R(q_p) . R(k_r) depends on p - r only: attention sees
relative positions, and no absolute position enters the model. ``learned_positions = False`` tells
``models.recommender.SequentialRecommender`` not to create or add its learned position table for this
backbone. Position p counts from the start of each sequence (right padding), so a later event never moves an
earlier one: causality holds. Time stamps are ignored.

SwiGLU width F: the recipe's ``ffn_dim``, where 0 means Llama's rule, 2/3 of GPT's 4 D rounded up to a multiple
of 8 (``swiglu_width``): three matrices of D x F then hold about the 8 D^2 parameters of GPT's two D x 4D.

Dropout (the recipe's) applies to the attention weights and to each residual branch's output, as in ``models.gpt``,
so the two backbones train under the same regularisation. Initialisation is GPT-2's (``models.gpt.gpt2_init``):
weights N(0, 0.02), the residual-stream projections N(0, 0.02 / sqrt(2 * blocks)), RMSNorm gains 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.data import to_jagged, to_padded
from models.gpt import gpt2_init

RMS_EPS = 1e-6
ROPE_THETA = 10_000.0  # Llama's rotary base


@dataclass
class LlamaConfig:
    """Sizes of one Llama stack; built from a recipe (``ModelConfig.encoder``), which holds the defaults."""

    dim: int  # D
    blocks: int
    heads: int  # D / heads must be even (rotary pairs)
    ffn_dim: int  # F, the SwiGLU width (resolved: never 0 here)
    max_len: int
    dropout: float


def swiglu_width(dim: int) -> int:
    """Llama's SwiGLU width for a model of width D: 2/3 * 4D, rounded up to a multiple of 8."""
    return 8 * math.ceil(8 * dim / 3 / 8)


def rotary_angles(n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of p * theta^(-2i/d) for positions p < n and pairs i < d/2: [n, d/2] each."""
    inv_freq = ROPE_THETA ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # [d/2]
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [n, d/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + d/2) of x [..., n, d] by the angles of their position: [..., n, d]."""
    x1, x2 = x.chunk(2, dim=-1)  # [..., n, d/2] each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: LayerNorm without centring and without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the mean of squares in float32 also under bf16 autocast, as Llama's reference does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).type_as(x) * self.weight


class RotaryCausalSelfAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.dim % cfg.heads or (cfg.dim // cfg.heads) % 2:
            raise ValueError(f"dim {cfg.dim} / heads {cfg.heads} must be a whole, even head width (rotary pairs)")
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # fused Q, K, V
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)  # writes into the residual stream

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, n, D = x.shape
        h = self.cfg.heads
        q, k, v = (t.view(B, n, h, D // h).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))  # [B, h, n, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # positions enter here, and only here
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B, h, n, d]
        y = y.transpose(1, 2).reshape(B, n, D)
        return F.dropout(self.proj(y), p=self.cfg.dropout, training=self.training)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # writes into the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, n, D] -> [B, n, F] (SiLU gate times linear) -> [B, n, D]
        y = self.proj(F.silu(self.gate(x)) * self.up(x))
        return F.dropout(y, p=self.cfg.dropout, training=self.training)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = RotaryCausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)  # [B, n, D]
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Stack of Llama blocks + final RMSNorm. Input and output: [N, D] jagged values."""

    learned_positions = False  # rotary embeddings inside attention; SequentialRecommender adds no pos_emb

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([LlamaBlock(cfg) for _ in range(cfg.blocks)])
        self.norm = RMSNorm(cfg.dim)
        gpt2_init(self, cfg.blocks)

    def forward(
        self,
        x: torch.Tensor,  # [N, D]
        offsets: torch.Tensor,  # [B + 1]
        timestamps: torch.Tensor | None = None,  # unused: kept for a common encoder signature
        query_timestamps: torch.Tensor | None = None,  # unused
    ) -> torch.Tensor:
        xd, n = to_padded(x, offsets, self.cfg.max_len)  # [B, n, D]
        cos, sin = rotary_angles(n, self.cfg.dim // self.cfg.heads, x.device)  # [n, d/2] x 2, shared by blocks
        for block in self.blocks:
            xd = block(xd, cos, sin)
        return to_jagged(self.norm(xd), offsets, x.shape[0])  # [N, D]


__all__ = ["Llama", "LlamaBlock", "LlamaConfig", "RMSNorm", "RotaryCausalSelfAttention", "SwiGLU",
           "apply_rotary", "rotary_angles", "swiglu_width"]
