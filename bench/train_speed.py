"""Training speed: the same HSTU config under DistributedModelParallel on 1 and on 2 processes (torchrun, gloo).

Each run shards the item table row-wise across its ranks (fused sparse optimiser) and trains the same
epochs on the same data; tokens/s = history events × epochs / wall seconds of the run (start-up, sharding
plan and final evaluation included, so it understates pure step speed). The LAST line is one JSON object.

    python -m bench.train_speed --config default --epochs 4
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, config: str, data: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "models.distributed", "--config", config, "--data", str(data), "--epochs", str(epochs)]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    test = re.search(r"test (\{.*?\}) wall_s", out.stdout)
    metrics = ast.literal_eval(test.group(1)) if test else {}  # the dict rank 0 prints
    return {"processes": nproc, "wall_s": round(wall, 1), "hr@10": metrics.get("hr@10"),
            "ndcg@10": metrics.get("ndcg@10")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args(argv)

    from features.simulator import MusicWorld
    from infra.settings import EncoreSettings

    df = MusicWorld(EncoreSettings().simulator).history_frame()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "events.parquet"
        df.to_parquet(data, index=False)
        runs = [run(n, args.config, data, args.epochs) for n in (1, 2)]
    for r in runs:
        r["tokens_per_s"] = round(len(df) * args.epochs / r["wall_s"])
    out = {"config": args.config, "events": len(df), "epochs": args.epochs, "runs": runs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
