"""Training speed and time-to-quality: one HSTU config under DistributedModelParallel on 1 and on 2 processes.

Each run is ``torchrun --standalone --nproc_per_node N -m models.distributed`` (gloo on CPU, NCCL on GPU): the
item table sharded row-wise across the ranks (fused sparse optimiser), the same global batches and negatives
whatever N. Every ``--validate-every`` epochs the shards are gathered and scored on the validation split (on the
test split, for a config with ``validation: false``: the papers' protocol, whose reference logs test every epoch).
The run's loop is models.train's: the config's ``patience`` may stop it before ``--epochs``.

* tokens/s = input events of the training windows x epochs run / training seconds (validation, start-up and sharding
  plan excluded; a user's events before the latest ``max_len + 1`` of a window are not counted: never trained);
* time-to-quality = training seconds until that NDCG@10 first reaches ``--target-ndcg`` (default: 95% of the
  best the 1-process run reaches; e.g. 0.1720 for the HSTU paper's ML-1M figure), for each run.

The LAST line printed is one JSON object.

    python -m bench.train_speed --config default --epochs 12 --validate-every 1   # the synthetic world
    python -m bench.train_speed --dataset ml-100k --dataset-dir ../shared/data/ml-100k --config my.yaml
    python -m bench.train_speed --dataset ml-1m --dataset-dir DIR --config hstu-ml1m --epochs 4 --validate-every 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, config: str, data: Path, epochs: int, validate_every: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "models.distributed", "--config", config, "--data", str(data), "--epochs", str(epochs),
           "--validate-every", str(validate_every), "--out", str(out)]
    t0 = time.monotonic()
    returncode, tail = stream(cmd, timeout_s=7200)
    wall = time.monotonic() - t0
    if returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed (exit {returncode}); its last lines:\n" + "".join(tail))
    training = json.loads((out / "config.json").read_text())["metadata"]["training"]
    history = training["history"]
    trained = list(itertools.accumulate(h["train_s"] for h in history))  # training seconds after each epoch
    return {"processes": nproc, "wall_s": round(wall, 1), "train_s": round(trained[-1], 1), "epochs": len(history),
            "train_tokens_per_epoch": training["train_tokens_per_epoch"],
            "test": {k: round(v, 4) for k, v in training["test_metrics"].items() if k != "count"},
            "curve_split": curve_split(history),
            "curve": [(round(t, 1), h[f"{curve_split(history)}_ndcg@10"]) for t, h in zip(trained, history)
                      if h.get(f"{curve_split(history)}_ndcg@10") is not None]}


def stream(cmd: list[str], timeout_s: float) -> tuple[int, list[str]]:
    """Run ``cmd``, echoing its output to stderr line by line as it comes (an ML-1M run takes most of an hour:
    its per-epoch lines are the progress report; stdout stays free for the JSON line). -> (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                sys.stderr.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            tail.append(f"killed after {timeout_s:.0f} s\n")
            returncode = -9
        reader.join(timeout=10)
    return returncode, list(tail)


def curve_split(history: list[dict]) -> str:
    """``valid``, or ``test`` for a config without a validation split (the papers' protocol, which logs test)."""
    return "valid" if any("valid_ndcg@10" in h for h in history) else "test"


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at the first validation that reaches ``target`` (None: never)."""
    return next((t for t, q in curve if q >= target), None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic",
                    choices=["synthetic", "ml-100k", "ml-1m", "ml-20m", "ml-25m", "amazon", "yambda"])
    ap.add_argument("--dataset-dir", dest="dataset_dir", type=Path, default=None,
                    help="the dataset's folder")
    ap.add_argument("--config", default="default", help="a recipe under models/configs/ or a YAML path")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--validate-every", type=int, default=2, metavar="K")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], metavar="N",
                    help="world sizes to run, in order; the first one sets the default target")
    ap.add_argument("--target-ndcg", type=float, default=None,
                    help="NDCG@10 (validation, or test without a validation split) that counts as 'reached quality' (default: 95%% of the 1-process best)")
    args = ap.parse_args(argv)

    from features.replay import events_frame
    from infra.settings import EncoreSettings

    df = events_frame(args.dataset, EncoreSettings(), args.dataset_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "events.parquet"
        df.to_parquet(data, index=False)
        runs = [run(n, args.config, data, args.epochs, args.validate_every, Path(tmp) / f"model-{n}") for n in args.processes]
    for r in runs:
        # epochs run: early stopping (the config's patience) may end a run before --epochs
        r["tokens_per_s"] = round(r["train_tokens_per_epoch"] * r["epochs"] / r["train_s"]) if r["train_s"] else None
        r["events_per_s"] = round(len(df) * r["epochs"] / r["train_s"]) if r["train_s"] else None
        r["best_ndcg@10"] = max((q for _, q in r["curve"]), default=None)
    best_one = runs[0]["best_ndcg@10"]
    target = args.target_ndcg if args.target_ndcg is not None else (0.95 * best_one if best_one else None)
    for r in runs:
        r["time_to_target_s"] = time_to(r["curve"], target) if target is not None else None
    out = {"config": args.config, "dataset": args.dataset, "events": len(df), "epochs": args.epochs,
           "target_ndcg@10": round(target, 4) if target is not None else None, "runs": runs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
