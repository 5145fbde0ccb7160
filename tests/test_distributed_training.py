"""The distributed trainer (``models.distributed``) on 1 and 2 processes, and its Dagster Pipes asset.

Equivalence, not just "both train": the trainer defines one optimisation step as one *global* batch
whatever the world size (each rank takes every world-th window of it; its loss is its share of the global
mean; the sampled negatives are the same on every rank; DDP and TorchRec average gradients over ranks, so
the loss is scaled by the world size to make the averages sums). With dropout 0 the 2-process run is then
the 1-process run up to floating-point summation order, and the test compares the trained *parameters*,
the per-epoch loss curve and the test metrics of the two runs tightly. It fails on any change that makes the
runs merely similar: per-rank negatives (parameters differ by up to 0.55), per-rank mean losses or a missing
world-size scale (differences of 1e-4 to 2e-4 of a tensor's magnitude, against about 8e-6 when correct).

The loop around the steps is models.train's: under DMP too the best validation epoch's weights are kept,
early stopping stops every rank at the epoch one process stops at, and a run resumed from its per-rank
checkpoints ends bit-identical to one never interrupted (2 processes, ``DRIVER``).
"""

import inspect
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from models.data import build_sequences
from models.recommender import Recommender
import models.train
from models.recipe import BASE_RECIPE, resolve_recipe
from models.train import make_split, train
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
# Validated once, after the last epoch: the weights kept are the last ones, the steps the two runs are compared
# on (a near-tie of validation scores could make them keep different epochs; the choice is tested below).
CONFIG = {"model": "hstu", "max_len": 20, "dim": 18, "blocks": 2, "heads": 2, "attn_dim": 8, "linear_dim": 8, "dropout": 0.0, "negatives": 16,
          "temperature": 0.05, "feedback_weight": 0.5, "batch_size": 16, "lr": 0.01, "epochs": 15, "eval_every": 15, "seed": 7,
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
    train = make_split(build_sequences(events), resolve_recipe(BASE_RECIPE, **CONFIG)).train
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


def script_validation(scores: list[float]) -> tuple[dict, list, list]:
    """Stand-ins for ``models.train``'s make_split, rank_targets and split_metrics under which validation NDCG@10
    reads ``scores``, one per validation, and each validation records the weights it saw and its ranking (the
    test split keeps the real figures). -> (the stand-ins by name, the weights, the rankings). Self-contained:
    ``DRIVER`` runs its source too."""
    import models.train as loop

    scores_left, snapshots, rankings, valid = iter(scores), [], [], {}
    real_make_split, real_rank_targets, real_split_metrics = loop.make_split, loop.rank_targets, loop.split_metrics

    def make_split(seqs, cfg):  # noqa: ANN001, ANN202 - the stand-in's signature is the real one's
        split = real_make_split(seqs, cfg)
        valid["examples"] = split.valid
        return split

    def rank_targets(model, seqs, examples, batch_size):  # noqa: ANN001, ANN202
        ranked = real_rank_targets(model, seqs, examples, batch_size=batch_size)
        if examples is valid["examples"]:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            rankings.append(ranked)  # kept alive, so identity tells them apart
        return ranked

    def split_metrics(ranked, num_items, *, feedback):  # noqa: ANN001, ANN202
        if any(ranked is r for r in rankings):
            return {"ndcg@10": next(scores_left), "hr@10": 0.0}
        return real_split_metrics(ranked, num_items, feedback=feedback)

    return {"make_split": make_split, "rank_targets": rank_targets, "split_metrics": split_metrics}, snapshots, rankings


# Run by torchrun in each process: ``python DRIVER SCENARIO EVENTS CONFIG_JSON OUT SCORES_JSON``; rank 0 writes
# result.json and weights.pt, every rank the epochs it ran. ``script_validation``'s source is put in front of it.
DRIVER = """
import json, os, sys
from pathlib import Path

import pandas as pd
import torch

import models.train
from models.distributed import train_distributed
from models.recipe import resolve_recipe

scenario, events, cfg, out = sys.argv[1], pd.read_parquet(sys.argv[2]), resolve_recipe("base", **json.loads(sys.argv[3])), Path(sys.argv[4])
rank = int(os.environ["RANK"])


def timeless(history):
    return [{k: v for k, v in h.items() if k not in ("train_s", "epoch_s")} for h in history]


def run(cfg, epochs_seen, **kwargs):
    return train_distributed(events, cfg, backend="gloo", progress=False, on_epoch=lambda e, r: epochs_seen.append(e), **kwargs)


if scenario == "stop":
    fakes, snapshots, rankings = script_validation(json.loads(sys.argv[5]))
    for name, fake in fakes.items():
        setattr(models.train, name, fake)  # rank 0 validates: only it calls them
    seen = []
    result = run(cfg, seen)
    (out / f"epochs-rank{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        torch.save({"snapshots": snapshots, "final": result.model.state_dict()}, out / "weights.pt")
        best = result.best_epoch
        (out / "result.json").write_text(json.dumps({
            "history": timeless(result.history), "best_epoch": best, "valid_metrics": result.valid_metrics,
            "kept_ranking_is_the_best_epochs": result.ranked["valid"] is rankings[best - 1]}))

elif scenario == "resume":
    scores, ckpt = json.loads(sys.argv[5]), out / "checkpoints"

    def script_from(validation):  # the run's validations read the scores from this one on
        for name, fake in script_validation(scores[validation:])[0].items():
            setattr(models.train, name, fake)

    class Interrupted(Exception):
        pass

    def interrupt_after_epoch_4(epoch, record):
        if epoch == 4:  # before epoch 4's checkpoint: the files hold epoch 3
            raise Interrupted

    script_from(0)
    whole = run(cfg, [])
    script_from(0)
    try:
        train_distributed(events, cfg.replace(checkpoint_dir=str(ckpt)), backend="gloo", progress=False,
                          on_epoch=interrupt_after_epoch_4)
    except Interrupted:
        pass
    script_from(3)
    seen = []
    resumed = run(cfg.replace(checkpoint_dir=str(ckpt)), seen)
    refused = []
    for change, kwargs in (("config", {"cfg": cfg.replace(checkpoint_dir=str(ckpt), lr=cfg.lr / 2)}),
                           ("sparse_lr", {"cfg": cfg.replace(checkpoint_dir=str(ckpt)), "sparse_lr": 0.5})):
        try:
            run(epochs_seen=[], **kwargs)
        except ValueError as e:
            refused.append([change, str(e)])
    (out / f"epochs-rank{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        torch.save({"whole": whole.model.state_dict(), "resumed": resumed.model.state_dict()}, out / "weights.pt")
        (out / "result.json").write_text(json.dumps({  # as JSON text, where NaN (a feedback AUC) equals NaN
            "whole": json.dumps([timeless(whole.history), whole.best_epoch, whole.valid_metrics, whole.test_metrics]),
            "resumed": json.dumps([timeless(resumed.history), resumed.best_epoch, resumed.valid_metrics, resumed.test_metrics]),
            "refused": refused}))
"""


def run_driver(toy: dict, scenario: str, cfg: dict, out: Path, *args: str) -> tuple[dict, dict, list[list[int]]]:
    """``DRIVER`` on 2 processes -> (rank 0's result.json, its weights.pt, the epochs each rank ran)."""
    out.mkdir(parents=True)
    script = out / "driver.py"
    script.write_text("from __future__ import annotations\n" + inspect.getsource(script_validation) + DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), scenario,
           str(toy["data"]), json.dumps(cfg), str(out), *args]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # ranks that disagree wait for each other forever
            proc.terminate()  # torchrun stops its workers on SIGTERM (each runs in a session of its own)
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"{scenario}: the ranks hung (stopped after 120 s)\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    epochs = [json.loads((out / f"epochs-rank{r}.json").read_text()) for r in range(2)]
    return json.loads((out / "result.json").read_text()), torch.load(out / "weights.pt"), epochs


# Validation NDCG@10 scripted as 0.1, 0.3, 0.2, 0.2, 0.2, 0.25: epoch 2 is best, and patience 2 stops after the
# second evaluation without a new best (epoch 4); the test split is logged every 3 epochs and on the stop.
STOP = {**CONFIG, "epochs": 6, "eval_every": 1, "patience": 2, "log_test_every": 3}
SCORES = [0.1, 0.3, 0.2, 0.2, 0.2, 0.25]


def test_early_stopping_under_dmp_stops_every_rank_where_one_process_stops_and_keeps_the_best_weights(toy, monkeypatch):
    fakes, _, _ = script_validation(SCORES)
    for name, fake in fakes.items():
        monkeypatch.setattr(models.train, name, fake)
    one = train(toy["events"], resolve_recipe(BASE_RECIPE, **STOP), progress=False)  # the single-process loop
    monkeypatch.undo()

    result, weights, epochs = run_driver(toy, "stop", STOP, toy["root"] / "stop", json.dumps(SCORES))
    assert epochs == [[1, 2, 3, 4], [1, 2, 3, 4]]  # both ranks stopped, after the same epoch
    assert len(result["history"]) == len(one.history) == 4 and result["best_epoch"] == one.best_epoch == 2
    logged = [[int(h["epoch"]) for h in history if "test_ndcg@10" in h] for history in (result["history"], one.history)]
    assert logged == [[3, 4], [3, 4]]
    assert result["valid_metrics"]["ndcg@10"] == 0.3 and result["kept_ranking_is_the_best_epochs"]
    final, snapshots = weights["final"], weights["snapshots"]  # snapshots[i]: the gathered weights epoch i + 1 validated
    assert final.keys() == snapshots[1].keys()
    assert all(torch.equal(final[k], v) for k, v in snapshots[1].items())  # epoch 2's weights, gathered on rank 0
    assert not all(torch.equal(final[k], v) for k, v in snapshots[3].items())  # training had moved on


def test_a_dmp_run_resumed_from_its_checkpoints_ends_as_if_never_interrupted(toy):
    """Validation NDCG@10 scripted as 0.1, 0.3, 0.2, 0.2, 0.25: epoch 2 is best, patience 3 stops after epoch 5.
    Interrupted after epoch 4 (its files hold epoch 3: the best weights, one evaluation without a new best) and
    started again, the run stops after epoch 5 too, with the same history, best epoch and weights, bit for bit,
    as a run never interrupted. Dropout 0.2: the per-rank dropout generators must be restored too. The
    checkpoints refuse another config, another sparse optimiser, and a single process."""
    cfg = {**CONFIG, "epochs": 6, "eval_every": 1, "patience": 3, "dropout": 0.2}
    result, weights, epochs = run_driver(toy, "resume", cfg, toy["root"] / "resume", json.dumps([0.1, 0.3, 0.2, 0.2, 0.25]))
    assert epochs == [[4, 5], [4, 5]]  # only the epochs after the checkpoint ran again, and both ranks stopped
    history, best_epoch, *_ = json.loads(result["whole"])
    assert len(history) == 5 and best_epoch == 2
    assert result["resumed"] == result["whole"]  # history (timings aside), best epoch, valid and test figures
    whole, resumed = weights["whole"], weights["resumed"]
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [change for change, _ in result["refused"]] == ["config", "sparse_lr"], result["refused"]
    assert "another config" in result["refused"][0][1]
    with pytest.raises(ValueError, match="another number of processes"):
        train(toy["events"], resolve_recipe(BASE_RECIPE, **{**cfg, "checkpoint_dir": str(toy["root"] / "resume" / "checkpoints")}),
              progress=False)


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
        run_config={"ops": {"distributed_trained_model": {"config": {"recipe": str(toy["config"]),
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
    config = {"recipe": str(toy["config"]), "epochs": 2, "nproc_per_node": 1, "nnodes": 2,
              "rdzv_endpoint": f"127.0.0.1:{port}", "rdzv_id": "two-nodes"}
    out = toy["root"] / "two-nodes"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    # the other node trains what the asset's step resolves (the toy recipe, 2 epochs), from its own copy of the file
    recipe = toy["root"] / "two-nodes-recipe.yaml"
    recipe.write_text(resolve_recipe(toy["config"], epochs=2).to_yaml())
    other = subprocess.Popen(torchrun_command(DistributedTrainingConfig(**config), str(recipe), str(toy["data"]),
                                              str(out), "-"),
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
