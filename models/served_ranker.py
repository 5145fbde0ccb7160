"""Wukong, DLRM and the HSTU ranker as the cascade's ranker: one artefact, one loader, the training features.

The cascade (``serving.cascade.rerank``) asks its ranker one question per micro-batch:

    ranker.score_candidates(histories, candidates, now_ms=..., states=...)  -> per history [m] P(task) or None
    ranker.same_encoder(retriever)                                          -> may the retriever's states be reused?

An ARGUS ranker is a ``models.recommender.Recommender`` and answers it itself. ``ServedRanker`` gives the other
ranking families (``models.ranker.Ranker``: Wukong or DLRM; ``models.hstu_ranker.HSTURanker``) the same
interface, so the registry, the gate and the service handle every family alike.

Train/serve consistency: the features are computed by the training code, not by a copy of it
------------------------------------------------------------------------------------------------
A served request becomes ranking examples (``models.ranking_data.served_examples``: the history dicts the
online store holds, one row per candidate at t = the request time), and the model's own ``predict`` computes
their features and scores, exactly as it does on training and test examples. What differs at serving is
fixed here, once:

* **item popularity** (``log1p(events of the item before t)``, Wukong / DLRM). In training it is counted over
  every user's events (``models.ranker.item_popularity_before``); a server holds only its own users' recent
  histories, and counting the offline store per request is far too slow for the cascade's budget. The
  artefact therefore carries the item counts of the training snapshot (``ItemCounts``: events per item
  strictly before ``as_of_ms``, the snapshot's end), and serving reads them: a frozen count, which is the
  training feature at the snapshot's end. What it misses: events after training (a new item reads 0, as an
  unseen item does in training). A fresh ranker each ``ranking_job`` run refreshes them.
  The gate measures what is served: the ranking evaluation and the champion's re-scoring
  (``ranker_scores``) score test examples with these frozen counts and the serving rank below
  (``score_as_served``), not with the popularity before each example's t that training reads: a later test
  request reads the snapshot's counts, as it would once served. Training is unchanged.
* **the slate rank** (the position feature: the logged slate's position bias). The server has not placed
  the candidates yet; every candidate is scored as if at the top (``SERVING_RANK = 0``: "how would the user
  react if this were shown first", the usual debiasing choice). Not -1: that value marks the sampled
  negatives, every one of them labelled 0, and would ask the model about a random catalogue item.
* **the history length** counts at most ``RankerConfig.max_history`` events: the platform trains with it
  set to the online store's ``ingest.history_length``, so the feature never sees more in training than a
  served history can hold.
* **user and item attributes** (``RankerConfig.attributes``): read online from the Feast views that
  training read point-in-time (``features.attributes.online_attributes``: the latest row of each user and
  item), through a reader the service binds (``bind_attributes``), one read per micro-batch. A caller that
  holds the attributes itself passes them with the request instead (``score_candidates(attributes=...)``):
  the registry's pyfunc model does, from columns of its input (``request_attributes``; see below).

Attributes in the pyfunc model. The MLflow model (``models.lifecycle.pyfunc``) is loaded without any store:
``mlflow models predict``, ``mlflow.pyfunc.load_model`` and MLflow's own validation of the input example
(at registration) build a fresh ranker that no service has bound a reader to. So its input carries the
attributes as columns, named as the training features (``features.attributes.ATTRIBUTE_FEATURES``): the
user's ``gender``, ``age``, ``occupation`` one value per row, the items' ``genres`` and ``album`` one value
per candidate (``ATTRIBUTE_COLUMNS``). The model is then self-contained, as MLflow users expect: its signature
names every input it reads, and registration scores its input example (the attributes read offline, as of
the example's time) without a live online store. Binding an offline reader at registration would have
registered a model that MLflow itself cannot run. Without the columns the bound reader is read (the
service's path), and a ranker with neither refuses to score.
* **request context** is an ARGUS feature only (ranking recipes refuse ``context: true`` for the other
  families); these rankers read none.

The HSTU ranker scores each request through M-FALCON (``HSTURanker.predict``: one forward per batch of
requests, each request's history encoded once for all its candidates).

The artefact (a directory, like a Recommender's): ``config.json`` (``format_version``, ``ranker_family``
wukong | dlrm | hstu, the model config, tasks, the served task, metadata), ``state_dict.pt`` (weights, loaded
with ``weights_only=True``), ``item_counts.npz``. ``load_artifact`` is the one loader of the registry and the
pyfunc model: it dispatches on ``ranker_family`` and loads a Recommender when there is none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from features.attributes import ITEM_FEATURES, USER_FEATURES
from models.hstu_ranker import HSTURanker, HSTURankerConfig, train_hstu_ranker
from models.ranker import ItemVectors, Ranker, RankerConfig, train_ranker
from models.ranking_data import RankingExamples, served_examples, with_attributes

FORMAT_VERSION = 1
FAMILY_KEY = "ranker_family"
FAMILIES: tuple[str, ...] = ("wukong", "dlrm", "hstu")
SERVING_RANK = 0  # the slate-rank feature of every served candidate (see the module docstring)
# the tasks every family learns beside the served one (as the bench's rankers do); the served task comes first
AUX_TASKS: tuple[str, ...] = ("engaged", "like", "skip")

# (user ids [n], item ids [n]) -> one row per pair with features.attributes.ATTRIBUTE_FEATURES
AttributeReader = Callable[[np.ndarray, np.ndarray], pd.DataFrame]
# the pyfunc input's attribute columns (see the module docstring): the user's features one value per row, the
# items' features one list per row, aligned with its candidates
ATTRIBUTE_COLUMNS: tuple[str, ...] = USER_FEATURES + ITEM_FEATURES


@dataclass
class ItemCounts:
    """Events per item strictly before ``as_of_ms`` (all events when None), frozen into the artefact."""

    items: np.ndarray  # [V] int64, sorted
    counts: np.ndarray  # [V] int64
    as_of_ms: int | None

    @classmethod
    def of_events(cls, events: pd.DataFrame, as_of_ms: int | None = None) -> ItemCounts:
        items = events["item_id"].to_numpy(np.int64)
        if as_of_ms is not None:
            items = items[events["timestamp_ms"].to_numpy(np.int64) < as_of_ms]
        uniq, counts = np.unique(items, return_counts=True)
        return cls(uniq.astype(np.int64), counts.astype(np.int64), as_of_ms)

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """[n] the frozen count of each item (0: not in the snapshot)."""
        item_ids = np.asarray(item_ids, np.int64)
        if not len(self.items):
            return np.zeros(len(item_ids), np.int64)
        at = np.searchsorted(self.items, item_ids).clip(0, len(self.items) - 1)
        return np.where(self.items[at] == item_ids, self.counts[at], 0)


class ServedRanker:
    """A trained Wukong / DLRM / HSTU ranker with what serving needs beside its weights (see the module
    docstring). Thread-safe for concurrent ``score_candidates`` calls (inference only)."""

    def __init__(self, model: Ranker | HSTURanker, task: str, counts: ItemCounts,
                 metadata: Mapping[str, Any] | None = None):
        if task not in model.tasks:
            raise ValueError(f"task {task!r} is not one of the model's tasks {model.tasks}")
        self.model = model.eval()
        self.task = task
        self.counts = counts
        self.metadata = {**dict(metadata or {}), FAMILY_KEY: self.family, "ranker_task": task}
        self.attributes: AttributeReader | None = None

    @property
    def family(self) -> str:
        return "hstu" if isinstance(self.model, HSTURanker) else self.model.cfg.backbone

    @property
    def reads_attributes(self) -> bool:
        return isinstance(self.model, Ranker) and self.model.cfg.attributes

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        """The pyfunc input columns that may be absent or hold unknown values (None): the attribute columns. The
        registry logs them as optional columns of any type, because a signature inferred from one example would
        type ``age`` as a required integer, and MLflow would then refuse a caller whose user's age is unknown,
        which the ranker itself reads as the unknown value."""
        return ATTRIBUTE_COLUMNS if self.reads_attributes else ()

    @property
    def events_read(self) -> int:
        """The most events of a user's history a feature reads (the service refuses a ranker that reads more
        than the online store keeps, as it refuses such a retriever)."""
        if isinstance(self.model, HSTURanker):
            return self.model.cfg.history_events
        cfg = self.model.cfg
        return max(cfg.history_len, cfg.max_history or cfg.history_len)

    def bind_attributes(self, reader: AttributeReader) -> None:
        """Where serving reads user and item attributes from (``features.attributes.online_attributes``)."""
        self.attributes = reader

    def same_encoder(self, other: Any) -> bool:  # noqa: ARG002 - the interface's
        """Never: these rankers encode the history themselves; no retriever state stands for theirs."""
        return False

    # ------------------------------------------------------------------------------------------ scoring

    def _task_column(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, self.model.tasks.index(self.task)].astype(np.float32)

    def score_examples(self, examples: RankingExamples) -> np.ndarray:
        """[N] P(task) of ranking examples under the training features (popularity before each t, the logged
        slate rank): the model as trained, not as served (the gate scores ``score_as_served``)."""
        return self._task_column(self.model.predict(examples))

    def score_as_served(self, examples: RankingExamples) -> np.ndarray:
        """[N] P(task) of ranking examples as serving scores them (``score_candidates``): the frozen item counts
        for popularity and every candidate at ``SERVING_RANK``. What evaluation and the gate measure."""
        served = replace(examples, examples=examples.examples.assign(rank=SERVING_RANK))
        return self.served_probs(served)

    def served_probs(self, examples: RankingExamples) -> np.ndarray:
        """[N] P(task) of served examples under the serving features: the frozen item counts for popularity."""
        if isinstance(self.model, HSTURanker):
            return self._task_column(self.model.predict(examples))  # M-FALCON; it reads no popularity
        items = examples.examples["item_id"].to_numpy(np.int64)
        return self._task_column(self.model.predict(examples, popularity=self.counts.lookup(items)))

    def score_candidates(self, histories: Sequence[Mapping[str, Any]], candidates: Sequence[Sequence[int]], *,
                         now_ms: int | None = None, states: Sequence[Any] | None = None,
                         attributes: pd.DataFrame | None = None) -> list[np.ndarray | None]:
        """Per history, float32 P(task) of each candidate (aligned with it). Every history dict must carry its
        ``user_id`` (the service adds it); ``now_ms``: the request time (default: just after each history's
        last event); ``states`` is ignored (``same_encoder`` is False). Hashed ids: every item gets a score.
        ``attributes``: the requests' own attributes, one row per (request, candidate) in order
        (``request_attributes``); None: a ranker that reads attributes reads them through the bound reader."""
        if len(candidates) != len(histories):
            raise ValueError(f"{len(histories)} histories but {len(candidates)} candidate lists")
        if not histories:
            return []
        users = [h.get("user_id") for h in histories]
        if any(u is None for u in users):
            raise ValueError("a served history must carry its user_id: these rankers read the user's id")
        t = [int(now_ms) if now_ms is not None else int(max(h.get("timestamps_ms") or [0])) + 1 for h in histories]
        examples = served_examples(list(histories), [int(u) for u in users], candidates, t, rank=SERVING_RANK)
        if self.reads_attributes:
            if attributes is None:
                if self.attributes is None:
                    raise ValueError("this ranker reads user and item attributes: pass them with the requests "
                                     f"(the columns {list(ATTRIBUTE_COLUMNS)}) or bind a reader (bind_attributes)")
                ex = examples.examples
                attributes = self.attributes(ex["user_id"].to_numpy(np.int64), ex["item_id"].to_numpy(np.int64))
            examples = with_attributes(examples, attributes)
        probs = self.served_probs(examples) if len(examples) else np.zeros(0, np.float32)
        return list(np.split(probs, np.cumsum([len(c) for c in candidates])[:-1]))

    # ------------------------------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, FAMILY_KEY: self.family, "model": asdict(self.model.cfg),
                  "tasks": list(self.model.tasks), "task": self.task, "metadata": self.metadata}
        (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        torch.save({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                   path / "state_dict.pt")
        as_of = np.asarray([-1 if self.counts.as_of_ms is None else self.counts.as_of_ms], np.int64)
        np.savez(path / "item_counts.npz", items=self.counts.items, counts=self.counts.counts, as_of_ms=as_of)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ServedRanker:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported ranker format {config.get('format_version')!r}")
        family = config[FAMILY_KEY]
        if family == "hstu":
            model: Ranker | HSTURanker = HSTURanker(HSTURankerConfig(**config["model"]), config["tasks"])
        elif family in ("wukong", "dlrm"):
            model = Ranker(RankerConfig(**config["model"]), config["tasks"])
        else:
            raise ValueError(f"unknown {FAMILY_KEY} {family!r} (known: {', '.join(FAMILIES)})")
        model.load_state_dict(torch.load(path / "state_dict.pt", map_location=device, weights_only=True), strict=True)
        with np.load(path / "item_counts.npz", allow_pickle=False) as z:
            as_of = int(z["as_of_ms"][0])
            counts = ItemCounts(z["items"].astype(np.int64), z["counts"].astype(np.int64), None if as_of < 0 else as_of)
        return cls(model.to(device), config["task"], counts, config.get("metadata"))


def request_attributes(rows: Sequence[Mapping[str, Any]], candidates: Sequence[Sequence[int]]) -> pd.DataFrame | None:
    """The attributes requests carry (``ATTRIBUTE_COLUMNS``, the pyfunc input's columns) as
    ``score_candidates`` takes them: one row per (request, candidate), in order, the request's user values
    repeated over its candidates. None when the rows carry none of the columns (a bound reader reads them)."""
    present = [c for c in ATTRIBUTE_COLUMNS if rows and c in rows[0]]
    if not present:
        return None
    if len(present) < len(ATTRIBUTE_COLUMNS):
        raise ValueError(f"requests carry attribute columns {present} but not "
                         f"{[c for c in ATTRIBUTE_COLUMNS if c not in present]}: pass all of them or none")
    frame: dict[str, list] = {c: [] for c in ATTRIBUTE_COLUMNS}
    for r, (row, items) in enumerate(zip(rows, candidates)):
        for c in USER_FEATURES:
            frame[c] += [row[c]] * len(items)
        for c in ITEM_FEATURES:
            values = _values(row[c])
            if len(values) != len(items):
                raise ValueError(f"request {r}: {len(values)} {c} values for {len(items)} candidates")
            frame[c] += values
    return pd.DataFrame(frame)


def attribute_columns(attributes: pd.DataFrame) -> dict[str, Any]:
    """The inverse of ``request_attributes`` for one request: its candidates' attributes (one row each, the
    same user on every row, e.g. ``features.attributes.historical_attributes``) as the pyfunc input's values."""
    if attributes.empty:
        raise ValueError("a request's attributes need at least one candidate row (its user's values)")
    first = attributes.iloc[0]
    return {**{c: first[c] for c in USER_FEATURES}, **{c: attributes[c].to_list() for c in ITEM_FEATURES}}


def _values(value: Any) -> list:
    """A list column's value as a list (an absent value, NaN in a frame, as none)."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(value)


def is_served_ranker_dir(path: str | Path) -> bool:
    """Whether a saved model directory holds a ``ServedRanker`` (its config names a ``ranker_family``)."""
    return FAMILY_KEY in json.loads((Path(path) / "config.json").read_text())


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """THE loader of a saved model directory: a ``ServedRanker`` when its config names a ``ranker_family``,
    else a ``models.recommender.Recommender`` (a retriever, or an ARGUS ranker)."""
    if is_served_ranker_dir(path):
        return ServedRanker.load(path, device)
    from models.recommender import Recommender

    return Recommender.load(path, device)


def ranker_scores(ranker: Any, examples: RankingExamples) -> np.ndarray:
    """[N] a loaded ranker's P(its task) on ranking examples, whichever family (NaN: it cannot score one), as
    serving would score them (``ServedRanker.score_as_served``): what the ranking evaluation measures and the
    gate re-scores a champion with."""
    if isinstance(ranker, ServedRanker):
        return ranker.score_as_served(examples)
    from models.argus_ranker import score_examples

    return score_examples(ranker, examples)


def train_served_ranker(recipe: Any, train: RankingExamples, task: str, *, seed: int = 0,
                        max_history: int | None = None, counts_as_of_ms: int | None = None,
                        hstu: HSTURankerConfig | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        item_vectors: ItemVectors | None = None) -> ServedRanker:
    """A ``models.ranking_recipe.RankingRecipe`` of a non-ARGUS family trained on ``train`` (the recipe's sizes
    and training values; the HSTU ranker is sized by ``hstu``, default ``HSTURankerConfig()`` as the bench).

    Tasks: ``task`` first (the served one), then ``AUX_TASKS`` the examples label; ``max_history``: the
    history-length cap (the online store's length); ``counts_as_of_ms``: the frozen item counts' instant
    (None: every event of ``train``'s table, i.e. the snapshot's end); ``item_vectors``: the frozen item table
    of a recipe with ``item_vectors`` on (the platform passes its champion retriever's)."""
    if recipe.model not in FAMILIES:
        raise ValueError(f"ranking recipe model {recipe.model!r} is not a served-ranker family {FAMILIES}")
    tasks = tuple(dict.fromkeys((task, *(t for t in AUX_TASKS if t in train.examples))))
    common = {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr, "seed": seed,
              "valid_share": recipe.valid_share}
    if recipe.model == "hstu":
        cfg = replace(hstu or HSTURankerConfig(), item_vectors=recipe.item_vectors)
        model: Ranker | HSTURanker = train_hstu_ranker(train, cfg, tasks, **common, item_vectors=item_vectors)
    else:
        model = train_ranker(train, recipe.ranker_config(max_history=max_history), tasks, **common,
                             item_vectors=item_vectors)
    counts = ItemCounts.of_events(train.events, counts_as_of_ms)
    info = {"train_examples": len(train), "epochs": recipe.epochs, "lr": recipe.lr, "batch_size": recipe.batch_size,
            "seed": seed, "train_losses": [round(x, 6) for x in model.train_losses],
            "valid_share": recipe.valid_share, "valid_auc": [round(x, 6) for x in model.valid_curve],
            "chosen_epoch": model.chosen_epoch,
            "item_counts_as_of_ms": counts_as_of_ms, "serving_rank": SERVING_RANK,
            **({"item_vectors": item_vectors.source} if item_vectors is not None else {})}
    return ServedRanker(model, task, counts, {**dict(metadata or {}), "ranker_train": info})


__all__ = ["ATTRIBUTE_COLUMNS", "FAMILIES", "FAMILY_KEY", "SERVING_RANK", "AttributeReader", "ItemCounts",
           "ServedRanker", "attribute_columns", "is_served_ranker_dir", "load_artifact", "ranker_scores",
           "request_attributes", "train_served_ranker"]
