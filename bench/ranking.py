"""Ranking benchmark: train the rankers (Wukong, the DLRM baseline) on point-in-time ranking examples and
report per task AUC and GAUC on a later, held-out period, next to the popularity and random floors.

Datasets
--------
* ``simulator`` (default): a ``features.simulator.MusicWorld`` (``--users``, the other sizes from
  ``infra.settings.SimulatorSettings``) generates its organic history. Then a *logging policy* serves
  ``--requests`` slates of ``--slate`` items, one request every ``--spacing-s`` seconds after the history, each
  to a user drawn uniformly; the user reacts through ``world.respond`` (a top-down cascade). Each slate is
  drawn without replacement from ``(1 - explore) * popularity + explore * uniform`` (``--explore``, popularity
  = the item's share of the organic history). Why a mix: a ranker only learns about the items it has seen
  shown, so a purely popular policy would leave the tail of the catalogue without a single labelled example,
  and a purely uniform one would show mostly items nobody wants (few positives, unlike any production log).
  The exposures and reactions go through ``models.ranking_data.build_ranking_examples`` with
  ``--negatives`` sampled negatives per request. Tasks: ``engaged``, ``like``, ``skip``.
* ``ml-100k`` (or another MovieLens set) with ``--data-dir``: the raw ratings (user, item, rating, time) go
  through ``ratings_examples``: one example per rating, labels ``like`` (rating >= 4) and ``dislike``
  (rating <= 2). There are no requests, so GAUC groups the examples by user.

Protocol: a temporal split. The last ``--test-share`` of the requests (simulator) or ratings (MovieLens) by
time are the test set; on the simulator the train set also drops the requests of the last ``--window-s``
seconds before the cutoff (their reactions could land after it). Each ``--model`` is trained with
``models.ranker.train_ranker`` (``wukong``, ``dlrm``) or ``models.hstu_ranker.train_hstu_ranker`` (``hstu``: the
HSTU target-aware ranker over the interleaved item/action history, a request's candidates scored together with
M-FALCON) and scored by ``models.ranker.task_metrics`` (the floors as ``evaluate_ranker`` scores them).

Ceiling (simulator): the ``oracle`` scorer is the simulated users' own probability of each label
(``MusicWorld.slate_probabilities``: the world's reaction model and its top-down cascade, exactly), the best
any ranker trained on this log could score in expectation. Read a model's AUC between ``popularity`` (the floor)
and ``oracle``: how much of the room it takes, not just whether it moved.

Epochs: ``--valid-share`` (recipe ``valid_share``) holds out the last share of the training examples by time
and keeps each Wukong / DLRM / HSTU ranker's best epoch by validation AUC (``counts.chosen_epoch`` per scorer), so
a size sweep compares sizes each at its own best epoch rather than all at one fixed count.

Shown only vs all: the sampled negatives carry rank -1, a value no shown item has, and the rank is a model
feature, so a ranker separates them perfectly and the "all" figures are inflated by easy pairs. The
``shown`` figures (slate items only: the ranker's real job, reordering what retrieval offered) are the
honest ones. MovieLens has one subset, ``all``.

Seeds (``--seeds 0,1,2``): on the simulator a seed drives the logging policy, the user choice, the sampled
negatives and the model's initialisation and batch order (the world itself is fixed by its settings); on
MovieLens only the model. Each metric is reported per seed and as mean and sd (sample sd, null for one seed).
The LAST line printed is one JSON object: ``bench``, ``dataset``, ``models``, ``tasks``, ``seeds``,
``metrics`` ({subset: {scorer: {task: {auc|gauc: {mean, sd, per_seed}}}}}, scorers = the models +
``popularity`` + ``random`` (+ ``oracle`` on the simulator)), ``counts`` (per seed: train/test examples,
positive rates), ``seconds`` and ``argv``. Undefined values (a task with one class) are null.

ARGUS (``--model argus``, MovieLens only; ``bench.argus_ranking`` has the protocol): the ``--config`` recipe
(default ``argus-ml100k``) pre-trained on the ratings before the cutoff, its feedback head scored unchanged
(``argus_pretrained``: today's head) and fine-tuned per task on the training period's examples (``argus``,
``models.argus_ranker``); then the cascade, the pre-trained model's top ``--retrieve`` reranked by the
fine-tuned p(like). Its JSON adds ``cascade`` (HR@10 and NDCG@10 over each user's movies rated >= 4 after the
cutoff, retrieval alone and reranked) and ``differences`` (fine-tuned minus pre-trained AUC and GAUC per task,
reranked minus retrieval HR@10 and NDCG@10, each with its 95% interval over seeds and users resampled). The
last line also carries, for the first ``--model``, ``auc``, ``gauc`` and ``logloss`` per task (means over
seeds), and, with ARGUS, ``hr@10`` and ``ndcg@10`` of the reranked top list; ``wall_s`` is the whole run.

Size sweeps (``--sizes``, Wukong and DLRM): every model trains at every size on the same examples of each seed;
``by_size`` in the JSON holds each size's AUC on the primary subset and task (shown items and ``engaged`` on the
simulator, ``like`` on MovieLens), its non-embedding parameters, and the differences between consecutive sizes and
between the models at each size, each with a 95% interval that resamples the seeds and, within each seed, the
users; ``--plot`` draws AUC against parameters.

Recipes and features: ``--config NAME`` names a ranking recipe (``models/configs/ranking/NAME.yaml``,
``models.ranking_recipe``) whose values fill every flag not given (without one: the ranking base, which is the
flags' values before recipes). ``--attributes`` adds the user and item attributes as of each example's t
(``features.attributes.attributes_as_of`` over the dataset's ``u.user``/``u.item`` or ``users.dat``/``movies.dat``,
or the simulator's genres and albums): two more units for Wukong and DLRM, and, for ARGUS, values summed into
the candidate's token; ``--context`` (ARGUS) adds the request's surface, hour and weekday there too. The JSON
carries the resolved ``recipe``.

    python -m bench.ranking --seeds 0,1,2
    python -m bench.ranking --users 2000 --requests 20000 --seeds 0,1,2 --model wukong --model dlrm \
        --sizes "dim=8,layers=1,fmb_units=2,lcb_units=2,fmb_rank=2,mlp_hidden=32;dim=64,layers=4,..." --plot sizes.png
    python -m bench.ranking --dataset ml-100k --data-dir ../shared/data/ml-100k --config wukong --attributes
    python -m bench.ranking --dataset ml-1m --data-dir DIR --config argus-ml1m --seeds 0,1,2,3,4
    python -m bench.ranking --dataset ml-100k --data-dir ../shared/data/ml-100k --seeds 0,1,2
    python -m bench.ranking --dataset ml-100k --data-dir ../shared/data/ml-100k --model argus --config argus-ml100k \
        --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

SIM_TASKS: tuple[str, ...] = ("engaged", "like", "skip")
RATING_TASKS: tuple[str, ...] = ("like", "dislike")
T0_MS = 1_700_000_000_000  # the simulator's history ends here (fixed: runs are reproducible)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="simulator", choices=["simulator", "ml-100k", "ml-1m", "ml-20m", "ml-25m"])
    ap.add_argument("--data-dir", "--dataset-dir", dest="data_dir", type=Path, default=None,
                    help="the MovieLens folder (holding u.data, ratings.dat or ratings.csv)")
    ap.add_argument("--config", default=None,
                    help="a ranking recipe (models/configs/ranking/NAME.yaml: wukong, dlrm, argus, argus-ml1m, ...), "
                         "whose values the flags below override when given; or, as before recipes, the retrieval "
                         "recipe ARGUS pre-trains (argus-ml100k), with the ranking base for the rest")
    ap.add_argument("--model", action="append", choices=["wukong", "dlrm", "hstu", "argus"], default=None,
                    help="repeatable; default: the ranking recipe's model, or wukong and dlrm without one")
    ap.add_argument("--attributes", action=argparse.BooleanOptionalAction, default=None,
                    help="user and item attributes as features (default: the recipe's): MovieLens u.user/u.item or "
                         "users.dat/movies.dat from --data-dir, the simulator's genres and albums")
    ap.add_argument("--context", action=argparse.BooleanOptionalAction, default=None,
                    help="argus only: the request context in the candidate's token (default: the recipe's)")
    ap.add_argument("--history", choices=["all", "engaged"], default=None,
                    help="wukong/dlrm history bag: the last events of any kind, or the engaged ones only "
                         "(default: the recipe's)")
    ap.add_argument("--item-vectors", action=argparse.BooleanOptionalAction, default=None,
                    help="wukong/dlrm/hstu: frozen item vectors of a retriever pre-trained on the training period "
                         "(--vectors-recipe): two more units of Wukong and DLRM, added to the HSTU ranker's item "
                         "tokens (default: the recipe's)")
    ap.add_argument("--vectors-recipe", default=None,
                    help="the retrieval recipe pre-trained for --item-vectors: a name or a .yaml beside the ranking "
                         "recipes (default: the recipe's, pretrain-vectors.yaml)")
    ap.add_argument("--history-events", type=int, default=None,
                    help="hstu only: events of history read (default: HSTURankerConfig's, 50)")
    ap.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's (5)")
    ap.add_argument("--size", default=None,
                    help="wukong/dlrm sizes as key=value,... over RankerConfig's defaults, e.g. "
                         "dim=32,layers=4,fmb_units=8,lcb_units=8,fmb_rank=8,mlp_hidden=128 (a size sweep)")
    ap.add_argument("--sizes", default=None,
                    help="a size sweep: several --size values separated by ';'. Every --model trains at each "
                         "(scorers MODEL@1, MODEL@2, ...) on the same data per seed, and the JSON's by_size holds "
                         "each size's AUC, its non-embedding parameters, and the paired differences between "
                         "consecutive sizes and between the models at each size (seeds and users resampled)")
    ap.add_argument("--plot", type=Path, default=None, help="with --sizes: a PNG of AUC against parameters")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (256)")
    ap.add_argument("--lr", type=float, default=None, help="default: the recipe's (3e-3)")
    ap.add_argument("--test-share", type=float, default=None, help="default: the recipe's (0.3)")
    ap.add_argument("--valid-share", type=float, default=None,
                    help="wukong/dlrm/hstu: hold out the last share of the training examples by time and keep the "
                         "epoch with the best validation AUC of the first task (default: the recipe's, 0: all epochs)")
    # simulator
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--items", type=int, default=None, help="default: SimulatorSettings'")
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--slate", type=int, default=10)
    ap.add_argument("--negatives", type=int, default=4, help="sampled negatives per request")
    ap.add_argument("--explore", type=float, default=0.5, help="uniform share of the logging policy")
    ap.add_argument("--spacing-s", type=int, default=60, help="seconds between two requests")
    ap.add_argument("--window-s", type=int, default=3600, help="reaction attribution window")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    # ARGUS
    ap.add_argument("--pretrain-epochs", type=int, default=None,
                    help="cap on the pre-trained recipe's epochs, ARGUS's and --item-vectors' (default: the recipe's)")
    ap.add_argument("--ft-epochs", type=int, default=None, help="most fine-tuning epochs (validation picks the number)")
    ap.add_argument("--ft-lr", type=float, default=None, help="the feedback head's fine-tuning learning rate")
    ap.add_argument("--ft-encoder-lr", type=float, default=None, help="> 0: fine-tune the encoder too, at this rate")
    ap.add_argument("--ft-batch-size", type=int, default=None)
    ap.add_argument("--ft-valid-share", type=float, default=None,
                    help="the last share of the training examples that chooses the fine-tuning epochs")
    ap.add_argument("--retrieve", type=int, default=None, help="retrieval's list that the cascade reranks")
    ap.add_argument("--bootstrap", type=int, default=2000, help="resamples of seeds and users for the intervals")
    args = ap.parse_args(argv)
    _apply_recipe(ap, args)
    if args.size and args.sizes:
        ap.error("give --size or --sizes, not both")
    args.size_list = [part.strip() for part in args.sizes.split(";") if part.strip()] if args.sizes else [args.size]
    if args.sizes and (len(args.size_list) < 2 or any(m in ("argus", "hstu") for m in args.models)):
        ap.error("--sizes needs at least two sizes and sizes Wukong and DLRM only")
    args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if not args.seed_list:
        ap.error("--seeds needs at least one seed")
    if args.dataset != "simulator" and args.data_dir is None:
        ap.error(f"--dataset {args.dataset} needs --data-dir")
    if not 0 < args.test_share < 1:
        ap.error("--test-share must be in (0, 1)")
    if "argus" in args.models and args.dataset == "simulator":
        ap.error("--model argus needs ratings (a MovieLens --dataset): its cascade's targets are rated movies")
    return args


# The flags a ranking recipe fills when they are not given: flag name -> recipe key.
_RECIPE_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "test_share": "test_share",
                 "valid_share": "valid_share",
                 "pretrain_epochs": "pretrain_epochs", "ft_epochs": "ft_epochs", "ft_lr": "ft_lr",
                 "ft_encoder_lr": "ft_encoder_lr", "ft_batch_size": "ft_batch_size", "ft_valid_share": "ft_valid_share",
                 "retrieve": "retrieve", "attributes": "attributes", "context": "context", "history": "history",
                 "item_vectors": "item_vectors", "vectors_recipe": "vectors_recipe"}


def _apply_recipe(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve ``--config`` to a ranking recipe (``args.recipe``), the explicit flags on top of it, and fill the
    flags that were not given from it. A ``--config`` that names no ranking recipe is, as before recipes, the
    retrieval recipe ARGUS pre-trains."""
    from models.ranking_recipe import is_ranking_recipe, resolve_ranking_recipe

    ranking = is_ranking_recipe(args.config)
    overrides = {key: getattr(args, flag) for flag, key in _RECIPE_FLAGS.items()}
    if args.config and not ranking:
        overrides["pretrain"] = args.config
    if args.model and "argus" not in args.model:
        overrides["context"] = False  # context tokens are ARGUS's: a recipe's switch does not reach the others
    try:
        recipe = resolve_ranking_recipe(args.config if ranking else "base",
                                        **(overrides | ({"model": "argus" if "argus" in args.model else args.model[0]}
                                                        if args.model else {})))
    except ValueError as exc:
        ap.error(str(exc))
    args.recipe = recipe
    args.models = args.model or ([recipe.model] if ranking else ["wukong", "dlrm"])
    for flag, key in _RECIPE_FLAGS.items():
        setattr(args, flag, getattr(recipe, key))
    args.pretrain_recipe = recipe.pretrain_recipe()
    args.vectors_recipe = recipe.vectors_retrieval_recipe()


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def logging_policy(world, history: pd.DataFrame, explore: float) -> np.ndarray:  # noqa: ANN001 - MusicWorld
    """[items] the logging policy's chance of drawing each item: the organic ``history``'s popularity, mixed with a
    uniform share ``explore``."""
    n_items = world.settings.items
    pop = np.bincount(history["item_id"].to_numpy(np.int64), minlength=n_items).astype(np.float64)
    return (1 - explore) * pop / pop.sum() + explore / n_items


def simulator_log(world, args: argparse.Namespace, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:  # noqa: ANN001
    """(interactions = organic history + reactions, exposures) of the logging policy, seeded."""
    from experiments.metrics import EXPOSURE_COLUMNS

    history = world.history_frame(end_ms=T0_MS)
    n_items = world.settings.items
    p = logging_policy(world, history, args.explore)
    rng = np.random.default_rng([seed, 1])
    slate = min(args.slate, n_items)
    exposures, reactions = [], []
    for n in range(args.requests):
        user = int(rng.integers(world.settings.users))
        items = rng.choice(n_items, size=slate, replace=False, p=p).tolist()
        request, now = f"s{seed}-r{n}", T0_MS + args.spacing_s * 1000 * (n + 1)
        exposures.append({"request_id": request, "user_id": user, "variant": "logging", "timestamp_ms": now,
                          "items": items})
        reactions += [e.model_dump() for e in world.respond(user, items, request_id=request, variant="logging",
                                                            now_ms=now)]
    interactions = pd.concat([history, pd.DataFrame(reactions)], ignore_index=True)
    return interactions, pd.DataFrame(exposures, columns=list(EXPOSURE_COLUMNS))


def read_ratings(dataset: str, data_dir: Path) -> pd.DataFrame:
    """The raw ratings: ``user_id, item_id, timestamp_ms, rating`` (times shifted as the loaders shift them)."""
    from features.datasets import MOVIELENS_SHIFT_MS, movielens_files

    files = movielens_files(dataset, data_dir)
    raw = files.ratings_bytes()
    sep = files.separator
    if sep == "::":
        raw, sep = raw.replace(b"::", b"\t"), "\t"
    frame = pd.read_csv(io.BytesIO(raw), sep=sep, header=None, names=["user_id", "item_id", "rating", "ts"],
                        skiprows=1 if files.header else 0, engine="c",
                        dtype={"user_id": np.int64, "item_id": np.int64, "rating": np.float64, "ts": np.int64})
    frame["timestamp_ms"] = frame["ts"] * 1000 + MOVIELENS_SHIFT_MS
    return frame[["user_id", "item_id", "timestamp_ms", "rating"]]


def _split(examples, share: float, gap_ms: int):  # noqa: ANN001, ANN202 - RankingExamples
    """Last ``share`` of the requests (distinct times) by time -> test."""
    t = np.sort(examples.examples["t_ms"].unique())
    cutoff = int(t[min(int(len(t) * (1 - share)), len(t) - 1)])
    return examples.split_by_time(cutoff, gap_ms=gap_ms)


def _subset(examples, source: str):  # noqa: ANN001, ANN202
    ex = examples.examples
    return replace(examples, examples=ex[ex["source"] == source].reset_index(drop=True))


def _counts(train, test, tasks) -> dict:  # noqa: ANN001
    out: dict = {}
    for name, part in (("train", train), ("test", test)):
        ex = part.examples
        out[name] = {"examples": len(ex), "by_source": {k: int(v) for k, v in ex["source"].value_counts().items()},
                     "positive_rate": {t: _num(ex[t].mean()) for t in tasks}}
        if "sampled" in set(ex["source"]):
            shown = ex[ex["source"] == "shown"]
            out[name]["positive_rate_shown"] = {t: _num(shown[t].mean()) for t in tasks}
    return out


# ----------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 4)



def _summary(values: list[float | None]) -> dict:
    ok = [v for v in values if v is not None]
    return {"mean": round(float(np.mean(ok)), 4) if ok else None,
            "sd": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else None, "per_seed": values}


def ranker_config(backbone: str, size: str | None, recipe=None):  # noqa: ANN001, ANN201 - RankerConfig
    """The recipe's sizes (default: the ranking base's) for ``backbone``, with ``--size`` overrides
    (``key=value,...``; ints, ``none`` for fmb_rank)."""
    from dataclasses import replace as with_backbone

    from models.ranking_recipe import SIZE_KEYS, resolve_ranking_recipe

    recipe = recipe if recipe is not None else resolve_ranking_recipe()
    changes: dict = {}
    for part in filter(None, (size or "").split(",")):
        key, _, value = part.partition("=")
        if key not in SIZE_KEYS:
            raise SystemExit(f"--size: unknown key {key!r} (known: {sorted(SIZE_KEYS)})")
        changes[key] = None if value.lower() == "none" else (float(value) if key == "dropout" else int(value))
    return with_backbone(recipe.ranker_config(**changes), backbone=backbone)


def attach_attributes(examples, args: argparse.Namespace, world=None):  # noqa: ANN001, ANN201 - RankingExamples
    """The examples with user and item attributes as of each example's t, read from the dataset's files
    (MovieLens) or the simulator's catalogue by the same rule Feast applies on platform data
    (``features.attributes.attributes_as_of``)."""
    from features.attributes import attributes_as_of
    from features.datasets import load_item_attributes, load_user_attributes, simulator_item_attributes
    from models.ranking_data import attribute_entities, with_attributes

    if world is not None:
        users, items = None, simulator_item_attributes(world.catalog.genre, world.catalog.album)
    else:
        users = load_user_attributes(args.dataset, args.data_dir)
        items = load_item_attributes(args.dataset, args.data_dir)
        if users is None and items is None:
            raise SystemExit(f"--attributes: no user or item file of {args.dataset} in {args.data_dir}")
    args.attribute_frames = (users, items)  # the ARGUS cascade reads its candidates' attributes from them
    return with_attributes(examples, attributes_as_of(attribute_entities(examples), users, items))


def run_seed(args: argparse.Namespace, seed: int, world=None) -> dict:  # noqa: ANN001
    """{subset: {scorer: {task: {auc, gauc}}}}, counts and seconds of one seed."""
    from bench.argus_ranking import logloss
    from models.hstu_ranker import HSTURankerConfig, train_hstu_ranker
    from models.ranker import task_metrics, train_ranker
    from models.ranking_data import build_ranking_examples, ratings_examples

    started = time.perf_counter()
    if args.dataset == "simulator":
        interactions, exposures = simulator_log(world, args, seed)
        examples = build_ranking_examples(interactions, exposures, window_s=args.window_s,
                                          sampled_negatives=args.negatives, catalogue=np.arange(world.settings.items),
                                          seed=seed)
        if args.attributes:
            examples = attach_attributes(examples, args, world)
        train, test = _split(examples, args.test_share, args.window_s * 1000)
        tasks = SIM_TASKS
        subsets = {"all": test, "shown": _subset(test, "shown")}
    else:
        examples = ratings_examples(read_ratings(args.dataset, args.data_dir))
        # No requests: GAUC groups by user (the events carry no request ids, so nothing else reads this).
        examples.examples["request_id"] = "u" + examples.examples["user_id"].astype(str)
        if args.attributes:
            examples = attach_attributes(examples, args)
        train, test = _split(examples, args.test_share, 0)
        tasks = RATING_TASKS
        subsets = {"all": test}
    data_s = time.perf_counter() - started

    metrics: dict = {name: {} for name in subsets}
    train_s: dict[str, float] = {}
    vectors = None
    if args.item_vectors and any(m in ("wukong", "dlrm", "hstu") for m in args.models):
        vectors, train_s["item_vectors"] = item_vectors(args, examples, test, seed)
    primary = subsets["shown" if "shown" in subsets else "all"]
    sweep: dict[str, dict] = {}  # scorer -> its scores on the primary subset and its size (a --sizes run)
    chosen: dict[str, int | None] = {}  # scorer -> the epoch validation kept (None: all epochs, no validation)
    argus = None
    for model, j, size in [(m, j, sz) for m in args.models for j, sz in enumerate(args.size_list)]:
        scorer = f"{model}@{j + 1}" if len(args.size_list) > 1 else model
        began = time.perf_counter()
        if model == "argus":
            from bench.argus_ranking import run_argus_seed

            argus = run_argus_seed(args, seed, examples, train, test, tasks)
            train_s[model] = round(time.perf_counter() - began, 2)
            metrics["all"].update(argus["metrics"])
            continue
        if model == "hstu":
            cfg = replace(HSTURankerConfig(), item_vectors=bool(args.item_vectors))
            if args.history_events is not None:
                cfg = replace(cfg, history_events=args.history_events)
            ranker = train_hstu_ranker(train, cfg, tasks, epochs=args.epochs, batch_size=args.batch_size,
                                       lr=args.lr, seed=seed, valid_share=args.valid_share, item_vectors=vectors)
        else:
            ranker = train_ranker(train, ranker_config(model, size, args.recipe), tasks, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, seed=seed, valid_share=args.valid_share,
                                  item_vectors=vectors)
        train_s[scorer] = round(time.perf_counter() - began, 2)
        chosen[scorer] = ranker.chosen_epoch
        for name, part in subsets.items():
            probs = ranker.predict(part)  # [N, tasks], once: the metrics, the log loss and a sweep's scores
            metrics[name][scorer] = task_metrics(part, probs, tasks)
            for task, p in zip(tasks, probs.T):
                metrics[name][scorer][task]["logloss"] = logloss(part.examples[task].to_numpy(), p)
            if part is primary and len(args.size_list) > 1:
                sweep[scorer] = {"scores": probs, "params": non_embedding_params(ranker)}
    for name, part in subsets.items():  # the floors, from the data alone
        if "popularity" not in metrics[name]:
            scored = _floors(part, tasks, seed)
            metrics[name]["popularity"], metrics[name]["random"] = scored["popularity"], scored["random"]
        if world is not None:  # and the ceiling: the simulated users' own probabilities
            metrics[name]["oracle"] = task_metrics(part, oracle_scores(world, part, tasks), tasks)
    counts = _counts(train, test, tasks)
    if args.valid_share:
        counts["chosen_epoch"] = chosen
    if argus is not None:
        counts["argus_scorable"] = round(argus["scorable"], 4)
        counts["argus_fine_tune_epochs"] = argus["fine_tune_epochs"]
    return {"metrics": metrics, "counts": counts, "tasks": tasks, "argus": argus, "test": test, "sweep": sweep,
            "primary": primary,
            "seconds": {"data": round(data_s, 2), "train": train_s, "total": round(time.perf_counter() - started, 2),
                        **({"argus": argus["seconds"]} if argus else {})}}


def item_vectors(args: argparse.Namespace, examples, test, seed: int):  # noqa: ANN001, ANN201
    """(ItemVectors, seconds): the item table of ``--vectors-recipe`` pre-trained on every event before the test
    period (organic plays and the training slates' reactions; nothing the test labels come from), as the platform's
    Wukong reads its champion retriever's."""
    from bench.argus_ranking import pretrain
    from models.ranker import ItemVectors

    began = time.perf_counter()
    retriever = pretrain(examples, int(test.examples["t_ms"].min()), args.vectors_recipe, seed, args.pretrain_epochs)
    return ItemVectors.of_recommender(retriever, source=f"{Path(args.vectors_recipe).name} seed {seed}"), \
        round(time.perf_counter() - began, 2)


def _floors(part, tasks, seed: int) -> dict:  # noqa: ANN001
    """The popularity and random scorers (``evaluate_ranker``'s floors), from the data alone."""
    from models.ranker import item_popularity_before, task_metrics

    n = len(part)
    return {"popularity": task_metrics(part, item_popularity_before(part).astype(np.float64), tasks),
            "random": task_metrics(part, np.random.default_rng(seed).random(n), tasks)}


# The world's exact probability behind each simulator task (``MusicWorld.slate_probabilities``'s keys).
_ORACLE_KEYS = {"engaged": "played", "like": "like", "skip": "skip", "dislike": "dislike", "examined": "examined"}


def oracle_scores(world, part, tasks) -> np.ndarray:  # noqa: ANN001 - MusicWorld, RankingExamples
    """[N, len(tasks)]: each example's exact label probability in the simulated world, the ceiling no ranker
    trained on the log passes (``MusicWorld.slate_probabilities``). A shown item's slate is rebuilt from its
    request's rows (every item of a served slate is one example, ``rank`` its position); a sampled negative was
    never shown, so every label of it is certainly 0."""
    ex = part.examples
    out = np.zeros((len(ex), len(tasks)))
    shown = ex.index[ex["rank"].to_numpy() >= 0]
    rows = ex.loc[shown, ["request_id", "user_id", "item_id", "rank"]].assign(row=np.flatnonzero(ex["rank"] >= 0))
    for _, slate in rows.sort_values(["request_id", "rank"]).groupby("request_id", sort=False):
        ranks = slate["rank"].to_numpy()
        if not np.array_equal(ranks, np.arange(len(ranks))):
            raise ValueError(f"request {slate['request_id'].iat[0]}: its shown examples are not one whole slate")
        probs = world.slate_probabilities(int(slate["user_id"].iat[0]), slate["item_id"].tolist())
        for k, task in enumerate(tasks):
            out[slate["row"].to_numpy(), k] = probs[_ORACLE_KEYS[task]]
    return out


def non_embedding_params(ranker) -> int:  # noqa: ANN001 - models.ranker.Ranker
    """Parameters outside the embedding tables (bottom MLP and backbone): what a size sweep grows."""
    return int(sum(p.numel() for n, p in ranker.named_parameters() if not n.startswith("encoder.embeddings.")))


def size_sweep(args: argparse.Namespace, runs: list[dict], *, draws: int, seed: int = 0) -> dict:
    """A ``--sizes`` run's figures on the primary subset (shown items on the simulator) and task (engaged /
    like): per model, each size's AUC (mean over seeds) and non-embedding parameters; the difference of each
    size from the one before it and, at each size, between the models, each with a 95% interval that
    resamples seeds and, within each seed, users (``bench.argus_ranking.seeded_auc_difference``)."""
    from bench.argus_ranking import seeded_auc_difference

    task = "engaged" if "engaged" in runs[0]["tasks"] else "like"
    k = list(runs[0]["tasks"]).index(task)
    rng = np.random.default_rng(seed)
    parts = []
    for r in runs:
        ex = r["primary"].examples
        users, index = np.unique(ex["user_id"].to_numpy(np.int64), return_inverse=True)
        parts.append((ex[task].to_numpy(np.float64), index.reshape(-1), len(users)))

    def diff(a: str, b: str) -> dict:
        return seeded_auc_difference([(y, r["sweep"][a]["scores"][:, k], r["sweep"][b]["scores"][:, k], u, n)
                                      for (y, u, n), r in zip(parts, runs)], rng, draws)

    sizes = len(args.size_list)
    out: dict = {"task": task, "subset": "shown" if "shown" in runs[0]["metrics"] else "all",
                 "sizes": args.size_list, "models": {}}
    for model in args.models:
        names = [f"{model}@{j + 1}" for j in range(sizes)]
        out["models"][model] = {
            "params": [runs[0]["sweep"][n]["params"] for n in names],
            "auc": [_summary([_num(r["metrics"][out["subset"]][n][task]["auc"]) for r in runs])["mean"] for n in names],
            "auc_per_seed": [[_num(r["metrics"][out["subset"]][n][task]["auc"]) for r in runs] for n in names],
            "step": [diff(names[j + 1], names[j]) for j in range(sizes - 1)],  # size j+2 minus size j+1
        }
    # The references a size curve is read against: the floor, and on the simulator the ceiling.
    out["references"] = {name: _summary([_num(r["metrics"][out["subset"]][name][task]["auc"]) for r in runs])["mean"]
                         for name in ("popularity", "oracle") if name in runs[0]["metrics"][out["subset"]]}
    if len(args.models) == 2:
        a, b = args.models
        out[f"{a}_minus_{b}"] = [diff(f"{a}@{j + 1}", f"{b}@{j + 1}") for j in range(sizes)]
    return out


def plot_sizes(out: dict, path: Path) -> Path:
    """The PNG of a ``--sizes`` run (``out``: its JSON): each model's AUC on the primary subset and task against
    its non-embedding parameters (``models.plots.size_curves``)."""
    from models.plots import size_curves

    sweep, seeds = out["by_size"], len(out["seeds"])
    return size_curves({m: (v["params"], v["auc_per_seed"]) for m, v in sweep["models"].items()}, path,
                       metric=f"{sweep['task']} AUC ({sweep['subset']} items)",
                       title=f"ranker AUC by size ({out['dataset']}, {seeds} seed{'s' * (seeds > 1)})",
                       references=sweep.get("references"))


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    world = None
    if args.dataset == "simulator":
        from features.simulator import MusicWorld
        from infra.settings import SimulatorSettings

        sizes = {"users": args.users} | ({"items": args.items} if args.items else {})
        world = MusicWorld(SimulatorSettings(**sizes))

    runs = []
    for seed in args.seed_list:
        run = run_seed(args, seed, world)
        runs.append(run)
        print(json.dumps({"seed": seed, "seconds": run["seconds"]}), file=sys.stderr, flush=True)

    tasks = runs[0]["tasks"]
    scorers = [m for model in args.models for m in ((model, "argus_pretrained") if model == "argus" else
                                                    [f"{model}@{j + 1}" for j in range(len(args.size_list))]
                                                    if len(args.size_list) > 1 else (model,))]
    scorers += ["popularity", "random"] + (["oracle"] if world is not None else [])

    def summary(subset: str, scorer: str, task: str, metric: str) -> dict:
        return _summary([_num(r["metrics"][subset][scorer][task].get(metric, math.nan)) for r in runs])

    metrics = {
        subset: {
            scorer: {task: {m: summary(subset, scorer, task, m) for m in ("auc", "gauc", "logloss")} for task in tasks}
            for scorer in scorers
        }
        for subset in runs[0]["metrics"]
    }
    primary = metrics["all"][scorers[0]]
    out = {
        "bench": "ranking",
        "dataset": args.dataset,
        "config": args.config,
        "models": args.models,
        "tasks": list(tasks),
        "seeds": args.seed_list,
        "primary": scorers[0],
        **{m: {task: primary[task][m]["mean"] for task in tasks} for m in ("auc", "gauc", "logloss")},
        "metrics": metrics,
    }
    if len(args.size_list) > 1:
        out["by_size"] = size_sweep(args, runs, draws=args.bootstrap)
        if args.plot:
            plot_sizes(out, args.plot)
    if "argus" in args.models:
        from bench.argus_ranking import cascade_summary, differences

        argus_runs = [r["argus"] for r in runs]
        out["cascade"] = cascade_summary(argus_runs) if "like" in tasks else None
        if out["cascade"] is not None:
            out["hr@10"] = out["cascade"]["hr@10_reranked"]["mean"]
            out["ndcg@10"] = out["cascade"]["ndcg@10_reranked"]["mean"]
        out["differences"] = differences(argus_runs, runs[0]["test"], tasks, draws=args.bootstrap)
    out |= {
        "counts": {"per_seed": [r["counts"] for r in runs]},
        "seconds": {"total": round(time.perf_counter() - started, 2), "per_seed": [r["seconds"] for r in runs]},
        "wall_s": round(time.perf_counter() - started, 2),
        "recipe": args.recipe.to_dict(),
        "settings": {k: getattr(args, k) for k in ("epochs", "valid_share", "batch_size", "lr", "test_share", "threads",
                                                    "size", "sizes", "attributes", "history", "item_vectors")}
        | ({"vectors_recipe": args.recipe.vectors_recipe} if args.item_vectors else {})
        | ({k: getattr(args, k) for k in ("users", "items", "requests", "slate", "negatives", "explore", "spacing_s",
                                          "window_s")} if args.dataset == "simulator" else {})
        | ({k: getattr(args, k) for k in ("pretrain_epochs", "ft_epochs", "ft_lr", "ft_encoder_lr", "ft_batch_size",
                                          "ft_valid_share", "retrieve", "bootstrap", "context", "pretrain_recipe")}
           if "argus" in args.models else {}),
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    if world is not None:
        out["settings"]["items"] = world.settings.items  # the default resolved
    if "hstu" in args.models:
        from models.hstu_ranker import HSTURankerConfig

        out["settings"]["history_events"] = args.history_events or HSTURankerConfig().history_events
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
