"""One recipe source: every road that trains resolves the same recipe for the same name, and every recipe value
has exactly one default (``models/configs/base.yaml``)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from cli.main import main as encore
from infra.settings import EncoreSettings, TrainSettings
from models.hstu import HSTUConfig
from models.recipe import BASE_RECIPE, TrainConfig, read_recipe_file, recipe_from_settings, recipe_names, resolve_recipe
from models.recommender import ModelConfig
from models.sasrec import SASRecConfig
from orchestration.assets.training import DistributedTrainingConfig, TrainingConfig, torchrun_command, train_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = recipe_names()


def cli_recipe(name: str) -> TrainConfig:
    """What ``encore train --config NAME`` trains."""
    out = CliRunner().invoke(encore, ["train", "--config", name, "--print-recipe"])
    assert out.exit_code == 0, out.output
    return resolve_from_text(out.output)


def distributed_recipe(name: str) -> TrainConfig:
    """What ``python -m models.distributed --config NAME`` (every rank of torchrun) trains."""
    out = subprocess.run([sys.executable, "-m", "models.distributed", "--config", name, "--print-recipe"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return resolve_from_text(out)


def resolve_from_text(text: str) -> TrainConfig:
    data = yaml.safe_load(text)
    assert data.pop("base") == BASE_RECIPE  # a printed recipe is self-contained: every key, over the root
    return TrainConfig.from_dict(data)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_road_resolves_the_same_recipe_for_the_same_name(name: str, tmp_path: Path) -> None:
    expected = resolve_recipe(name)
    settings = EncoreSettings(data_dir=tmp_path, ingest={"history_length": 512})
    # the Dagster training assets: a run that names the recipe, and the settings that name it
    assert train_config(settings, TrainingConfig(recipe=name)) == expected
    assert train_config(settings.model_copy(update={"train": TrainSettings(recipe=name)}), TrainingConfig()) == expected
    assert train_config(settings, DistributedTrainingConfig(recipe=name)) == expected
    # encore train, and distributed training under torchrun
    assert cli_recipe(name) == expected
    assert distributed_recipe(name) == expected


def test_the_distributed_asset_hands_every_rank_the_recipe_it_resolved(tmp_path: Path) -> None:
    settings = EncoreSettings(data_dir=tmp_path, train={"recipe": "sasrec", "overrides": {"epochs": 3}})
    cfg = train_config(settings, DistributedTrainingConfig(dim=24))
    file = tmp_path / "recipe.yaml"
    file.write_text(cfg.to_yaml())
    cmd = torchrun_command(DistributedTrainingConfig(), str(file), "data.parquet", "out", "run")
    assert cmd[cmd.index("--config") + 1] == str(file)
    assert distributed_recipe(str(file)) == cfg
    assert (cfg.model, cfg.epochs, cfg.dim, cfg.feedback_weight) == ("sasrec", 3, 24, 0.0)


def test_settings_name_a_recipe_plus_overrides_and_a_run_overrides_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCORE_TRAIN__RECIPE", "hstu")
    monkeypatch.setenv("ENCORE_TRAIN__OVERRIDES__EPOCHS", "3")  # text from the environment, read as the key's type
    train = EncoreSettings().train
    assert recipe_from_settings(train) == resolve_recipe("hstu", epochs=3)
    assert recipe_from_settings(train, seed=5) == resolve_recipe("hstu", epochs=3, seed=5)
    # a run that names another recipe: the settings' overrides apply to it too, the run's own last
    assert recipe_from_settings(train, "sasrec") == resolve_recipe("sasrec", epochs=3)
    assert recipe_from_settings(train, "sasrec", epochs=1) == resolve_recipe("sasrec", epochs=1)


def test_a_bad_recipe_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown recipe keys"):
        resolve_recipe("default", nope=1)
    with pytest.raises(ValueError, match="recipe key epochs: expected int"):
        resolve_recipe("default", epochs="many")
    settings = EncoreSettings(data_dir=tmp_path)  # the online store keeps 200 events per user
    assert train_config(settings, TrainingConfig(recipe="default")).max_len == 50  # fits
    short = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"history_length": 40})})
    with pytest.raises(dg.Failure, match="ingest.history_length"):
        train_config(short, TrainingConfig(recipe="default"))  # max_len 50 > 40: serving could not feed it
    out = CliRunner().invoke(encore, ["train", "--config", "no-such-recipe"])
    assert out.exit_code != 0 and "shipped: " in out.output and "hstu-ml1m" in out.output


def test_every_recipe_value_has_exactly_one_default() -> None:
    # the classes that receive a recipe declare none
    for cls in (TrainConfig, ModelConfig, HSTUConfig, SASRecConfig):
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert with_default == [], f"{cls.__name__} declares defaults for {with_default}"
    # the settings name a recipe and overrides, and hold no recipe value
    assert set(TrainSettings.model_fields) == {"recipe", "overrides"}
    # base.yaml states every key once (a YAML mapping with a repeated key would silently keep the last)
    text = (ROOT / "models" / "configs" / f"{BASE_RECIPE}.yaml").read_text()
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line[0].isspace() and line[0] != "#"]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    # every shipped recipe resolves over the root (nothing left to a default elsewhere)
    for name in SHIPPED:
        assert set(read_recipe_file(name)) == set(keys), name


def test_only_the_recipe_module_builds_a_train_config() -> None:
    """One road: outside ``models/recipe.py`` a TrainConfig comes from ``resolve_recipe`` (or a replace of one)."""
    direct = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv") or rel == Path("models/recipe.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else (
                    f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else "")
                if name == "TrainConfig" or name.startswith("TrainConfig."):
                    direct.append(f"{rel}:{node.lineno} {name}")
    assert direct == []


def test_a_resolved_recipe_trains_again_from_its_own_file(tmp_path: Path) -> None:
    cfg = resolve_recipe("hstu-large-ml100k", seed=3)
    (tmp_path / "again.yaml").write_text(cfg.to_yaml())
    assert resolve_recipe(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("bad, message", [
    ({"model": "foo"}, "model 'foo': expected one of hstu, sasrec"),
    ({"epochs": 0}, "epochs 0: expected at least 1"),
    ({"dropout": 1.5}, r"dropout 1.5: expected in \[0, 1\)"),
    ({"lr": -1}, "lr -1.0: expected at least 0.0"),
    ({"temperature": 0}, "temperature 0.0: expected > 0"),
    ({"dim": 30, "heads": 4}, r"heads 4: must divide dim \(30\)"),
])
def test_a_value_out_of_range_is_refused_before_training(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_recipe("default", **bad)


def test_old_train_settings_are_told_where_recipe_values_went(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCORE_TRAIN__EPOCHS", "3")
    with pytest.raises(ValueError, match=r"train.epochs is a recipe value now: set train.overrides.epochs"):
        EncoreSettings()
