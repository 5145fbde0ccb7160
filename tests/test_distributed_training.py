"""The distributed trainer (``models.distributed``) on 1 and 2 processes, and its Dagster Pipes asset.

Equivalence, not just "both train": the trainer defines one optimisation step as one *global* batch
whatever the world size (each rank takes every world-th window of it; its loss is its share of the global
mean; the sampled negatives are the same on every rank; DDP and TorchRec average gradients over ranks, so
the loss is scaled by the world size to make the averages sums). With dropout 0 the 2-process run is then
the 1-process run up to floating-point summation order, and the test compares the trained *parameters*,
the per-epoch loss curve and the test metrics of the two runs tightly. It fails on any change that makes the
runs merely similar: per-rank negatives (parameters differ by up to 0.55), per-rank mean losses or a missing
world-size scale (differences of 1e-4 to 2e-4 of a tensor's magnitude, against about 8e-6 when correct).
"""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from models.data import build_sequences
from models.recommender import Recommender
from models.train import TrainConfig, make_split
from orchestration.assets.training import (
    DistributedTrainingConfig,
    distributed_trained_model,
    torchrun_command,
)
from orchestration.resources import EncoreResource
from tests.test_models import synthetic_events

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# Small enough for 2 CPU cores (15 epochs x 4 global batches, ~2 s of training per run), large enough to learn
# the toy world well past the most-popular baseline. Dropout 0: dropout masks are drawn per rank. dim 18 is not a
# multiple of 4, which FBGEMM's sharded kernel needs: the tables are stored 20 wide (models.recommender.table_dim),
# the path the d = 50 paper configs take under DMP. Heads of 8 (not 9) keep the dense matmuls on widths whose
# float rounding stays small: with 9-wide heads the two runs drift apart to 2e-4 (measured; 3e-6 with 8).
CONFIG = {"model": "hstu", "max_len": 20, "dim": 18, "blocks": 2, "heads": 2, "attn_dim": 8, "linear_dim": 8, "dropout": 0.0, "negatives": 16,
          "temperature": 0.05, "feedback_weight": 0.5, "batch_size": 16, "lr": 0.01, "epochs": 15, "seed": 7,
          "split": "loo"}
# Parameters of the two runs may differ by this fraction of each tensor's largest magnitude. Measured: 8e-6
# after 60 steps (summation order of float32 sums on one rank vs two ranks plus an all-reduce; Adam and
# row-wise Adagrad normalise updates, which lets such rounding differences grow a little over the steps).
PARAM_RTOL = 5e-5
# Per-epoch mean losses: measured equal to 1e-6 relative.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    events = synthetic_events(users=60, items=40)  # 1,500 events, 60 users, 40 items
    data = root / "events.parquet"
    events.to_parquet(data, index=False)
    config = root / "toy.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    train = make_split(build_sequences(events), TrainConfig.from_dict(dict(CONFIG))).train
    return {"root": root, "data": data, "config": config, "events": events, "train_windows": len(train),
            "train_tokens": train.num_inputs}


def torchrun(nproc: int, toy: dict, out: Path) -> Recommender:
    """``models.distributed`` under torchrun, as bench/train_speed.py and the Dagster asset launch it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "models.distributed", "--config", str(toy["config"]), "--data", str(toy["data"]), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return Recommender.load(out)


def test_one_and_two_processes_take_the_same_steps(toy):
    one = torchrun(1, toy, toy["root"] / "one")
    two = torchrun(2, toy, toy["root"] / "two")
    a, b = one.metadata["training"], two.metadata["training"]
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["sharding"]["model.embeddings.item"] == "row_wise" and b["dense_replicas_in_sync"]
    steps = CONFIG["epochs"] * math.ceil(toy["train_windows"] / CONFIG["batch_size"])
    assert a["steps"] == b["steps"] == steps  # same global batches, not half as many per rank
    assert a["train_tokens_per_epoch"] == b["train_tokens_per_epoch"] == toy["train_tokens"]  # bench/train_speed's tokens

    # It trained (so equality below is not two untouched initialisations): loss down 50x, and both runs
    # clearly beat most-popular on the held-out last events.
    assert a["history"][-1]["loss"] < a["history"][0]["loss"] / 20
    for m in (a, b):
        assert m["test_metrics"]["ndcg@10"] > m["popularity_test_metrics"]["ndcg@10"] + 0.2, m

    for ea, eb in zip(a["history"], b["history"], strict=True):
        assert eb["loss"] == pytest.approx(ea["loss"], rel=LOSS_RTOL), (ea, eb)
        assert eb["feedback_loss"] == pytest.approx(ea["feedback_loss"], rel=LOSS_RTOL, abs=1e-6), (ea, eb)
    sa, sb = one.model.state_dict(), two.model.state_dict()
    assert sa.keys() == sb.keys()
    worst = {k: float((sa[k] - sb[k]).abs().max() / sa[k].abs().max().clamp(min=1e-12)) for k in sa}
    assert max(worst.values()) < PARAM_RTOL, worst
    # Equal weights rank equally; a near-tie could still flip one of the 60 test users.
    for k in ("hr@1", "hr@10", "ndcg@10", "mrr"):
        assert b["test_metrics"][k] == pytest.approx(a["test_metrics"][k], abs=1 / 60), k


def test_dagster_asset_launches_torchrun_through_pipes_and_reports_rank_zero_metrics(toy):
    @dg.asset(name="training_dataset", group_name="training")
    def toy_training_dataset() -> dict:
        """Stands in for the Feast snapshot: the same dict shape (a parquet path and its digest)."""
        return {"path": str(toy["data"]), "snapshot": "toy", "events": len(toy["events"]), "users": 60}

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [toy_training_dataset, distributed_trained_model],
        instance=instance,
        resources={"encore": EncoreResource(data_dir=str(toy["root"] / "encore")),
                   "pipes_subprocess_client": dg.PipesSubprocessClient(env={"OMP_NUM_THREADS": "1"})},
        run_config={"ops": {"distributed_trained_model": {"config": {"config": str(toy["config"]),
                                                                     "nproc_per_node": 2}}}},
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("distributed_trained_model")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["world_size"] == 2 and meta["nodes"] == 1 and meta["backend"] == "gloo"
    assert "--standalone --nproc_per_node 2 -m models.distributed" in meta["command"]
    assert len(meta["history"]) == CONFIG["epochs"]
    assert meta["test/ndcg@10"] > meta["popularity/ndcg@10"] + 0.2

    # What Dagster received is what rank 0 computed and saved with the model.
    rec = Recommender.load(meta["dir"])
    saved = rec.metadata["training"]
    assert meta["test_metrics"] == saved["test_metrics"]
    assert meta["test/ndcg@10"] == saved["test_metrics"]["ndcg@10"]
    assert meta["final_loss"] == saved["history"][-1]["loss"]
    assert result.output_for_node("distributed_trained_model")["dir"] == meta["dir"]

    # One rank reported: one materialisation (above) and each epoch logged once.
    logs = [e.user_message for e in instance.all_logs(result.run_id) if "[dmp x2] epoch" in e.user_message]
    assert len(logs) == CONFIG["epochs"], logs
    instance.dispose()


def test_two_node_c10d_rendezvous_with_the_asset_on_one_node(toy):
    """Two "nodes" on this machine: the asset launches one torchrun agent (1 process) with a c10d rendezvous,
    the test starts the other agent the way a cluster would (same command, no Dagster Pipes in its
    environment). The rendezvous numbers the nodes itself, so the asset's process may be rank 1: it must
    still report rank 0's figures (broadcast to it), and only it reports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"config": str(toy["config"]), "epochs": 2, "nproc_per_node": 1, "nnodes": 2,
              "rdzv_endpoint": f"127.0.0.1:{port}", "rdzv_id": "two-nodes"}
    out = toy["root"] / "two-nodes"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    other = subprocess.Popen(torchrun_command(DistributedTrainingConfig(**config), str(toy["data"]), str(out), "-"),
                             cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)

    @dg.asset(name="training_dataset", group_name="training")
    def toy_training_dataset() -> dict:
        return {"path": str(toy["data"]), "snapshot": "toy", "events": len(toy["events"]), "users": 60}

    instance = dg.DagsterInstance.ephemeral()
    try:
        result = dg.materialize(
            [toy_training_dataset, distributed_trained_model], instance=instance,
            resources={"encore": EncoreResource(data_dir=str(toy["root"] / "encore-2n")),
                       "pipes_subprocess_client": dg.PipesSubprocessClient(env={"OMP_NUM_THREADS": "1"})},
            run_config={"ops": {"distributed_trained_model": {"config": config}}},
        )
        log, _ = other.communicate(timeout=120)
    finally:
        if other.poll() is None:  # the asset failed before the rendezvous closed: do not leave it waiting
            other.kill()
            other.wait()
    assert result.success and other.returncode == 0, log[-3000:]
    (mat,) = result.asset_materializations_for_node("distributed_trained_model")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert (meta["world_size"], meta["nodes"], meta["epochs"]) == (2, 2, 2)
    assert "--nnodes 2 --rdzv_backend c10d" in meta["command"]
    saved = Recommender.load(meta["dir"]).metadata["training"]  # whichever node held rank 0 saved it
    assert meta["test_metrics"] == saved["test_metrics"] and meta["history"] == saved["history"]
    logs = [e.user_message for e in instance.all_logs(result.run_id) if "[dmp x2] epoch" in e.user_message]
    assert len(logs) == 2, logs
    instance.dispose()


def test_train_speed_echoes_a_run_as_it_goes_and_keeps_its_tail_for_the_error(capfd):
    from bench.train_speed import stream

    script = "import sys; print('epoch 1: loss 5.0', flush=True); print('boom', file=sys.stderr); sys.exit(3)"
    returncode, tail = stream([sys.executable, "-c", script], timeout_s=60)
    assert returncode == 3 and tail == ["epoch 1: loss 5.0\n", "boom\n"]
    assert "epoch 1: loss 5.0" in capfd.readouterr().err  # on stderr: stdout is kept for the JSON line

    returncode, tail = stream([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert returncode == -9 and "killed after 1 s" in tail[-1]
