"""Ranking examples: point-in-time histories, reaction labels, sampled negatives, ratings (pure pandas)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.simulator import MusicWorld
from infra.settings import SimulatorSettings
from models.ranking_data import (
    KEY_COLUMNS,
    RATING_LABELS,
    SHOWN_LABELS,
    build_ranking_examples,
    ratings_examples,
)

T0 = 1_700_000_000_000
WINDOW_S = 600


def _event(eid: str, user: int, item: int, kind: str, ts: int, ratio: float | None = None,
           request: str | None = None) -> dict:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": kind, "timestamp_ms": ts,
            "played_ratio": ratio, "request_id": request}


def _exposure(request: str, user: int, ts: int, items: list[int]) -> dict:
    return {"request_id": request, "user_id": user, "variant": "control", "timestamp_ms": ts, "items": items}


@pytest.fixture
def scenario() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two users, two requests. r1 (user 1): slate [10, 11, 12, 13] -> like 10, skip 11, listen 0.8 on 12,
    13 unexamined. r2 (user 2): slate [20, 21] -> listen on 20; plus noise that must not be attributed."""
    interactions = pd.DataFrame(
        [
            _event("h1", 1, 1, "listen", T0 - 5_000, 1.0),
            _event("h2", 1, 2, "skip", T0 - 4_000, 0.1),
            _event("h3", 1, 3, "like", T0 - 3_000, 0.9),
            _event("h4", 2, 5, "listen", T0 - 2_000, 0.7),
            _event("a1", 1, 10, "like", T0 + 1_000, 0.95, "r1"),
            _event("a2", 1, 11, "skip", T0 + 2_000, 0.05, "r1"),
            _event("a3", 1, 12, "listen", T0 + 3_000, 0.8, "r1"),
            _event("a3", 1, 12, "listen", T0 + 3_000, 0.8, "r1"),  # redelivered: counts once
            _event("b1", 2, 20, "listen", T0 + 11_000, 0.6, "r2"),
            _event("n1", 2, 21, "like", T0 + 10_000 + WINDOW_S * 1000 + 1, 1.0, "r2"),  # after the window
            _event("n2", 1, 13, "like", T0 + 4_000, 1.0, "other"),  # another request's id
            _event("n3", 1, 13, "dislike", T0 + 5_000, 0.0, None),  # organic, no request id
            _event("n4", 2, 21, "like", T0 + 12_000, 1.0, "r1"),  # r1's id but the wrong user
        ]
    )
    exposures = pd.DataFrame([_exposure("r1", 1, T0, [10, 11, 12, 13]), _exposure("r2", 2, T0 + 10_000, [20, 21])])
    return interactions, exposures


# ---------------------------------------------------------------------------------------------- labels


def test_labels_of_a_hand_built_scenario(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    ex = build_ranking_examples(interactions, exposures, window_s=WINDOW_S)
    frame = ex.examples
    assert list(frame.columns) == list(KEY_COLUMNS) + list(SHOWN_LABELS)
    assert ex.labels == SHOWN_LABELS
    got = frame[["request_id", "item_id", "rank", "like", "dislike", "skip", "engaged", "examined"]]
    expected = pd.DataFrame(
        [
            ("r1", 10, 0, 1, 0, 0, 1, 1),
            ("r1", 11, 1, 0, 0, 1, 0, 1),
            ("r1", 12, 2, 0, 0, 0, 1, 1),
            ("r1", 13, 3, 0, 0, 0, 0, 0),  # unexamined, and n2/n3 are not r1's reactions
            ("r2", 20, 0, 0, 0, 0, 1, 1),
            ("r2", 21, 1, 0, 0, 0, 0, 0),  # the like came after the window / under the wrong user
        ],
        columns=got.columns,
    )
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    np.testing.assert_allclose(frame["played_ratio"].to_numpy(), [0.95, 0.05, 0.8, np.nan, 0.6, np.nan])
    assert (frame["source"] == "shown").all()
    assert frame["t_ms"].tolist() == [T0] * 4 + [T0 + 10_000] * 2
    assert frame["user_id"].tolist() == [1] * 4 + [2] * 2
    # r1's history: user 1's three organic events, none of the reactions; r2's: user 2's one organic event.
    assert ex.history(0)["item_id"].tolist() == [1, 2, 3]
    assert ex.history(4)["item_id"].tolist() == [5]


def test_missing_columns_are_named(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    with pytest.raises(ValueError, match="request_id"):
        build_ranking_examples(interactions.drop(columns="request_id"), exposures, window_s=WINDOW_S)
    with pytest.raises(ValueError, match="items"):
        build_ranking_examples(interactions, exposures.drop(columns="items"), window_s=WINDOW_S)
    with pytest.raises(ValueError, match="rating"):
        ratings_examples(interactions)
    with pytest.raises(ValueError, match="catalogue"):
        build_ranking_examples(interactions, exposures, window_s=WINDOW_S, sampled_negatives=2)
    with pytest.raises(ValueError, match="window_s"):
        build_ranking_examples(interactions, exposures, window_s=0)


def test_items_as_json_strings_and_replayed_exposures(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    as_json = exposures.assign(items=exposures["items"].map(lambda v: str(list(v))))
    replayed = pd.concat([as_json, as_json.iloc[:1]], ignore_index=True)
    a = build_ranking_examples(interactions, exposures, window_s=WINDOW_S).examples
    b = build_ranking_examples(interactions, replayed, window_s=WINDOW_S).examples
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------------------------------------- point in time


def test_history_is_strictly_before_t_and_complete(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    # A second request of user 1 later on: its history must include r1's reactions, not its own.
    later = pd.DataFrame([_exposure("r3", 1, T0 + 100_000, [30, 10])])
    own = pd.DataFrame([_event("c1", 1, 30, "skip", T0 + 101_000, 0.1, "r3")])
    ex = build_ranking_examples(pd.concat([interactions, own], ignore_index=True),
                                pd.concat([exposures, later], ignore_index=True), window_s=WINDOW_S)
    events = pd.concat([interactions, own], ignore_index=True).drop_duplicates("event_id")
    for i in range(len(ex)):
        row = ex.examples.iloc[i]
        hist = ex.history(i)
        assert (hist["user_id"] == row["user_id"]).all()
        assert (hist["timestamp_ms"] < row["t_ms"]).all()
        assert not (hist["request_id"] == row["request_id"]).any()
        earlier = events[(events["user_id"] == row["user_id"]) & (events["timestamp_ms"] < row["t_ms"])]
        assert len(hist) == len(earlier)
    r3 = ex.examples.index[ex.examples["request_id"] == "r3"][0]
    assert set(ex.history(r3)["request_id"].dropna()) == {"r1", "other"}


def test_a_skewed_reaction_before_its_exposure_is_not_history() -> None:
    interactions = pd.DataFrame([_event("h", 1, 1, "listen", T0 - 9_000, 1.0),
                                 _event("s", 1, 10, "like", T0 - 1_000, 1.0, "r1")])  # clock skew
    exposures = pd.DataFrame([_exposure("r1", 1, T0, [10, 11])])
    ex = build_ranking_examples(interactions, exposures, window_s=WINDOW_S)
    assert ex.history(0)["item_id"].tolist() == [1]
    assert ex.examples["examined"].tolist() == [0, 0]  # before the exposure: not attributed either


def test_split_by_time_is_temporal(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    ex = build_ranking_examples(interactions, exposures, window_s=WINDOW_S)
    train, test = ex.split_by_time(T0 + 5_000)
    assert len(train) + len(test) == len(ex)
    assert train.examples["t_ms"].max() < test.examples["t_ms"].min()
    assert set(train.examples["request_id"]) == {"r1"} and set(test.examples["request_id"]) == {"r2"}
    assert test.history(0)["item_id"].tolist() == [5]  # offsets still point into the shared events
    gapped, _ = ex.split_by_time(T0 + 5_000, gap_ms=WINDOW_S * 1000)
    assert len(gapped) == 0


# ---------------------------------------------------------------------------------------------- sampled


def test_sampled_negatives_exclude_slate_and_history(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    catalogue = np.arange(0, 40)
    ex = build_ranking_examples(interactions, exposures, window_s=WINDOW_S, sampled_negatives=8,
                                catalogue=catalogue, seed=5)
    frame = ex.examples
    sampled = frame[frame["source"] == "sampled"]
    assert sampled.groupby("request_id").size().to_dict() == {"r1": 8, "r2": 8}
    assert (sampled["rank"] == -1).all()
    assert (sampled[["like", "dislike", "skip", "engaged", "examined"]] == 0).all().all()
    assert sampled["played_ratio"].isna().all()
    for request, rows in sampled.groupby("request_id"):
        i = int(rows.index[0])
        slate = set(exposures.set_index("request_id").loc[request, "items"])
        history = set(ex.history(i)["item_id"])
        picked = rows["item_id"].tolist()
        assert len(set(picked)) == len(picked)
        assert not set(picked) & (slate | history)
        assert set(picked) <= set(catalogue.tolist())
    again = build_ranking_examples(interactions, exposures, window_s=WINDOW_S, sampled_negatives=8,
                                   catalogue=catalogue, seed=5)
    pd.testing.assert_frame_equal(frame, again.examples)
    other = build_ranking_examples(interactions, exposures, window_s=WINDOW_S, sampled_negatives=8,
                                   catalogue=catalogue, seed=6)
    assert other.examples["item_id"].tolist() != frame["item_id"].tolist()


def test_sampling_from_an_almost_exhausted_catalogue(scenario: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    interactions, exposures = scenario
    # r1 (user 1) may draw only {0, 4, 5}: 1-3 are its history, 10-13 its slate. So it gets those three and
    # no more; r2 (user 2, history {5}, slate outside the catalogue) has nine to draw four from.
    catalogue = np.array([0, 1, 2, 3, 4, 5, 10, 11, 12, 13])
    ex = build_ranking_examples(interactions, exposures, window_s=WINDOW_S, sampled_negatives=4,
                                catalogue=catalogue, seed=1)
    sampled = ex.examples[ex.examples["source"] == "sampled"]
    assert sorted(sampled.loc[sampled["request_id"] == "r1", "item_id"]) == [0, 4, 5]
    r2 = sampled.loc[sampled["request_id"] == "r2", "item_id"].tolist()
    assert len(r2) == len(set(r2)) == 4 and set(r2) <= {0, 1, 2, 3, 4, 10, 11, 12, 13}


# ---------------------------------------------------------------------------------------------- simulator


def test_end_to_end_on_the_simulator() -> None:
    world = MusicWorld(SimulatorSettings(users=120, items=150, sessions_per_user=3, events_per_session=10, seed=3))
    end_ms = T0
    history = world.history_frame(end_ms=end_ms)
    rng = np.random.default_rng(0)
    exposures, reactions = [], []
    for n, user in enumerate(rng.choice(world.settings.users, size=12, replace=False)):
        slate = rng.choice(world.settings.items, size=6, replace=False).tolist()
        request, now = f"req-{n}", end_ms + 60_000 * (n + 1)
        exposures.append(_exposure(request, int(user), now, slate))
        reactions += [e.model_dump() for e in world.respond(int(user), slate, request_id=request,
                                                            variant="control", now_ms=now)]
    interactions = pd.concat([history, pd.DataFrame(reactions)], ignore_index=True)
    exposures_frame = pd.DataFrame(exposures)
    ex = build_ranking_examples(interactions, exposures_frame, window_s=3600, sampled_negatives=4,
                                catalogue=np.arange(world.settings.items), seed=0)
    shown = ex.examples[ex.examples["source"] == "shown"]
    assert len(shown) == 12 * 6
    assert len(ex.examples) == 12 * 6 + 12 * 4
    assert 0 < shown["engaged"].mean() < 1
    # Labels agree with the reaction events: one event per examined item in the simulator.
    by_pair = pd.DataFrame(reactions).set_index(["request_id", "item_id"])
    assert shown["examined"].sum() == len(by_pair)
    for _, row in shown.iterrows():
        key = (row["request_id"], row["item_id"])
        if row["examined"]:
            event = by_pair.loc[key]
            assert row["like"] == (event["event_type"] == "like")
            assert row["skip"] == (event["event_type"] == "skip")
            assert row["dislike"] == (event["event_type"] == "dislike")
            assert row["engaged"] == (event["event_type"] in {"listen", "like", "add_to_playlist"})
            assert row["played_ratio"] == pytest.approx(event["played_ratio"])
        else:
            assert key not in by_pair.index
            assert row[["like", "dislike", "skip", "engaged"]].sum() == 0
    # Point in time: every history holds all of the user's earlier events (organic, and reactions to that
    # user's earlier requests) and nothing at or after t.
    for i in range(0, len(ex), 7):
        row = ex.examples.iloc[i]
        earlier = interactions[(interactions["user_id"] == row["user_id"]) & (interactions["timestamp_ms"] < row["t_ms"])]
        assert len(ex.history(i)) == len(earlier)
        assert (ex.history(i)["timestamp_ms"] < row["t_ms"]).all()


# ---------------------------------------------------------------------------------------------- ratings


def test_ratings_thresholds_and_history() -> None:
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1, 2],
            "item_id": [10, 11, 12, 13, 14, 10],
            "timestamp_ms": [T0, T0 + 1000, T0 + 1000, T0 + 2000, T0 + 3000, T0],
            "rating": [5.0, 4.0, 3.5, 2.0, 2.5, 1.0],
        }
    )
    ex = ratings_examples(frame)
    assert ex.labels == RATING_LABELS
    out = ex.examples.set_index(["user_id", "item_id"])
    assert out["like"].to_dict() == {(1, 10): 1, (2, 10): 0, (1, 11): 1, (1, 12): 0, (1, 13): 0, (1, 14): 0}
    assert out["dislike"].to_dict() == {(1, 10): 0, (2, 10): 1, (1, 11): 0, (1, 12): 0, (1, 13): 1, (1, 14): 0}
    assert out.loc[(1, 12), "rating"] == 3.5
    lengths = dict(zip(zip(ex.examples["user_id"], ex.examples["item_id"]), ex.history_lengths()))
    # Same-second ratings (11 and 12) do not see each other; the rated event itself is never in its history.
    assert lengths == {(1, 10): 0, (2, 10): 0, (1, 11): 1, (1, 12): 1, (1, 13): 3, (1, 14): 4}
    i = int(np.flatnonzero((ex.examples["user_id"] == 1) & (ex.examples["item_id"] == 14))[0])
    hist = ex.history(i)
    assert hist["item_id"].tolist() == [10, 11, 12, 13]
    assert hist["event_type"].tolist() == ["like", "listen", "listen", "dislike"]  # derived from the ratings
