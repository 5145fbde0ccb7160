"""Learning curves of ``bench.quality --history FILE`` runs in one PNG, beside the published figures.

    python -m bench.curves runs/hstu-ml1m.json runs/sasrec-ml1m.json --metric hr@10 \\
        --published hstu-ml1m=0.3097 sasrec-ml1m=0.2853 --out docs/img/ml1m-hr10.png

Each run is named by its ``config`` (and its file name too when several runs share a config: seeds, data
variants); a config's published line is drawn once. By default validation metrics are drawn when the run had a
validation split, else the test metrics the papers' protocol logs (``validation: false``), which select nothing;
``--split test`` draws the test log of every run (runs with validation log it with ``log_test_every``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="JSON files written by bench.quality --history")
    ap.add_argument("--metric", default="hr@10", help="hr@10, ndcg@10, ... (default: hr@10)")
    ap.add_argument("--published", nargs="*", default=[], metavar="CONFIG=VALUE",
                    help="a dashed reference line per config, e.g. hstu-ml1m=0.3097")
    ap.add_argument("--split", choices=["auto", "valid", "test"], default="auto",
                    help="auto: validation where a run has it, else its test log; test: every run's test log")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args(argv)

    from models.plots import learning_curves

    published = {}
    for item in args.published:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--published takes CONFIG=VALUE, got {item!r}")
        published[name] = float(value)
    runs, lines = name_runs({path: json.loads(path.read_text()) for path in args.runs}, published)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = learning_curves(runs, args.out, args.metric, lines, split=args.split)
    print(out)
    return out


def name_runs(runs: dict[Path, dict], published: dict[str, float]) -> tuple[dict[str, list], dict[str, float]]:
    """(label -> history, label -> published figure): a run is labelled by its config, or ``config (file stem)``
    when another run has the same config, so no run silently replaces another; each config's published
    figure goes to its first run only (one dashed line per config)."""
    configs = {path: Path(str(run["config"])).stem for path, run in runs.items()}
    shared = {c for c, n in Counter(configs.values()).items() if n > 1}
    histories: dict[str, list] = {}
    lines: dict[str, float] = {}
    drawn: set[str] = set()
    for path, run in runs.items():
        config = configs[path]
        label = f"{config} ({path.stem})" if config in shared else config
        histories[label] = run["history"]
        if config in published and config not in drawn:
            lines[label] = published[config]
            drawn.add(config)
    return histories, lines


if __name__ == "__main__":
    main()
