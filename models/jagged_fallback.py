"""PyTorch kernels for the four FBGEMM jagged ops the models use, for a GPU whose fbgemm_gpu has no CUDA build.

The models keep histories jagged with FBGEMM's ops (``asynchronous_complete_cumsum``,
``jagged_to_padded_dense``, ``dense_to_jagged``). The CUDA build of fbgemm_gpu (``fbgemm-gpu``) must match the
CUDA of the installed PyTorch exactly and is a ~500 MB wheel; where only the CPU build (``fbgemm-gpu-cpu``) is
installed beside a CUDA PyTorch, those ops have no CUDA kernel and single-process GPU training would stop at the
first batch. :func:`register_missing` fills exactly those gaps: for each op whose CUDA kernel is missing it
registers the plain-PyTorch equivalent below under FBGEMM's own schema, so the model code, FBGEMM's autograd
formulas and the CPU path are unchanged. Ops that do have a CUDA kernel are left alone, and nothing is registered
on a machine without CUDA.

What this does not cover: sharded training (``models/distributed.py``) needs FBGEMM's CUDA table-batched
embedding kernels, which have no such fallback; install ``fbgemm-gpu`` for that.

Shapes (one jagged dimension, the only kind used here): B sequences, offsets [B + 1], N = offsets[-1] values,
n = the padded length. Every kernel is written without a host sync (no boolean-mask indexing, no ``.item()``),
so the GPU is never stalled waiting for the CPU.
"""

from __future__ import annotations

import logging

import fbgemm_gpu  # noqa: F401  (defines the fbgemm:: op schemas these kernels are registered under)
import torch

log = logging.getLogger(__name__)


def complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """[B] -> [B + 1]: 0 then the running total, e.g. [2, 3] -> [0, 2, 5]."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0).to(lengths.dtype)])


def _padded_index(offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the value index of padded slot [b, p] = offsets[b] + p [B, n], whether that slot holds a value [B, n])."""
    pos = torch.arange(n, device=offsets.device)
    index = offsets[:-1, None] + pos  # [B, n]
    return index, pos < (offsets[1:] - offsets[:-1])[:, None]


def jagged_to_padded_dense(values: torch.Tensor, offsets: list[torch.Tensor], max_lengths: list[int],
                           padding_value: float = 0.0) -> torch.Tensor:
    """values [N, *] -> [B, n, *]: sequence b's first min(len_b, n) values, then ``padding_value``."""
    (off,), (n,) = offsets, max_lengths
    index, valid = _padded_index(off, n)
    if values.shape[0] == 0:
        return values.new_full((off.numel() - 1, n, *values.shape[1:]), padding_value)
    gathered = values[index.clamp(max=values.shape[0] - 1)]  # [B, n, *]; clamped slots are padding anyway
    valid = valid.view(*valid.shape, *([1] * (values.dim() - 1)))
    return torch.where(valid, gathered, gathered.new_full((), padding_value))


def jagged_to_padded_dense_backward(grad_output: torch.Tensor, offsets: list[torch.Tensor], total_L: int) -> torch.Tensor:
    """The gradient of :func:`jagged_to_padded_dense`: grad_output [B, n, *] -> [N, *], zero for values past n."""
    (off,) = offsets
    B, n = grad_output.shape[:2]
    index, valid = _padded_index(off, n)
    tail = grad_output.shape[2:]
    # Padding slots all go to a spare row N, dropped after: no boolean indexing, so no host sync.
    index = torch.where(valid, index, total_L).reshape(-1)
    grad = grad_output.new_zeros((total_L + 1, *tail))
    grad.index_add_(0, index, grad_output.reshape(B * n, *tail))
    return grad[:total_L]


def dense_to_jagged(dense: torch.Tensor, offsets: list[torch.Tensor], total_L: int | None = None) -> torch.Tensor:
    """dense [B, n, *] -> [N, *]: value j of sequence b is dense[b, j - offsets[b]], zero where that is past n."""
    (off,) = offsets
    B, n = dense.shape[:2]
    N = int(off[-1]) if total_L is None else int(total_L)
    row = torch.repeat_interleave(torch.arange(B, device=off.device), off[1:] - off[:-1], output_size=N)  # [N]
    pos = torch.arange(N, device=off.device) - off[:-1][row]  # [N]
    flat = dense.reshape(B * n, *dense.shape[2:])
    out = flat[row * n + pos.clamp(max=n - 1)]  # [N, *]
    keep = (pos < n).view(N, *([1] * (dense.dim() - 2)))
    return torch.where(keep, out, out.new_zeros(()))


# fbgemm op name -> its PyTorch kernel. The user-facing ops (jagged_to_padded_dense, dense_to_jagged) are
# composite: FBGEMM routes them through these, and its autograd formulas call the backward op below.
KERNELS = {
    "asynchronous_complete_cumsum": complete_cumsum,
    "jagged_to_padded_dense_forward": jagged_to_padded_dense,
    "jagged_to_padded_dense_backward": jagged_to_padded_dense_backward,
    "dense_to_jagged_forward": dense_to_jagged,
}

_libraries: list[torch.library.Library] = []  # a registration lives as long as its Library object


def missing(dispatch_key: str = "CUDA") -> list[str]:
    """The ops of :data:`KERNELS` that have no kernel for ``dispatch_key``."""
    return [op for op in KERNELS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{op}", dispatch_key)]


def register_missing(dispatch_key: str = "CUDA", *, ops: list[str] | None = None) -> list[str]:
    """Register the PyTorch kernels for the ops without a ``dispatch_key`` kernel (or for ``ops``, which may
    replace existing kernels: how the tests run them on CPU). -> the ops registered. A no-op on CUDA without a GPU."""
    if dispatch_key == "CUDA" and not torch.cuda.is_available():
        return []
    ops = missing(dispatch_key) if ops is None else ops
    if ops:
        lib = torch.library.Library("fbgemm", "IMPL")  # noqa: TOR901 - adds kernels to fbgemm's own schemas
        for op in ops:
            lib.impl(op, KERNELS[op], dispatch_key)
        _libraries.append(lib)
        log.warning("fbgemm_gpu has no %s kernel for %s: using the PyTorch ones in models.jagged_fallback "
                    "(install the fbgemm-gpu build that matches this PyTorch for FBGEMM's own)", dispatch_key, ", ".join(ops))
    return ops
