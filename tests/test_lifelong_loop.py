"""LifelongWorld.respond and the closed-loop bench (bench/lifelong_loop.py), on tiny worlds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from features.lifelong import DEFAULT_END_MS, LifelongParams, LifelongWorld

SMALL = LifelongParams(seed=5, users=6, min_events=800, max_events=1500, artists=200, max_tracks=6,
                       min_favourites=20, max_favourites=40)
NOW = DEFAULT_END_MS + 3_600_000


@pytest.fixture(scope="module")
def world() -> LifelongWorld:
    return LifelongWorld(SMALL)


def _top(world: LifelongWorld, u: int, k: int = 10) -> list[int]:
    return np.argsort(-world.next_probs(u))[:k].tolist()


def _reactions(events) -> list[tuple]:
    return [(e.item_id, e.event_type, e.played_ratio, e.timestamp_ms, e.event_id) for e in events]


def test_respond_is_deterministic_per_key(world: LifelongWorld) -> None:
    slate = _top(world, 1)
    a = world.respond(1, slate, now_ms=NOW, rng_key="k1")
    assert _reactions(a) == _reactions(LifelongWorld(SMALL).respond(1, slate, now_ms=NOW, rng_key="k1"))
    keys = [_reactions(world.respond(1, slate, now_ms=NOW, rng_key=f"k{i}")) for i in range(20)]
    assert len({tuple(r) for r in keys}) > 1  # the key matters
    assert all(e.source == "recommended" and e.request_id == "k1" and e.timestamp_ms > NOW for e in a)
    assert [e.item_id for e in a] == slate[: len(a)]  # top-down: a prefix of the slate
    # the played context moves the state: the previous artist's next track is likelier after it was played
    prev = int(world.history(1).item[-1])
    other = next(i for i in range(world.num_items) if world.catalog.artist[i] != world.catalog.artist[prev])
    nxt = int(world.catalog.next_item[other])
    after = [world.respond(1, [nxt], now_ms=NOW, rng_key=f"c{i}", history=[other]) for i in range(200)]
    before = [world.respond(1, [nxt], now_ms=NOW, rng_key=f"c{i}") for i in range(200)]
    listened = lambda rs: sum(r[0].event_type in ("listen", "like") for r in rs)  # noqa: E731
    assert listened(after) > listened(before)


def test_true_top_slates_earn_more_than_random_ones(world: LifelongWorld) -> None:
    rng = np.random.default_rng(0)
    good = {"like": 0, "listen": 0.0}
    bad = {"like": 0, "listen": 0.0}
    for u in range(SMALL.users):
        top = _top(world, u)
        for r in range(30):
            rand = rng.choice(world.num_items, 10, replace=False).tolist()
            for slate, acc in ((top, good), (rand, bad)):
                events = world.respond(u, slate, now_ms=NOW, rng_key=f"{r}")  # common random numbers
                acc["like"] += sum(e.event_type == "like" for e in events)
                acc["listen"] += sum(e.played_ratio for e in events)
    assert good["listen"] > 2 * bad["listen"]
    assert good["like"] > bad["like"]


def test_respond_refuses_bad_input(world: LifelongWorld) -> None:
    with pytest.raises(ValueError, match="unknown user"):
        world.respond(SMALL.users, [0], now_ms=NOW, rng_key="x")
    with pytest.raises(ValueError, match="unknown items"):
        world.respond(0, [world.num_items], now_ms=NOW, rng_key="x")
    with pytest.raises(ValueError, match="unknown items"):
        world.respond(0, [0], now_ms=NOW, rng_key="x", history=[-1])
    with pytest.raises(ValueError, match="twice"):
        world.respond(0, [3, 3], now_ms=NOW, rng_key="x")
    with pytest.raises(ValueError, match="before the end"):
        world.respond(0, [0], now_ms=DEFAULT_END_MS - 1, rng_key="x")
    assert world.respond(0, [], now_ms=NOW, rng_key="x") == []


def test_bench_json_and_same_model_in_both_arms_differs_by_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from bench.lifelong_loop import main

    size = ["--users", "12", "--min-events", "400", "--max-events", "900", "--world", "artists=240",
            "--world", "max_tracks=6", "--world", "min_favourites=10", "--world", "max_favourites=30", "--draws", "300"]
    models = tmp_path / "arms"
    main(size + ["--epochs", "1", "--rounds", "0", "--save", str(models)])
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "paired" not in trained and set(trained["training"]) == {"control", "treatment"}

    main(size + ["--epochs", "1", "--models", str(models), "--rounds", "3", "--keep-seen"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"config", "world", "training", "paired", "split", "wall_s", "argv"} <= set(out)
    assert out["argv"][-1] == "--keep-seen" and out["config"]["rounds"] == 3 and not out["config"]["exclude_seen"]
    for m in ("like_rate", "listening", "hits"):
        assert {"control", "treatment", "diff", "ci", "p"} <= set(out["paired"][m])
        assert {"lift", "lift_ci", "p", "p_bh", "significant"} <= set(out["split"][m])
    assert sum(out["split"]["users"].values()) == 12 and "p" in out["split"]["srm"]
    # two different models: their slates, hence the users' reactions, differ somewhere
    assert out["paired"]["hits"]["users_differing"] > 0

    # the VISTA model in both arms: the same slates, the same random numbers, exactly no difference
    shutil.rmtree(models / "control")
    shutil.copytree(models / "treatment", models / "control")
    main(size + ["--epochs", "1", "--models", str(models), "--rounds", "3"])
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["paired"]
    for m in ("like_rate", "listening", "hits"):
        assert same[m]["diff"] == 0.0 and same[m]["ci"] == [0.0, 0.0] and same[m]["users_differing"] == 0
        assert same[m]["control"] == same[m]["treatment"]
    assert same["listening"]["control"] > 0  # every request plays something: the zeros are not empty arms


def test_vista_cached_summary_serves_as_the_whole_history(tmp_path: Path) -> None:
    """The loop folds each round's newly older events into a cached state: it must serve what summarising the
    whole history from scratch serves."""
    from bench.lifelong import WorldSize, make_world
    from bench.lifelong_loop import LoopConfig, play, serve, start_loop, train_arms

    cfg = LoopConfig(size=WorldSize(users=8, min_events=300, max_events=600), epochs=1,
                     world={"artists": "240", "max_tracks": "6", "min_favourites": "10", "max_favourites": "30"})
    world = make_world(cfg.size, cfg.world_seed, cfg.world)
    arms, _ = train_arms(world, cfg, log=lambda m: None)
    loop = start_loop(arms["treatment"], world, DEFAULT_END_MS)
    users = list(range(world.num_users))
    for r in range(3):
        now = DEFAULT_END_MS + (r + 1) * 86_400_000
        cached = serve(loop, users, 10, now, exclude_seen=r > 0)
        scratch = loop.rec.recommend([loop.history(u) for u in users], k=10, exclude_seen=r > 0, now_ms=now)
        assert cached == [[i for i, _ in s] for s in scratch]
        for u, slate in zip(users, cached):
            play(loop, u, world.respond(u, slate, now_ms=now, rng_key=f"{u}-{r}", history=loop.played[u]))
    serve(loop, users, 10, DEFAULT_END_MS + 4 * 86_400_000, exclude_seen=False)  # folds the last round's events
    assert all(int(s.count[0]) == len(loop.items[u]) - loop.rec.config.max_len for u, s in enumerate(loop.states))
