"""A MovieLens copy without each user's last N ratings: leave-one-out one rating earlier.

Leave-one-out always holds out each user's *last* rating, so every comparison of two models on one dataset rests
on one set of targets: which ratings happened to be the users' last is a sample of its own (see "what 943 test
users can resolve", docs/journal/2026-12-05-ml100k-what-943-test-users-resolve.md). This writes the same dataset with each user's last ``--drop`` ratings
removed; ``bench.quality`` on the copy then tests on the users' ``drop + 1``-th-last rating and validates on the
one before, with everything else unchanged. The ratings dropped are the last in the order ``models.data`` gives a
user's events (by time, ties in file order); the lines kept are written byte for byte, in file order, and the
item file is copied, so the catalogue ranked is the same.

    python -m bench.drop_last --dataset ml-100k --dataset-dir ../shared/data/ml-100k --out ml-100k-drop1
    python -m bench.quality --dataset ml-100k --dataset-dir ml-100k-drop1 --config hstu-ml100k
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from features.datasets import movielens_files

DATASETS = ("ml-100k", "ml-1m", "ml-20m", "ml-25m")


def last_ratings(users: np.ndarray, timestamps: np.ndarray, drop: int) -> np.ndarray:
    """Line numbers of each user's last ``drop`` ratings (by time, ties in file order), ascending."""
    order = np.lexsort((timestamps, users))  # stable: per user by time, equal times in file order
    by_user = users[order]
    starts = np.r_[0, np.flatnonzero(by_user[1:] != by_user[:-1]) + 1]
    ends = np.r_[starts[1:], len(order)]
    from_end = np.repeat(ends, ends - starts) - 1 - np.arange(len(order))  # 0: a user's last rating, 1: the one before
    return np.sort(order[from_end < drop])


def drop_last(dataset: str, data_dir: Path, out: Path, drop: int = 1) -> dict[str, int]:
    """Write ``out``: the dataset without each user's last ``drop`` ratings; returns the counts."""
    if drop < 1:
        raise ValueError(f"--drop must be at least 1, not {drop}")
    files = movielens_files(dataset, data_dir)  # found where the loaders look for them
    lines = files.ratings_bytes().splitlines(keepends=True)
    head, lines = (lines[:1], lines[1:]) if files.header else ([], lines)  # a header line is kept as it is
    sep = files.separator.encode()
    try:
        fields = [line.split(sep) for line in lines]
        users = np.array([int(f[0]) for f in fields], dtype=np.int64)
        timestamps = np.array([int(f[3]) for f in fields], dtype=np.int64)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{files.ratings.name}: not a {dataset} ratings file (user{files.separator}item"
                         f"{files.separator}rating{files.separator}timestamp per line)") from exc
    dropped = last_ratings(users, timestamps, drop)
    keep = np.ones(len(lines), dtype=bool)
    keep[dropped] = False
    out.mkdir(parents=True, exist_ok=True)
    (out / files.ratings.name.removesuffix(".gz")).write_bytes(b"".join(head + [line for line, k in zip(lines, keep) if k]))
    if files.items is not None:  # the same catalogue: unrated movies stay candidates
        shutil.copyfile(files.items, out / files.items.name)
    return {"ratings": len(lines), "dropped": int(len(dropped)), "kept": int(keep.sum()),
            "users": int(len(np.unique(users)))}


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--dataset-dir", dest="dataset_dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the folder to write (created; its files are replaced)")
    ap.add_argument("--drop", type=int, default=1, help="ratings to drop from the end of each user's history")
    args = ap.parse_args(argv)
    try:
        counts = drop_last(args.dataset, args.dataset_dir, args.out, args.drop)
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    print(f"{args.out}: {counts['kept']:,} of {counts['ratings']:,} ratings kept, each of {counts['users']:,} users' "
          f"last {args.drop} dropped ({counts['dropped']:,})")
    return counts


if __name__ == "__main__":
    main()
