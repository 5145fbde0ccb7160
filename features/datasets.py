"""Loaders for public interaction datasets, all producing ``InteractionEvent``s sorted by time.

Every loader reads its raw files into one pandas frame with the ``InteractionEvent`` columns
(``load_frame``), validated column-wise, then sorted by ``timestamp_ms`` (ties: by user, then file order,
so the order is reproducible). ``load_dataset`` turns that frame into validated events. Big files are read
by pandas' C parser or pyarrow; a slow line-by-line scan runs only to explain a failure precisely.

Datasets (``DATASETS``; each looks in ``data_dir`` and then ``data_dir/<name>``):

========== ========================================= ===========================================
name       files                                     notes
========== ========================================= ===========================================
ml-100k    ``u.data`` or ``u.data.gz``               ``user<TAB>item<TAB>rating<TAB>unix_s``
ml-1m      ``ratings.dat`` (or .gz)                  ``user::item::rating::unix_s``
ml-20m     ``ratings.csv`` (or .gz)                  header ``userId,movieId,rating,timestamp``
ml-25m     ``ratings.csv`` (or .gz)                  same as ml-20m
amazon     ``Beauty.txt`` and/or ``Beauty_time.txt`` 5-core sequences, no ratings, no dates
yambda     ``listens/likes/dislikes.parquet``        also ``flat/50m/`` under ``data_dir``
========== ========================================= ===========================================

Feedback rules
--------------
* **MovieLens ratings** (0.5-5 stars): ``>= 4.5`` -> ``like`` (played_ratio 1.0: you rate what you
  watched); ``3 .. 4`` -> ``listen`` with played_ratio ``(rating - 2) / 2`` (3 -> 0.5, 3.5 -> 0.75,
  4 -> 1.0); ``< 3`` -> ``dislike`` (played_ratio unknown, None). So 4-5 stars are full positives, 3 stars
  a weak positive and 0.5-2.5 stars negatives.
* **Amazon** (no ratings): every interaction is a ``listen`` with played_ratio None.
* **Yambda**: a listen with ``played_ratio_pct >= 50`` is a ``listen``, below 50 a ``skip`` (Yambda's own
  definition of a "listened" track is more than 50% played); played_ratio = pct / 100 clipped to 1 (pct
  above 100 means the user rewound). ``likes`` -> ``like``, ``dislikes`` -> ``dislike``, ``unlikes``
  (when present) -> ``unlike``; ``undislikes`` has no event type and is ignored. ``is_organic`` = 1 ->
  source ``organic``, 0 -> ``recommended`` (no request id: the recommendation was Yandex's, not ours).

Timestamps (the schema needs epoch ms >= 2001-09-09)
-----------------------------------------------------
* **MovieLens** stores Unix seconds, but ratings go back to 1995, before the schema's floor. Every
  MovieLens timestamp is therefore ``unix_s * 1000 + MOVIELENS_SHIFT_MS``, a fixed 349 weeks (~6.7 years)
  for all versions: everything lands between 2001-09 and 2026-07, gaps, order, weekday and time of day are
  kept, and one rating has the same time in every MovieLens version. Subtract the shift for real dates.
* **Amazon** files have no dates, only per-step gaps (seconds since the user's previous interaction, day
  resolution) in ``*_time.txt``. Each user's timeline is synthesised: the last interaction is at
  ``AMAZON_END_MS`` (2014-07-23, the end of the Amazon 2014 crawl) and earlier ones go back by the recorded
  gaps, plus 1 s per step so that same-day interactions stay strictly ordered. Without a time file each
  step is one day. A common end also makes a global time split behave like the usual leave-last-out split.
  (A timeline that would start before 2001-09-09 is moved forward as a whole.)
* **Yambda** timestamps are relative (the real epoch is not published). The values are multiples of 5
  and reach ~26 million over the dataset's ~10 months (26e6 s = 301 days), so we read them as *seconds at
  5-second granularity* (not as counts of 5-second units, which would span four years) since an assumed
  epoch ``YAMBDA_EPOCH_MS`` = 2024-01-01 UTC: ``timestamp_ms = YAMBDA_EPOCH_MS + timestamp * 1000``.
  Events of one user in one 5 s bucket keep file order, listens before likes.

Event ids are derived from content, not from file positions, so that replaying a dataset (or a bigger
version of it) deduplicates downstream: MovieLens ``{name}-{user}-{item}-{unix_s}``, Amazon
``amazon-{category}-{user}-{position}``, Yambda ``yambda-{kind}-{uid}-{item}-{timestamp}``; exact
duplicates within a file get ``-1``, ``-2``... suffixes.

Catalogue: ``load_catalogue`` returns the ids of every item the dataset's item file lists (``u.item``,
``movies.dat``, ``movies.csv``), so that items nobody rated are candidates too, as in the published
protocol. Without an item file the catalogue is the items that occur in the events.

Attributes (the rankers' side features): ``load_user_attributes`` reads ``u.user`` (ml-100k) or ``users.dat``
(ml-1m) into gender, age group and occupation; ``load_item_attributes`` reads ``u.item`` or ``movies.dat`` into
genres; ``simulator_item_attributes`` gives the simulator's genre and album. One layout for all
(``USER_ATTRIBUTE_COLUMNS``, ``ITEM_ATTRIBUTE_COLUMNS``): what ``features.feature_repo``'s attribute views hold.

Errors: a missing file raises ``FileNotFoundError`` naming the files looked for, where, and where to get
them; a malformed line raises ``ValueError`` naming the file and the line number (for parquet, the row).
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import TypeAdapter

from features.events import MIN_TIMESTAMP_MS, InteractionEvent

# Column order of every frame produced here (and by the simulator): the schema's own field order.
EVENT_COLUMNS: list[str] = list(InteractionEvent.model_fields)
_EVENT_LIST = TypeAdapter(list[InteractionEvent])
_DEFAULTS = {name: field.default for name, field in InteractionEvent.model_fields.items() if not field.is_required()}

WEEK_MS = 7 * 86_400_000
MOVIELENS_SHIFT_MS = 349 * WEEK_MS  # 1995-01-09 (first MovieLens rating) -> after 2001-09-09
AMAZON_END_MS = 1_406_073_600_000  # 2014-07-23T00:00:00Z
YAMBDA_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z (assumed; Yambda publishes relative time)
YAMBDA_SKIP_BELOW_PCT = 50


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    files: str  # what the loader needs, for error messages
    url: str  # where to get it
    read: Callable[[str, Path], pd.DataFrame]  # (name, data_dir) -> _event_frame(...), any order


# ---- public API --------------------------------------------------------------------------------------------


def load_frame(name: str, data_dir: Path | str, *, limit: int | None = None) -> pd.DataFrame:
    """A dataset as a frame with ``EVENT_COLUMNS``, sorted by time; ``limit`` keeps the earliest events."""
    spec = _spec(name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    frame = spec.read(name, Path(data_dir).expanduser()).reset_index(drop=True)  # labels == positions
    key_columns = [c for c in frame.columns if c.startswith(_ID_KEY)]
    # Repeats are numbered over the whole file (in file order), before the limit cuts anything.
    occurrence = _occurrences(frame[key_columns])
    # Stable sort: ties keep (user, then file) order, which the readers arranged to be meaningful.
    order = frame.sort_values(["timestamp_ms", "user_id"], kind="stable").index.to_numpy()
    if limit is not None:
        order = order[:limit]
    frame = frame.loc[order].reset_index(drop=True)
    # Ids are formatted only for the rows kept: strings are the costliest column by far on big datasets.
    frame["event_id"] = _format_ids(frame[key_columns], occurrence[order])
    return frame[EVENT_COLUMNS]


def load_dataset(name: str, data_dir: Path | str, *, limit: int | None = None) -> Iterator[InteractionEvent]:
    """Events of a public dataset, sorted by ``timestamp_ms``. See the module docstring for the rules.

    Files are read (and errors raised) when this is called; events are built lazily while iterating.
    """
    return events_from_frame(load_frame(name, data_dir, limit=limit))


def load_catalogue(name: str, data_dir: Path | str) -> np.ndarray | None:
    """Raw ids of every item the dataset's item file lists, rated or not; None where there is no such file.

    The catalogue is what a recommender ranks and draws its negatives from. The published MovieLens protocol
    (the HSTU reference's ``all_item_ids``) takes it from the item file, not from the ratings: ML-1M's
    ``movies.dat`` lists 3,883 movies, 177 of which nobody rated. Those are candidates at evaluation and uniform
    negatives in training, as in the reference. Files: ml-100k ``u.item`` (``id|title|...``), ml-1m
    ``movies.dat`` (``id::title::genres``), ml-20m/25m ``movies.csv`` (header ``movieId,title,genres``), each
    optionally gzipped and read as Latin-1 (GroupLens' encoding). Other datasets have no item file.
    """
    layout = _CATALOGUE_FILES.get(name)
    if layout is None:
        _spec(name)  # unknown names still fail loudly
        return None
    candidates, sep, header = layout
    data_dir = Path(data_dir).expanduser()
    try:
        path = _find(name, data_dir, candidates)
    except FileNotFoundError:
        return None
    ids: list[int] = []
    lines = _read_bytes(path).decode("latin-1").splitlines()
    if header:
        expected = header.split(",")
        if not lines or lines[0].strip().split(",")[: len(expected)] != expected:
            raise ValueError(f"{path.name}, line 1: expected header {header!r}: {(lines or [''])[0][:200]!r}")
    for line_no, line in enumerate(lines, start=1):
        if (header and line_no == 1) or not line.strip():
            continue
        first = line.split(sep, 1)[0].strip()
        if not first.isdigit():
            raise ValueError(f"{path.name}, line {line_no}: expected an item id before {sep!r}: {line[:200]!r}")
        ids.append(int(first))
    catalogue = np.asarray(ids, dtype=np.int64)
    unique, counts = np.unique(catalogue, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path.name}: item id {int(unique[counts > 1][0])} is listed more than once")
    return catalogue


def events_from_frame(frame: pd.DataFrame, *, chunk_size: int = 10_000) -> Iterator[InteractionEvent]:
    """Validated events from a frame with ``EVENT_COLUMNS`` (NaN/None become None), lazily.

    Rows are validated a chunk at a time by one pydantic call (its Rust core), which is faster than
    building events one by one yet keeps memory bounded for tens of millions of rows. A column that
    holds only its field's default in a chunk (source "organic", no request id...) is left out of the
    row dicts: the model fills it in, and validation is the dominant cost of loading a dataset.
    """
    for start in range(0, len(frame), chunk_size):
        chunk = frame.iloc[start : start + chunk_size]
        names, columns = [], []
        for name in EVENT_COLUMNS:
            values = chunk[name]
            if name in _DEFAULTS and _only(values, _DEFAULTS[name]):
                continue
            if values.dtype.kind == "f":
                values = values.astype(object).where(values.notna(), None)
            names.append(name)
            columns.append(values.tolist())
        yield from _EVENT_LIST.validate_python([dict(zip(names, row)) for row in zip(*columns)])


def _only(values: pd.Series, default: object) -> bool:
    return bool(values.isna().all()) if default is None else bool((values == default).all())


# ---- shared helpers ----------------------------------------------------------------------------------------


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def _find(name: str, data_dir: Path, candidates: list[str], extra_dirs: tuple[str, ...] = ()) -> Path:
    """The first of ``candidates`` found in ``data_dir``, ``data_dir/<name>`` or ``extra_dirs``."""
    dirs = _search_dirs(name, data_dir, extra_dirs)
    for folder in dirs:
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
    raise _missing(name, candidates, dirs)


def _search_dirs(name: str, data_dir: Path, extra_dirs: tuple[str, ...] = ()) -> list[Path]:
    return [data_dir, data_dir / name, *(data_dir / d for d in extra_dirs)]


def _missing(name: str, candidates: list[str], dirs: list[Path]) -> FileNotFoundError:
    spec = DATASETS[name]
    return FileNotFoundError(
        f"{name}: none of {', '.join(candidates)} found in {', '.join(str(d) for d in dirs)}. "
        f"This loader needs {spec.files}; get it from {spec.url}"
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _read_bytes(path: Path) -> bytes:
    return gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()


def _first_bad_line(path: Path, check: Callable[[str], str | None], *, header: bool) -> tuple[int, str, str] | None:
    """(line number, reason, line) of the first line ``check`` rejects; blank lines are allowed."""
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if header and line_no == 1:
                continue
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            reason = check(text)
            if reason:
                return line_no, reason, text
    return None


def _malformed(path: Path, check: Callable[[str], str | None], *, header: bool, cause: Exception | None = None) -> ValueError:
    found = _first_bad_line(path, check, header=header)
    if found is None:
        return ValueError(f"{path}: could not be parsed ({cause})")
    line_no, reason, text = found
    return ValueError(f"{path.name}, line {line_no}: {reason}: {text[:200]!r}")


_ID_KEY = "_id_"  # columns of a reader's frame that make up the event id: _id_0 (prefix), _id_1, ...


def _occurrences(keys: pd.DataFrame) -> np.ndarray:
    """0 for the first row with a given id key, 1, 2... for exact repeats, in file order."""
    occurrence = np.zeros(len(keys), dtype=np.int64)
    repeated = keys.duplicated(keep=False).to_numpy()
    if repeated.any():
        occurrence[repeated] = keys[repeated].groupby(list(keys.columns), sort=False, observed=True).cumcount().to_numpy()
    return occurrence


def _format_ids(keys: pd.DataFrame, occurrence: np.ndarray) -> np.ndarray:
    """``prefix-k1-k2...`` per row, plus ``-n`` for the n-th repeat of an id key."""
    ids = keys.iloc[:, 0].astype(str).to_numpy(dtype=object)
    for column in keys.columns[1:]:
        ids = ids + "-" + keys[column].to_numpy().astype(str).astype(object)
    repeat = occurrence > 0
    if repeat.any():
        ids[repeat] = ids[repeat] + "-" + occurrence[repeat].astype(str).astype(object)
    return ids


def _event_frame(
    *,
    id_keys: tuple[str | pd.Categorical | np.ndarray, ...],
    user_id: np.ndarray,
    item_id: np.ndarray,
    event_type: np.ndarray,
    timestamp_ms: np.ndarray,
    played_ratio: np.ndarray,
    source: np.ndarray | str = "organic",
) -> pd.DataFrame:
    """A reader's result: the event columns except ``event_id``, plus the id key columns.

    ``id_keys`` is the id prefix (one string, or a categorical per row) followed by integer keys;
    ``load_frame`` turns them into ``event_id`` once it knows which rows it keeps.
    """
    frame = pd.DataFrame(
        {
            "schema_version": 1,
            "user_id": np.asarray(user_id, dtype=np.int64),
            "item_id": np.asarray(item_id, dtype=np.int64),
            "event_type": event_type,
            "timestamp_ms": np.asarray(timestamp_ms, dtype=np.int64),
            "played_ratio": np.asarray(played_ratio, dtype=np.float64),
            "source": source,
            "request_id": None,
            "variant": None,
        }
    )
    for position, key in enumerate(id_keys):
        if isinstance(key, str):  # a categorical costs one byte a row, an object column eight plus
            key = pd.Categorical.from_codes(np.zeros(len(frame), dtype=np.int8), categories=[key])
        frame[f"{_ID_KEY}{position}"] = key
    return frame


# ---- MovieLens ---------------------------------------------------------------------------------------------


def rating_feedback(rating: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event types, played ratios) for star ratings; see "Feedback rules" in the module docstring."""
    rating = np.asarray(rating, dtype=np.float64)
    kind = np.where(rating >= 4.5, "like", np.where(rating >= 3.0, "listen", "dislike")).astype(object)
    played = np.where(rating >= 4.5, 1.0, np.where(rating >= 3.0, (rating - 2.0) / 2.0, np.nan))
    return kind, played


def _rating_line_checker(sep: str) -> Callable[[str], str | None]:
    def check(text: str) -> str | None:
        fields = text.split(sep)
        if len(fields) != 4:
            return f"expected 4 fields separated by {sep!r}, got {len(fields)}"
        try:
            user, item, rating, ts = int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])
        except ValueError:
            return "user, item and timestamp must be integers and rating a number"
        return _rating_problem(user, item, rating, ts)

    return check


def _rating_problem(user: int, item: int, rating: float, ts: int) -> str | None:
    if user < 0 or item < 0:
        return "ids must be >= 0"
    if not 0.5 <= rating <= 5.0:
        return f"rating {rating} is outside 0.5..5"
    if ts * 1000 + MOVIELENS_SHIFT_MS < MIN_TIMESTAMP_MS:
        return f"timestamp {ts} is not a plausible Unix time in seconds"
    return None


# Ratings files: candidate file names, field separator, whether line 1 is a header.
_RATINGS_FILES: dict[str, tuple[list[str], str, bool]] = {
    "ml-100k": (["u.data", "u.data.gz"], "\t", False),
    "ml-1m": (["ratings.dat", "ratings.dat.gz"], "::", False),
    "ml-20m": (["ratings.csv", "ratings.csv.gz"], ",", True),
    "ml-25m": (["ratings.csv", "ratings.csv.gz"], ",", True),
}


@dataclass(frozen=True)
class MovieLensFiles:
    """The files a MovieLens loader reads, found where the loaders look (``data_dir`` or ``data_dir/<name>``)."""

    ratings: Path  # user, item, rating, timestamp per line, plain or gzipped
    separator: str
    header: bool  # line 1 names the columns
    items: Path | None  # the item file (the catalogue, ``load_catalogue``), where there is one

    def ratings_bytes(self) -> bytes:
        return _read_bytes(self.ratings)


def movielens_files(name: str, data_dir: Path | str) -> MovieLensFiles:
    """Where the ratings and item files of MovieLens dataset ``name`` are; FileNotFoundError, naming where it
    looked and where to get them, if there are no ratings."""
    if name not in _RATINGS_FILES:
        raise ValueError(f"{name!r} is not a MovieLens dataset; known: {', '.join(_RATINGS_FILES)}")
    candidates, sep, header = _RATINGS_FILES[name]
    data_dir = Path(data_dir).expanduser()
    try:
        items: Path | None = _find(name, data_dir, _CATALOGUE_FILES[name][0])
    except FileNotFoundError:
        items = None
    return MovieLensFiles(_find(name, data_dir, candidates), sep, header, items)


def movielens_dataset_of(path: Path | str) -> str | None:
    """The MovieLens dataset whose ratings file ``path`` is, by its name (``u.data`` is ml-100k, ``ratings.dat``
    ml-1m); None when no dataset, or more than one, writes a file of that name (ml-20m and ml-25m both write
    ``ratings.csv``)."""
    name = Path(path).name
    owners = [dataset for dataset, (candidates, _, _) in _RATINGS_FILES.items() if name in candidates]
    return owners[0] if len(owners) == 1 else None


def _read_movielens(name: str, data_dir: Path) -> pd.DataFrame:
    candidates, sep, header = _RATINGS_FILES[name]
    path = _find(name, data_dir, candidates)
    check = _rating_line_checker(sep)
    columns = ["user", "item", "rating", "ts"]
    dtypes = {"user": np.int64, "item": np.int64, "rating": np.float64, "ts": np.int64}
    if header:
        with _open_text(path) as handle:
            first = handle.readline().strip()
        if first.split(",") != ["userId", "movieId", "rating", "timestamp"]:
            raise ValueError(f"{path.name}, line 1: expected header 'userId,movieId,rating,timestamp': {first[:200]!r}")
    try:
        if sep == "::":
            # pandas only parses multi-character separators with its slow Python engine; swap to a tab.
            source: Path | io.BytesIO = io.BytesIO(_read_bytes(path).replace(b"::", b"\t"))
            parse_sep = "\t"
        else:
            source, parse_sep = path, sep
        raw = pd.read_csv(
            source, sep=parse_sep, header=None, names=columns, dtype=dtypes, skiprows=1 if header else 0, engine="c"
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise _malformed(path, check, header=header, cause=exc) from exc
    user, item, rating, ts = (raw[c].to_numpy() for c in columns)
    bad = (user < 0) | (item < 0) | ~((rating >= 0.5) & (rating <= 5.0))
    bad |= ts * 1000 + MOVIELENS_SHIFT_MS < MIN_TIMESTAMP_MS
    if bad.any() or raw.isna().any().any():
        raise _malformed(path, check, header=header)
    kind, played = rating_feedback(rating)
    return _event_frame(
        id_keys=(name, user, item, ts),
        user_id=user,
        item_id=item,
        event_type=kind,
        timestamp_ms=ts * 1000 + MOVIELENS_SHIFT_MS,
        played_ratio=played,
    )


# ---- Amazon 5-core sequences -------------------------------------------------------------------------------

_TIME_SUFFIX = "_time"


def _amazon_files(name: str, data_dir: Path) -> tuple[str, Path | None, Path | None]:
    """(category, sequence file, time file) found for the Amazon loader; Beauty wins if several."""
    dirs = _search_dirs(name, data_dir)
    for folder in dirs:
        if not folder.is_dir():
            continue
        found: dict[str, dict[str, Path]] = {}
        for path in sorted(folder.iterdir()):
            match = re.fullmatch(r"([A-Za-z0-9_]+?)(_time)?\.txt(\.gz)?", path.name)
            if match and path.is_file():
                found.setdefault(match.group(1), {})["time" if match.group(2) else "seq"] = path
        if not found:
            continue
        if "Beauty" in found:
            category = "Beauty"
        elif len(found) == 1:
            category = next(iter(found))
        else:
            raise ValueError(f"{name}: several categories in {folder} ({', '.join(sorted(found))}); keep one per folder")
        return category, found[category].get("seq"), found[category].get("time")
    raise _missing(name, ["Beauty.txt", "Beauty_time.txt", "<Category>.txt(.gz)"], dirs)


def _read_amazon(name: str, data_dir: Path) -> pd.DataFrame:
    category, seq_path, time_path = _amazon_files(name, data_dir)
    # The time file repeats the sequences, so when it is there it is the only file we need.
    path = time_path or seq_path
    assert path is not None
    users: list[int] = []
    lengths: list[int] = []
    items: list[str] = []
    gaps: list[str] = []
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            seq_part, _, gap_part = text.partition("\t")
            tokens = seq_part.split()
            gap_tokens = gap_part.split() if time_path is not None else []
            problem = _amazon_problem(tokens, gap_tokens, time_path is not None)
            if problem:
                raise ValueError(f"{path.name}, line {line_no}: {problem}: {text[:200]!r}")
            users.append(int(tokens[0]))
            lengths.append(len(tokens) - 1)
            items.extend(tokens[1:])
            gaps.extend(gap_tokens)
    n = np.asarray(lengths, dtype=np.int64)
    user = np.repeat(np.asarray(users, dtype=np.int64), n)
    item = np.asarray(items, dtype=np.int64)
    first = np.r_[0, np.cumsum(n)[:-1]]  # index of each user's first interaction
    position = np.arange(len(item)) - np.repeat(first, n)
    if time_path is not None:
        gap_s = np.asarray(gaps, dtype=np.int64)
    else:
        gap_s = np.where(position == 0, 0, 86_400)  # no dates at all: one day per step
    # Seconds since the user's first interaction, then anchored so the last one is at AMAZON_END_MS.
    total = np.cumsum(gap_s)
    elapsed = total - np.repeat(total[first] - gap_s[first], n)
    last = np.repeat(first + n - 1, n)
    ts = AMAZON_END_MS - (elapsed[last] - elapsed) * 1000 - (last - np.arange(len(item))) * 1000
    start = np.repeat(ts[first], n)
    ts = ts + np.maximum(0, MIN_TIMESTAMP_MS - start)  # very long timelines move forward as a whole
    slug = category.lower().replace("_", "-")
    return _event_frame(
        id_keys=(f"amazon-{slug}", user, position),
        user_id=user,
        item_id=item,
        event_type=np.full(len(item), "listen", dtype=object),
        timestamp_ms=ts,
        played_ratio=np.full(len(item), np.nan),
    )


def _amazon_problem(tokens: list[str], gap_tokens: list[str], timed: bool) -> str | None:
    if len(tokens) < 2:
        return "expected 'user_id item_id ...' with at least one item"
    if not all(t.isdigit() for t in tokens):
        return "user and item ids must be non-negative integers"
    if timed:
        if len(gap_tokens) != len(tokens) - 1:
            return f"{len(tokens) - 1} items but {len(gap_tokens)} time gaps after the TAB"
        if not all(g.isdigit() for g in gap_tokens):
            return "time gaps must be non-negative integers (seconds)"
    return None


# ---- Yambda ------------------------------------------------------------------------------------------------

_YAMBDA_KINDS = {  # file stem -> (event type, required beyond uid,item_id,timestamp,is_organic)
    "listens": ("listen", ["played_ratio_pct", "track_length_seconds"]),
    "likes": ("like", []),
    "dislikes": ("dislike", []),
    "unlikes": ("unlike", []),
}
_YAMBDA_PREFIXES = [f"yambda-{stem.removesuffix('s')}" for stem in _YAMBDA_KINDS]  # yambda-listen, ...
_YAMBDA_REQUIRED = ("listens", "likes", "dislikes")
_YAMBDA_DIRS = ("flat/50m", "50m", "yambda/flat/50m")


def _yambda_dir(name: str, data_dir: Path) -> Path:
    dirs = _search_dirs(name, data_dir, _YAMBDA_DIRS)
    for folder in dirs:
        if all((folder / f"{stem}.parquet").is_file() for stem in _YAMBDA_REQUIRED):
            return folder
    raise _missing(name, [f"{stem}.parquet" for stem in _YAMBDA_REQUIRED], dirs)


def _read_yambda(name: str, data_dir: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    folder = _yambda_dir(name, data_dir)
    frames = []
    for stem, (kind, extra) in _YAMBDA_KINDS.items():
        path = folder / f"{stem}.parquet"
        if not path.is_file():
            continue  # only unlikes is optional
        columns = ["uid", "item_id", "timestamp", "is_organic", *extra[:1]]
        available = set(pq.read_schema(path).names)
        missing = [c for c in columns if c not in available]
        if missing:
            raise ValueError(f"{path.name}: missing columns {missing}; has {sorted(available)}")
        raw = pq.read_table(path, columns=columns).to_pandas()
        frames.append(_yambda_frame(path, stem, kind, raw))
    # Concatenation order (listens, likes, dislikes, unlikes) is the tie order within one 5 s bucket.
    return pd.concat(frames, ignore_index=True)


def _yambda_frame(path: Path, stem: str, kind: str, raw: pd.DataFrame) -> pd.DataFrame:
    required = ["uid", "item_id", "timestamp", "is_organic"]
    nulls = raw[required].isna().any(axis=1).to_numpy()
    if nulls.any():
        row = int(np.flatnonzero(nulls)[0])
        raise ValueError(f"{path.name}, row {row}: null in {required}: {raw.iloc[row].to_dict()}")
    uid, item, ts = (raw[c].to_numpy().astype(np.int64) for c in ("uid", "item_id", "timestamp"))
    negative = (uid < 0) | (item < 0) | (ts < 0)
    if negative.any():
        row = int(np.flatnonzero(negative)[0])
        raise ValueError(f"{path.name}, row {row}: negative id or timestamp: {raw.iloc[row].to_dict()}")
    if kind == "listen":
        pct = raw["played_ratio_pct"].to_numpy(dtype=np.float64, na_value=np.nan)
        if (pct < 0).any():
            row = int(np.flatnonzero(pct < 0)[0])
            raise ValueError(f"{path.name}, row {row}: negative played_ratio_pct: {raw.iloc[row].to_dict()}")
        # Unknown ratio (null) stays a listen with played_ratio None.
        event_type = np.where(pct < YAMBDA_SKIP_BELOW_PCT, "skip", "listen").astype(object)
        played = np.minimum(pct / 100.0, 1.0)
    else:
        event_type = np.full(len(raw), kind, dtype=object)
        played = np.full(len(raw), np.nan)
    organic = raw["is_organic"].to_numpy().astype(bool)
    return _event_frame(
        id_keys=(_yambda_prefix(stem, len(raw)), uid, item, ts),
        user_id=uid,
        item_id=item,
        event_type=event_type,
        timestamp_ms=YAMBDA_EPOCH_MS + ts * 1000,
        played_ratio=played,
        source=np.where(organic, "organic", "recommended").astype(object),
    )


def _yambda_prefix(stem: str, rows: int) -> pd.Categorical:
    """The id prefix of a Yambda file as a categorical over *all* Yambda prefixes, so that concatenating
    the files keeps the column categorical (one byte a row) instead of turning it into objects."""
    code = list(_YAMBDA_KINDS).index(stem)
    return pd.Categorical.from_codes(np.full(rows, code, dtype=np.int8), categories=_YAMBDA_PREFIXES)


# Item files: the catalogue (``load_catalogue``): candidate file names, separator, header (None: no header).
_CATALOGUE_FILES: dict[str, tuple[list[str], str, str | None]] = {
    "ml-100k": (["u.item", "u.item.gz"], "|", None),
    "ml-1m": (["movies.dat", "movies.dat.gz"], "::", None),
    "ml-20m": (["movies.csv", "movies.csv.gz"], ",", "movieId,title,genres"),
    "ml-25m": (["movies.csv", "movies.csv.gz"], ",", "movieId,title,genres"),
}

# ---- user and item attributes (ranking features) ----------------------------------------------------------
#
# What the MovieLens side files say about users and movies, read into two frames with one layout for every
# dataset, so that the Feast views (``features.feature_repo.user_attributes_view`` / ``item_attributes_view``)
# and the rankers read the same columns whichever file they came from:
#
#   users: user_id int64, gender str ("M"/"F"), age int64 (ML-1M's age group: 1, 18, 25, 35, 45, 50, 56),
#          occupation str
#   items: item_id int64, genres list[str] (GroupLens' genre names), album str ("" where there is none)
#
# ML-100K's ``u.user`` holds the age in years; it is put into ML-1M's groups so that a recipe means the same
# feature on both. The zip code is left out: thousands of values, most seen once, and a location proxy.

USER_ATTRIBUTE_COLUMNS: tuple[str, ...] = ("user_id", "gender", "age", "occupation")
ITEM_ATTRIBUTE_COLUMNS: tuple[str, ...] = ("item_id", "genres", "album")
# ML-1M's age groups (README: 1 "Under 18", 18 "18-24", 25 "25-34", 35 "35-44", 45 "45-49", 50 "50-55", 56 "56+").
AGE_GROUPS: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
# ML-100K's u.genre, in the order of u.item's 19 flag columns; ML-1M's movies.dat uses the same names.
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# ML-1M's occupation codes (README), read as names so that a code is not mistaken for a number.
ML1M_OCCUPATIONS: tuple[str, ...] = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)
_USER_FILES: dict[str, list[str]] = {"ml-100k": ["u.user", "u.user.gz"], "ml-1m": ["users.dat", "users.dat.gz"]}


def age_group(years: np.ndarray) -> np.ndarray:
    """Age in years -> ML-1M's age group code (the group's lower bound; 1 for under 18)."""
    bounds = np.asarray(AGE_GROUPS[1:])
    return np.asarray(AGE_GROUPS, np.int64)[np.searchsorted(bounds, np.asarray(years, np.int64), side="right")]


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; Latin-1, GroupLens' encoding (titles have accents)."""
    text = _read_bytes(path).decode("latin-1")
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_users(name: str, path: Path) -> pd.DataFrame:
    rows = []
    for line_no, line in _lines(path):
        fields = line.split("|") if name == "ml-100k" else line.split("::")
        if len(fields) != 5:
            raise ValueError(f"{path.name}, line {line_no}: expected 5 fields, got {len(fields)}: {line[:200]!r}")
        try:
            if name == "ml-100k":  # user id | age | gender | occupation | zip code
                user, years, gender, occupation = int(fields[0]), int(fields[1]), fields[2], fields[3]
                age = int(age_group(np.array([years]))[0])
            else:  # UserID::Gender::Age::Occupation::Zip-code
                user, gender, age, code = int(fields[0]), fields[1], int(fields[2]), int(fields[3])
                occupation = ML1M_OCCUPATIONS[code]
        except (ValueError, IndexError):
            raise ValueError(f"{path.name}, line {line_no}: ids, age and occupation code must be integers "
                             f"(occupation 0..{len(ML1M_OCCUPATIONS) - 1}): {line[:200]!r}") from None
        if gender not in ("M", "F") or age not in AGE_GROUPS:
            raise ValueError(f"{path.name}, line {line_no}: gender must be M or F and age one of {AGE_GROUPS}: "
                             f"{line[:200]!r}")
        rows.append((user, gender, age, occupation.strip()))
    return _attribute_frame(path, pd.DataFrame(rows, columns=list(USER_ATTRIBUTE_COLUMNS)), "user_id")


def _parse_items(name: str, path: Path) -> pd.DataFrame:
    rows = []
    for line_no, line in _lines(path):
        if name == "ml-100k":  # movie id | title | release date | video release date | IMDb URL | 19 genre flags
            fields = line.split("|")
            flags = fields[5:]
            if len(fields) != 5 + len(ML100K_GENRES) or not fields[0].isdigit() or any(f not in ("0", "1") for f in flags):
                raise ValueError(f"{path.name}, line {line_no}: expected 'id|title|date|video date|url' and "
                                 f"{len(ML100K_GENRES)} 0/1 genre flags: {line[:200]!r}")
            genres = [g for g, f in zip(ML100K_GENRES, flags) if f == "1"]
        else:  # MovieID::Title::Genres, genres separated by |
            fields = line.split("::")
            if len(fields) != 3 or not fields[0].isdigit():
                raise ValueError(f"{path.name}, line {line_no}: expected 'MovieID::Title::Genres': {line[:200]!r}")
            genres = [g for g in fields[2].strip().split("|") if g]
        rows.append((int(fields[0]), genres, ""))
    return _attribute_frame(path, pd.DataFrame(rows, columns=list(ITEM_ATTRIBUTE_COLUMNS)), "item_id")


def _attribute_frame(path: Path, frame: pd.DataFrame, key: str) -> pd.DataFrame:
    repeated = frame[key].duplicated()
    if repeated.any():
        raise ValueError(f"{path.name}: {key} {int(frame[key][repeated].iloc[0])} is listed more than once")
    return frame.astype({key: np.int64}).sort_values(key, kind="stable").reset_index(drop=True)


def load_user_attributes(name: str, data_dir: Path | str) -> pd.DataFrame | None:
    """Users' demographics (``USER_ATTRIBUTE_COLUMNS``) from ``u.user`` (ml-100k: ``id|age|gender|occupation|zip``)
    or ``users.dat`` (ml-1m: ``UserID::Gender::Age::Occupation::Zip-code``), plain or gzipped, Latin-1; None for a
    dataset without a user file or when the file is absent."""
    _spec(name)
    if name not in _USER_FILES:
        return None
    try:
        path = _find(name, Path(data_dir).expanduser(), _USER_FILES[name])
    except FileNotFoundError:
        return None
    return _parse_users(name, path)


def load_item_attributes(name: str, data_dir: Path | str) -> pd.DataFrame | None:
    """Movies' genres (``ITEM_ATTRIBUTE_COLUMNS``) from ``u.item`` (ml-100k: 19 genre flags) or ``movies.dat``
    (ml-1m: ``MovieID::Title::Genres``, ``|``-separated), plain or gzipped, Latin-1; None for a dataset without
    such a file or when the file is absent. ``album`` is empty: movies have none."""
    _spec(name)
    if name not in ("ml-100k", "ml-1m"):
        return None
    try:
        path = _find(name, Path(data_dir).expanduser(), _CATALOGUE_FILES[name][0])
    except FileNotFoundError:
        return None
    return _parse_items(name, path)


def simulator_item_attributes(genre: np.ndarray, album: np.ndarray) -> pd.DataFrame:
    """The simulator's catalogue as item attributes: each track's genre (one, named ``g<k>``) and album
    (``MusicWorld.catalog.genre`` / ``.album``, indexed by item id). Its listeners have no demographics."""
    genre, album = np.asarray(genre, np.int64), np.asarray(album, np.int64)
    return pd.DataFrame({"item_id": np.arange(len(genre), dtype=np.int64),
                         "genres": [[f"g{g}"] for g in genre], "album": [f"a{a}" for a in album]})


# ---- registry ----------------------------------------------------------------------------------------------

_GROUPLENS = "https://grouplens.org/datasets/movielens/"
DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec("ml-100k", "MovieLens 100K ratings", "u.data (or u.data.gz)", _GROUPLENS + "100k/", _read_movielens),
    "ml-1m": DatasetSpec("ml-1m", "MovieLens 1M ratings", "ratings.dat", _GROUPLENS + "1m/", _read_movielens),
    "ml-20m": DatasetSpec("ml-20m", "MovieLens 20M ratings", "ratings.csv", _GROUPLENS + "20m/", _read_movielens),
    "ml-25m": DatasetSpec("ml-25m", "MovieLens 25M ratings", "ratings.csv", _GROUPLENS + "25m/", _read_movielens),
    "amazon": DatasetSpec(
        "amazon",
        "Amazon 2014 5-core sequences (Beauty by default)",
        "Beauty.txt and/or Beauty_time.txt (or another <Category>.txt), optionally gzipped",
        "the SASRec/BERT4Rec-style preprocessing of https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html",
        _read_amazon,
    ),
    "yambda": DatasetSpec(
        "yambda",
        "Yandex Yambda music interactions (flat layout)",
        "listens.parquet, likes.parquet, dislikes.parquet (e.g. the flat/50m folder)",
        "https://huggingface.co/datasets/yandex/yambda",
        _read_yambda,
    ),
}
