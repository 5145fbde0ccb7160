"""The lifelong world (features/lifelong.py) and its bench (bench/lifelong.py), on tiny worlds."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from features.datasets import EVENT_COLUMNS, events_from_frame
from features.lifelong import LifelongParams, LifelongWorld, loo_targets, oracle_report

SMALL = LifelongParams(seed=3, users=8, min_events=1500, max_events=4000)


@pytest.fixture(scope="module")
def world() -> LifelongWorld:
    return LifelongWorld(SMALL)


@pytest.fixture(scope="module")
def frame(world: LifelongWorld):
    return world.history_frame()


def test_same_seed_same_history_other_seed_other(frame) -> None:
    again = LifelongWorld(SMALL).history_frame()
    assert frame.equals(again)
    other = LifelongWorld(LifelongParams(seed=4, users=8, min_events=1500, max_events=4000)).history_frame()
    assert not np.array_equal(frame["item_id"].to_numpy()[:1000], other["item_id"].to_numpy()[:1000])
    # a user's history does not depend on how many users the world has
    fewer = LifelongWorld(LifelongParams(seed=3, users=3, min_events=1500, max_events=4000)).history(2)
    assert np.array_equal(fewer.item, LifelongWorld(SMALL).history(2).item)


def test_frame_is_a_valid_event_log(world: LifelongWorld, frame) -> None:
    assert list(frame.columns) == EVENT_COLUMNS
    assert frame["timestamp_ms"].is_monotonic_increasing
    lengths = frame.groupby("user_id").size()
    assert len(lengths) == SMALL.users
    assert lengths.between(SMALL.min_events, SMALL.max_events).all()
    assert np.array_equal(lengths.to_numpy(), world.lengths())
    assert all(re.fullmatch(rf"life-3-{u}-\d+", e) for u, e in zip(frame["user_id"][:50], frame["event_id"][:50]))
    assert frame["event_id"].is_unique
    assert set(frame["event_type"]) <= {"listen", "like", "skip"}
    list(events_from_frame(frame.iloc[:200]))  # the pydantic schema accepts them
    # end_ms only places the timeline
    shifted = world.history_frame(end_ms=1_767_225_600_000 + 1000)
    assert np.array_equal(shifted["timestamp_ms"] - 1000, frame["timestamp_ms"])
    assert np.array_equal(shifted["item_id"], frame["item_id"])


def test_favourite_artists_resurface_after_long_gaps(world: LifelongWorld) -> None:
    for u in range(SMALL.users):
        h, state = world.history(u), world.user(u)
        artist = world.catalog.artist[h.item]
        favs = np.flatnonzero(state.fav_weight)
        assert SMALL.min_favourites <= len(favs) <= SMALL.max_favourites
        plays = [np.flatnonzero(artist == a) for a in favs]
        # nearly every favourite comes back after more than 200 events at least once ...
        assert np.mean([len(p) >= 2 and np.diff(p).max() > 200 for p in plays]) >= 0.75
        # ... and the typical one is played about once per 200 events or less: rare in any window
        assert np.median([len(p) / len(h.item) * 200 for p in plays]) <= 1.2
        # so the last 200 events show only a minority of the favourites
        assert len(set(artist[-200:]) & set(favs)) < 0.6 * len(favs)


def test_seasonal_playlists_return_every_year(world: LifelongWorld) -> None:
    h, state = world.history(0), world.user(0)
    years = np.floor((h.span_days - h.day) / 365.25)  # (n,) simulated years before the end
    for playlist in state.playlists:
        on = np.isin(h.item, playlist)
        assert len(np.unique(years[on])) >= 3  # back in (at least) three different years



def _history_digest(world: LifelongWorld) -> str:
    """sha256 of every user's playlists and history arrays: changes with any byte the world generates."""
    h = hashlib.sha256()
    for u in range(world.num_users):
        hist, state = world.history(u), world.user(u)
        for a in (state.playlists, hist.item, hist.event_type, hist.played_ratio, hist.day, np.float64(hist.span_days)):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_worlds_whose_genres_fill_a_playlist_generate_what_they_always_did() -> None:
    """Digests recorded before small genres were allowed (the playlist fix): the default catalogue, and a small one
    whose smallest genre (47 tracks) still holds a 30-track playlist, are byte for byte the same worlds."""
    default = LifelongWorld(LifelongParams(seed=3, users=4, min_events=500, max_events=1500))
    assert _history_digest(default) == "24768ab5b1650d8a4a7fa36d4a8eaa5f3a83178d732572b7c0788224f1611ac4"
    small = LifelongWorld(LifelongParams(seed=5, users=4, min_events=500, max_events=1500, artists=240, max_tracks=6,
                                         min_favourites=10, max_favourites=30))
    assert _history_digest(small) == "7b79e0a6c085f6768dfc2d338508e1994a967e7eccffd6d06c055509aa813a1c"


def test_a_genre_smaller_than_a_playlist_fills_it_with_all_its_tracks() -> None:
    params = LifelongParams(seed=0, users=20, min_events=300, max_events=600, artists=120, max_tracks=6,
                            min_favourites=10, max_favourites=30)
    world = LifelongWorld(params)
    sizes = np.bincount(world.catalog.genre)
    assert sizes.min() < params.playlist_len  # the case under test: some genre cannot fill a playlist
    small_playlists = 0
    for u in range(params.users):
        h, state = world.history(u), world.user(u)  # generating it is what used to fail
        assert state.playlists.shape == (params.seasons, params.playlist_len)
        for playlist in state.playlists:
            genres = np.unique(world.catalog.genre[playlist])
            assert len(genres) == 1  # one genre, as ever
            pool = np.flatnonzero(world.catalog.genre == genres[0])
            counts = np.bincount(playlist, minlength=world.num_items)[pool]
            if len(pool) < params.playlist_len:
                small_playlists += 1
                assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # all of the genre, evenly
            else:
                assert counts.max() == 1  # without replacement
        assert world.next_probs(u, len(h.item) // 2).sum() == pytest.approx(1.0)
    assert small_playlists > 0

def test_settings_outside_their_bounds_are_refused_naming_the_values() -> None:
    with pytest.raises(ValueError, match=r"max_favourites <= artists, got 80, 200, 120"):
        LifelongParams(artists=120)
    with pytest.raises(ValueError, match=r"playlist_len >= 1, got 0"):
        LifelongParams(playlist_len=0)


def test_oracle_is_the_generator(world: LifelongWorld) -> None:
    """The full oracle's top item is as likely as it says: the oracle is the distribution events are drawn from."""
    said, hit = [], []
    for u in range(SMALL.users):
        h = world.history(u)
        for seq in range(1, len(h.item), 7):
            p = world.next_probs(u, seq)
            assert p.sum() == pytest.approx(1.0)
            top = int(np.argmax(p))
            said.append(p[top])
            hit.append(h.item[seq] == top)
    assert len(said) > 2000
    assert abs(np.mean(said) - np.mean(hit)) < 0.03
    # and it knows more than a window of 200 events: higher likelihood of what happened
    full, window = [], []
    for u in range(SMALL.users):
        h = world.history(u)
        for seq in range(1000, len(h.item), 37):
            full.append(np.log(world.next_probs(u, seq)[h.item[seq]]))
            window.append(np.log(world.window_probs(u, seq, 200)[h.item[seq]]))
    assert np.mean(full) > np.mean(window) + 0.3


def test_targets_are_leave_one_out_test_targets(frame) -> None:
    from models.data import build_sequences, leave_one_out

    targets = loo_targets(frame)
    test = leave_one_out(build_sequences(frame), 200).test
    assert np.array_equal(targets.event, np.sort(test.rank_at[test.rank_at >= 0]))
    assert np.array_equal(targets.user, np.arange(SMALL.users))


def test_full_oracle_beats_the_window_and_the_window_beats_counts() -> None:
    world = LifelongWorld(LifelongParams(seed=0, users=120, min_events=3000, max_events=6000))
    report = oracle_report(world, world.history_frame(), windows=(50, 200))
    assert report["targets"] == 120
    assert report["full"]["ndcg@10"] > report["window_200"]["ndcg@10"] > report["popularity"]["ndcg@10"]
    assert report["lead_ndcg@10_over_window_200"] >= 0.03
    assert report["window_200"]["ndcg@10"] > report["count"]["ndcg@10"]  # recency still matters


def test_bench_smoke_prints_json_last(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.lifelong import main

    main(["--smoke", "--configs", "hstu,no-such-recipe", "--seeds", "0", "--epochs", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    assert set(out["configs"]) == {"hstu"}
    assert "no-such-recipe" in out["skipped"]
    hstu = out["configs"]["hstu"]
    assert 0.0 <= hstu["ndcg@10"] <= 1.0 and hstu["ndcg@10_ci"][0] <= hstu["ndcg@10"] <= hstu["ndcg@10_ci"][1]
    assert out["oracle"]["targets"] == out["targets"] == out["world"]["users"]
    assert out["wall_s"] > 0


def test_bench_depths_cut_the_summary_of_the_same_model(capsys: pytest.CaptureFixture[str]) -> None:
    """--depths ranks each trained lifelong model again with its summary cut to the latest N older events; a cut
    deeper than any history reads them all, so it must give the full figure exactly."""
    from bench.lifelong import main

    main(["--smoke", "--configs", "vista-lifelong,hstu", "--seeds", "0", "--epochs", "1", "--depths", "1,100000"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    depths = out["configs"]["vista-lifelong"]["depths"]
    assert set(depths) == {"1", "100000"} and "depths" not in out["configs"]["hstu"]
    assert depths["100000"]["minus_all"] == 0.0 and depths["100000"]["ndcg@10"] == out["configs"]["vista-lifelong"]["ndcg@10"]
    assert 0.0 <= depths["1"]["ndcg@10"] <= 1.0
    assert depths["1"]["minus_all_ci"][0] <= depths["1"]["minus_all"] <= depths["1"]["minus_all_ci"][1]
    with pytest.raises(SystemExit, match="depths"):
        main(["--smoke", "--depths", "0"])
