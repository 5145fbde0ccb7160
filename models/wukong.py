"""Wukong (Zhang et al., Meta 2024, "Wukong: Towards a Scaling Law for Large-Scale Recommendation").

The input is a set of n *embedding units* X_0 in R^{n x d} (one per sparse feature, a few more made from the
dense features; see ``models.ranker.FeatureEncoder``). A stack of l Wukong layers turns units into units:

    X_{i+1} = LN( concat(FMB(X_i), LCB(X_i)) + residual(X_i) )        # [n_F + n_L, d]

    FMB(X)  = reshape( MLP( LN( flatten( FM(X) ) ) ), (n_F, d) )      # Factorization Machine Block
    FM(X)   = X X^T                  in R^{n x n}                     # every pairwise dot product
            = X (X^T Y) = (X X^T) Y  in R^{n x k}   (rank k)          # the paper's optimised FM: Y in R^{n x k}
                                                                      # is learned; cost O(n k d), not O(n^2 d)
    LCB(X)  = W_L X,   W_L in R^{n_L x n}                             # Linear Compress Block: recombines units

``residual`` is the identity when n_F + n_L == n and a learned linear map over the units otherwise. Stacking
layers raises the order of the interactions: layer i's FMB sees products of layer i-1's units, so after l
layers the model holds interactions of order up to 2^l, while the LCB keeps the lower orders alive. The
scaling knobs of the paper's sweep are exactly the config fields: layers l, units n_F / n_L, rank k, MLP width.

The head flattens the last layer's units and maps them through an MLP to one logit per task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class WukongConfig:
    """Sizes of one Wukong stack. ``fmb_rank`` None: the full n x n interaction matrix."""

    dim: int = 32  # d, the width of every unit
    num_units: int = 8  # n, units entering the first layer (from the feature encoder)
    layers: int = 2
    fmb_units: int = 4  # n_F
    lcb_units: int = 4  # n_L
    fmb_rank: int | None = 4  # k
    mlp_hidden: int = 128  # hidden width of the FMB MLP and of the head
    mlp_layers: int = 2  # linear layers in the FMB MLP
    dropout: float = 0.0
    num_tasks: int = 1

    @property
    def layer_units(self) -> int:
        """Units leaving every layer."""
        return self.fmb_units + self.lcb_units


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU -> dropout between every pair of sizes; the last Linear stays linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class FMBlock(nn.Module):
    """Factorization Machine Block: pairwise dot products of the units -> MLP -> n_F new units."""

    def __init__(self, num_units: int, cfg: WukongConfig):
        super().__init__()
        self.cfg = cfg
        self.num_units = num_units
        # Y: the low-rank projection of the interaction matrix's columns (the paper's optimised FM).
        self.proj = nn.Parameter(torch.randn(num_units, cfg.fmb_rank) / num_units**0.5) if cfg.fmb_rank else None
        width = num_units * (cfg.fmb_rank or num_units)
        self.norm = nn.LayerNorm(width)
        hidden = [cfg.mlp_hidden] * (cfg.mlp_layers - 1)
        self.mlp = mlp([width, *hidden, cfg.fmb_units * cfg.dim], cfg.dropout)

    def interactions(self, x: torch.Tensor) -> torch.Tensor:
        """FM(X): [B, n, d] -> [B, n, k] (or [B, n, n] without a rank)."""
        if self.proj is None:
            return x @ x.transpose(1, 2)  # [B, n, n]: entry (i, j) = <x_i, x_j>
        xty = x.transpose(1, 2) @ self.proj  # [B, d, k]: project first, so no n x n matrix is ever built
        return x @ xty  # [B, n, k] = (X X^T) Y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        fm = self.interactions(x).flatten(1)  # [B, n * k]
        out = self.mlp(self.norm(fm))  # [B, n_F * d]
        return out.view(B, self.cfg.fmb_units, self.cfg.dim)  # [B, n_F, d]


class LCBlock(nn.Module):
    """Linear Compress Block: n_L learned linear combinations of the n units (no mixing inside a unit)."""

    def __init__(self, num_units: int, cfg: WukongConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.lcb_units, num_units) / num_units**0.5)  # W_L [n_L, n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ln,bnd->bld", self.weight, x)  # [B, n_L, d]


class WukongLayer(nn.Module):
    """X -> LN(concat(FMB(X), LCB(X)) + residual(X)): [B, n, d] -> [B, n_F + n_L, d]."""

    def __init__(self, num_units: int, cfg: WukongConfig):
        super().__init__()
        self.fmb = FMBlock(num_units, cfg)
        self.lcb = LCBlock(num_units, cfg)
        out_units = cfg.layer_units
        # The residual must match the output's unit count; a linear map over units when the count changes.
        self.residual = nn.Identity() if out_units == num_units else LCBlock(num_units, _with_lcb(cfg, out_units))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.fmb(x), self.lcb(x)], dim=1)  # [B, n_F + n_L, d]
        return self.norm(y + self.residual(x))


def _with_lcb(cfg: WukongConfig, units: int) -> WukongConfig:
    return WukongConfig(**{**cfg.__dict__, "lcb_units": units})


class Wukong(nn.Module):
    """Stack of Wukong layers + head: units [B, n, d] -> logits [B, num_tasks]."""

    def __init__(self, cfg: WukongConfig):
        super().__init__()
        self.cfg = cfg
        units = [cfg.num_units] + [cfg.layer_units] * cfg.layers
        self.layers = nn.ModuleList(WukongLayer(n, cfg) for n in units[:-1])
        self.head = mlp([units[-1] * cfg.dim, cfg.mlp_hidden, cfg.num_tasks], cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)  # [B, n_F + n_L, d]
        return self.head(x.flatten(1))  # [B, num_tasks]
