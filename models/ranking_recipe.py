"""Ranking recipes: the one source of a ranker's settings, as ``models.recipe`` is for retrieval.

A ranking recipe is a YAML file under ``models/configs/ranking/``. ``ranking/base.yaml`` states every key once,
with its default (today's ``bench.ranking`` flags, ``RankerConfig``'s sizes and ``fine_tune_ranker``'s settings);
every other recipe starts from another with ``base: <name>`` and states what it changes. ``RankingRecipe``
types the keys and declares no defaults; an unknown or missing key is an error, as in ``TrainConfig``.

Why a schema of its own rather than a ``ranker:`` section in ``TrainConfig``: a ranking run is not a training
run of the retriever (its data are ranking examples, its model one of several families), and the retrieval
recipes' schema refuses unknown keys. The ARGUS ranker names its pre-training recipe (``pretrain``): a
retrieval recipe name (``argus-ml100k``) or a YAML file beside the ranking recipes (``pretrain-argus-ml1m.yaml``).

Who reads them: ``encore bench ranking --config NAME`` (flags given explicitly override the recipe) and the
ranking assets (``ranking.recipe`` in the settings; unset, the settings' own values, which equal the base's).
On the platform a recipe's ``model`` picks the family ``ranking_job`` trains and the cascade serves: ``argus``
fine-tunes the champion retriever's feedback head (``platform_fine_tune``), ``wukong`` / ``dlrm`` / ``hstu``
train that model on the ranking examples with the recipe's sizes and training values
(``models.served_ranker.train_served_ranker``).

    resolve_ranking_recipe("wukong")                       # Wukong, today's sizes and training
    resolve_ranking_recipe("argus", ft_epochs=5)           # ARGUS with context tokens, fewer epochs
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from models.recipe import RECIPE_DIR, _coerce

RANKING_DIR = RECIPE_DIR / "ranking"
RANKING_BASE = "base"
RANKER_MODELS: tuple[str, ...] = ("wukong", "dlrm", "hstu", "argus")
# RankerConfig's fields that a recipe sets (the backbone is the recipe's ``model``).
SIZE_KEYS: tuple[str, ...] = ("dim", "item_buckets", "user_buckets", "history_len", "dense_units", "layers",
                              "fmb_units", "lcb_units", "fmb_rank", "mlp_hidden", "dropout", "attribute_buckets")


@dataclass
class RankingRecipe:
    """A resolved ranking recipe. Meanings are documented once, in ``ranking/base.yaml``."""

    model: str
    # features
    attributes: bool
    context: bool
    attribute_buckets: int
    history: str
    item_vectors: bool
    vectors_recipe: str
    # Wukong / DLRM sizes
    dim: int
    item_buckets: int
    user_buckets: int
    history_len: int
    dense_units: int
    layers: int
    fmb_units: int
    lcb_units: int
    fmb_rank: int | None
    mlp_hidden: int
    dropout: float
    # training of Wukong, DLRM, the HSTU ranker
    epochs: int
    batch_size: int
    lr: float
    test_share: float
    valid_share: float
    # ARGUS: pre-training, then fine-tuning the feedback head
    pretrain: str
    pretrain_epochs: int | None
    task: str
    ft_epochs: int
    ft_lr: float
    ft_encoder_lr: float
    ft_batch_size: int
    ft_valid_share: float
    retrieve: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankingRecipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ranking recipe keys {unknown} (known: {', '.join(sorted(known))})")
        missing = sorted(known - set(data))
        if missing:
            raise ValueError(f"ranking recipe lacks keys {missing}: start it from ranking/{RANKING_BASE}")
        hints = typing.get_type_hints(cls)
        recipe = cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()})
        if recipe.model not in RANKER_MODELS:
            raise ValueError(f"ranking recipe model {recipe.model!r}: expected one of {', '.join(RANKER_MODELS)}")
        if not 0 <= recipe.valid_share < 1:
            raise ValueError(f"ranking recipe valid_share {recipe.valid_share}: expected in [0, 1)")
        if not 0 < recipe.test_share < 1:
            raise ValueError(f"ranking recipe test_share {recipe.test_share}: expected in (0, 1)")
        if recipe.item_vectors and recipe.model == "argus":
            raise ValueError("item_vectors are Wukong's, DLRM's and the HSTU ranker's; ARGUS is the retriever "
                             "itself: set it false")
        if recipe.history not in ("all", "engaged"):
            raise ValueError(f"ranking recipe history {recipe.history!r}: expected all or engaged")
        if recipe.context and recipe.model != "argus":
            raise ValueError("context tokens are an ARGUS feature (its event tokens): set context false for "
                             f"{recipe.model}")
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ranker_config(self, **size_overrides: Any):  # noqa: ANN201 - models.ranker.RankerConfig
        """The Wukong / DLRM config of this recipe (``model`` is the backbone), sizes overridden by name."""
        from models.ranker import RankerConfig

        sizes = {k: getattr(self, k) for k in SIZE_KEYS} | size_overrides
        return RankerConfig(backbone=self.model if self.model in ("wukong", "dlrm") else "wukong",
                            attributes=self.attributes, history=self.history, item_vectors=self.item_vectors,
                            **sizes)

    def side_config(self):  # noqa: ANN201 - models.argus_ranker.SideConfig
        """The ARGUS candidate token's side features of this recipe."""
        from models.argus_ranker import SideConfig

        return SideConfig(context=self.context, attributes=self.attributes, buckets=self.attribute_buckets)

    def pretrain_recipe(self) -> str:
        """The pre-training recipe as ``models.recipe.resolve_recipe`` takes it: a retrieval recipe name, or
        the absolute path of a YAML file that sits beside the ranking recipes."""
        return _retrieval_recipe(self.pretrain)

    def vectors_retrieval_recipe(self) -> str:
        """``vectors_recipe`` as ``models.recipe.resolve_recipe`` takes it (as ``pretrain_recipe``)."""
        return _retrieval_recipe(self.vectors_recipe)


def _retrieval_recipe(name: str) -> str:
    """A retrieval recipe name as is; a ``.yaml`` file name (one beside the ranking recipes) as its absolute path."""
    return str(RANKING_DIR / name) if Path(name).suffix else name


def platform_fine_tune(ranking: Any) -> dict[str, Any]:
    """What the platform's ranker (``ranking_job``) takes from ``ranking.recipe`` (``infra.settings.
    RankingSettings``): its task and fine-tuning values, under the settings' names; {} without a recipe (the
    settings' own values, which are the base's). For an ARGUS recipe the side features are not taken: an ARGUS
    ranker with them is not served yet (``models.argus_ranker.SideRecommender``). A wukong / dlrm / hstu recipe
    takes its task from here and everything else from the recipe (``models.served_ranker``), its attributes
    included (read online at serving)."""
    if not ranking.recipe:
        return {}
    recipe = resolve_ranking_recipe(ranking.recipe)
    return {"task": recipe.task, "epochs": recipe.ft_epochs, "lr": recipe.ft_lr, "encoder_lr": recipe.ft_encoder_lr,
            "batch_size": recipe.ft_batch_size}


def ranking_recipe_path(name: str) -> Path:
    return RANKING_DIR / f"{name}.yaml"


def ranking_recipe_names() -> list[str]:
    return sorted(p.stem for p in RANKING_DIR.glob("*.yaml") if not p.stem.startswith("pretrain-"))


def is_ranking_recipe(name: str | None) -> bool:
    return bool(name) and ranking_recipe_path(str(name)).is_file()


def read_ranking_recipe(name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A ranking recipe's keys with its ``base:`` chain resolved (a file naming no base starts from base)."""
    if name in _chain:
        raise ValueError(f"ranking recipe base cycle: {' -> '.join((*_chain, name))}")
    path = ranking_recipe_path(name)
    if not path.is_file():
        raise ValueError(f"no ranking recipe {name!r} (known: {', '.join(ranking_recipe_names())})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"ranking recipe {path.name}: expected a mapping of keys")
    if name == RANKING_BASE:
        return data
    base = data.pop("base", RANKING_BASE)
    return {**read_ranking_recipe(str(base), (*_chain, name)), **data}


def resolve_ranking_recipe(name: str = RANKING_BASE, **overrides: Any) -> RankingRecipe:
    """THE way to a ``RankingRecipe``: the named recipe's chain, then ``overrides`` (None values are skipped:
    a flag that was not given)."""
    return RankingRecipe.from_dict({**read_ranking_recipe(name), **{k: v for k, v in overrides.items() if v is not None}})
