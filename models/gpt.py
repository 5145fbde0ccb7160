"""GPT: the decoder-only transformer of GPT-2 (Radford et al., 2019), written as nanoGPT writes it.

One block on a padded batch x [B, n, D], pre-LayerNorm (with affine weights and biases):

    x = x + dropout(W_proj(softmax(Q K^T / sqrt(d) + causal) V))    # Q, K, V = split(LayerNorm(x) @ W_qkv)
    x = x + dropout(W_proj'(GELU(LayerNorm(x) @ W_fc)))              # MLP of width F (ffn_dim)

and a final LayerNorm after the last block. d = D / heads. The MLP width F is the recipe's ``ffn_dim``, where
0 means GPT's own 4 D (``ModelConfig.encoder`` resolves it; SASRec reads 0 as D, its reference width).

Positions are learned absolute embeddings, as GPT-2's: the shared ``pos_emb`` of
``models.recommender.SequentialRecommender`` adds them to the inputs (``learned_positions = True``), so GPT
and SASRec read the very same inputs and differ only in the block stack. Time stamps are ignored.

Initialisation is GPT-2's: every Linear weight ~ N(0, 0.02), biases 0, LayerNorms (1, 0), and the two
projections that write into the residual stream (``proj``) ~ N(0, 0.02 / sqrt(2 * blocks)), so the residual
stream's variance does not grow with depth (2 such writes per block).

Batches are jagged [N, D] like every encoder of the platform; the stack pads them to the longest sequence of
the batch (right padding: with the causal mask a real query never sees a padded key) and drops the padding
again at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.data import to_jagged, to_padded

INIT_STD = 0.02  # GPT-2's weight scale


@dataclass
class GPTConfig:
    """Sizes of one GPT stack; built from a recipe (``ModelConfig.encoder``), which holds the defaults."""

    dim: int  # D
    blocks: int
    heads: int  # D must be divisible by heads
    ffn_dim: int  # F, the MLP width (resolved: never 0 here)
    max_len: int
    dropout: float  # attention weights, and each residual branch's output


def gpt2_init(module: nn.Module, blocks: int) -> None:
    """GPT-2's initialisation of a block stack: Linear N(0, 0.02) with zero bias, residual projections (every
    parameter named ``*.proj.weight``) N(0, 0.02 / sqrt(2 * blocks)). Norm layers keep their (1, 0) init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith(".proj.weight"):
            nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * blocks))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} must be divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # fused Q, K, V
        self.proj = nn.Linear(cfg.dim, cfg.dim)  # writes into the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, D = x.shape
        h = self.cfg.heads
        q, k, v = (t.view(B, n, h, D // h).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))  # [B, h, n, d]
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B, h, n, d]
        y = y.transpose(1, 2).reshape(B, n, D)
        return F.dropout(self.proj(y), p=self.cfg.dropout, training=self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.dim)  # writes into the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, n, D] -> [B, n, F] -> [B, n, D]; exact (erf) GELU, as nanoGPT
        return F.dropout(self.proj(F.gelu(self.fc(x))), p=self.cfg.dropout, training=self.training)


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # [B, n, D]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Stack of GPT blocks + final LayerNorm. Input and output: [N, D] jagged values."""

    learned_positions = True  # SequentialRecommender adds its learned position embedding to the inputs

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([GPTBlock(cfg) for _ in range(cfg.blocks)])
        self.ln_f = nn.LayerNorm(cfg.dim)
        gpt2_init(self, cfg.blocks)

    def forward(
        self,
        x: torch.Tensor,  # [N, D]
        offsets: torch.Tensor,  # [B + 1]
        timestamps: torch.Tensor | None = None,  # unused: kept for a common encoder signature
        query_timestamps: torch.Tensor | None = None,  # unused
    ) -> torch.Tensor:
        xd, _ = to_padded(x, offsets, self.cfg.max_len)  # [B, n, D]
        for block in self.blocks:
            xd = block(xd)
        return to_jagged(self.ln_f(xd), offsets, x.shape[0])  # [N, D]


__all__ = ["GPT", "GPTBlock", "GPTConfig", "CausalSelfAttention", "MLP", "gpt2_init", "to_jagged", "to_padded"]
