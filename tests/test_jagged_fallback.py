"""The PyTorch kernels that stand in for FBGEMM's CUDA jagged ops equal FBGEMM's own CPU kernels, values and
gradients, and a whole training run on them is bit-identical to one on FBGEMM's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fbgemm_gpu  # noqa: F401
import pytest
import torch

from models import jagged_fallback as jf

ROOT = Path(__file__).resolve().parents[1]


def _jagged(lengths: list[int], tail: tuple[int, ...] = (3,), dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths_t)
    values = torch.randn(int(lengths_t.sum()), *tail, generator=g, dtype=dtype)
    return lengths_t, offsets, values


CASES = [([2, 0, 5, 1], 5), ([2, 0, 5, 1], 3), ([7], 7), ([0, 0], 2), ([1, 4, 4, 2, 9], 6)]  # n < max length truncates


@pytest.mark.parametrize("lengths,n", CASES)
def test_complete_cumsum_equals_fbgemms(lengths, n):
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    assert torch.equal(jf.complete_cumsum(lengths_t), torch.ops.fbgemm.asynchronous_complete_cumsum(lengths_t))
    assert torch.equal(jf.complete_cumsum(lengths_t.int()), torch.ops.fbgemm.asynchronous_complete_cumsum(lengths_t.int()))


@pytest.mark.parametrize("lengths,n", CASES)
@pytest.mark.parametrize("pad", [0.0, -1.5])
def test_jagged_to_padded_dense_and_its_gradient_equal_fbgemms(lengths, n, pad):
    _, offsets, values = _jagged(lengths)
    ours = jf.jagged_to_padded_dense(values, [offsets], [n], pad)
    theirs = torch.ops.fbgemm.jagged_to_padded_dense_forward(values, [offsets], [n], pad)
    assert ours.shape == theirs.shape == (len(lengths), n, 3)
    assert torch.equal(ours, theirs)
    grad = torch.randn(len(lengths), n, 3, dtype=torch.float32)
    total = values.shape[0]
    assert torch.equal(jf.jagged_to_padded_dense_backward(grad, [offsets], total),
                       torch.ops.fbgemm.jagged_to_padded_dense_backward(grad, [offsets], total))


@pytest.mark.parametrize("lengths,n", CASES)
def test_dense_to_jagged_equals_fbgemms(lengths, n):
    _, offsets, values = _jagged(lengths)
    dense = torch.randn(len(lengths), n, 3, dtype=torch.float32)
    total = values.shape[0]
    theirs = torch.ops.fbgemm.dense_to_jagged_forward(dense, [offsets], total)
    assert torch.equal(jf.dense_to_jagged(dense, [offsets], total), theirs)
    assert torch.equal(jf.dense_to_jagged(dense, [offsets]), theirs)


def test_one_column_values_keep_their_shape():
    """The HSTU's timestamps go through as [N, 1]."""
    _, offsets, values = _jagged([3, 1], tail=(1,))
    assert torch.equal(jf.jagged_to_padded_dense(values, [offsets], [4], 0.0),
                       torch.ops.fbgemm.jagged_to_padded_dense_forward(values, [offsets], [4], 0.0))


def test_nothing_is_registered_for_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert jf.register_missing("CUDA") == []


def test_training_on_the_fallback_kernels_is_bit_identical_to_fbgemms(tmp_path):
    """FBGEMM's autograd formulas run through the fallback kernels (registered over FBGEMM's CPU kernels in a
    separate process): same seed, same weights, so the same metrics to the last bit."""
    script = """
import json, sys
import numpy as np, pandas as pd
if sys.argv[1] == "fallback":
    from models import jagged_fallback as jf
    assert jf.register_missing("CPU", ops=list(jf.KERNELS)) == list(jf.KERNELS)
from models.recipe import resolve_recipe
from models.train import train
rng = np.random.default_rng(0)
rows = []
for u in range(60):
    cur, t = int(rng.integers(40)), 1_700_000_000_000
    for i in range(int(rng.integers(5, 30))):
        cur, t = (cur + 1) % 40, t + int(rng.integers(1_000, 3_600_000))
        rows.append((u, 100 + cur, "listen" if i % 3 else "skip", t, 0.9))
df = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp_ms", "played_ratio"])
for model in ("hstu", "sasrec"):
    cfg = resolve_recipe("base", model=model, epochs=2, dim=16, blocks=2, heads=2, max_len=12, negatives=8, batch_size=16, seed=3)
    r = train(df, cfg, progress=False)
    print(json.dumps({"model": model, "loss": r.history[-1]["loss"], **r.test_metrics}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(mode: str) -> list[dict]:
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    fbgemm, fallback = run("fbgemm"), run("fallback")
    assert len(fbgemm) == 2 and fbgemm == fallback
