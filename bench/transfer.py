"""Transfer bench (SRT-style): pre-train on three Amazon domains, fine-tune on Beauty, against Beauty from scratch.

    python -m bench.transfer --data-dir ../shared/data --sizes dim=16 dim=32 dim=64 --seeds 0 1 2 \\
        --fraction 0.25 --pretrain-epochs 10 --finetune-epochs 20 --recipe hstu-beauty

``--data-dir`` holds ``amazon-beauty/``, ``amazon-sports/`` and ``amazon-toys/`` (the 5-core sequence files).
Half of Beauty's users (``--target-share``) are held out of pre-training entirely; pre-training sees Sports,
Toys and the other half of Beauty (``models.transfer.three_domain_corpus``). The fine-tune frame is a
``--fraction`` of the held-out users, the same for every size and seed. Per size (``key=value`` recipe
overrides, comma-separated for several keys: ``dim=64,blocks=4``) one pre-training, then per seed a fine-tuned
and a from-scratch run with the same recipe and epochs (``models.transfer.run_transfer``).

Statistics (``paired_gains``): every run ranks the same Beauty test targets (one per fine-tune user), so the gain
fine-tuned - scratch is paired by seed and by user, and its 95% interval comes from ``bench.compare``'s two-way
bootstrap (seeds and users resampled independently). Whether the gain grows with size: the same bootstrap of
(gain at the largest size - gain at the smallest), sizes ordered by non-embedding parameters.

``--max-users N`` keeps a seeded N users of each domain (a quick check on the real files); ``--pretrain-max-steps``
caps pre-training (timing). Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.compare import BOOTSTRAP, bootstrap, per_target

DOMAIN_DIRS = {"beauty": "amazon-beauty", "sports": "amazon-sports", "toys": "amazon-toys"}
GAIN_METRICS = ("hr@10", "ndcg@10")


def load_domains(data_dir: Path, max_users: int | None = None, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The three Amazon domains' frames (``features.datasets.load_frame("amazon", ...)``), each optionally cut to a
    seeded sample of ``max_users`` users (whole sequences)."""
    from features.datasets import load_frame

    frames = {}
    for name, folder in DOMAIN_DIRS.items():
        frame = load_frame("amazon", data_dir / folder)
        if max_users is not None:
            users = np.unique(frame["user_id"].to_numpy())
            if max_users < len(users):
                keep = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
                frame = frame[frame["user_id"].isin(keep)].reset_index(drop=True)
        frames[name] = frame
    return frames


def _ranks(rows: Sequence[Any], size: str, arm: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(events [T], ranks [seeds, T], catalogue size) of one arm of one size, seeds ascending."""
    picked = sorted((r for r in rows if r.size == size and r.arm == arm), key=lambda r: r.seed)
    if not picked or any(r.ranked is None for r in picked):
        raise ValueError(f"no ranked test targets for {arm} at {size}")
    events = picked[0].ranked.event
    if any(not np.array_equal(r.ranked.event, events) for r in picked):
        raise ValueError(f"{arm} runs at {size} rank different test targets: not the same fine-tune frame")
    return events, np.stack([r.ranked.rank for r in picked]).astype(float), picked[0].items


def gain_per_target(rows: Sequence[Any], size: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(events [T], fine-tuned - scratch [seeds, T]) of ``metric`` per test target."""
    ev_ft, r_ft, n_ft = _ranks(rows, size, "finetune")
    ev_sc, r_sc, n_sc = _ranks(rows, size, "scratch")
    if not np.array_equal(ev_ft, ev_sc) or n_ft != n_sc or r_ft.shape != r_sc.shape:
        raise ValueError(f"fine-tuned and scratch runs at {size} rank different targets or catalogues")
    return ev_ft, per_target(metric, r_ft, n_ft) - per_target(metric, r_sc, n_sc)


def paired_gains(rows: Sequence[Any], metrics: Sequence[str] = GAIN_METRICS, draws: int = BOOTSTRAP,
                 seed: int = 0) -> dict[str, Any]:
    """Per size and metric: both means, the gain and its 95% interval (seeds x users bootstrap); then the gain's
    growth from the smallest to the largest size (by non-embedding parameters) with its interval."""
    rng = np.random.default_rng(seed)
    pre = {r.size: r for r in rows if r.arm == "pretrain"}
    sizes = sorted(pre, key=lambda s: pre[s].non_embedding_params)
    out: dict[str, Any] = {"sizes": sizes, "gains": [], "growth": []}
    gains: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for size in sizes:
        for metric in metrics:
            events, d = gain_per_target(rows, size, metric)  # [seeds, T]
            gains[size, metric] = events, d
            ft = float(np.mean([getattr(r, _field(metric)) for r in rows if r.size == size and r.arm == "finetune"]))
            sc = float(np.mean([getattr(r, _field(metric)) for r in rows if r.size == size and r.arm == "scratch"]))
            out["gains"].append({"size": size, "metric": metric, "seeds": d.shape[0], "users": d.shape[1],
                                 "finetune": ft, "scratch": sc, "gain": float(d.mean()), **bootstrap(d, rng, draws)})
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        for metric in metrics:
            (ev_s, d_s), (ev_l, d_l) = gains[small, metric], gains[large, metric]
            if not np.array_equal(ev_s, ev_l) or d_s.shape != d_l.shape:
                raise ValueError("the sizes rank different targets or seeds: cannot pair their gains")
            d = d_l - d_s  # [seeds, T]: seed s and user u pair across sizes, as within one
            out["growth"].append({"large": large, "small": small, "metric": metric, "gain_large": float(d_l.mean()),
                                  "gain_small": float(d_s.mean()), "difference": float(d.mean()),
                                  **bootstrap(d, rng, draws)})
    return out


def _field(metric: str) -> str:
    return {"hr@10": "hr10", "ndcg@10": "ndcg10"}[metric]


def parse_size(text: str) -> dict[str, str]:
    """``dim=64,blocks=4`` -> {"dim": "64", "blocks": "4"} (the recipe reads text as each key's type)."""
    size = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"a size is key=value[,key=value...], got {text!r}")
        size[key.strip()] = value.strip()
    return size


def table(stats: dict[str, Any]) -> str:
    lines = ["| size | metric | fine-tuned | scratch | gain | 95% interval | p |", "|---|---|---|---|---|---|---|"]
    for g in stats["gains"]:
        lines.append(f"| {g['size']} | {g['metric']} | {g['finetune']:.4f} | {g['scratch']:.4f} | {g['gain']:+.4f} "
                     f"| {g['ci_low']:+.4f} to {g['ci_high']:+.4f} | {g['p']:.3f} |")
    for g in stats["growth"]:
        lines.append(f"| {g['large']} - {g['small']} | {g['metric']} gain | | | {g['difference']:+.4f} "
                     f"| {g['ci_low']:+.4f} to {g['ci_high']:+.4f} | {g['p']:.3f} |")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.transfer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="holds amazon-beauty/, amazon-sports/, amazon-toys/")
    ap.add_argument("--sizes", nargs="+", default=["dim=16", "dim=32", "dim=64"],
                    help="recipe overrides per size, key=value[,key=value] (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.25, help="share of the held-out Beauty users fine-tuned on")
    ap.add_argument("--target-share", type=float, default=0.5, help="share of Beauty users held out of pre-training")
    ap.add_argument("--recipe", default="hstu-beauty")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="default: the recipe's (early stopping off)")
    ap.add_argument("--pretrain-max-steps", type=int, default=None, help="cap pre-training's steps (timing runs)")
    ap.add_argument("--max-users", type=int, default=None, help="a seeded sample of this many users per domain")
    ap.add_argument("--device", default=None, help="recipe override for every run (default: the recipe's, auto)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="resamples of seeds and users")
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1 or not 0 < args.target_share < 1:
        ap.error("--fraction must be in (0, 1] and --target-share in (0, 1)")
    try:
        args.size_list = [parse_size(s) for s in args.sizes]
    except ValueError as err:
        ap.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    import torch

    from models.transfer import run_transfer, three_domain_corpus

    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    frames = load_domains(args.data_dir, args.max_users)
    loaded = ", ".join(f"{k}: {len(v)} events" for k, v in frames.items())
    log(f"loaded {loaded} in {time.perf_counter() - started:.1f} s")
    corpus = three_domain_corpus(frames, target="beauty", target_share=args.target_share, seed=0)
    rows = run_transfer(corpus, args.size_list, args.seeds, args.fraction, args.recipe,
                        pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.finetune_epochs,
                        overrides={"device": args.device} if args.device else None,
                        pretrain_max_steps=args.pretrain_max_steps, log=log)
    stats = paired_gains(rows, draws=args.bootstrap)
    log(table(stats))
    out = {
        "bench": "transfer", "recipe": args.recipe, "sizes": args.sizes, "seeds": args.seeds,
        "fraction": args.fraction, "target_share": args.target_share, "max_users": args.max_users,
        "corpus": corpus.summary(), "rows": [r.record() for r in rows], **stats,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(out, default=_json_default))
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return None if isinstance(value, np.floating) and math.isnan(value) else value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    main()
