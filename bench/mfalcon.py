"""M-FALCON benchmark: one request's candidates scored in one forward pass vs one forward per candidate.

``models.hstu_ranker`` scores a request's m candidates with M-FALCON: the history's tokens run once (causal)
and each block's K, V of the history are kept; then all m candidates go through the blocks as one batch, each
attending to the cached history and to itself. The reference, ``score_naive``, runs m full forwards over
[history tokens, candidate], each through the stock jagged ``HSTU.forward``. This bench times both on one
synthetic request (one user, ``--history`` events = 2 x that many tokens, ``--candidates`` items, times
spread over a year before the request) and checks they give the same logits.

Sizes: the HSTU ranker's defaults (``HSTURankerConfig``: dim 32, 2 blocks, 2 heads, d_qk = d_v = 16, 1,024
item buckets), except ``history_events``, set to ``--history`` so the whole history is read. The weights are
drawn from N(0, ``--weights-std``) (the initialisation's 0.02 leaves the attention near zero, which would make
the equality check weak; speed does not depend on the values).

Timing: ``torch.set_num_threads(--threads)`` (default 1), inference mode, one warm-up call of each path.
M-FALCON: median of ``--repeats`` calls. Naive: ``--naive-sample`` single-candidate forwards timed (default:
all candidates), scaled to all candidates when fewer; the output says which. ``max_abs_diff`` is over the
logits of the candidates the naive path scored.

The LAST line printed is one JSON object: ``bench``, ``candidates``, ``history_events``, ``history_tokens``,
``mfalcon_ms``, ``naive_ms`` (for all candidates), ``naive_timed`` (forwards actually timed), ``naive_scaled``,
``speedup``, ``max_abs_diff`` (and ``max_abs_logit`` for scale), ``threads``, ``sizes``, ``weights_std``,
``seed``, ``argv``.

    python -m bench.mfalcon                                   # 1,000 candidates, 200-event history
    python -m bench.mfalcon --candidates 1000 --history 200 --naive-sample 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace

import numpy as np

T_MS = 1_700_000_000_000  # the request's time
YEAR_MS = 365 * 24 * 3600 * 1000


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=1000, help="m, candidates of the one request")
    ap.add_argument("--history", type=int, default=200, help="history events (each is two tokens)")
    ap.add_argument("--naive-sample", type=int, default=None,
                    help="time this many single-candidate forwards and scale to --candidates (default: all)")
    ap.add_argument("--repeats", type=int, default=5, help="M-FALCON calls timed (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--weights-std", type=float, default=0.1, help="std of the random weights")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.candidates < 1 or args.history < 0 or args.repeats < 1 or args.threads < 1:
        ap.error("--candidates, --repeats and --threads must be >= 1, --history >= 0")
    args.naive = min(args.naive_sample or args.candidates, args.candidates)
    if args.naive < 1:
        ap.error("--naive-sample must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    import torch

    from features.events import EVENT_TYPE_CODES
    from models.hstu_ranker import HSTURanker, HSTURankerConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = replace(HSTURankerConfig(), history_events=args.history)
    model = HSTURanker(cfg, ("engaged", "like", "skip")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, args.weights_std)

    rng = np.random.default_rng(args.seed)
    items = rng.integers(0, 100_000, args.history)
    types = rng.choice(sorted(EVENT_TYPE_CODES.values()), size=args.history)
    times = np.sort(T_MS - rng.integers(1_000, YEAR_MS, args.history))  # oldest first, all before t
    candidates = rng.integers(0, 100_000, args.candidates)
    ranks = np.arange(args.candidates)  # a ranked list: the rank feature varies too
    request = (items, types, times, T_MS)

    with torch.inference_mode():
        model.score_mfalcon(*request, candidates[:8], ranks[:8])  # warm-up
        model.score_naive(*request, candidates[:1], ranks[:1])
        laps = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            fast = model.score_mfalcon(*request, candidates, ranks)
            laps.append(time.perf_counter() - began)
        began = time.perf_counter()
        slow = model.score_naive(*request, candidates[: args.naive], ranks[: args.naive])
        naive_s = (time.perf_counter() - began) * args.candidates / args.naive

    mfalcon_ms = statistics.median(laps) * 1000
    naive_ms = naive_s * 1000
    diff = float((fast[: args.naive] - slow).abs().max())
    scaled = args.naive < args.candidates
    print(f"M-FALCON: {args.candidates} candidates, {args.history}-event history ({2 * args.history} tokens): "
          f"{mfalcon_ms:.1f} ms (median of {args.repeats})", file=sys.stderr)
    print(f"naive:    {args.naive} single-candidate forwards timed"
          + (f", scaled x{args.candidates / args.naive:g} to {args.candidates}" if scaled else "")
          + f": {naive_ms:.1f} ms", file=sys.stderr)
    print(f"speedup {naive_ms / mfalcon_ms:.1f}x, max |logit difference| {diff:.2e} on {args.naive} candidates, "
          f"{args.threads} thread(s)", file=sys.stderr)
    sizes = {k: v for k, v in asdict(cfg).items() if k not in ("dropout",)} | {"max_len": cfg.max_len}
    out = {
        "bench": "mfalcon",
        "candidates": args.candidates,
        "history_events": args.history,
        "history_tokens": 2 * args.history,
        "mfalcon_ms": round(mfalcon_ms, 3),
        "naive_ms": round(naive_ms, 3),
        "naive_timed": args.naive,
        "naive_scaled": scaled,
        "speedup": round(naive_ms / mfalcon_ms, 2),
        "max_abs_diff": diff,
        "max_abs_logit": float(fast.abs().max()),
        "threads": args.threads,
        "sizes": sizes,
        "weights_std": args.weights_std,
        "seed": args.seed,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
