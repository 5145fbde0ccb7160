"""Ranking features: the attribute files, their Feast views read point-in-time, the rankers' attribute units,
ARGUS's context in the candidate token, and the ranking recipes."""

from __future__ import annotations

import gzip
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.ranking import _parse_args
from bench.ranking import main as bench_main
from features.attributes import (
    ATTRIBUTE_FEATURES,
    attributes_as_of,
    historical_attributes,
    online_attributes,
    write_attributes,
)
from features.datasets import ML100K_GENRES, age_group, load_item_attributes, load_user_attributes
from features.feature_repo import feature_store
from infra.settings import EncoreSettings, RankingSettings
from models.argus_ranker import SideConfig, SideRecommender, context_frame, fine_tune_ranker, score_examples
from models.data import ItemVocab
from models.ranker import RankerConfig, auc, example_attribute_bags, train_ranker
from models.ranking_data import attribute_entities, ratings_examples, with_attributes
from models.ranking_recipe import RankingRecipe, platform_fine_tune, ranking_recipe_names, resolve_ranking_recipe
from models.recipe import resolve_recipe
from models.recommender import ModelConfig, Recommender, build_model

T0_MS = 1_200_000_000_000
HOUR_MS = 3_600_000


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- the files


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


def write_ml100k(folder: Path) -> None:
    """u.user plain, u.item gzipped (the loaders read both), u.data for the bench."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|32067\n"
                                   "4|25|F|writer|11111\n")
    items = [f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{_flags('Comedy' if i % 2 else 'Drama', 'War')}"
             for i in range(1, 21)]
    with gzip.open(folder / "u.item.gz", "wt", encoding="latin-1") as f:
        f.write("\n".join(items) + "\n")
    rng = np.random.default_rng(0)
    rows = [f"{u}\t{i}\t{int(rng.integers(1, 6))}\t{880_000_000 + u * 50_000 + k * 3_600}"
            for u in range(1, 31) for k, i in enumerate(rng.choice(np.arange(1, 21), size=15, replace=False))]
    (folder / "u.data").write_text("\n".join(rows) + "\n")


def test_ml100k_user_and_item_files_parse(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    users = load_user_attributes("ml-100k", tmp_path)
    assert users.to_dict("list") == {"user_id": [1, 2, 3, 4], "gender": ["M", "F", "M", "F"],
                                     "age": [18, 50, 1, 25], "occupation": ["technician", "other", "student", "writer"]}
    items = load_item_attributes("ml-100k", tmp_path)
    assert items["item_id"].tolist() == list(range(1, 21))
    assert items["genres"][0] == ["Comedy", "War"] and items["genres"][1] == ["Drama", "War"]
    # ages in years fall into ML-1M's groups, bounds included
    assert age_group(np.array([17, 18, 24, 25, 44, 45, 49, 50, 55, 56, 90])).tolist() == [1, 18, 18, 25, 35, 45, 45,
                                                                                          50, 50, 56, 56]
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|x|F|other|94043\n")
    with pytest.raises(ValueError, match="u.user, line 2"):
        load_user_attributes("ml-100k", tmp_path)


def test_ml1m_users_dat_and_movies_dat_parse_the_grouplens_format(tmp_path: Path) -> None:
    (tmp_path / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n\n3::M::25::15::55117\n")
    # Latin-1, as GroupLens ships it: an accented title must not break the parse
    (tmp_path / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                          "2::Caf\xe9 au lait (1993)::Comedy\n".encode("latin-1"))
    users = load_user_attributes("ml-1m", tmp_path)
    assert users.to_dict("list") == {"user_id": [1, 2, 3], "gender": ["F", "M", "M"], "age": [1, 56, 25],
                                     "occupation": ["K-12 student", "self-employed", "scientist"]}
    items = load_item_attributes("ml-1m", tmp_path)
    assert items["genres"].tolist() == [["Animation", "Children's", "Comedy"], ["Comedy"]]
    (tmp_path / "users.dat").write_bytes(b"1::F::1::10::48067\n2::X::56::16::70072\n")
    with pytest.raises(ValueError, match="users.dat, line 2"):
        load_user_attributes("ml-1m", tmp_path)
    # a dataset without such files, and a folder without them, have no attributes
    assert load_user_attributes("amazon", tmp_path) is None
    assert load_item_attributes("ml-100k", tmp_path / "nothing") is None


# --------------------------------------------------------------------------------------------- Feast


def test_attribute_views_are_registered_and_read_point_in_time_like_the_file_road(tmp_path: Path) -> None:
    settings = EncoreSettings(data_dir=tmp_path)
    store = feature_store(settings)
    assert {"user_attributes", "item_attributes"} <= {v.name for v in store.list_feature_views()}
    users = pd.DataFrame({"user_id": [1, 2], "gender": ["M", "F"], "age": [18, 25], "occupation": ["writer", "other"]})
    items = pd.DataFrame({"item_id": [10, 11], "genres": [["Action", "Drama"], ["Comedy"]], "album": ["", "a1"]})
    write_attributes(store, settings, users=users, items=items, timestamp_ms=T0_MS)
    moved = pd.DataFrame({"user_id": [1], "gender": ["M"], "age": [25], "occupation": ["programmer"]})
    write_attributes(store, settings, users=moved, timestamp_ms=T0_MS + 1000)
    entity = pd.DataFrame({"user_id": [1, 1, 1, 2, 3], "item_id": [10, 11, 10, 12, 11],
                           "t_ms": [T0_MS - 1, T0_MS + 999, T0_MS + 1000, T0_MS + 5, T0_MS + 5]})
    offline = historical_attributes(store, settings, entity)
    # before any row: unknown; a row holds from its own instant on; the later row replaces the earlier one
    assert offline["occupation"].tolist() == [None, "writer", "programmer", "other", None]
    assert offline["age"].tolist()[1:4] == [18, 25, 25]
    assert offline["genres"].tolist() == [[], ["Comedy"], ["Action", "Drama"], [], ["Comedy"]]
    assert offline["album"].tolist() == [None, "a1", None, None, "a1"]
    # the bench's road (pandas, from the frames) applies the same rule
    files = attributes_as_of(entity, pd.read_parquet(settings.feast_dir / "user_attributes.parquet"),
                             pd.read_parquet(settings.feast_dir / "item_attributes.parquet"))
    assert files.astype(str).equals(offline.astype(str))
    # and serving reads the latest row online, from the same views
    online = store.get_online_features(["user_attributes:occupation", "item_attributes:genres"],
                                       [{"user_id": 1, "item_id": 10}]).to_dict()
    assert online["occupation"] == ["programmer"] and online["genres"] == [["Action", "Drama"]]
    # ... through online_attributes, one row per (user, candidate) pair: the as-of-now rows, cleaned alike
    pairs = pd.DataFrame({"user_id": [1, 1, 2, 3, 2], "item_id": [10, 11, 12, 11, 10], "t_ms": T0_MS + 10**6})
    served = online_attributes(store, settings, pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
    assert served.astype(str).equals(historical_attributes(store, settings, pairs).astype(str))
    assert served["occupation"].tolist() == ["programmer", "programmer", "other", None, "other"]
    assert served["album"].tolist() == [None, "a1", None, "a1", None]


# ------------------------------------------------------------------------------------- Wukong and DLRM


def genre_ratings() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ratings where a like is exactly "the movie is a comedy"; train and test movies are disjoint, so only the
    genre (not the item id) can carry the label to the test period."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        t = T0_MS + u * 1000
        for k, item in enumerate(rng.choice(np.arange(1, 61), size=12, replace=False)):
            rows.append((u, int(item), t + k * 60_000 + (10**9 if item > 40 else 0), 5.0 if item % 3 == 0 else 1.0))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp_ms", "rating"])
    items = pd.DataFrame({"item_id": np.arange(1, 61), "genres": [["Comedy"] if i % 3 == 0 else ["Drama"]
                                                                  for i in range(1, 61)], "album": ""})
    return ratings, items


def test_wukong_and_dlrm_read_the_attributes_as_units() -> None:
    ratings, items = genre_ratings()
    examples = ratings_examples(ratings)
    examples.examples["request_id"] = "u" + examples.examples["user_id"].astype(str)
    examples = with_attributes(examples, attributes_as_of(attribute_entities(examples), None, items))
    assert set(ATTRIBUTE_FEATURES) <= set(examples.examples)
    train, test = examples.split_by_time(T0_MS + 10**9)
    assert set(test.examples["item_id"]) & set(train.examples["item_id"]) == set()
    like = test.examples["like"].to_numpy()
    # Wukong reads the genre unit cleanly; DLRM's dot products also meet the random rows of the unseen items
    for backbone, floor in (("wukong", 0.9), ("dlrm", 0.75)):
        plain = RankerConfig(backbone=backbone)
        assert not plain.attributes and RankerConfig(backbone=backbone, attributes=True).num_units == plain.num_units + 2
        aucs = {}
        for on in (False, True):
            ranker = train_ranker(train, RankerConfig(backbone=backbone, attributes=on, dim=8), ("like",), epochs=8,
                                  batch_size=64, seed=0)
            aucs[on] = auc(like, ranker.predict(test)[:, 0])
        assert aucs[True] > floor and aucs[True] > aucs[False] + 0.2, (backbone, aucs)
    bags = example_attribute_bags(test, 1024)
    assert (bags["item_attributes"][1] == 1).all() and (bags["user_attributes"][1] == 0).all()  # no user file
    with pytest.raises(ValueError, match="with_attributes"):
        train_ranker(ratings_examples(ratings), RankerConfig(attributes=True), ("like",), epochs=1)


# ---------------------------------------------------------------------------------- ARGUS context tokens


def untrained_argus(items: int) -> Recommender:
    torch.manual_seed(0)
    cfg = ModelConfig(model="hstu", num_items=items, max_len=12, dim=16, blocks=1, heads=1, attn_dim=0,
                      linear_dim=0, ffn_dim=0, dropout=0.0, num_time_buckets=16, hstu_rab=True,
                      hstu_attention="silu", hstu_gating=True, feedback_head=True, event_types=True,
                      vista_tokens=0, vista_target_attention=False)
    return Recommender(build_model(cfg), ItemVocab.build(np.arange(1, items + 1)))


def hourly_ratings(items: int = 30) -> pd.DataFrame:
    """A like is exactly "rated in an even hour of the day": nothing but the request's context says so."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(50):
        t = T0_MS + int(rng.integers(0, 1000)) * HOUR_MS
        for item in rng.choice(np.arange(1, items + 1), size=14, replace=False):
            t += int(rng.integers(1, 5)) * HOUR_MS + int(rng.integers(0, 3_000_000))
            rows.append((u, int(item), t, 5.0 if (t // HOUR_MS) % 2 == 0 else 1.0))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp_ms", "rating"])


def test_context_tokens_let_argus_rank_by_the_request_context_and_are_off_by_default() -> None:
    rec = untrained_argus(30)
    examples = ratings_examples(hourly_ratings())
    t = np.sort(examples.examples["t_ms"].unique())
    train, test = examples.split_by_time(int(t[int(len(t) * 0.7)]))
    hours = context_frame(test)["hour"].to_numpy()
    assert np.array_equal(hours, (test.examples["t_ms"].to_numpy() // HOUR_MS) % 24)
    assert set(context_frame(test)["surface"]) == {"organic"}  # ratings: the user's own doing
    like = test.examples["like"].to_numpy()
    plain = fine_tune_ranker(rec, train, task="like", epochs=10, lr=1e-2, batch_size=128, seed=0)
    tuned = fine_tune_ranker(rec, train, task="like", epochs=10, lr=1e-2, batch_size=128, seed=0,
                             side=SideConfig(context=True))
    # off by default: a plain Recommender, as every earlier ranker; on: the context moves the scores
    assert type(plain) is Recommender and plain.metadata["ranker_fine_tune"]["side"] is None
    assert isinstance(tuned, SideRecommender) and tuned.metadata["ranker_fine_tune"]["side"]["context"]
    p_plain, p_ctx = score_examples(plain, test), score_examples(tuned, test)
    ok = ~np.isnan(p_ctx)
    assert ok.mean() > 0.8
    assert auc(like[ok], p_ctx[ok]) > 0.9 and auc(like[ok], p_plain[ok]) < 0.7
    # the same requests an hour later: the context token alone changes the answer
    later = test.examples.assign(t_ms=test.examples["t_ms"] + HOUR_MS)
    from dataclasses import replace

    shifted = score_examples(tuned, replace(test, examples=later))
    assert np.nanmean(np.abs(shifted - p_ctx)) > 0.2
    # a context ranker is not served: saving it says why instead of dropping its side table
    with pytest.raises(NotImplementedError, match="serving"):
        tuned.save("unused")
    with pytest.raises(ValueError, match="with_attributes"):
        fine_tune_ranker(rec, train, task="like", epochs=1, side=SideConfig(attributes=True))


# ------------------------------------------------------------------------------------------- recipes


def test_the_ranking_recipes_load_and_their_base_is_todays_behaviour() -> None:
    names = ranking_recipe_names()
    assert {"base", "wukong", "dlrm", "hstu", "argus", "argus-ml1m", "wukong-ml1m", "dlrm-ml1m"} <= set(names)
    recipes = {n: resolve_ranking_recipe(n) for n in names}
    base = recipes["base"]
    # Wukong / DLRM sizes: RankerConfig's defaults, attributes off
    assert base.ranker_config() == RankerConfig()
    # the bench's flag defaults before recipes, and fine_tune_ranker's
    assert (base.epochs, base.batch_size, base.lr, base.test_share, base.retrieve) == (5, 256, 3e-3, 0.3, 200)
    ft = inspect.signature(fine_tune_ranker).parameters
    assert (base.ft_epochs, base.ft_lr, base.ft_encoder_lr, base.ft_batch_size, base.ft_valid_share) == tuple(
        ft[k].default for k in ("epochs", "lr", "encoder_lr", "batch_size", "valid_share"))
    # the platform's ranking settings
    r = RankingSettings()
    assert (r.task, r.epochs, r.lr, r.encoder_lr, r.batch_size) == (base.task, base.ft_epochs, base.ft_lr,
                                                                    base.ft_encoder_lr, base.ft_batch_size)
    assert r.recipe is None and platform_fine_tune(r) == {}
    # a recipe named in the settings sets the platform ranker's task and fine-tuning values
    named = platform_fine_tune(RankingSettings(recipe="argus"))
    assert named == {"task": "engaged", "epochs": 20, "lr": 1e-3, "encoder_lr": 0.0, "batch_size": 512}
    # no shipped recipe has context on (ratings carry none; it cost ML-100K like-AUC); the ML-1M recipes read
    # users.dat / movies.dat
    assert [n for n, rc in recipes.items() if rc.context] == []
    assert all(recipes[n].attributes for n in ("argus-ml1m", "wukong-ml1m", "dlrm-ml1m"))
    assert not any(recipes[n].attributes for n in ("base", "wukong", "dlrm", "argus"))
    # Wukong and DLRM read the engaged history and a retriever's item vectors (hstu-ml1m's on ML-1M); the base not
    for n in ("wukong", "dlrm", "wukong-ml1m", "dlrm-ml1m"):
        assert recipes[n].item_vectors and recipes[n].history == "engaged", n
    assert recipes["wukong-ml1m"].vectors_recipe == recipes["dlrm-ml1m"].vectors_recipe == "hstu-ml1m"
    assert not base.item_vectors and base.history == "all"
    assert recipes["hstu"].item_vectors and recipes["hstu"].history == "all"  # its action tokens mark the skips
    pre = resolve_recipe(recipes["argus-ml1m"].pretrain_recipe())
    assert pre.feedback_weight > 0 and pre.event_types and pre.max_len == 200  # hstu-ml1m plus ARGUS's task
    with pytest.raises(ValueError, match="unknown ranking recipe keys"):
        RankingRecipe.from_dict({**base.to_dict(), "speed": 1})
    with pytest.raises(ValueError, match="ARGUS feature"):
        resolve_ranking_recipe("wukong", context=True)
    with pytest.raises(ValueError, match="ARGUS is the retriever"):
        resolve_ranking_recipe("argus", item_vectors=True)
    with pytest.raises(ValueError, match="all or engaged"):
        resolve_ranking_recipe("wukong", history="liked")


def test_the_bench_reads_the_recipe_and_the_flags_override_it() -> None:
    args = _parse_args(["--dataset", "ml-100k", "--data-dir", ".", "--config", "argus"])
    assert args.models == ["argus"] and not args.context and args.pretrain_recipe == "argus-ml100k"
    args = _parse_args(["--dataset", "ml-100k", "--data-dir", ".", "--config", "argus", "--context", "--ft-epochs", "3"])
    assert args.context and args.ft_epochs == 3
    # before recipes, --config named the pre-training recipe: still so, with context off
    args = _parse_args(["--dataset", "ml-100k", "--data-dir", ".", "--model", "argus", "--config", "argus-ml100k"])
    assert args.models == ["argus"] and not args.context and args.pretrain_recipe == "argus-ml100k"
    args = _parse_args([])
    assert args.models == ["wukong", "dlrm"] and not args.attributes and args.epochs == 5
    args = _parse_args(["--config", "argus", "--model", "wukong"])
    assert args.models == ["wukong"] and not args.context


def test_the_bench_ranks_movielens_with_the_attribute_files(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    write_ml100k(tmp_path)
    bench_main(["--dataset", "ml-100k", "--data-dir", str(tmp_path), "--config", "wukong", "--attributes",
                "--epochs", "1", "--seeds", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["models"] == ["wukong"] and out["recipe"]["attributes"] and out["settings"]["attributes"]
    assert 0 <= out["auc"]["like"] <= 1
    # item vectors of a retriever pre-trained on the training period, and the engaged history
    bench_main(["--dataset", "ml-100k", "--data-dir", str(tmp_path), "--model", "dlrm", "--item-vectors",
                "--history", "engaged", "--vectors-recipe", "hstu", "--pretrain-epochs", "1", "--epochs", "1",
                "--seeds", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["settings"]["item_vectors"] and out["settings"]["history"] == "engaged"
    assert out["settings"]["vectors_recipe"] == "hstu" and out["seconds"]["per_seed"][0]["train"]["item_vectors"] > 0
    assert 0 <= out["auc"]["like"] <= 1
    # ARGUS with context and attributes in the candidate token, the cascade scoring its lists the same way
    bench_main(["--dataset", "ml-100k", "--data-dir", str(tmp_path), "--config", "argus", "--attributes",
                "--context", "--pretrain-epochs", "1", "--ft-epochs", "2", "--seeds", "0", "--bootstrap", "20",
                "--retrieve", "10"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["models"] == ["argus"] and out["settings"]["context"]  # --context turned it on
    assert 0 <= out["auc"]["like"] <= 1 and out["cascade"]["users"] > 0 and 0 <= out["ndcg@10"] <= 1


def test_the_ranking_assets_read_the_attributes_through_feast_point_in_time(tmp_path: Path) -> None:
    from orchestration.assets.ranking import ranking_split, read_attributes

    settings = EncoreSettings(data_dir=tmp_path)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    exposures = pd.DataFrame({"request_id": ["r1", "r2"], "user_id": [1, 1], "timestamp_ms": [T0_MS, T0_MS + 10_000],
                              "items": [[10, 11], [10, 11]]})
    interactions = pd.DataFrame({"event_id": ["e1", "e2"], "user_id": [1, 1], "item_id": [10, 11],
                                 "event_type": ["like", "skip"], "timestamp_ms": [T0_MS + 1, T0_MS + 10_001],
                                 "played_ratio": [1.0, 0.1], "request_id": ["r1", "r2"]})
    exposures.to_parquet(snapshot / "exposures.parquet")
    interactions.to_parquet(snapshot / "interactions.parquet")
    info = {"exposures": str(snapshot / "exposures.parquet"), "interactions": str(snapshot / "interactions.parquet"),
            "labels_complete_ms": T0_MS + 10**6, "window_s": 60, "cutoff_ms": T0_MS + 5_000}
    assert read_attributes(settings, info, snapshot) is None  # nothing written: nothing read, no Feast call
    store = feature_store(settings)
    write_attributes(store, settings, users=pd.DataFrame({"user_id": [1], "gender": ["F"], "age": [25],
                                                          "occupation": ["writer"]}), timestamp_ms=T0_MS)
    write_attributes(store, settings, items=pd.DataFrame({"item_id": [10, 11], "genres": [["Jazz"], ["Rock"]],
                                                          "album": ["a1", "a2"]}), timestamp_ms=T0_MS + 5_000)
    info["attributes"] = read_attributes(settings, info, snapshot)
    train, test = ranking_split(info)
    # the user's row holds for both requests; the items' rows came after the first request only
    assert train.examples["occupation"].tolist() == ["writer", "writer"]
    assert train.examples["genres"].tolist() == [[], []] and test.examples["genres"].tolist() == [["Jazz"], ["Rock"]]


def test_the_ml1m_recipes_run_by_the_same_code_path_on_synthetic_grouplens_files(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    ratings = [f"{u}::{i}::{int(rng.integers(1, 6))}::{978_000_000 + u * 50_000 + k * 3_600}"
               for u in range(1, 31) for k, i in enumerate(rng.choice(np.arange(1, 41), size=15, replace=False))]
    (tmp_path / "ratings.dat").write_text("\n".join(ratings) + "\n")
    (tmp_path / "users.dat").write_text("\n".join(f"{u}::{'MF'[u % 2]}::{(1, 18, 25, 35)[u % 4]}::{u % 21}::12345"
                                                  for u in range(1, 31)) + "\n")
    (tmp_path / "movies.dat").write_bytes("\n".join(f"{i}::Film {i} (1999)::{'Comedy|Drama' if i % 2 else 'War'}"
                                                    for i in range(1, 41)).encode("latin-1") + b"\n")
    for argv in (["--config", "wukong-ml1m", "--epochs", "1"],
                 ["--config", "argus-ml1m", "--pretrain-epochs", "1", "--ft-epochs", "2", "--bootstrap", "20",
                  "--retrieve", "10"]):
        bench_main(["--dataset", "ml-1m", "--data-dir", str(tmp_path), "--seeds", "0", *argv])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["recipe"]["attributes"] and 0 <= out["auc"]["like"] <= 1
    assert out["settings"]["pretrain_recipe"].endswith("pretrain-argus-ml1m.yaml") and not out["settings"]["context"]
