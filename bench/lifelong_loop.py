"""Closed-loop A/B of a lifelong-history arm (VISTA) against a window arm (HSTU) on ``LifelongWorld``.

    encore bench lifelong-loop --users 200 --min-events 3000 --max-events 6000 --world artists=400 \\
        --world max_tracks=8 --world min_favourites=60 --world max_favourites=150 --epochs 12 --rounds 10 --save DIR
    encore bench lifelong-loop ... --models DIR      # the saved arms, no training
    encore bench lifelong-loop --smoke --epochs 1 --rounds 2     # seconds: the harness end to end

What it does, in order:

1. builds the world as ``bench.lifelong`` does (``--users``, ``--world KEY=VALUE``, ...), then trains the two
   recipes (``--treatment vista-lifelong``, ``--control hstu-lifelong``) on its history under that bench's protocol
   (``bench.lifelong.resolve_config``: VISTA reads ``--recent`` raw events plus its summary, HSTU ``--window``);
   or loads them from ``--models DIR`` (``--save DIR`` writes them there, with the world and the training they
   belong to, which a later ``--models`` run must match). ``--rounds 0`` trains and saves only.
2. **paired replay**: every user is served by both arms, ``--rounds`` times. Each round a request at
   ``end + round * --gap-hours``; each arm answers top ``--k`` from *its own copy* of the user's history and the
   world answers (``LifelongWorld.respond``) with the same ``rng_key`` for both arms (common random numbers:
   where the two slates agree, so do the reactions). The events played are appended to that arm's copy (the
   closed loop: an arm lives with the consequences of its slates, and the world's ``next`` habit follows what
   was played). VISTA reads its last ``--recent`` events raw and a cached summary state of everything older,
   folded forward each round by the model's own ``Recommender.summarise`` (exact: the same as summarising the
   whole older history again); HSTU reads its last ``--window``.
   Per user, per request: ``like_rate`` (likes), ``listening`` (sum of played ratios: the world has no track
   lengths) and ``hits`` (served items listened to or liked). The per-user treatment - control differences get
   95% bootstrap intervals over users (``bench.compare.bootstrap``).
3. **split A/B**: the same users randomised 50/50 by the platform's hash assignment
   (``experiments.assignment.choose_variant``, salt from ``--loop-seed``); each arm's users are read off their own
   arm's loop (the world does not couple users, so this is what a split test of these arms would observe).
   Relative lifts with Welch/delta-method intervals (``experiments.stats.welch_test``), p-values corrected
   across the three metrics (``experiments.stats.adjust_pvalues``, Benjamini-Hochberg, the readout's
   correction), and the sample-ratio check (``experiments.stats.srm_check``).

The slates leave out the items of the user's history (the arm's copy), as serving does by default
(``exclude_seen``) and as the offline protocol filters them; ``--keep-seen`` serves them too. The difference
matters here: most of a lifelong user's true next plays are tracks they have heard (favourite artists resurfacing,
the next track of an artist), so the filter makes both arms find what the user will like among what they have not
heard yet, while without it both can re-serve the user's most played tracks.

Progress goes to stderr; the LAST stdout line is one JSON object: ``config``, ``world``, ``training``,
``paired``, ``split``, ``wall_s``, ``argv``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.compare import BOOTSTRAP, bootstrap
from bench.lifelong import (DEFAULT_SIZE, SMOKE_SIZE, WorldSize, _overrides, add_world_arguments, make_world,
                            resolve_config)
from features.events import EVENT_TYPE_CODES
from features.lifelong import DEFAULT_END_MS, LifelongWorld

METRICS = ("like_rate", "listening", "hits")
ARMS = ("control", "treatment")
_POSITIVE = frozenset({"listen", "like"})
_EPOCH_LOG = ("loss", "valid_ndcg@10", "valid_hr@10", "epoch_s")  # what a training epoch's progress line shows
_SUMMARY_CHUNK = 16  # users summarised at once from scratch: the fold pads to the longest history of the chunk


@dataclass(frozen=True)
class LoopConfig:
    """Everything that decides the run's figures (echoed as ``config`` in the JSON)."""

    size: WorldSize = DEFAULT_SIZE
    world: dict[str, str] = field(default_factory=dict)  # --world overrides of LifelongParams
    world_seed: int = 0
    treatment: str = "vista-lifelong"
    control: str = "hstu-lifelong"
    seed: int = 0  # training seed of both arms
    loop_seed: int = 0  # the reactions' random keys and the split's salt
    epochs: int | None = None
    window: int = 200  # the control's max_len
    recent: int = 50  # the treatment's raw recent events (its max_len)
    rounds: int = 10
    k: int = 10
    gap_hours: float = 24.0
    exclude_seen: bool = True  # serving's default
    draws: int = BOOTSTRAP


# ----------------------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------------------


def train_arms(world: LifelongWorld, cfg: LoopConfig, log: Callable[[str], None]) -> tuple[dict[str, Any], dict]:
    """Train control and treatment on the world's history under ``bench.lifelong``'s protocol -> (arm name ->
    ``Recommender``, per-arm training figures: the offline test NDCG@10 / HR@10, epochs, seconds)."""
    from models.data import build_sequences
    from models.train import train

    seqs = build_sequences(world.history_frame(DEFAULT_END_MS))
    arms, figures = {}, {}
    for arm, name in (("control", cfg.control), ("treatment", cfg.treatment)):
        rc = resolve_config(name, seed=cfg.seed, epochs=cfg.epochs, window=cfg.window, recent=cfg.recent)
        t = time.perf_counter()
        log(f"training {arm} ({name}, {rc.model}, max_len {rc.max_len}, {rc.epochs} epochs)")
        result = train(seqs, rc, progress=False, on_epoch=lambda e, rec, arm=arm: log(
            f"{arm} epoch {e}: " + " ".join(f"{k} {rec[k]:.4g}" for k in _EPOCH_LOG if k in rec)))
        assert result is not None  # one process: the result is always returned
        arms[arm] = result.recommender()
        figures[arm] = {"recipe": name, "model": rc.model, "max_len": rc.max_len, "epochs": len(result.history),
                        "best_epoch": result.best_epoch, "train_s": round(time.perf_counter() - t, 1),
                        **{m: round(float(result.test_metrics[m]), 4) for m in ("ndcg@10", "hr@10")
                           if m in result.test_metrics}}
        log(f"{arm} trained: {json.dumps(figures[arm])}")
    return arms, figures


def save_arms(arms: dict[str, Any], figures: dict, cfg: LoopConfig, path: Path) -> None:
    """Each arm's model under ``path/<arm>``, and what they were trained on (``arms.json``)."""
    for arm, rec in arms.items():
        rec.save(path / arm)
    (path / "arms.json").write_text(json.dumps({"world": _world_key(cfg), "training": figures}, indent=2))


def load_arms(cfg: LoopConfig, path: Path) -> tuple[dict[str, Any], dict]:
    """The arms ``save_arms`` wrote; refuses arms of another world or training (the JSON would misname them)."""
    from models.recommender import Recommender

    saved = json.loads((path / "arms.json").read_text())
    if saved["world"] != _world_key(cfg):
        raise SystemExit(f"--models {path} holds arms of {saved['world']}, this run asks for {_world_key(cfg)}")
    return {arm: Recommender.load(path / arm) for arm in ARMS}, saved["training"]


def _world_key(cfg: LoopConfig) -> dict[str, Any]:
    """What the saved arms depend on: the world and how they were trained."""
    return {"size": asdict(cfg.size), "world": dict(sorted(cfg.world.items())), "world_seed": cfg.world_seed,
            "control": cfg.control, "treatment": cfg.treatment, "seed": cfg.seed, "epochs": cfg.epochs,
            "window": cfg.window, "recent": cfg.recent}


# ----------------------------------------------------------------------------------------------------------
# The closed loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ArmLoop:
    """One arm's copy of every user's history, grown by what the arm's slates made the users play."""

    rec: Any  # models.recommender.Recommender
    items: list[np.ndarray]  # per user (n_u,) raw item ids, time-ordered
    codes: list[np.ndarray]  # per user (n_u,) event type codes
    times_ms: list[np.ndarray]  # per user (n_u,)
    played: list[list[int]] = field(default_factory=list)  # per user: items played in the loop (the world's context)
    states: list[Any] = field(default_factory=list)  # VISTA: per user a SummaryState [1] of its events before
    # its last max_len (empty for other models)
    folded: np.ndarray | None = None  # VISTA: (U,) events of each user inside its state

    def history(self, u: int) -> dict[str, np.ndarray]:
        return {"item_ids": self.items[u], "event_types": self.codes[u], "timestamps_ms": self.times_ms[u]}

    @property
    def vista(self) -> bool:
        return self.rec.model.summariser is not None


def start_loop(rec: Any, world: LifelongWorld, end_ms: int) -> ArmLoop:
    """An arm's loop at the end of the organic history; VISTA's older events summarised once, from scratch."""
    frame = world.history_frame(end_ms)
    codes = frame["event_type"].map(EVENT_TYPE_CODES).to_numpy(np.int64)
    users = frame["user_id"].to_numpy(np.int64)
    order = np.lexsort((frame["timestamp_ms"].to_numpy(), users))  # by user, then time (ties keep seq order)
    bounds = np.searchsorted(users[order], np.arange(world.num_users + 1))
    col = lambda c: [c[order][bounds[u]: bounds[u + 1]] for u in range(world.num_users)]  # noqa: E731
    loop = ArmLoop(rec=rec, items=col(frame["item_id"].to_numpy(np.int64)), codes=col(codes),
                   times_ms=col(frame["timestamp_ms"].to_numpy(np.int64)), played=[[] for _ in range(world.num_users)])
    unknown = sum(int((rec.vocab.encode(i) == 0).sum()) for i in loop.items)
    if unknown:  # the fold below counts raw events as the model's: every one must be known to it
        raise ValueError(f"{unknown} history events of items the model does not know: not this world's model")
    if loop.vista:
        loop.folded = np.zeros(world.num_users, np.int64)
        parts = []
        for lo in range(0, world.num_users, _SUMMARY_CHUNK):
            chunk = list(range(lo, min(lo + _SUMMARY_CHUNK, world.num_users)))
            parts.append(rec.summarise([_slice(loop, u, 0, _older(loop, u)) for u in chunk]))
        loop.states = [part.select([b]) for part in parts for b in range(part.batch_size)]
        loop.folded[:] = [_older(loop, u) for u in range(world.num_users)]
    return loop


def _older(loop: ArmLoop, u: int) -> int:
    """How many of user u's events lie before the model's raw window (what its summary must cover)."""
    return max(len(loop.items[u]) - loop.rec.config.max_len, 0)


def _slice(loop: ArmLoop, u: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    return {"item_ids": loop.items[u][lo:hi], "event_types": loop.codes[u][lo:hi],
            "timestamps_ms": loop.times_ms[u][lo:hi]}


def serve(loop: ArmLoop, users: Sequence[int], k: int, now_ms: int, exclude_seen: bool) -> list[list[int]]:
    """Each user's top-k from the arm's copy of their history (VISTA: its summary state of the older events)."""
    if loop.vista:
        # fold what fell out of the raw window since the last request: the state then covers exactly the
        # events before the last max_len, which is what user_embeddings reads raw
        new = [_slice(loop, u, int(loop.folded[u]), _older(loop, u)) for u in users]
        state = loop.rec.summarise(new, type(loop.states[0]).cat([loop.states[u] for u in users]))
        for b, u in enumerate(users):
            loop.states[u] = state.select([b])
            loop.folded[u] = _older(loop, u)
        summaries = [loop.states[u] for u in users]
    else:
        summaries = None
    recs = loop.rec.recommend([loop.history(u) for u in users], k=k, exclude_seen=exclude_seen, now_ms=now_ms,
                              summaries=summaries)
    return [[i for i, _ in r] for r in recs]


def play(loop: ArmLoop, u: int, events: Sequence[Any]) -> None:
    """Append the events the user played to the arm's copy of their history (the closed loop)."""
    if not events:
        return
    loop.items[u] = np.r_[loop.items[u], [e.item_id for e in events]]
    loop.codes[u] = np.r_[loop.codes[u], [EVENT_TYPE_CODES[str(e.event_type)] for e in events]]
    loop.times_ms[u] = np.r_[loop.times_ms[u], [e.timestamp_ms for e in events]]
    loop.played[u].extend(e.item_id for e in events)


def outcome(events: Sequence[Any]) -> dict[str, float]:
    """One request's metrics: likes, listening (played ratios: the world has no track lengths), hits."""
    kinds = [str(e.event_type) for e in events]
    return {"like_rate": float(sum(k == "like" for k in kinds)),
            "listening": float(sum(float(e.played_ratio or 0.0) for e in events)),
            "hits": float(sum(k in _POSITIVE for k in kinds))}


def run_loop(world: LifelongWorld, loops: dict[str, ArmLoop], cfg: LoopConfig, end_ms: int,
             log: Callable[[str], None]) -> dict[str, dict[str, np.ndarray]]:
    """``cfg.rounds`` rounds of one request per user per arm -> arm -> metric -> (U,) mean per request."""
    users = list(range(world.num_users))
    totals = {arm: {m: np.zeros(len(users)) for m in METRICS} for arm in loops}
    t0 = time.perf_counter()
    for r in range(cfg.rounds):
        now_ms = end_ms + int((r + 1) * cfg.gap_hours * 3_600_000)
        for arm, loop in loops.items():
            slates = serve(loop, users, cfg.k, now_ms, cfg.exclude_seen)
            for u, slate in zip(users, slates):
                # the same key in both arms: common random numbers, so equal slates get equal reactions
                events = world.respond(u, slate, now_ms=now_ms, rng_key=f"loop-{cfg.loop_seed}-{u}-{r}",
                                       history=loop.played[u], variant=arm, end_ms=end_ms)
                play(loop, u, events)
                for m, v in outcome(events).items():
                    totals[arm][m][u] += v
        means = " ".join(f"{arm} " + " ".join(f"{m} {totals[arm][m].mean() / (r + 1):.3f}" for m in METRICS)
                         for arm in loops)
        log(f"round {r + 1}/{cfg.rounds} ({time.perf_counter() - t0:.0f} s): {means}")
    return {arm: {m: v / max(cfg.rounds, 1) for m, v in t.items()} for arm, t in totals.items()}


# ----------------------------------------------------------------------------------------------------------
# Read-outs
# ----------------------------------------------------------------------------------------------------------


def paired_figures(per_user: dict[str, dict[str, np.ndarray]], draws: int, seed: int) -> dict[str, Any]:
    """Treatment - control per user (both arms served every user), with 95% bootstrap intervals over users."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"users": int(len(per_user["control"][METRICS[0]]))}
    for m in METRICS:
        a, b = per_user["control"][m], per_user["treatment"][m]
        d = b - a  # (U,)
        boot = bootstrap(d[None, :], rng, draws)
        out[m] = {"control": round(float(a.mean()), 4), "treatment": round(float(b.mean()), 4),
                  "diff": round(float(d.mean()), 4), "ci": [round(boot["ci_low"], 4), round(boot["ci_high"], 4)],
                  "p": round(boot["p"], 4), "relative": round(float(d.mean() / a.mean()), 4) if a.mean() else None,
                  "users_differing": int((d != 0).sum())}
    return out


def split_assignment(users: Sequence[int], seed: int) -> dict[int, str]:
    """User -> arm, 50/50 by the platform's hash assignment (the experiment's salt names the loop's seed)."""
    from experiments.assignment import Experiment, choose_variant

    experiment = Experiment.model_validate({
        "name": "lifelong-loop", "salt": f"lifelong-loop-{seed}",
        "variants": [{"name": "control", "weight": 0.5, "target": "alias:champion"},
                     {"name": "treatment", "weight": 0.5, "target": "alias:challenger"}]})
    return {u: choose_variant(experiment, u) for u in users}


def split_figures(per_user: dict[str, dict[str, np.ndarray]], seed: int, alpha: float = 0.05) -> dict[str, Any]:
    """The split A/B: each user's metrics from its own arm only; relative lifts, BH-corrected p, SRM check."""
    from experiments.stats import adjust_pvalues, srm_check, welch_test

    users = list(range(len(per_user["control"][METRICS[0]])))
    arm_of = split_assignment(users, seed)
    in_arm = {arm: np.array([u for u in users if arm_of[u] == arm], np.int64) for arm in ARMS}
    srm = srm_check({arm: len(in_arm[arm]) for arm in ARMS}, {"control": 0.5, "treatment": 0.5})
    out: dict[str, Any] = {"users": {arm: int(len(in_arm[arm])) for arm in ARMS},
                           "srm": {"p": round(srm.p_value, 4), "flagged": srm.flagged}}
    tests = {m: welch_test(per_user["control"][m][in_arm["control"]], per_user["treatment"][m][in_arm["treatment"]],
                           alpha=alpha) for m in METRICS}
    adjusted = adjust_pvalues([tests[m].p_value for m in METRICS])
    for m, p_adj in zip(METRICS, adjusted):
        t = tests[m]
        out[m] = {"control": round(t.mean_a, 4), "treatment": round(t.mean_b, 4),
                  "lift": _round(t.rel_lift), "lift_ci": [_round(t.rel_lift_ci_low), _round(t.rel_lift_ci_high)],
                  "p": round(t.p_value, 4), "p_bh": round(p_adj, 4), "significant": bool(p_adj < alpha)}
    out["correction"] = "benjamini-hochberg across " + ", ".join(METRICS)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# ----------------------------------------------------------------------------------------------------------
# The bench
# ----------------------------------------------------------------------------------------------------------


def run(cfg: LoopConfig, *, models: Path | None = None, save: Path | None = None,
        log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The whole bench (module docstring); returns the JSON object (less ``argv``)."""
    t0 = time.perf_counter()
    world = make_world(cfg.size, cfg.world_seed, cfg.world)
    end_ms = DEFAULT_END_MS
    log(f"world: {cfg.size.users} users, {int(world.lengths().sum()):,} events, {world.num_items} items")
    if models is not None:
        arms, training = load_arms(cfg, models)
        log(f"loaded the arms from {models}")
    else:
        arms, training = train_arms(world, cfg, log)
        if save is not None:
            save_arms(arms, training, cfg, save)
            log(f"saved the arms to {save}")
    out: dict[str, Any] = {"config": {**asdict(cfg), "size": asdict(cfg.size)},
                           "world": asdict(world.params), "training": training}
    if cfg.rounds > 0:
        t = time.perf_counter()
        loops = {arm: start_loop(arms[arm], world, end_ms) for arm in ARMS}
        log(f"loops started ({time.perf_counter() - t:.0f} s)")
        per_user = run_loop(world, loops, cfg, end_ms, log)
        out["paired"] = paired_figures(per_user, cfg.draws, cfg.loop_seed)
        out["split"] = split_figures(per_user, cfg.loop_seed)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(ap)
    ap.add_argument("--treatment", default="vista-lifelong", help="the treatment arm's recipe")
    ap.add_argument("--control", default="hstu-lifelong", help="the control arm's recipe")
    ap.add_argument("--seed", type=int, default=0, help="training seed of both arms")
    ap.add_argument("--loop-seed", type=int, default=0, help="the reactions' random keys and the A/B's salt")
    ap.add_argument("--epochs", type=int, default=None, help="override both recipes' epochs")
    ap.add_argument("--window", type=int, default=200, help="max_len of the window arm")
    ap.add_argument("--recent", type=int, default=50, help="raw recent events of the lifelong arm")
    ap.add_argument("--rounds", type=int, default=10, help="requests per user per arm (0: train and save only)")
    ap.add_argument("-k", type=int, default=10, help="slate size")
    ap.add_argument("--gap-hours", type=float, default=24.0, help="simulated time between two rounds")
    ap.add_argument("--keep-seen", action="store_true",
                    help="serve items of the user's history too (default: left out, as serving does)")
    ap.add_argument("--draws", type=int, default=BOOTSTRAP, help="bootstrap draws")
    ap.add_argument("--models", type=Path, default=None, help="load the arms saved by --save instead of training")
    ap.add_argument("--save", type=Path, default=None, help="save the trained arms here")
    args = ap.parse_args(argv)
    if args.rounds < 0 or args.k < 1 or args.gap_hours <= 0:
        raise SystemExit("need --rounds >= 0, -k >= 1 and --gap-hours > 0")
    if args.models is not None and args.save is not None:
        raise SystemExit("--models loads saved arms, --save writes trained ones: not both")

    torch.set_num_threads(1)  # a shared box: one core per bench, and reproducible float sums
    base = SMOKE_SIZE if args.smoke else DEFAULT_SIZE
    size = WorldSize(users=args.users or base.users, min_events=args.min_events or base.min_events,
                     max_events=args.max_events or base.max_events)
    cfg = LoopConfig(size=size, world=_overrides(args.world), world_seed=args.world_seed, treatment=args.treatment,
                     control=args.control, seed=args.seed, loop_seed=args.loop_seed, epochs=args.epochs, window=args.window, recent=args.recent,
                     rounds=args.rounds, k=args.k, gap_hours=args.gap_hours, exclude_seen=not args.keep_seen,
                     draws=args.draws)
    out = run(cfg, models=args.models, save=args.save, log=lambda m: print(m, file=sys.stderr, flush=True))
    out["argv"] = list(sys.argv[1:] if argv is None else argv)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
