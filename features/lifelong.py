"""A lifelong listening world: users with 10,000-100,000 events over simulated years, and its oracles.

Why a second world: ``features/simulator.py``'s users have a few hundred events, so the last 200 of them are
nearly everything there is to know. Lifelong-history models (VISTA, issue #36) summarise a user's *whole*
history; to test them we need users whose distant past predicts their next play in ways a 200-event window
cannot see, and a yardstick that says how much there is to gain. ``LifelongWorld`` is that world.

Ground truth (all drawn from ``LifelongParams.seed``, nothing learnt):

* **Catalogue.** ``genres`` genres of ``artists / genres`` artists each; an artist has ``min_tracks..max_tracks``
  tracks, all of its genre. Artist popularity is a Zipf law over a random permutation of the artists; within
  an artist, track shares are a Zipf law over its tracks (``share[i]``, summing to 1 per artist). An item's
  popularity is its artist's popularity times its share; ``pop_in_genre[i]`` is that popularity normalised
  within the item's genre.
* **Listeners.** Each user has

  - a genre affinity ``affinity_u ~ Dirichlet(genre_concentration)`` (sparse: a few genres dominate);
  - ``min_favourites..max_favourites`` lifelong *favourite artists*, drawn without replacement with
    probability proportional to artist popularity ** 0.5, with weights ``fav_u ~ Dirichlet(favourite_concentration)``
    (flat: each favourite is individually rare, about one play in every ``1 / (p_favourite * fav_u[a])`` events);
  - ``seasons`` *seasonal tastes*: a peak day of the simulated year ``mu_k`` and a playlist of ``playlist_len``
    tracks of one genre (drawn by popularity, without replacement; a genre with fewer tracks fills the slots
    with all of its tracks, cycling through them in the drawn order, and ``[i in playlist_k]`` below then counts
    a track once per slot). The playlist returns every year around its peak with intensity
    ``s_k(t) = exp(-d(t, mu_k)^2 / (2 season_width_days^2))`` (``d`` the circular distance in days);
  - a *current genre* ``g_u(t)``, piecewise constant: it changes at the points of a Poisson process with mean
    gap ``genre_days`` days, each time to a genre drawn from ``affinity_u`` (a slow drift the recent window sees).

* **History.** A user's ``n_u`` events (log-uniform in ``min_events..max_events``) are spread over
  ``span_u`` days (uniform in ``min_years..max_years`` years) with exponential gaps; a simulated year is
  365.25 days counted back from the end of the history (``end_ms`` only places the timeline). Event ``j``
  (time ``t``, previous item ``prev``) is drawn from the mixture, normalised at each ``t``::

      p(i | state) = w_next [i == next(prev)]                       next track of the previous artist (cyclic)
                   + w_current pop_in_genre[i] [genre(i) == g_u(t)]  the current genre, by popularity
                   + w_favourite fav_u[artist(i)] share[i]           a lifelong favourite artist
                   + sum_k w_season s_k(t) [i in playlist_k] / L     the seasonal playlists in season
                   + w_popular pop[i]                                anything popular

  with ``w_x = p_x / Z(t)`` and ``Z(t) = p_next + p_current + p_favourite + p_season sum_k s_k(t) + p_popular``
  (``p_next`` is 0 for a user's first event). So the last few events reveal the ``next`` habit and the
  current genre (recency matters: HSTU on 200 events is a strong baseline), but the favourite artists and the
  seasonal playlists out of season are spread over years of history.

* **Reactions** do not depend on the item: ``skip`` with ``p_skip`` (played_ratio U(0, 0.3)), else ``like``
  with ``p_like`` (U(0.7, 1)), else ``listen`` (U(0.5, 1)): every like and listen is a positive target of
  ``models/data.py``, so the held-out target follows the same mixture.
* **Served slates** (``respond``, after the end of the history) get ``MusicWorld``'s reactions instead, which do
  depend on the item: its true log-probability under the mixture "now", standardised over the catalogue, through
  ``features.simulator.react`` (see ``respond``): a closed loop's better slates earn more listens and likes.

Oracles (``next_probs``, ``window_probs``, ``oracle_report``), for the held-out last positive event of each user
(``models.data.leave_one_out``'s test target), ranked against the whole catalogue with the user's earlier items
filtered out (``seen_filter: history``, the platform's default; the target itself is never filtered):

* **full**: the exact mixture above with the user's true latent state (favourites, playlists, seasons, current
  genre at the target's time) and the previous item. It is the best possible ranking of the target.
* **window W**: the same formula with the user's latents *estimated from the last W events before the target*
  (a shrinkage plug-in): ``current ~ (genre counts + a prior_genre) / (W + a)``, ``favourite ~ (artist counts + a
  prior_fav) / (W + a)``, playlists ~ item counts / W, season mass = its average over the year; ``prior_genre``
  and ``prior_fav`` are the population averages of ``affinity_u`` and ``fav_u`` over 500 users drawn like the
  world's but not in it (what a model trained on many users knows, without the user's own latents). The
  report keeps the best of a few shrinkage strengths ``a``, so the full oracle's lead over it is not an
  artefact of a badly tuned estimator. The ``next`` habit is known exactly (the previous item is in
  every window).
* **count**: a pure lifelong-count model: the same plug-in over the *whole* history without the ``next`` habit
  (item, artist and genre frequencies, no recency).
* **popularity**: positive events per item over the whole frame (``models.evaluate.popularity_ranks``'s floor).

Cost: one user's history is a handful of vectorised numpy passes over its events (~6 ms per 10k events):
1,000 users x 10k-20k events take ~8 s (the DataFrame of their 14M events ~14 s more: string ids), a
100k-event user 0.14 s. Users draw from their own random streams ``(seed, stream, user)``, so a user's history
does not depend on how many users the world has.
Event ids are ``life-{seed}-{user}-{seq}`` (no time in them, as in ``MusicWorld``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from features.datasets import EVENT_COLUMNS
from features.events import MIN_TIMESTAMP_MS, InteractionEvent
from features.simulator import REACTION_NAMES, WorldParams, examines_next, react, stable_digest

DAY_MS = 86_400_000
YEAR_DAYS = 365.25
_STREAM_CATALOG, _STREAM_USERS, _STREAM_HISTORY, _STREAM_RESPOND = 11, 12, 13, 14  # independent random streams
DEFAULT_END_MS = 1_767_225_600_000  # 2026-01-01: where ``history_frame`` ends every history unless told
# Reactions to served slates: MusicWorld's reaction model with its default parameters (features/simulator.py),
# so that "a like" means the same in both worlds.
REACTION = WorldParams()
NOMINAL_TRACK_S = 200.0  # the world has no track lengths: a played slate item takes played_ratio x this (time only)
_TYPE_NAMES = np.array(["listen", "skip", "like"], dtype=object)
_LISTEN, _SKIP, _LIKE = 0, 1, 2
_EVENT_ID = re.compile(r"^life-(\d+)-(\d+)-(\d+)$")
SHRINKAGE = (3.0, 30.0, 300.0)  # the window estimator's prior strengths ``a`` (pseudo-events); the best is kept
K = 10  # the report's cut-off: NDCG@10 / HR@10
_POPULATION, _POPULATION_FIRST_ID = 500, 10**9  # the window estimator's prior: users outside every world


@dataclass(frozen=True)
class LifelongParams:
    """The knobs of the lifelong world. Defaults: the world of docs/lifelong.md (its oracle report is recorded)."""

    seed: int = 0
    users: int = 1000
    min_events: int = 10_000
    max_events: int = 20_000
    min_years: float = 3.0
    max_years: float = 8.0
    # catalogue
    genres: int = 24
    artists: int = 1200
    min_tracks: int = 4
    max_tracks: int = 16
    artist_zipf: float = 1.0
    track_zipf: float = 1.0
    # listeners
    genre_concentration: float = 0.3
    min_favourites: int = 80
    max_favourites: int = 200
    favourite_concentration: float = 4.0
    seasons: int = 3
    season_width_days: float = 20.0
    playlist_len: int = 30
    genre_days: float = 90.0
    # mixture (unnormalised; see the module docstring)
    p_next: float = 0.25
    p_current: float = 0.3
    p_favourite: float = 0.3
    p_season: float = 0.3
    p_popular: float = 0.05
    # reactions
    p_skip: float = 0.1
    p_like: float = 0.1

    def __post_init__(self) -> None:
        # Each message names the values given, so a --world override that breaks a bound says which one.
        if not 1 <= self.min_events <= self.max_events:
            raise ValueError(f"need 1 <= min_events <= max_events, got {self.min_events}, {self.max_events}")
        if not 0 < self.min_years <= self.max_years:
            raise ValueError(f"need 0 < min_years <= max_years, got {self.min_years}, {self.max_years}")
        if not 1 <= self.min_tracks <= self.max_tracks or self.artists < self.genres:
            raise ValueError("need 1 <= min_tracks <= max_tracks and at least one artist per genre, got tracks "
                             f"{self.min_tracks}..{self.max_tracks}, {self.artists} artists, {self.genres} genres")
        if not 1 <= self.min_favourites <= self.max_favourites <= self.artists:
            raise ValueError("need 1 <= min_favourites <= max_favourites <= artists, got "
                             f"{self.min_favourites}, {self.max_favourites}, {self.artists}")
        if self.playlist_len < 1:
            raise ValueError(f"need playlist_len >= 1, got {self.playlist_len}")


@dataclass(frozen=True)
class LifelongCatalog:
    """Items ``0..I-1``, grouped by artist (an artist's tracks are consecutive ids), artists by genre."""

    artist: np.ndarray  # (I,) int: artist of each item
    genre: np.ndarray  # (I,) int: genre of each item (its artist's)
    artist_genre: np.ndarray  # (A,) int
    artist_start: np.ndarray  # (A,) int: first item of each artist
    artist_tracks: np.ndarray  # (A,) int: tracks per artist
    share: np.ndarray  # (I,) float64: track share within its artist, sums to 1 per artist
    pop: np.ndarray  # (I,) float64: item popularity, sums to 1
    pop_in_genre: np.ndarray  # (I,) float64: popularity normalised within the item's genre
    next_item: np.ndarray  # (I,) int: the artist's next track (cyclic): the ``next`` habit

    @property
    def num_items(self) -> int:
        return len(self.artist)


@dataclass(frozen=True)
class LifelongUser:
    """One user's latent state (the ground truth the full oracle knows)."""

    affinity: np.ndarray  # (G,) genre affinity
    fav_weight: np.ndarray  # (A,) weight of each artist among the favourites (0 for the others), sums to 1
    season_peak_days: np.ndarray  # (S,) peak day of the simulated year
    playlists: np.ndarray  # (S, L) item ids
    genre_change_days: np.ndarray  # (C,) days since the history start at which the current genre changes
    genre_segments: np.ndarray  # (C + 1,) current genre before the first change, then after each


@dataclass(frozen=True)
class UserHistory:
    """One user's events in order (seq = position)."""

    item: np.ndarray  # (n,) int32
    event_type: np.ndarray  # (n,) int8 codes _LISTEN/_SKIP/_LIKE
    played_ratio: np.ndarray  # (n,) float32
    day: np.ndarray  # (n,) float64 days since the user's history start
    span_days: float  # the history ends span_days after its start (at end_ms)


class LifelongWorld:
    """A seeded lifelong listening world. See the module docstring for the generative model."""

    def __init__(self, params: LifelongParams | None = None) -> None:
        self.params = params or LifelongParams()
        self.catalog = _make_catalog(self.params, np.random.default_rng([self.params.seed, _STREAM_CATALOG]))
        self._lengths = _draw_lengths(self.params)
        self._users: dict[int, LifelongUser] = {}
        self._histories: dict[int, UserHistory] = {}
        self._priors: tuple[np.ndarray, np.ndarray] | None = None

    # ---- identities ---------------------------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return self.params.users

    @property
    def num_items(self) -> int:
        return self.catalog.num_items

    def lengths(self) -> np.ndarray:
        """(U,) events per user."""
        return self._lengths.copy()

    def user(self, u: int) -> LifelongUser:
        self._check_user(u)
        if u not in self._users:
            self._users[u] = _make_user(self.params, self.catalog, u, self._history_span(u))
        return self._users[u]

    def history(self, u: int) -> UserHistory:
        self._check_user(u)
        if u not in self._histories:
            self._histories[u] = _make_history(self.params, self.catalog, self.user(u), u, int(self._lengths[u]),
                                               self._history_span(u))
        return self._histories[u]

    # ---- events -------------------------------------------------------------------------------------------
    def history_frame(self, end_ms: int | None = None, users: Iterable[int] | None = None) -> pd.DataFrame:
        """Every (or the given) user's history as a frame with ``EVENT_COLUMNS``, sorted by time.

        ``end_ms`` (default: 2026-01-01) is the end of every user's history; only the placement in time depends
        on it, never which events happen."""
        end_ms = DEFAULT_END_MS if end_ms is None else int(end_ms)
        users = list(range(self.num_users)) if users is None else [int(u) for u in users]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "seq", "item", "type", "ratio", "ts")}
        for u in users:
            h = self.history(u)
            parts["user"].append(np.full(len(h.item), u, np.int64))
            parts["seq"].append(np.arange(len(h.item), dtype=np.int64))
            parts["item"].append(h.item.astype(np.int64))
            parts["type"].append(h.event_type)
            parts["ratio"].append(h.played_ratio)
            # whole milliseconds; two events of a user in one millisecond keep their seq order (the lexsort below)
            parts["ts"].append(end_ms - np.round((h.span_days - h.day) * DAY_MS).astype(np.int64))
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
        if len(cat["ts"]) and int(cat["ts"].min()) < MIN_TIMESTAMP_MS:
            raise ValueError(f"end_ms={end_ms} puts the history before {MIN_TIMESTAMP_MS} ms (2001): pass epoch ms")
        order = np.lexsort((cat["seq"], cat["user"], cat["ts"]))  # ties: by user, then seq (reproducible)
        # ids are built user by user (one prefix each) and gathered by reference: the strings exist once
        ids = np.empty(len(order), dtype=object)
        seed, lo = self.params.seed, 0
        for u, part in zip(users, parts["seq"]):
            prefix = f"life-{seed}-{u}-"
            ids[lo : lo + len(part)] = [prefix + s for s in map(str, range(len(part)))]
            lo += len(part)
        n = len(order)
        columns = {
            "schema_version": np.ones(n, np.int64),
            "event_id": ids[order],
            "user_id": cat["user"][order],
            "item_id": cat["item"][order],
            "event_type": _TYPE_NAMES[cat["type"][order].astype(np.int64)],
            "timestamp_ms": cat["ts"][order],
            "played_ratio": np.round(cat["ratio"][order].astype(np.float64), 4),
            "source": np.full(n, "organic", dtype=object),
            "request_id": np.full(n, None, dtype=object),
            "variant": np.full(n, None, dtype=object),
        }
        del ids, cat, parts
        return pd.DataFrame({c: columns.pop(c) for c in EVENT_COLUMNS}, copy=False)

    # ---- oracles ------------------------------------------------------------------------------------------
    def next_probs(self, u: int, seq: int | None = None) -> np.ndarray:
        """(I,) exact probability of each item being event ``seq`` of user ``u`` given the events before it and
        the user's latent state (default ``seq``: the event after the last one, at the end of the history)."""
        h, state = self.history(u), self.user(u)
        seq = len(h.item) if seq is None else int(seq)
        if not 0 <= seq <= len(h.item):
            raise ValueError(f"seq {seq} outside 0..{len(h.item)}")
        day = h.span_days if seq == len(h.item) else float(h.day[seq])
        genre_mass, season_items, season_total = self._state_at(u, day)
        return _mixture(self.params, self.catalog, prev=int(h.item[seq - 1]) if seq > 0 else -1,
                        genre_mass=genre_mass, fav_weight=state.fav_weight, season_items=season_items,
                        season_total=season_total)

    def next_log_probs(self, u: int, seq: int | None = None) -> np.ndarray:
        """``log(next_probs(u, seq))``: the full-history oracle's scores."""
        with np.errstate(divide="ignore"):
            return np.log(self.next_probs(u, seq))

    def window_probs(self, u: int, seq: int, window: int | None, *, shrinkage: float = SHRINKAGE[1],
                     sequential: bool = True) -> np.ndarray:
        """(I,) the plug-in estimate of ``next_probs(u, seq)`` from the last ``window`` events before ``seq``
        only (None: the whole history). ``sequential=False`` drops the ``next`` habit: with ``window=None`` that
        is the pure lifelong-count model. See the module docstring for the estimator."""
        h = self.history(u)
        lo = 0 if window is None else max(0, seq - int(window))
        seen = h.item[lo:seq].astype(np.int64)  # (W,)
        n = max(len(seen), 1)
        prior_genre, prior_fav = self._population_priors()
        c = self.catalog
        genre_mass = (np.bincount(c.genre[seen], minlength=self.params.genres) + shrinkage * prior_genre) / (n + shrinkage)
        fav = (np.bincount(c.artist[seen], minlength=len(c.artist_start)) + shrinkage * prior_fav) / (n + shrinkage)
        season_items = np.bincount(seen, minlength=self.num_items) / n
        return _mixture(self.params, c, prev=int(h.item[seq - 1]) if (seq > 0 and sequential) else -1,
                        genre_mass=genre_mass, fav_weight=fav, season_items=season_items,
                        season_total=self._mean_season_total())

    # ---- reacting to recommendations ---------------------------------------------------------------------
    def respond(self, u: int, slate: Sequence[int], *, now_ms: int, rng_key: str,
                history: Sequence[int] | None = None, variant: str | None = None,
                end_ms: int | None = None) -> list[InteractionEvent]:
        """How user ``u`` reacts to a served ``slate`` at ``now_ms``, after the end of their history.

        The reaction model is ``MusicWorld.respond``'s (``features.simulator.react`` with its default
        parameters, and its cascade ``examines_next``): the user examines the slate top-down; each examined item
        gets one event whose type and played ratio depend on ``z``, the item's true log-probability as the
        user's next play, standardised over the catalogue (``(log p_i - mean log p) / std log p``). Organic
        plays of this world sit around z = 1.4-4.3 (median 2.5) and a random item around -0.3, as in
        MusicWorld, so the same parameters mean the same thing.

        The state is the module docstring's mixture, "now": the user's latents (favourites, playlists,
        affinity), the season and the current genre at ``now_ms`` (``day = span_days + (now_ms - end_ms) /
        1 day``, ``end_ms`` the end of the history as placed by ``history_frame``, default ``DEFAULT_END_MS``;
        the genre keeps its last value after the history ends), and the *previous item*: the last of
        ``history`` (the items played since the end of the organic history, e.g. a closed loop's earlier
        responses, oldest first) or else the history's last event. The previous item moves with every item the
        user examines in this slate too (a skip is a play, as in the organic history). Users do not learn from
        what they are served: nothing else moves.

        Deterministic given (seed, user, ``rng_key``): the random draws depend on nothing else, so two arms
        answered with the same key share them (common random numbers); an arm's own ``history`` changes only
        the state the draws are read against. Returns one event per examined item, ``source="recommended"``,
        ``request_id=rng_key``, ids ``life-{seed}-{u}-r-{key}-{rank}``; timestamps after ``now_ms``
        (``NOMINAL_TRACK_S`` per played item: the world has no track lengths). Never mutates the world.
        """
        self._check_user(u)
        items = [int(i) for i in slate]
        played = [int(i) for i in (history if history is not None else ())]
        bad = [i for i in items + played if not 0 <= i < self.num_items]
        if bad:
            raise ValueError(f"unknown items {bad[:5]}: this world has items 0..{self.num_items - 1}")
        if len(set(items)) != len(items):
            raise ValueError(f"the slate lists an item twice: {items}")
        end_ms = DEFAULT_END_MS if end_ms is None else int(end_ms)
        if int(now_ms) < end_ms:
            raise ValueError(f"now_ms {now_ms} is before the end of the history ({end_ms}): respond answers after it")
        h = self.history(u)
        day = h.span_days + (int(now_ms) - end_ms) / DAY_MS
        genre_mass, season_items, season_total = self._state_at(u, day)
        prev = played[-1] if played else int(h.item[-1])
        rng = np.random.default_rng([self.params.seed, _STREAM_RESPOND, int(u), stable_digest(str(rng_key))])
        events: list[InteractionEvent] = []
        clock_ms = int(now_ms)
        for rank, item in enumerate(items):
            probs = _mixture(self.params, self.catalog, prev=prev, genre_mass=genre_mass,
                             fav_weight=self.user(u).fav_weight, season_items=season_items,
                             season_total=season_total)  # (I,)
            log_p = np.log(np.maximum(probs, 1e-30))
            z = (log_p[item] - log_p.mean()) / (log_p.std() + 1e-9)
            kind, ratio = react(np.array([z]), rng, REACTION)
            code, played_ratio = int(kind[0]), float(ratio[0])
            clock_ms += int(1000 * (NOMINAL_TRACK_S * played_ratio + rng.uniform(1, 4)))
            events.append(InteractionEvent(
                event_id=_response_event_id(self.params.seed, int(u), str(rng_key), rank), user_id=int(u),
                item_id=item, event_type=REACTION_NAMES[code], timestamp_ms=clock_ms,
                played_ratio=round(played_ratio, 4), source="recommended", request_id=str(rng_key)[:128],
                variant=variant))
            prev = item  # the item just played is the previous item of the next choice, as in the history
            if not examines_next(code, rng):
                break
        return events

    def _state_at(self, u: int, day: float) -> tuple[np.ndarray, np.ndarray, float]:
        """User u's current genre (one-hot (G,)), seasonal item mass (I,) and its total at ``day`` (days since the
        history start; the genre process is defined on the history's span and holds its last value after it)."""
        state, h = self.user(u), self.history(u)
        genre = state.genre_segments[np.searchsorted(state.genre_change_days, day, side="right")]
        intensity = _season_intensity(self.params, state.season_peak_days, np.array([day]), h.span_days)[0]  # (S,)
        season_items = np.zeros(self.num_items)
        np.add.at(season_items, state.playlists.ravel(), np.repeat(intensity, state.playlists.shape[1]))
        return ((np.arange(self.params.genres) == genre).astype(np.float64), season_items / self.params.playlist_len,
                float(intensity.sum()))

    # ---- internals ----------------------------------------------------------------------------------------
    def _history_span(self, u: int) -> float:
        rng = np.random.default_rng([self.params.seed, _STREAM_USERS, u, 0])
        return float(rng.uniform(self.params.min_years, self.params.max_years) * YEAR_DAYS)

    def _population_priors(self) -> tuple[np.ndarray, np.ndarray]:
        """Population averages of the genre affinity and of the favourite weights, over ``_POPULATION`` users drawn
        like the world's but not in it: no user's own latents leak into its window estimate."""
        if self._priors is None:
            sample = [_make_user(self.params, self.catalog, u, self._history_span(u))
                      for u in range(_POPULATION_FIRST_ID, _POPULATION_FIRST_ID + _POPULATION)]
            self._priors = (np.mean([s.affinity for s in sample], axis=0), np.mean([s.fav_weight for s in sample], axis=0))
        return self._priors

    def _mean_season_total(self) -> float:
        """``sum_k s_k(t)`` averaged over the year: the season mass an estimator without the peaks expects."""
        offsets = np.linspace(-YEAR_DAYS / 2, YEAR_DAYS / 2, 1000, endpoint=False)
        one = np.exp(-0.5 * (offsets / self.params.season_width_days) ** 2).mean()
        return float(self.params.seasons * one)

    def _check_user(self, u: int) -> None:
        if not 0 <= int(u) < self.num_users:
            raise ValueError(f"unknown user {u} (0..{self.num_users - 1})")


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------


def _zipf(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


def _make_catalog(p: LifelongParams, rng: np.random.Generator) -> LifelongCatalog:
    artist_genre = np.arange(p.artists) % p.genres  # balanced genres
    tracks = rng.integers(p.min_tracks, p.max_tracks + 1, size=p.artists)
    artist_pop = _zipf(p.artists, p.artist_zipf)[rng.permutation(p.artists)]  # popular artists in every genre
    starts = np.r_[0, np.cumsum(tracks)[:-1]]
    artist = np.repeat(np.arange(p.artists), tracks)  # (I,)
    local = np.arange(len(artist)) - starts[artist]  # (I,) track number within its artist
    # Zipf shares within an artist: its first track is its hit (the ``next`` habit then walks down the list)
    share = 1.0 / (local + 1.0) ** p.track_zipf
    share /= np.bincount(artist, weights=share)[artist]
    pop = artist_pop[artist] * share
    genre = artist_genre[artist]
    pop_in_genre = pop / np.bincount(genre, weights=pop, minlength=p.genres)[genre]
    next_item = starts[artist] + (local + 1) % tracks[artist]
    return LifelongCatalog(artist=artist, genre=genre, artist_genre=artist_genre, artist_start=starts,
                           artist_tracks=tracks, share=share, pop=pop, pop_in_genre=pop_in_genre, next_item=next_item)


def _draw_lengths(p: LifelongParams) -> np.ndarray:
    rng = np.random.default_rng([p.seed, _STREAM_USERS])
    log_n = rng.uniform(math.log(p.min_events), math.log(p.max_events), size=p.users)
    return np.clip(np.round(np.exp(log_n)), p.min_events, p.max_events).astype(np.int64)


def _gumbel_top(rng: np.random.Generator, log_w: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices drawn without replacement with probability proportional to exp(log_w)."""
    keys = log_w + rng.gumbel(size=len(log_w))
    return np.argsort(-keys)[:k]


def _make_user(p: LifelongParams, c: LifelongCatalog, u: int, span_days: float) -> LifelongUser:
    rng = np.random.default_rng([p.seed, _STREAM_USERS, u, 1])
    affinity = rng.dirichlet(np.full(p.genres, p.genre_concentration))
    # favourites: popular artists more often, but a long tail (probability ~ popularity ** 0.5)
    artist_pop = np.bincount(c.artist, weights=c.pop)
    n_fav = int(rng.integers(p.min_favourites, p.max_favourites + 1))
    favs = _gumbel_top(rng, 0.5 * np.log(artist_pop), n_fav)
    fav_weight = np.zeros(len(artist_pop))
    fav_weight[favs] = rng.dirichlet(np.full(n_fav, p.favourite_concentration))
    # seasonal playlists: one genre each (by affinity), tracks by popularity without replacement
    peaks = rng.uniform(0.0, YEAR_DAYS, size=p.seasons)
    playlists = np.empty((p.seasons, p.playlist_len), np.int64)
    for k in range(p.seasons):
        g = rng.choice(p.genres, p=affinity)
        pool = np.flatnonzero(c.genre == g)
        drawn = pool[_gumbel_top(rng, np.log(c.pop[pool]), min(p.playlist_len, len(pool)))]
        # a genre with fewer tracks than a playlist (a small catalogue): all of them, the drawn order repeated to
        # fill the slots, so every track of the genre is on it and its mass stays as even as L slots allow
        playlists[k] = np.resize(drawn, p.playlist_len)
    # the current genre: a Poisson process of changes over the span, each to a genre drawn from the affinity
    changes = np.sort(rng.uniform(0.0, span_days, size=rng.poisson(span_days / p.genre_days)))
    segments = rng.choice(p.genres, size=len(changes) + 1, p=affinity)
    return LifelongUser(affinity=affinity, fav_weight=fav_weight, season_peak_days=peaks, playlists=playlists,
                        genre_change_days=changes, genre_segments=segments)


def _season_intensity(p: LifelongParams, peaks: np.ndarray, day: np.ndarray, span_days: float) -> np.ndarray:
    """(n, S) s_k(t): Gaussian bumps around each peak on the circular year; the year is counted from the end."""
    year_day = np.mod(day - span_days, YEAR_DAYS)  # (n,) 0 = the end of the history
    d = np.abs(year_day[:, None] - peaks[None, :])  # (n, S)
    d = np.minimum(d, YEAR_DAYS - d)
    return np.exp(-0.5 * (d / p.season_width_days) ** 2)


def _sample(cdf: np.ndarray, u: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """Inverse-CDF sampling. ``cdf`` holds groups back to back, each cumulated within itself to 1 and shifted by its
    group number (group g spans (g, g + 1]), so ``u + group`` samples within ``group`` in one searchsorted."""
    x = u if group is None else u + group
    return np.minimum(np.searchsorted(cdf, x, side="right"), len(cdf) - 1)


def _make_history(p: LifelongParams, c: LifelongCatalog, state: LifelongUser, u: int, n: int,
                  span_days: float) -> UserHistory:
    rng = np.random.default_rng([p.seed, _STREAM_HISTORY, u])
    # times: exponential gaps scaled to the span, the last event one mean gap before the end
    gaps = rng.exponential(size=n + 1)
    day = np.cumsum(gaps[:-1]) / gaps.sum() * span_days  # (n,)
    genre_now = state.genre_segments[np.searchsorted(state.genre_change_days, day, side="right")]  # (n,)
    intensity = _season_intensity(p, state.season_peak_days, day, span_days)  # (n, S)

    # which habit: columns next, current, favourite, popular, season 1..S; weights normalised per event
    w = np.empty((n, 4 + p.seasons))
    w[:, 0], w[:, 1], w[:, 2], w[:, 3] = p.p_next, p.p_current, p.p_favourite, p.p_popular
    w[:, 4:] = p.p_season * intensity
    w[0, 0] = 0.0  # the first event has no previous track
    cum = np.cumsum(w, axis=1)
    habit = (cum < rng.random(n)[:, None] * cum[:, -1:]).sum(axis=1)  # (n,)

    item = np.empty(n, np.int64)
    # current genre: items by popularity within the genre
    genre_order = np.argsort(c.genre, kind="stable")
    genre_cdf = _grouped_cdf(c.pop_in_genre[genre_order], c.genre[genre_order])
    m = habit == 1
    item[m] = genre_order[_sample(genre_cdf, rng.random(int(m.sum())), genre_now[m])]
    # a favourite artist, then one of its tracks by share
    favs = np.flatnonzero(state.fav_weight)
    fav_cdf = np.cumsum(state.fav_weight[favs])
    m = habit == 2
    artist = favs[_sample(fav_cdf / fav_cdf[-1], rng.random(int(m.sum())))]
    item[m] = _sample(_grouped_cdf(c.share, c.artist), rng.random(int(m.sum())), artist)
    # anything popular
    m = habit == 3
    item[m] = _sample(np.cumsum(c.pop) / c.pop.sum(), rng.random(int(m.sum())))
    # a seasonal playlist, uniformly
    m = habit >= 4
    item[m] = state.playlists[habit[m] - 4, rng.integers(0, p.playlist_len, size=int(m.sum()))]
    # next track of the previous artist: resolve runs of ``next`` from the last event that was not one
    is_next = habit == 0
    anchor = np.maximum.accumulate(np.where(is_next, 0, np.arange(n)))  # (n,) last non-next event at or before
    steps = np.arange(n) - anchor
    a = c.artist[item[anchor]]
    local = item[anchor] - c.artist_start[a]
    item[is_next] = (c.artist_start[a] + (local + steps) % c.artist_tracks[a])[is_next]

    # reactions: independent of the item
    r = rng.random(n)
    event_type = np.where(r < p.p_skip, _SKIP, np.where(r < p.p_skip + p.p_like, _LIKE, _LISTEN)).astype(np.int8)
    ratio = np.where(event_type == _SKIP, rng.uniform(0.0, 0.3, n),
                     np.where(event_type == _LIKE, rng.uniform(0.7, 1.0, n), rng.uniform(0.5, 1.0, n)))
    return UserHistory(item=item.astype(np.int32), event_type=event_type, played_ratio=ratio.astype(np.float32),
                       day=day, span_days=span_days)


def _response_event_id(seed: int, u: int, key: str, rank: int) -> str:
    event_id = f"life-{seed}-{u}-r-{key}-{rank}"
    if len(event_id) > 128:  # the schema's limit: a long key is hashed, keeping the id stable
        event_id = f"life-{seed}-{u}-r-{stable_digest(key):08x}-{rank}"
    return event_id


def _grouped_cdf(weights: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cumulative weights within each contiguous group, normalised to 1 and shifted by the group number."""
    totals = np.bincount(group, weights=weights)
    cum = np.cumsum(weights)
    before = np.r_[0.0, np.cumsum(totals)[:-1]][group]  # mass of the earlier groups
    return (cum - before) / totals[group] + group


def _mixture(p: LifelongParams, c: LifelongCatalog, *, prev: int, genre_mass: np.ndarray, fav_weight: np.ndarray,
             season_items: np.ndarray, season_total: float) -> np.ndarray:
    """(I,) the module docstring's mixture for one state; ``season_items`` sums to ``season_total`` (or to 1 when
    estimated, then scaled by ``season_total``)."""
    w_next = p.p_next if prev >= 0 else 0.0
    z = w_next + p.p_current + p.p_favourite + p.p_season * season_total + p.p_popular
    season = season_items * (season_total / max(season_items.sum(), 1e-12))
    probs = (p.p_current * genre_mass[c.genre] * c.pop_in_genre  # (I,)
             + p.p_favourite * fav_weight[c.artist] * c.share
             + p.p_season * season
             + p.p_popular * c.pop)
    if prev >= 0:
        probs[c.next_item[prev]] += w_next
    return probs / z


# ----------------------------------------------------------------------------------------------------------
# The oracle report
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The held-out target of each user of a frame: its last positive event (``models.data.leave_one_out``)."""

    user: np.ndarray  # (T,) user ids, ascending
    seq: np.ndarray  # (T,) the target's position in the user's history
    item: np.ndarray  # (T,) the target item
    event: np.ndarray  # (T,) the target's index into ``models.data.build_sequences(frame)``'s flat arrays
    vocab: np.ndarray  # (V,) the items of the frame: the catalogue the models rank


def loo_targets(frame: pd.DataFrame) -> Targets:
    """Each user's last positive event (like, add_to_playlist, listen with played_ratio >= 0.5 or unknown) when
    the user has two positive events after their first event: the test target ``models.data.leave_one_out`` picks
    (the same rule, restated here because features sit below models)."""
    users = frame["user_id"].to_numpy(np.int64)
    ts = frame["timestamp_ms"].to_numpy(np.int64)
    order = np.lexsort((ts, users))  # stable, as build_sequences
    users = users[order]
    positive = positive_events(frame)[order]
    uid, first = np.unique(users, return_index=True)
    positive[first] = False  # a target needs a history
    owner = np.searchsorted(uid, users)
    n_pos = np.bincount(owner, weights=positive, minlength=len(uid))
    idx = np.flatnonzero(positive)  # ascending, so grouped by user
    past_last = np.searchsorted(owner[idx], np.arange(len(uid)), side="right")  # one past each user's last
    keep = n_pos >= 2
    event = idx[past_last[keep] - 1]
    seq = event - first[keep]  # the frame of one user is its history in seq order
    return Targets(user=uid[keep], seq=seq, item=frame["item_id"].to_numpy(np.int64)[order][event], event=event,
                   vocab=np.unique(frame["item_id"].to_numpy(np.int64)))


def positive_events(frame: pd.DataFrame) -> np.ndarray:
    """(E,) bool: the events ``models.data`` takes as positive targets (like, add_to_playlist, and listen with
    played_ratio >= 0.5 or unknown)."""
    kind = frame["event_type"]
    ratio = frame["played_ratio"].to_numpy(np.float64, na_value=np.nan)
    return (kind.isin(["like", "add_to_playlist"]).to_numpy()
            | ((kind == "listen").to_numpy() & ~(ratio < 0.5)))


def target_rank(scores: np.ndarray, target: int, candidates: np.ndarray) -> int:
    """0-based rank of ``target`` among ``candidates`` (a bool mask that includes it) by ``scores``; ties count
    against the target (``models.evaluate.rank_targets``'s rule)."""
    others = candidates.copy()
    others[target] = False
    return int((scores[others] >= scores[target]).sum())


def oracle_ranks(world: LifelongWorld, frame: pd.DataFrame, windows: Sequence[int] = (50, 200),
                 shrinkage: Sequence[float] = SHRINKAGE, targets: Targets | None = None) -> tuple[Targets, dict[str, np.ndarray]]:
    """Each held-out target's rank under every reference predictor: ``full``, ``window_{W}@{a}`` for each window
    and shrinkage, ``count@{a}`` and ``popularity``. The user's earlier items are filtered out of the ranking.
    ``targets``: ``loo_targets(frame)`` when already at hand."""
    targets = loo_targets(frame) if targets is None else targets
    in_vocab = np.zeros(world.num_items, bool)
    in_vocab[targets.vocab] = True
    positive = positive_events(frame)
    pop_counts = np.bincount(frame["item_id"].to_numpy(np.int64)[positive], minlength=world.num_items).astype(float)
    names = ["full", "popularity"] + [f"window_{w}@{a:g}" for w in windows for a in shrinkage] + [f"count@{a:g}" for a in shrinkage]
    ranks = {name: np.empty(len(targets.user), np.int64) for name in names}
    for t, (u, seq, item) in enumerate(zip(targets.user.tolist(), targets.seq.tolist(), targets.item.tolist())):
        h = world.history(u)
        if int(h.item[seq]) != item:
            raise ValueError(f"the frame's target of user {u} is not the world's event {seq}: not this world's frame")
        candidates = in_vocab.copy()
        candidates[h.item[:seq]] = False  # seen_filter: history
        candidates[item] = True
        ranks["full"][t] = target_rank(world.next_probs(u, seq), item, candidates)
        ranks["popularity"][t] = target_rank(pop_counts, item, candidates)
        for a in shrinkage:
            for w in windows:
                ranks[f"window_{w}@{a:g}"][t] = target_rank(world.window_probs(u, seq, w, shrinkage=a), item, candidates)
            ranks[f"count@{a:g}"][t] = target_rank(world.window_probs(u, seq, None, shrinkage=a, sequential=False),
                                                   item, candidates)
    return targets, ranks


def gains(ranks: np.ndarray, k: int = K) -> dict[str, np.ndarray]:
    """Per-target NDCG@k and HR@k (``models.evaluate.target_gains``'s formulas)."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = r < k
    return {f"ndcg@{k}": np.where(hit, 1.0 / np.log2(r + 2.0), 0.0), f"hr@{k}": hit.astype(np.float64)}


def best_of(ranks: dict[str, np.ndarray], prefix: str, k: int = K) -> tuple[str, np.ndarray]:
    """The variant of a predictor (its shrinkage) with the best mean NDCG@k: its name and ranks."""
    variants = [name for name in ranks if name.startswith(prefix + "@")]
    name = max(variants, key=lambda n: gains(ranks[n], k)[f"ndcg@{k}"].mean())
    return name, ranks[name]


def oracle_report(world: LifelongWorld, frame: pd.DataFrame, windows: Sequence[int] = (50, 200),
                  targets: Targets | None = None) -> dict:
    """NDCG@10 / HR@10 of the reference predictors on the held-out last positive event of each user, and the full
    oracle's lead over each window oracle: how much a lifelong model can gain over one that reads W events.
    ``targets``: ``loo_targets(frame)`` when already at hand."""
    targets, ranks = oracle_ranks(world, frame, windows, targets=targets)
    out: dict = {"targets": int(len(targets.user))}

    def figures(r: np.ndarray) -> dict[str, float]:
        return {m: round(float(v.mean()), 4) for m, v in gains(r).items()}

    out["full"] = figures(ranks["full"])
    for prefix in [f"window_{w}" for w in windows] + ["count"]:
        name, r = best_of(ranks, prefix)
        out[prefix] = {**figures(r), "shrinkage": float(name.partition("@")[2])}
    out["popularity"] = figures(ranks["popularity"])
    full = gains(ranks["full"])[f"ndcg@{K}"]
    rng = np.random.default_rng(0)
    for w in windows:
        lead = full - gains(best_of(ranks, f"window_{w}")[1])[f"ndcg@{K}"]  # (T,) paired by user
        out[f"lead_ndcg@{K}_over_window_{w}"] = round(float(lead.mean()), 4)
        out[f"lead_ndcg@{K}_over_window_{w}_ci"] = [round(float(x), 4) for x in _bootstrap_ci(lead, rng)]
    return out


def _bootstrap_ci(values: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> tuple[float, float]:
    """95% interval of the mean of ``values`` (T,) over users resampled with replacement."""
    n = len(values)
    means = (rng.multinomial(n, np.full(n, 1.0 / n), size=draws) @ values) / n  # (draws,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)
