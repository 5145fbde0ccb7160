"""What a pointwise ranker could know on the simulator: the oracle's engaged AUC, taken apart.

``bench.ranking`` reports the ``oracle``, the simulated users' exact probability of each label of a logged slate
(``MusicWorld.slate_probabilities``). A ranker cannot reach all of it: it scores each candidate alone, without
the items placed above it, and it knows the user only through features. This bench scores the same test slates
with the world's own probabilities under less and less knowledge, so a ranker's AUC can be read against the
ceiling of what it sees:

* ``oracle``: everything (the slate around each item, the user's state);
* ``pointwise``: the item above each position unknown, averaged over the logging policy's items (``--contexts``
  draws); the user's last play is known at position 0; the chance of reaching a position is its mean by rank;
* ``rank only``: that chance of reaching the position, and nothing else;
* ``pointwise, user from engaged plays``: the user's taste and genre weights replaced by what their last
  ``--history-len`` engaged events before the test period show (the mean of those items' vectors, the share of
  each genre among them), as a ranker's history bag of engaged events could;
* ``pointwise, user from all events``: the same from their last events of any kind, skips included, as a history
  bag of every event reads them;
* ``pointwise, user unknown``: no user at all (even genre weights, no taste): item, popularity and rank.

    python -m bench.ranking_ceiling --users 2000 --requests 20000 --seeds 0

The last line is one JSON object: engaged AUC and GAUC on the shown test items per scorer (mean over seeds and
per seed). The log and split are ``bench.ranking``'s for the same flags (every ``bench.ranking`` simulator flag is
accepted), so the figures sit beside its rankers'. See docs/journal/2026-12-07-what-the-rankers-miss.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bench.ranking import T0_MS, _parse_args, _split, _subset, logging_policy, oracle_scores, simulator_log


def _user_guess(world, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - MusicWorld
    """(taste, genre weights) that a bag of items shows: the mean of their vectors (normalised) and the share of
    each genre among them; no items: no taste, even genres."""
    n_genres = world.listeners.genre_end.shape[1]
    if not len(items):
        return np.zeros(world.catalog.vectors.shape[1], np.float32), np.full(n_genres, 1.0 / n_genres)
    taste = world.catalog.vectors[items].mean(0)
    taste = taste / (np.linalg.norm(taste) + 1e-9)
    return taste.astype(np.float32), np.bincount(world.catalog.genre[items], minlength=n_genres) / len(items)


def ceiling_scores(world, part, history: dict[str, dict[int, np.ndarray]], contexts: int,  # noqa: ANN001
                   seed: int, explore: float = 0.5) -> dict[str, np.ndarray]:
    """Scorer -> [N] engaged probability of each shown test example (``part``), as the module docstring says.
    ``history``: guess name -> user -> the items a guess of the user reads."""
    ex = part.examples
    full = oracle_scores(world, part, ["engaged", "examined"])
    ranks = ex["rank"].to_numpy()
    reach = np.array([full[ranks == r, 1].mean() for r in range(int(ranks.max()) + 1)])[ranks]  # P(examined) by rank
    n_items = world.settings.items
    logging_p = logging_policy(world, world.history_frame(end_ms=T0_MS), explore)  # what placed the items above
    rng = np.random.default_rng([seed, 7])
    # Scorer -> None (the user's true state) or the items each user is guessed from (none: no user at all).
    guesses: dict[str, dict[int, np.ndarray] | None] = {"pointwise": None, "pointwise, user unknown": {}} | {
        f"pointwise, user from {name}": bags for name, bags in history.items()}
    out = {name: np.zeros(len(ex)) for name in guesses}
    for user, rows in ex.groupby("user_id").groups.items():
        user = int(user)
        at = ex.index.get_indexer(rows)
        items = ex.loc[rows, "item_id"].to_numpy(np.int64)
        first = ranks[at] == 0
        prevs = [world.recent_items(user, 1)[-1], *rng.choice(n_items, size=contexts, p=logging_p).tolist()]
        for name, bags in guesses.items():
            state = {} if bags is None else dict(zip(("taste", "genre_weights"),
                                                     _user_guess(world, bags.get(user, np.zeros(0, np.int64)))))
            played = world.played_probabilities(user, prevs, **state)  # [1 + contexts, items]
            p = np.where(first, played[0, items], played[1:, items].mean(0))
            out[name][at] = p * reach[at]
    return {"oracle": full[:, 0], **out, "rank only": reach}


def last_items(examples, cutoff_ms: int, n: int, engaged: bool) -> dict[int, np.ndarray]:  # noqa: ANN001
    """User -> their last ``n`` events' items before ``cutoff_ms`` (engaged events only, or every event)."""
    from features.events import POSITIVE_TYPES

    ev = examples.events
    ev = ev[ev["timestamp_ms"].to_numpy(np.int64) < cutoff_ms]
    if engaged:
        ev = ev[ev["event_type"].astype(str).isin(POSITIVE_TYPES)]
    return {int(u): g["item_id"].to_numpy(np.int64)[-n:] for u, g in ev.groupby("user_id", sort=False)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=40, help="draws of the item above a position per user")
    ap.add_argument("--history-len", type=int, default=20, help="events a guess of the user reads")
    own, rest = ap.parse_known_args(argv)
    args = _parse_args(rest)
    if args.dataset != "simulator":
        ap.error("the ceiling needs the simulator's ground truth")
    from features.simulator import MusicWorld
    from infra.settings import SimulatorSettings
    from models.ranker import task_metrics
    from models.ranking_data import build_ranking_examples

    started = time.perf_counter()
    world = MusicWorld(SimulatorSettings(users=args.users, **({"items": args.items} if args.items else {})))
    per_seed = []
    for seed in args.seed_list:
        interactions, exposures = simulator_log(world, args, seed)
        examples = build_ranking_examples(interactions, exposures, window_s=args.window_s,
                                          sampled_negatives=args.negatives, catalogue=np.arange(world.settings.items),
                                          seed=seed)
        _, test = _split(examples, args.test_share, args.window_s * 1000)
        part = _subset(test, "shown")
        cutoff = int(test.examples["t_ms"].min())
        history = {"engaged plays": last_items(examples, cutoff, own.history_len, True),
                   "all events": last_items(examples, cutoff, own.history_len, False)}
        scores = ceiling_scores(world, part, history, own.contexts, seed, args.explore)
        per_seed.append({name: task_metrics(part, s[:, None], ["engaged"])["engaged"] for name, s in scores.items()})
        print(json.dumps({"seed": seed, "auc": {k: round(v["auc"], 4) for k, v in per_seed[-1].items()}}),
              file=sys.stderr, flush=True)
    names = list(per_seed[0])
    out = {"bench": "ranking_ceiling", "seeds": args.seed_list, "task": "engaged", "subset": "shown",
           "auc": {n: round(float(np.mean([s[n]["auc"] for s in per_seed])), 4) for n in names},
           "gauc": {n: round(float(np.mean([s[n]["gauc"] for s in per_seed])), 4) for n in names},
           "per_seed": per_seed,
           "settings": {"users": args.users, "items": world.settings.items, "requests": args.requests,
                        "contexts": own.contexts, "history_len": own.history_len, "explore": args.explore},
           "wall_s": round(time.perf_counter() - started, 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
