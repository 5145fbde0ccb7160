"""Training recipes: the one source of every value a training run is made of.

A recipe is a YAML file under ``models/configs/``. ``base.yaml`` states every key once, with its default;
every other recipe starts from another with ``base: <name or path>`` and states only what it changes (a
dataset's protocol, a larger size, the synthetic world's learning rate), so each value has exactly one
default and a variant reads as a diff. The classes that receive a recipe (``TrainConfig`` here,
``models.recommender.ModelConfig``, ``HSTUConfig``, ``SASRecConfig``, ``GPTConfig``, ``LlamaConfig``) declare no
defaults of their own.

Every road that trains resolves its recipe through ``resolve_recipe``: the Dagster training assets, ``encore
train``, distributed training (``python -m models.distributed``), the scaling study and the benches. The
settings (``train.recipe`` and ``train.overrides``, i.e. ``ENCORE_TRAIN__RECIPE``) name a recipe plus explicit
overrides; they hold no recipe values themselves. A trained model's run in MLflow carries the resolved
recipe (``TrainConfig.to_yaml``), so it can be trained again from that file alone.

    resolve_recipe("hstu-ml1m")                     # the paper's ML-1M recipe
    resolve_recipe("default", epochs=2, seed=7)     # the synthetic world's, two epochs, another seed
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from models.hstu import ATTENTIONS
from models.recommender import MODELS, ModelConfig

RECIPE_DIR = Path(__file__).parent / "configs"
BASE_RECIPE = "base"


def recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A bare name (no suffix) is a shipped recipe, ``models/configs/<name>.yaml``; a relative path is read
    beside ``relative_to`` (the file that names it) when given, else from the working directory."""
    path = Path(name_or_path)
    if not path.suffix:
        return RECIPE_DIR / f"{name_or_path}.yaml"
    if relative_to is not None and not path.is_absolute():
        return relative_to / path
    return path


def recipe_names() -> list[str]:
    """The shipped recipes, by name."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_recipe_file(name_or_path: str | Path, *, relative_to: Path | None = None,
                     _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys with its ``base:`` chain resolved: the base's keys, then the file's own on top
    (one level of keys: a recipe is flat). A file without ``base:`` starts from ``base.yaml``. Key names and
    types are checked by ``TrainConfig.from_dict``."""
    path = recipe_path(name_or_path, relative_to)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, resolved))
        raise ValueError(f"recipe base cycle: {cycle}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path.name}: expected a mapping of keys, got {type(data).__name__}")
    if resolved == recipe_path(BASE_RECIPE).resolve():
        return data
    base = data.pop("base", BASE_RECIPE)  # a file that names no base starts from the root
    if not isinstance(base, str):
        raise ValueError(f"recipe {path.name}: base must be a recipe name or path, got {base!r}")
    return {**read_recipe_file(base, relative_to=path.parent, _chain=(*_chain, resolved)), **data}


@dataclass
class TrainConfig:
    """A resolved recipe: what one training run does. Field meanings are documented once, in ``base.yaml``,
    beside their defaults; this class only types them (no defaults: see the module docstring)."""

    # model
    model: str
    max_len: int
    dim: int
    blocks: int
    heads: int
    attn_dim: int
    linear_dim: int
    ffn_dim: int
    dropout: float
    num_time_buckets: int
    hstu_rab: bool
    hstu_attention: str
    hstu_gating: bool
    vista_tokens: int
    vista_train_older: int
    vista_target_attention: bool
    vista_recall_weight: float
    # objective
    negatives: int
    temperature: float
    feedback_weight: float
    # data protocol
    targets: str
    event_types: bool
    # optimisation
    batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    epochs: int
    patience: int
    eval_every: int
    log_test_every: int
    eval_batch_size: int
    length_bucketing: bool
    seed: int
    # data
    split: str
    train_windows: str
    validation: bool
    seen_filter: str
    test_fraction: float
    valid_fraction: float
    # runtime
    checkpoint_dir: str | None
    device: str
    autocast: str
    retain_cpu_memory: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Exactly the keys of a resolved recipe: an unknown or missing key is an error, and values given as
        text (``ENCORE_TRAIN__OVERRIDES__EPOCHS=3``) are read as the field's type."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown} (known: {', '.join(known)})")
        missing = sorted(set(known) - set(data))
        if missing:
            raise ValueError(f"recipe lacks keys {missing}: start it from '{BASE_RECIPE}'")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()})

    def __post_init__(self) -> None:
        """A value out of range is an error naming the key, before any data is read or a step is taken."""
        problems = [f"{key} {getattr(self, key)!r}: {why}" for key, why in _violations(self)]
        if problems:
            raise ValueError("bad recipe values: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**asdict(self), **changes}) if changes else replace(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_yaml(self) -> str:
        """The resolved recipe as a self-contained file (``base: base`` plus every value): what MLflow keeps
        with each training run, and what ``resolve_recipe(path)`` trains again."""
        return yaml.safe_dump({"base": BASE_RECIPE, **self.to_dict()}, sort_keys=False)

    def model_config(self, num_items: int) -> ModelConfig:
        return ModelConfig(
            model=self.model,
            num_items=num_items,
            max_len=self.max_len,
            dim=self.dim,
            blocks=self.blocks,
            heads=self.heads,
            attn_dim=self.attn_dim,
            linear_dim=self.linear_dim,
            ffn_dim=self.ffn_dim,
            dropout=self.dropout,
            num_time_buckets=self.num_time_buckets,
            hstu_rab=self.hstu_rab,
            hstu_attention=self.hstu_attention,
            hstu_gating=self.hstu_gating,
            feedback_head=self.feedback_weight > 0,
            event_types=self.event_types,
            vista_tokens=self.vista_tokens if self.model == "vista" else 0,  # other models summarise nothing
            vista_target_attention=self.vista_target_attention and self.model == "vista",
        )

    def train_older_events(self) -> int | None:
        """``make_batch``'s ``older_events`` for a training step: None (no older prefix) but for vista, which
        reads the ``vista_train_older`` latest events before each window (0 = all)."""
        return self.vista_train_older if self.model == "vista" else None


CHOICES = {"model": MODELS, "hstu_attention": ATTENTIONS, "targets": ("positive", "all"), "split": ("loo", "temporal"), "train_windows": ("last", "all"),
           "seen_filter": ("history", "window"), "autocast": ("auto", "bf16", "off")}
AT_LEAST = {"max_len": 2, "dim": 4, "blocks": 1, "heads": 1, "attn_dim": 0, "linear_dim": 0, "ffn_dim": 0,
            "num_time_buckets": 1, "vista_tokens": 1, "vista_train_older": 0, "vista_recall_weight": 0.0, "negatives": 1, "feedback_weight": 0.0,
            "batch_size": 1, "weight_decay": 0.0, "epochs": 1, "patience": 0, "eval_every": 1, "log_test_every": 0, "eval_batch_size": 1,
            "lr": 0.0}  # lr 0 is allowed on purpose: weights that never move (a control in tests and studies)


def _violations(cfg: TrainConfig) -> list[tuple[str, str]]:
    out = [(k, f"expected one of {', '.join(v)}") for k, v in CHOICES.items() if getattr(cfg, k) not in v]
    out += [(k, f"expected at least {v}") for k, v in AT_LEAST.items() if getattr(cfg, k) < v]
    out += [("temperature", "expected > 0")] if not cfg.temperature > 0 else []
    if cfg.vista_recall_weight > 0 and not (cfg.model == "vista" and cfg.vista_target_attention):
        out.append(("vista_recall_weight", "trains the token scorer: needs model vista with vista_target_attention: true"))
    out += [(k, "expected in [0, 1)") for k in ("dropout", "test_fraction", "valid_fraction")
            if not 0 <= getattr(cfg, k) < 1]
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        out.append(("betas", "expected two values in [0, 1)"))
    if cfg.dim % cfg.heads:
        out.append(("heads", f"must divide dim ({cfg.dim})"))
    elif cfg.model == "llama" and (cfg.dim // cfg.heads) % 2:
        out.append(("heads", f"llama's rotary embedding needs an even dim // heads ({cfg.dim // cfg.heads})"))
    return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type: YAML gives the right types already; environment variables give text."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | None
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"recipe key {key}: expected true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        return tuple(float(v) for v in value)
    if hint in (int, float):
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"recipe key {key}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != number:
            raise ValueError(f"recipe key {key}: expected a whole number, got {value!r}")
        return number
    return str(value) if hint is str else value


def resolve_recipe(name_or_path: str | Path, **overrides: Any) -> TrainConfig:
    """THE way to a ``TrainConfig``: a recipe (a shipped name or a YAML path) with its ``base:`` chain, then
    ``overrides`` on top. Every road that trains calls this."""
    return TrainConfig.from_dict({**read_recipe_file(name_or_path), **overrides})


def recipe_from_settings(train: Any, recipe: str = "", **overrides: Any) -> TrainConfig:
    """The recipe of one platform run: the settings' (``infra.settings.TrainSettings``: ``recipe``), or the one
    the run names instead (``recipe``), then the settings' ``overrides`` (they apply to every run of the
    platform: ``ENCORE_TRAIN__OVERRIDES__EPOCHS=1`` makes every training short), then the run's own
    ``overrides`` (a Dagster run's config, a command's flags)."""
    return resolve_recipe(recipe or train.recipe, **{**train.overrides, **overrides})
