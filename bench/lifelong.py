"""Lifelong-history quality bench: recipes on ``features.lifelong.LifelongWorld`` against its oracles.

    python -m bench.lifelong --users 1000 --min-events 10000 --max-events 20000 --configs hstu,vista --seeds 0,1,2
    python -m bench.lifelong --smoke --configs hstu --seeds 0 --epochs 1      # seconds: the harness end to end

What it does, in order:

1. builds the world (``--world-seed``) and its history frame, and prints its oracle report
   (``features.lifelong.oracle_report``): NDCG@10 / HR@10 of the full-history oracle, of the window oracles
   (``--window`` and ``--recent`` events), of a lifelong-count model and of popularity, on each user's held-out
   last positive event;
2. trains every recipe of ``--configs`` once per seed of ``--seeds`` with ``models.train.train`` on that frame
   (leave-one-out, the whole history filtered from the ranking: the protocol of the oracle report, forced on
   every recipe so they all rank the same targets against the same candidates). Window models read
   ``--window`` events (``max_len``, 200: HSTU's window); lifelong models (``LIFELONG_MODELS``: VISTA) read the
   whole history through their own summary and ``--recent`` raw events (their ``max_len``). A recipe that does
   not exist is skipped with its reason in ``skipped`` (the run fails when none is left);
3. pairs the runs: every run ranks the same targets, so config A's and config B's per-target NDCG@10 / HR@10
   pair by seed and by user, and ``bench.compare.bootstrap`` resamples seeds and users together for 95%
   intervals: of each config's mean and of its difference to ``--baseline`` (hstu). ``relative`` is that
   difference over the baseline's mean; ``oracle_lead_fraction`` is the NDCG@10 difference over the oracle's
   lead (full oracle - window oracle at ``--window``): how much of what a lifelong model can gain it reaches
   (issue #36's bar: >= 10% relative and >= 90% of the lead).

4. with ``--depths``, ranks each trained lifelong model's test targets again with its summary cut to the latest N
   older events (``configs.<name>.depths``): how deep into the history its answers come from.

Progress and the oracle report go to stderr; the LAST stdout line is one JSON object: ``world``, ``events``,
``oracle``, ``configs`` (per config: ``ndcg@10`` / ``hr@10`` with ``ci``, ``per_seed``, and ``vs_<baseline>``),
``skipped``, ``seeds``, ``wall_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.compare import BOOTSTRAP, bootstrap, per_target
from features.lifelong import LifelongParams, LifelongWorld, loo_targets, oracle_report

METRICS = ("ndcg@10", "hr@10")
LIFELONG_MODELS = frozenset({"vista"})  # models that read the whole history; their max_len is the recent window


@dataclass(frozen=True)
class WorldSize:
    users: int
    min_events: int
    max_events: int


DEFAULT_SIZE = WorldSize(users=1000, min_events=10_000, max_events=20_000)  # ~15M events: the recorded world
SMOKE_SIZE = WorldSize(users=40, min_events=600, max_events=1200)  # seconds: the tests' end-to-end run


class UnknownRecipe(ValueError):
    """A config name that is neither a shipped recipe nor a YAML file."""


def resolve_config(name: str, *, seed: int, epochs: int | None, window: int, recent: int,
                   overrides: dict[str, str] | None = None) -> Any:
    """The recipe ``name`` with ``overrides`` (``--set``) under the bench's protocol (see the module docstring); a
    ``TrainConfig``."""
    from models.recipe import recipe_names, recipe_path, resolve_recipe

    if name not in recipe_names() and not (Path(name).suffix and recipe_path(name).exists()):
        raise UnknownRecipe(f"no recipe {name!r}: not in models/configs/ ({', '.join(recipe_names())}) nor a YAML file")
    fixed = {"seed": seed, **({"epochs": epochs} if epochs is not None else {})}
    cfg = resolve_recipe(name, **{**(overrides or {}), **fixed})
    max_len = recent if cfg.model in LIFELONG_MODELS else window
    # train_windows "all": a user with 10,000 events gives a recent-window recipe one window of its last events;
    # both kinds of model must train on the whole history, or the bench measures training data, not reading
    return cfg.replace(max_len=max_len, split="loo", validation=True, seen_filter="history", targets="positive",
                       train_windows="all")


def make_world(size: WorldSize, world_seed: int = 0, world: dict[str, str] | None = None) -> LifelongWorld:
    """The bench's world: ``size``, ``world_seed`` and the ``--world`` overrides (text, typed by ``world_params``)."""
    return LifelongWorld(LifelongParams(seed=world_seed, users=size.users, min_events=size.min_events,
                                        max_events=size.max_events, **world_params(world or {})))


def config_figures(gains: dict[str, np.ndarray], rng: np.random.Generator, draws: int) -> dict[str, Any]:
    """One config's means, their 95% intervals and the per-seed means, from per-target gains [seeds, T]."""
    out: dict[str, Any] = {}
    for metric, g in gains.items():
        b = bootstrap(g, rng, draws)
        out[metric] = round(float(g.mean()), 4)
        out[f"{metric}_ci"] = [round(b["ci_low"], 4), round(b["ci_high"], 4)]
        out[f"{metric}_per_seed"] = [round(float(x), 4) for x in g.mean(axis=1)]
    return out


def versus(gains: dict[str, np.ndarray], base: dict[str, np.ndarray], oracle_lead: float, rng: np.random.Generator,
           draws: int) -> dict[str, Any]:
    """A config against the baseline, paired by seed and user: difference, 95% interval, p, relative lead; and the
    share of the oracle's NDCG@10 lead reached."""
    out: dict[str, Any] = {}
    for metric in gains:
        d = gains[metric] - base[metric]  # [seeds, T]
        b = bootstrap(d, rng, draws)
        mean_base = float(base[metric].mean())
        out[metric] = {"diff": round(float(d.mean()), 4), "ci": [round(b["ci_low"], 4), round(b["ci_high"], 4)],
                       "p": round(b["p"], 4), "relative": round(float(d.mean()) / mean_base, 4) if mean_base else None}
    ndcg = out["ndcg@10"]["diff"]
    out["oracle_lead_fraction"] = round(ndcg / oracle_lead, 4) if oracle_lead > 0 else None
    return out


def depth_figures(by_depth: dict[int, list[np.ndarray]], full: np.ndarray, rng: np.random.Generator,
                  draws: int) -> dict[str, Any]:
    """NDCG@10 of a lifelong model whose summary reads only the latest ``depth`` older events, and its paired
    difference to reading them all (``full``, [seeds, T]): how deep into the history its answers come from."""
    out: dict[str, Any] = {}
    for depth, runs in sorted(by_depth.items()):
        g = np.stack(runs)  # [seeds, T]
        b = bootstrap(g - full, rng, draws)
        out[str(depth)] = {"ndcg@10": round(float(g.mean()), 4), "minus_all": round(float((g - full).mean()), 4),
                           "minus_all_ci": [round(b["ci_low"], 4), round(b["ci_high"], 4)]}
    return out


def run(size: WorldSize, configs: Sequence[str], seeds: Sequence[int], *, epochs: int | None = None,
        window: int = 200, recent: int = 50, baseline: str = "hstu", world_seed: int = 0,
        overrides: dict[str, str] | None = None, world: dict[str, str] | None = None, draws: int = BOOTSTRAP,
        depths: Sequence[int] = (), log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The whole bench (module docstring); returns the JSON object."""
    from models.data import build_sequences
    from models.evaluate import rank_targets
    from models.train import make_split, train

    t0 = time.perf_counter()
    world = make_world(size, world_seed, world)
    params = world.params
    frame = world.history_frame()
    log(f"world: {size.users} users, {len(frame):,} events, {world.num_items} items ({time.perf_counter() - t0:.1f} s)")
    targets = loo_targets(frame)
    oracle = oracle_report(world, frame, windows=tuple(dict.fromkeys((recent, window))), targets=targets)
    log(f"oracle report: {json.dumps(oracle)}")
    events = len(frame)
    seqs = build_sequences(frame)  # once for every run: train() accepts the sequences
    del frame  # ~150 bytes an event (string ids): the sequences hold what training reads

    skipped: dict[str, str] = {}
    gains: dict[str, dict[str, np.ndarray]] = {}
    depth_gains: dict[str, dict[int, list[np.ndarray]]] = {}  # lifelong config -> depth -> per seed [T] NDCG@10
    for name in configs:
        try:
            cfgs = [resolve_config(name, seed=s, epochs=epochs, window=window, recent=recent, overrides=overrides)
                    for s in seeds]
        except UnknownRecipe as e:
            skipped[name] = str(e)
            log(f"skipping {name}: {e}")
            continue
        per_run = []
        for cfg in cfgs:
            t = time.perf_counter()
            result = train(seqs, cfg, progress=False)
            assert result is not None  # one process: the result is always returned
            ranked = result.ranked["test"]
            if not np.array_equal(ranked.event, targets.event):
                raise RuntimeError(f"{name} ranked other test targets than the oracle report's: not the same protocol")
            per_run.append({m: per_target(m, ranked.rank, len(result.vocab)) for m in METRICS})
            log(f"{name} seed {cfg.seed}: ndcg@10 {per_run[-1]['ndcg@10'].mean():.4f} hr@10 "
                f"{per_run[-1]['hr@10'].mean():.4f} ({len(result.history)} epochs, {time.perf_counter() - t:.1f} s)")
            if depths and result.model.summariser is not None:
                split = make_split(seqs, cfg)
                for depth in depths:  # the same model, its summary cut to the latest `depth` older events
                    r = rank_targets(result.model, seqs, split.test, batch_size=cfg.eval_batch_size, older_events=depth)
                    depth_gains.setdefault(name, {}).setdefault(depth, []).append(per_target("ndcg@10", r.rank, len(result.vocab)))
        gains[name] = {m: np.stack([g[m] for g in per_run]) for m in METRICS}  # [seeds, T]
    if not gains:
        raise SystemExit(f"no config to train: {json.dumps(skipped)}")

    rng = np.random.default_rng(0)
    lead = oracle[f"lead_ndcg@10_over_window_{window}"]
    figures: dict[str, Any] = {}
    for name, g in gains.items():
        figures[name] = config_figures(g, rng, draws)
        if baseline in gains and name != baseline:
            figures[name][f"vs_{baseline}"] = versus(g, gains[baseline], lead, rng, draws)
        if name in depth_gains:
            figures[name]["depths"] = depth_figures(depth_gains[name], g["ndcg@10"], rng, draws)
    return {"world": asdict(params), "events": int(events), "items": int(world.num_items),
            "targets": int(len(targets.user)), "window": window, "recent": recent, "epochs": epochs,
            "overrides": overrides or {},
            "oracle": oracle, "configs": figures, "baseline": baseline, "skipped": skipped, "seeds": list(seeds),
            "wall_s": round(time.perf_counter() - t0, 2)}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    """``["lr=0.002", "batch_size=32"]`` -> {"lr": "0.002", ...} (the recipe reads text as each key's type)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def world_params(pairs: dict[str, str]) -> dict[str, Any]:
    """``--world`` values typed as ``LifelongParams``' defaults (``{"artists": "300"}`` -> ``{"artists": 300}``)."""
    defaults = asdict(LifelongParams())
    own_flags = {"seed", "users", "min_events", "max_events"}  # --world-seed, --users, --min-events, --max-events
    bad = sorted((set(pairs) - set(defaults)) | (set(pairs) & own_flags))
    if bad:
        raise SystemExit(f"--world takes LifelongParams fields (not seed/users/min_events/max_events, which have their "
                         f"own flags); got {bad}")
    return {k: type(defaults[k])(v) for k, v in pairs.items()}


def add_world_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags that size and seed the lifelong world, shared by the benches that build one."""
    ap.add_argument("--users", type=int, default=None, help=f"users of the world (default {DEFAULT_SIZE.users})")
    ap.add_argument("--min-events", type=int, default=None, help=f"shortest history (default {DEFAULT_SIZE.min_events})")
    ap.add_argument("--max-events", type=int, default=None, help=f"longest history (default {DEFAULT_SIZE.max_events})")
    ap.add_argument("--smoke", action="store_true", help=f"a tiny world ({asdict(SMOKE_SIZE)}) for the harness's test")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                    help="a LifelongParams field, e.g. --world artists=400 (repeatable): a smaller world for a CPU")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(ap)
    ap.add_argument("--configs", default="hstu", help="comma-separated recipes (models/configs/ names or YAML paths)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds, the same for every config")
    ap.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    ap.add_argument("--window", type=int, default=200, help="max_len of the window models (hstu, sasrec, ...)")
    ap.add_argument("--recent", type=int, default=50, help="max_len of the lifelong models: recent raw events")
    ap.add_argument("--baseline", default="hstu", help="the config the others are compared with")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe key for every config, e.g. --set lr=0.002 (repeatable; max_len is the bench's)")
    ap.add_argument("--depths", default="", help="comma-separated event counts, e.g. 1,200,1000: each lifelong model "
                    "is ranked again with its summary reading only that many of the latest older events "
                    "(configs.<name>.depths: how deep into the history its answers come from)")
    args = ap.parse_args(argv)
    if any(d < 1 for d in _ints(args.depths)):
        raise SystemExit(f"--depths takes positive event counts, got {args.depths!r}")

    base = SMOKE_SIZE if args.smoke else DEFAULT_SIZE
    size = WorldSize(users=args.users or base.users, min_events=args.min_events or base.min_events,
                     max_events=args.max_events or base.max_events)
    out = run(size, [c.strip() for c in args.configs.split(",") if c.strip()], _ints(args.seeds), epochs=args.epochs,
              window=args.window, recent=args.recent, baseline=args.baseline, world_seed=args.world_seed,
              overrides=_overrides(args.set), world=_overrides(args.world), depths=_ints(args.depths), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
