"""SASRec (Kang & McAuley, 2018), as the baseline of the HSTU paper (generative-recommenders' sasrec.py).

One block on a padded batch x [B, n, D]:

    q = LayerNorm(x)
    x = q + MultiHeadAttention(q, x, x, causal)     # softmax(Q K^T / sqrt(d)) V; queries normalised only
    x = LayerNorm(x)
    x = x + FFN(x)                                   # point-wise: Linear -> ReLU -> dropout -> Linear -> dropout
    x = x * valid                                    # keep padding at zero

As in the reference: LayerNorms without affine parameters (eps 1e-8), no final LayerNorm (the output is
L2-normalised), weight matrices initialised Xavier-normal (the query/key/value projections as one [3D, D]
matrix, as torch's MultiheadAttention holds them) and attention biases at zero. Inputs (sqrt(d)-scaled
item embeddings + learned positions, dropout) and the L2 normalised output come from the shared ``models.recommender.SequentialRecommender``, exactly as the HSTU
paper's SASRec baseline shares them. Time stamps are ignored: SASRec has no temporal signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.data import to_jagged, to_padded


@dataclass
class SASRecConfig:
    """Sizes of one SASRec stack; built from a recipe (``ModelConfig.encoder``), which holds the defaults."""

    dim: int
    blocks: int
    heads: int
    ffn_dim: int
    max_len: int
    dropout: float


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        assert cfg.dim % cfg.heads == 0, "dim must be divisible by heads"
        self.cfg = cfg
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        qkv = nn.init.xavier_normal_(torch.empty(3 * cfg.dim, cfg.dim))  # fan of the fused projection
        with torch.no_grad():
            self.q.weight.copy_(qkv[: cfg.dim])
            self.kv.weight.copy_(qkv[cfg.dim :])
        nn.init.xavier_normal_(self.out.weight)
        for b in (self.q.bias, self.kv.bias, self.out.bias):
            nn.init.zeros_(b)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        B, n, D = q_in.shape
        h = self.cfg.heads
        q = self.q(q_in).view(B, n, h, D // h).transpose(1, 2)  # [B, h, n, d]
        k, v = (t.view(B, n, h, D // h).transpose(1, 2) for t in self.kv(kv_in).split(D, dim=-1))
        # softmax(q k^T / sqrt(d) + causal) v. With right padding, the causal mask alone keeps every real
        # query away from padded keys, so no key-padding mask is needed.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.cfg.dropout if self.training else 0.0
        )  # [B, h, n, d]
        return self.out(y.transpose(1, 2).reshape(B, n, D))


class PointWiseFeedForward(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)  # the reference's kernel-size-1 Conv1d
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        nn.init.xavier_normal_(self.fc1.weight)
        nn.init.xavier_normal_(self.fc2.weight)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class SASRecBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = CausalSelfAttention(cfg)
        self.ffn = PointWiseFeedForward(cfg)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # x: [B, n, D], valid: [B, n, 1]
        ln = lambda t: F.layer_norm(t, (self.cfg.dim,), eps=1e-8)  # noqa: E731
        q = ln(x)
        x = q + self.attn(q, x)  # original SASRec: residual from the *normalised* queries
        x = ln(x)
        x = x + self.ffn(x)
        return x * valid


class SASRec(nn.Module):
    """Stack of SASRec blocks. Input and output: [N, D] jagged values (padded internally to the batch max)."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([SASRecBlock(cfg) for _ in range(cfg.blocks)])

    def forward(
        self,
        x: torch.Tensor,  # [N, D]
        offsets: torch.Tensor,  # [B + 1]
        timestamps: torch.Tensor | None = None,  # unused: kept for a common encoder signature
        query_timestamps: torch.Tensor | None = None,  # unused
    ) -> torch.Tensor:
        lengths = offsets[1:] - offsets[:-1]
        xd, n = to_padded(x, offsets, self.cfg.max_len)  # [B, n, D]
        valid = (torch.arange(n, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            xd = block(xd, valid)
        return to_jagged(xd, offsets, x.shape[0])  # [N, D]


__all__ = ["SASRec", "SASRecBlock", "SASRecConfig", "CausalSelfAttention", "PointWiseFeedForward"]
