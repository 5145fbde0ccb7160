"""Quality and training-speed benchmark: train one config on one dataset, rank the full catalogue.

Protocol: leave-one-out (last positive event = test, second-last = validation), full-catalogue ranking
with the user's history filtered out (the catalogue: every item of the dataset's item file, such as ML-1M's
``movies.dat``, where there is one, as the reference's ``all_item_ids``; else the items of the events), early stopping on validation NDCG@10 (see ``models/train.py``). Configs
with ``validation: false`` (the ML-1M paper configs) follow the papers instead: no validation split, every
epoch runs, the final weights are tested. Configs with ``seen_filter: window`` (the same ML-1M configs) filter
only the ``max_len`` events the model reads, as the reference's eval does; their JSON also carries
``history_filtered``: the same weights ranked with the whole history filtered out (the figures before 2026-12-01).
The LAST line printed is one JSON object with ``hr@1 hr@10 hr@50 hr@200 ndcg@10 ndcg@50 ndcg@200 mrr``,
``config``, ``epochs``, ``wall_s`` and ``tokens_per_s`` (input events of the training windows processed per second
of training, validation excluded: events a window leaves out, such as those before a user's latest ``max_len``
on ML-1M, are not counted) and ``events_per_s`` (the dataset's events x epochs / training seconds). Where the
test targets carry both reactions (the MovieLens paper configs rank every rating), ``by_reaction`` holds
HR@10/50/200, NDCG@10 and MRR over the targets the user reacted to positively and negatively, apart.
``--history FILE`` also keeps every held-out target's rank under the kept weights (``ranks``: per split, the
target events and their 0-based ranks), so that ``bench.compare --users`` can pair two configs user by user.

    python -m bench.quality --dataset ml-100k --dataset-dir ../shared/data/ml-100k --config hstu-ml100k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic",
                    choices=["synthetic", "ml-100k", "ml-1m", "ml-20m", "ml-25m", "amazon", "yambda"])
    ap.add_argument("--dataset-dir", dest="dataset_dir", type=Path, default=None,
                    help="the dataset's folder; its item file "
                         "(u.item, movies.dat, movies.csv), where present, is the catalogue ranked, unrated items included")
    ap.add_argument("--config", default="default", help="a recipe under models/configs/ or a YAML path")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--seed", type=int, default=None, help="override the config's seed (repeat runs to see the spread)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--history", type=Path, default=None, metavar="FILE",
                    help="also write the per-epoch history, the final figures and every held-out target's rank here as JSON (for "
                         "bench.curves and bench.compare); "
                         "rewritten after every epoch, so a run stopped midway keeps its curve (\"finished\": false)")
    args = ap.parse_args(argv)

    from features.replay import dataset_catalogue, events_frame
    from infra.settings import EncoreSettings
    from models.recipe import resolve_recipe
    from models.train import train

    cfg = resolve_recipe(args.config, **{k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None})
    df = events_frame(args.dataset, EncoreSettings(), args.dataset_dir)
    catalogue = dataset_catalogue(args.dataset, args.dataset_dir)
    epochs_so_far: list[dict] = []

    def save_epoch(epoch: int, record: dict) -> None:
        # a 101-epoch ML-1M run takes hours on a CPU: if it is stopped, the epochs it finished stay on disk
        epochs_so_far.append(record)
        _write_json(args.history, {"config": args.config, "dataset": args.dataset, "seed": cfg.seed,
                                   "finished": False, "history": epochs_so_far})

    result = train(df, cfg, progress=args.progress, on_epoch=save_epoch if args.history is not None else None,
                   catalogue=catalogue)
    train_s = sum(h.get("train_s", 0.0) for h in result.history)
    out = {k: round(float(result.test_metrics[k]), 4) for k in KEYS if k in result.test_metrics}
    if "feedback_auc" in result.test_metrics:
        out["feedback_auc"] = round(float(result.test_metrics["feedback_auc"]), 4)
    if "positive_share" in result.test_metrics:  # targets of both reactions: the figures per reaction
        out["by_reaction"] = {k: round(float(v), 4) for k, v in result.test_metrics.items()
                              if k.startswith(("positive_", "negative_"))}
    if result.valid_metrics:  # the best validation epoch's figures: what to compare when choosing a config
        out.update({f"valid_{k}": round(float(result.valid_metrics[k]), 4) for k in ("hr@10", "ndcg@10")})
    out.update({"config": args.config, "dataset": args.dataset, "seed": cfg.seed, "epochs": len(result.history),
                "best_epoch": result.best_epoch, "wall_s": round(result.wall_s, 3),
                "tokens_per_s": round(result.extra["train_tokens"] * len(result.history) / train_s) if train_s else None,
                # the dataset's events over the same time: what sizes a retrain from a snapshot's event count
                "events_per_s": round(len(df) * len(result.history) / train_s) if train_s else None,
                "params": result.num_params,
                # candidates ranked: the item file's catalogue where the dataset has one, else the rated items
                "items": len(result.vocab), "unrated_items": len(result.vocab) - int(df["item_id"].nunique())})
    if cfg.seen_filter == "window":
        out["history_filtered"] = _history_filtered(df, cfg, result)
    if args.history is not None:
        # each held-out target's event index and 0-based rank under the kept weights, per split: what
        # bench.compare --users pairs user by user across runs on the same data (the metrics above are their means)
        ranks = {name: {"event": r.event.tolist(), "rank": r.rank.tolist()} for name, r in result.ranked.items() if len(r.rank)}
        _write_json(args.history, {**out, "finished": True, "history": result.history, "ranks": ranks})
    print(json.dumps(out))
    return out


def _write_json(path: Path, obj: dict) -> None:
    """Write-then-rename: a reader (or a kill mid-write) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _history_filtered(df, cfg, result) -> dict[str, float]:  # noqa: ANN001 - DataFrame, TrainConfig, TrainResult
    """Test metrics of the trained weights with every earlier item of the user filtered, not just the window."""
    from models.data import build_sequences, with_targets
    from models.evaluate import evaluate
    from models.train import make_split

    seqs = with_targets(build_sequences(df, vocab=result.vocab), cfg.targets)  # the trained vocabulary's sequences
    test = make_split(seqs, cfg.replace(seen_filter="history")).test
    metrics = evaluate(result.model, seqs, test, batch_size=cfg.eval_batch_size)
    return {k: round(float(metrics[k]), 4) for k in KEYS}


if __name__ == "__main__":
    main()
