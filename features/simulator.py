"""A synthetic music-streaming world: the platform's default data and its ground truth.

Why a simulator: Encore must run end to end (ingest -> train -> serve -> A/B test) without a public
dataset, and an A/B test needs *someone to answer the recommendations*. ``MusicWorld`` is that someone.
It writes an organic listening history for training and reacts to served slates, both from one hidden
ground truth, so a better recommender measurably earns more listens and likes.

Ground truth (all drawn from the seed, nothing learnt):

* **Catalog.** Every item (track) belongs to a genre and an album (4-12 consecutive tracks of one genre)
  and has a unit latent vector: genre centre + album offset + noise, so tracks of one album are closer
  than tracks of one genre, which are closer than anything else. Popularity is a power law (Zipf) over a
  random permutation of the items, so popular tracks are spread across genres.
* **Listeners.** A user likes a few (2-3) genres with Dirichlet weights and has a personal taste vector
  near the centres of those genres. About half the users *drift*: over the history span a growing share of
  their genre preference moves to a genre they did not like before, so recent behaviour predicts the
  future better than old behaviour. Each user also has a handful of all-time favourite tracks.
* **Sequential habits.** History is a sequence of sessions. The next track of a session is drawn from a
  mixture of three habits:

  - *album play*: the next track of the current album (when there is one);
  - *repeat*: one of the user's favourites;
  - *explore*: a softmax over the catalog of
    ``genre_weight * log w_u(t)[genre] + taste_weight * taste_u . v + popularity_weight * log pop
    + similarity_weight * v_prev . v + continuity_bonus * [genre == genre of previous track]``.

  The first track of a session gets the continuity bonus on a genre drawn from the user's current genre
  weights (the session's mood), and the explore habit never replays the previous track. So the
  previous track carries information that neither popularity nor a user's overall profile has: that is
  the signal a sequence model can learn and a non-sequential model cannot.

``true_scores`` is *exactly* the log-probability of the next organic track under that mixture, given the
previous track (the user's state "now", i.e. at the end of the history span). It is therefore the optimal
ranking for predicting the next organic track, and the quantity that drives feedback.

Feedback. Every play produces exactly one event whose type is the strongest reaction to it: ``like``
(listened and liked; carries played_ratio), ``listen``, ``skip`` (low played_ratio) or ``dislike``
(skipped and disliked; carries played_ratio). The reaction depends on ``z``, the track's true score
standardised for that user and context (centred on the mean log-probability over the catalog, scaled by
the spread of the explore logits): the probability of listening is a logistic function of ``z``; likes
come only from listens with high ``z``, dislikes only from skips with low ``z``. Organic plays sit around
z = 2-4 and a random track around z = -0.5, so the history is ~65% listens, ~25% skips, ~9% likes and
~1% dislikes, while a random slate is mostly skipped.

Hidden quality (``SimulatorSettings.quality_weight``, 0 by default). Each track also has a quality q ~ N(0, 1)
that no choice depends on: reactions to a play use ``z + quality_weight * q``. Without it (the default) a
reaction is a function of the same score that drives the choice, so the reactions teach nothing that the
choices do not, and a next-item model is already the best ranker a reaction-trained one could be. With it, as
with real catchy-but-disappointing tracks, only reactions reveal part of what a user will enjoy: the world
in which a feedback-trained ranking stage can add to retrieval.

Determinism. The history depends only on the seed and the settings, never on ``end_ms``: ``end_ms`` only
places the timeline, and event ids (``sim-{seed}-{user}-{seq}``) do not contain time, so replaying the
same world twice produces the same ids and deduplicates downstream. ``respond`` is a pure function of
(seed, user, slate, context, rng key) with ids ``sim-{seed}-{user}-r-{request_id}-{rank}``; it never
mutates the world, so responses do not depend on call order or on threads. Feedback served to the
world does not change its ground truth: users do not learn from recommendations (a known limit).

Vectorisation. History is generated step by step *across all users at once* (in blocks of users for
big worlds): one (users x items) score matrix per step (a row gather from a precomputed context table into
a reused buffer), sampled by a two-level inverse CDF. The default world (600 users, 800 items,
6 sessions x 12 events = 43,200 events) takes ~0.3 s to generate and ~0.4 s more to validate as
pydantic events on an idle core.

Ids: users and items are ``0..n-1``; ``true_scores(...)[i]`` is the score of item ``i``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd

from features.events import MIN_TIMESTAMP_MS, EventType, InteractionEvent
from features.datasets import EVENT_COLUMNS, events_from_frame
from infra.settings import SimulatorSettings

DAY_MS = 86_400_000
_TABLE_MAX_ITEMS = 4096  # precomputed context table up to (4096 + G) x 4096 float32, ~70 MB
_CELLS_PER_BLOCK = 1 << 22  # users x items cells per generation block: ~16 MB per float32 buffer

# Independent random streams: changing how, say, history is generated must not reshuffle the catalog.
_STREAM_CATALOG, _STREAM_USERS, _STREAM_HISTORY, _STREAM_RESPOND, _STREAM_QUALITY = 1, 2, 3, 4, 5

# Event type codes used internally by the vectorised generator (order matters only here).
_LISTEN, _SKIP, _LIKE, _DISLIKE = 0, 1, 2, 3
_TYPE_NAMES = np.array(["listen", "skip", "like", "dislike"], dtype=object)
REACTION_NAMES = _TYPE_NAMES  # event type of each ``react`` code


@dataclass(frozen=True)
class WorldParams:
    """The knobs of the ground truth. Defaults give a world where sequence clearly matters.

    Setting ``p_album``, ``p_repeat``, ``similarity_weight`` and ``continuity_bonus`` to 0 (see
    ``WorldParams.non_sequential()``) removes the sequential signal; tests use that to prove that
    their sequential-beats-non-sequential check can fail.
    """

    dim: int = 16
    album_min: int = 4
    album_max: int = 12
    zipf_exponent: float = 1.0
    min_favourite_genres: int = 2
    max_favourite_genres: int = 3
    drift_share: float = 0.5  # share of users whose taste drifts towards a new genre
    drift_strength: float = 0.7  # genre-weight mass moved to the new genre by the end of the history
    favourites: int = 6
    # explore softmax
    genre_weight: float = 1.0
    taste_weight: float = 3.0
    popularity_weight: float = 0.6
    similarity_weight: float = 2.0
    continuity_bonus: float = 1.5
    # habits
    p_album: float = 0.2
    p_repeat: float = 0.08
    # feedback, in units of the standardised true score z (organic plays sit around z = 2-4, a random
    # track around z = -0.5): ~65% listens, ~25% skips, ~9% likes, ~1% dislikes in organic history
    listen_mid: float = 2.0
    listen_slope: float = 1.5
    like_mid: float = 3.6
    like_max: float = 0.5
    dislike_mid: float = 1.5
    dislike_max: float = 0.2
    # hidden track quality: reactions to a play use z + quality_weight * quality[track]; choices never see it
    quality_weight: float = 0.0

    @classmethod
    def non_sequential(cls) -> WorldParams:
        """Same world without sequential habits: the next track depends on the user, not on the previous one."""
        return cls(p_album=0.0, p_repeat=0.0, similarity_weight=0.0, continuity_bonus=0.0)


@dataclass(frozen=True)
class Catalog:
    """Items, indexed by item id (0..n-1)."""

    genre: np.ndarray  # (I,) int
    album: np.ndarray  # (I,) int
    next_in_album: np.ndarray  # (I,) int, -1 for the last track of an album
    vectors: np.ndarray  # (I, d) float32, unit norm
    log_popularity: np.ndarray  # (I,) float32, log of a power law, max 0
    length_s: np.ndarray  # (I,) float32, track length in seconds
    quality: np.ndarray | None = None  # (I,) float32 ~ N(0, 1), hidden: moves reactions, never choices


@dataclass(frozen=True)
class Listeners:
    """Users, indexed by user id (0..n-1)."""

    genre_start: np.ndarray  # (U, G) genre weights at the start of the history
    genre_end: np.ndarray  # (U, G) genre weights "now"
    taste: np.ndarray  # (U, d) float32, unit norm
    favourites: np.ndarray  # (U, F) int item ids


@dataclass(frozen=True)
class _History:
    """The organic history in arrays, one row per event, ordered by (user, seq)."""

    user: np.ndarray
    seq: np.ndarray
    item: np.ndarray
    event_type: np.ndarray  # codes _LISTEN.._DISLIKE
    played_ratio: np.ndarray
    offset_ms: np.ndarray  # time since the start of the history window


class MusicWorld:
    """A seeded synthetic music-streaming world. See the module docstring for the model."""

    def __init__(self, settings: SimulatorSettings | None = None, params: WorldParams | None = None) -> None:
        self.settings = settings or SimulatorSettings()
        self.params = params or WorldParams(quality_weight=self.settings.quality_weight)
        catalog = _make_catalog(self.settings, self.params, self._rng(_STREAM_CATALOG))
        # A stream of its own: a world without quality draws exactly what it drew before quality existed.
        quality = self._rng(_STREAM_QUALITY).normal(size=self.settings.items).astype(np.float32)
        self.catalog = replace(catalog, quality=quality)
        self.listeners = _make_listeners(self.settings, self.params, self.catalog, self._rng(_STREAM_USERS))
        self._truth = _Truth.build(self.catalog, self.listeners, self.params)
        self._history: _History | None = None  # generated lazily, once
        self._history_lock = threading.Lock()  # respond() is called from thread pools

    # ---- identities -------------------------------------------------------------------------------------
    @property
    def users(self) -> list[int]:
        return list(range(self.settings.users))

    @property
    def items(self) -> list[int]:
        return list(range(self.settings.items))

    def genre_of(self, item_id: int) -> int:
        return int(self.catalog.genre[item_id])

    # ---- organic history ----------------------------------------------------------------------------------
    def history_frame(self, end_ms: int | None = None) -> pd.DataFrame:
        """The organic history as a DataFrame with the ``InteractionEvent`` columns, sorted by time."""
        hist = self._generated()
        # "Now" rounded down to a whole second: the models bucket time gaps in whole seconds, so histories made
        # at different moments then differ only by a shift and train the same model for the same seed.
        end_ms = _now_ms() // 1000 * 1000 if end_ms is None else int(end_ms)
        start_ms = end_ms - self.settings.days * DAY_MS
        if start_ms < MIN_TIMESTAMP_MS:
            raise ValueError(f"end_ms={end_ms} puts the history before {MIN_TIMESTAMP_MS} ms (2001): pass epoch ms")
        timestamp = start_ms + hist.offset_ms
        # Ties (two users at the same ms) are broken by user then seq so the order is reproducible.
        order = np.lexsort((hist.seq, hist.user, timestamp))
        seed = self.settings.seed
        frame = pd.DataFrame(
            {
                "schema_version": 1,
                "event_id": [f"sim-{seed}-{u}-{s}" for u, s in zip(hist.user[order].tolist(), hist.seq[order].tolist())],
                "user_id": hist.user[order],
                "item_id": hist.item[order],
                "event_type": _TYPE_NAMES[hist.event_type[order]],
                "timestamp_ms": timestamp[order],
                "played_ratio": np.round(hist.played_ratio[order], 4),
                "source": "organic",
                "request_id": None,
                "variant": None,
            }
        )
        return frame[EVENT_COLUMNS].reset_index(drop=True)

    def history(self, end_ms: int | None = None) -> list[InteractionEvent]:
        """The organic history over ``settings.days`` days ending at ``end_ms`` (default now), by time."""
        return list(events_from_frame(self.history_frame(end_ms)))

    # ---- ground truth -------------------------------------------------------------------------------------
    def true_scores(self, user_id: int, recent_items: Sequence[int] = ()) -> np.ndarray:
        """Log-probability of each item being the user's next organic play, given their recent items.

        Only the last recent item matters (the world is first-order given the user); with none, the user
        is starting a session. Uses the user's tastes "now" (end of the history span). Shape: (items,).
        """
        user_id = int(user_id)
        self._check_user(user_id)
        prev = int(recent_items[-1]) if len(recent_items) else -1
        if prev >= 0:
            self._check_items([prev])
        return self._truth.next_log_probs(user_id, self._base_now(user_id), prev)[0]

    def recent_items(self, user_id: int, n: int = 5) -> list[int]:
        """The user's last ``n`` organic plays (the context ``respond`` uses by default)."""
        self._check_user(user_id)
        hist = self._generated()
        per_user = self.settings.sessions_per_user * self.settings.events_per_session
        row = hist.item[user_id * per_user : (user_id + 1) * per_user]  # rows are ordered by (user, seq)
        return row[-n:].tolist() if n > 0 else []

    # ---- reacting to recommendations ---------------------------------------------------------------------
    def respond(
        self,
        user_id: int,
        items: Sequence[int],
        *,
        request_id: str,
        variant: str,
        now_ms: int,
        rng_key: str | None = None,
        recent_items: Sequence[int] | None = None,
    ) -> list[InteractionEvent]:
        """How the user reacts to a served slate, considered top-down.

        The user examines the first item, then keeps going with a probability that is higher after a
        listen than after a skip (a cascade), so a slate that starts well is explored further. Each
        examined item yields one event (see the module docstring for the reaction model), scored against
        the user's context, which starts at ``recent_items`` (default: their last organic plays) and moves
        on with every track they play. Unexamined items yield nothing.

        Deterministic given the seed, the user and ``rng_key`` (default ``request_id``): pass the same
        ``rng_key`` to two variants to compare them under common random numbers. Thread-safe.
        """
        user_id = int(user_id)  # numpy ints from a model's output are welcome
        self._check_user(user_id)
        slate = [int(i) for i in items]
        context = [int(i) for i in (self.recent_items(user_id) if recent_items is None else recent_items)]
        self._check_items(slate + context)
        key = rng_key if rng_key is not None else request_id
        rng = self._rng(_STREAM_RESPOND, stable_digest(f"{user_id}\x00{key}"))
        base = self._base_now(user_id)
        events: list[InteractionEvent] = []
        clock_ms = int(now_ms)
        for rank, item in enumerate(slate):
            prev = int(context[-1]) if context else -1
            log_p, mean, scale = self._truth.next_log_probs(user_id, base, prev)
            z = (log_p[item] - mean) / scale + self.params.quality_weight * float(self.catalog.quality[item])
            kind, ratio = react(np.array([z]), rng, self.params)
            kind_code, played = int(kind[0]), float(ratio[0])
            clock_ms += int(1000 * (self.catalog.length_s[item] * played + rng.uniform(1, 4)))
            events.append(
                InteractionEvent(
                    event_id=_response_event_id(self.settings.seed, user_id, request_id, rank),
                    user_id=user_id,
                    item_id=item,
                    event_type=EventType(_TYPE_NAMES[kind_code]),
                    timestamp_ms=clock_ms,
                    played_ratio=round(played, 4),
                    source="recommended",
                    request_id=request_id,
                    variant=variant,
                )
            )
            # Like the organic generator, the track just played is the context of the next one.
            context.append(item)
            if not examines_next(kind_code, rng):
                break
        return events

    def slate_probabilities(self, user_id: int, items: Sequence[int], *,
                            recent_items: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """The exact probability, per slate position, of each outcome ``respond`` can give this slate, over its
        randomness: ``examined`` (the user got that far), ``played`` (a listen or like: an engaged event),
        ``like``, ``skip``, ``dislike`` (each examined and then that reaction). Shape (len(items),) each.

        Exact because the world is first-order: position r is examined only if every position before it was,
        and then its context is the item at r - 1 (or the last of ``recent_items`` at r = 0). So this is the
        best possible scorer of a logged slate's labels (the Bayes ranker, for AUC too): the ceiling a ranker
        trained on the log can approach and not pass."""
        user_id = int(user_id)
        self._check_user(user_id)
        slate = [int(i) for i in items]
        context = [int(i) for i in (self.recent_items(user_id) if recent_items is None else recent_items)]
        self._check_items(slate + context)
        base = self._base_now(user_id)
        z = np.empty(len(slate))
        for rank, item in enumerate(slate):
            prev = slate[rank - 1] if rank else (context[-1] if context else -1)
            log_p, mean, scale = self._truth.next_log_probs(user_id, base, prev)
            z[rank] = (log_p[item] - mean) / scale + self.params.quality_weight * float(self.catalog.quality[item])
        odds = reaction_probabilities(z, self.params)
        go_on = CONTINUE_AFTER_PLAY * odds["played"] + CONTINUE_AFTER_SKIP * (1 - odds["played"])
        examined = np.concatenate([[1.0], np.cumprod(go_on[:-1])])[: len(slate)]
        return {"examined": examined} | {k: examined * odds[k] for k in ("played", "like", "skip", "dislike")}

    def played_probabilities(self, user_id: int, prev_items: Sequence[int], *, taste: np.ndarray | None = None,
                             genre_weights: np.ndarray | None = None) -> np.ndarray:
        """P(played | examined) of every item right after each of ``prev_items`` (-1: the start of a session):
        (len(prev_items), items). The reaction model of ``respond`` without the slate around the item: averaged
        over the items that could sit above a position, it is the best a scorer that sees each candidate alone
        (a pointwise ranker) can know.

        ``taste`` (d,) and ``genre_weights`` (G,) replace the user's own state ("now") in the explore logits:
        the probabilities under a guess of the user, such as one read from their recent plays, which says how
        much of the user a given feature can reveal (``bench.ranking_ceiling``)."""
        user_id = int(user_id)
        self._check_user(user_id)
        prevs = [int(p) for p in prev_items]
        self._check_items([p for p in prevs if p >= 0])
        if taste is None and genre_weights is None:
            base = self._base_now(user_id)
        else:  # the same explore base, of a one-user Listeners holding the guess ("now" is t = 1: genre_end)
            own = self.listeners
            weights = own.genre_end[user_id] if genre_weights is None else np.asarray(genre_weights)
            vector = own.taste[user_id] if taste is None else np.asarray(taste, np.float32)
            guess = Listeners(genre_start=weights[None], genre_end=weights[None], taste=vector[None],
                              favourites=own.favourites[user_id][None])
            base = _base_scores(np.zeros(1, np.int64), np.ones(1), self.catalog, guess, self.params)[0]
        quality = self.params.quality_weight * self.catalog.quality
        out = np.empty((len(prevs), base.shape[0]))
        for row, prev in enumerate(prevs):
            log_p, mean, scale = self._truth.next_log_probs(user_id, base, prev)
            out[row] = reaction_probabilities((log_p - mean) / scale + quality, self.params)["played"]
        return out

    # ---- internals ---------------------------------------------------------------------------------------
    def _rng(self, stream: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.settings.seed & 0xFFFFFFFF, stream, *extra])

    def _check_user(self, user_id: int) -> None:
        if not 0 <= int(user_id) < self.settings.users:
            raise ValueError(f"unknown user {user_id}: this world has users 0..{self.settings.users - 1}")

    def _check_items(self, items: Sequence[int]) -> None:
        bad = [i for i in items if not 0 <= int(i) < self.settings.items]
        if bad:
            raise ValueError(f"unknown items {bad[:5]}: this world has items 0..{self.settings.items - 1}")

    def _base_now(self, user_id: int) -> np.ndarray:
        """Context-free explore logits of one user "now" (the end of the history span): (I,)."""
        return _base_scores(np.array([user_id]), np.array([1.0]), self.catalog, self.listeners, self.params)[0]

    def _generated(self) -> _History:
        with self._history_lock:
            if self._history is None:
                self._history = _generate_history(self.settings, self._truth, self.settings.seed & 0xFFFFFFFF)
            return self._history


# ---- world construction ------------------------------------------------------------------------------------


def _make_catalog(settings: SimulatorSettings, params: WorldParams, rng: np.random.Generator) -> Catalog:
    n, g, d = settings.items, settings.genres, params.dim
    # Albums of random size laid out consecutively; each album has one genre, genres round-robin so that
    # every genre gets a similar number of tracks.
    sizes = rng.integers(params.album_min, params.album_max + 1, size=n)  # more than enough albums
    album = np.repeat(np.arange(n), sizes)[:n]
    n_albums = int(album[-1]) + 1
    album_genre = rng.permutation(np.arange(n_albums) % g)
    genre = album_genre[album]
    next_in_album = np.where(np.r_[album[1:] == album[:-1], False], np.arange(n) + 1, -1)

    centres = rng.normal(size=(g, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    album_offset = rng.normal(size=(n_albums, d)) / np.sqrt(d)
    noise = rng.normal(size=(n, d)) / np.sqrt(d)
    vectors = centres[genre] + 0.8 * album_offset[album] + 0.5 * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    rank = rng.permutation(n) + 1  # popularity rank, 1 = most popular
    log_pop = -params.zipf_exponent * np.log(rank)
    length_s = rng.uniform(120, 360, size=n)
    return Catalog(
        genre=genre.astype(np.int64),
        album=album.astype(np.int64),
        next_in_album=next_in_album.astype(np.int64),
        vectors=vectors.astype(np.float32),
        log_popularity=log_pop.astype(np.float32),
        length_s=length_s.astype(np.float32),
    )


def _make_listeners(settings: SimulatorSettings, params: WorldParams, catalog: Catalog, rng: np.random.Generator) -> Listeners:
    u, g = settings.users, settings.genres
    k_max = min(params.max_favourite_genres, g)
    k_min = min(params.min_favourite_genres, k_max)
    n_fav = rng.integers(k_min, k_max + 1, size=u)
    # A random ordering of genres per user: the first n_fav are liked, the next one is where drift goes.
    order = np.argsort(rng.random((u, g)), axis=1)
    start = np.zeros((u, g))
    weights = rng.dirichlet(np.ones(k_max) * 2.0, size=u)
    for k in range(k_max):
        liked = k < n_fav
        start[np.arange(u)[liked], order[liked, k]] = weights[liked, k]
    start /= start.sum(axis=1, keepdims=True)

    end = start.copy()
    if g > k_max:
        drifts = rng.random(u) < params.drift_share
        new_genre = order[np.arange(u), n_fav]  # the first genre the user did not like
        end[drifts] *= 1 - params.drift_strength
        end[np.arange(u)[drifts], new_genre[drifts]] += params.drift_strength

    # Taste: the (start) genre centres the user likes plus a personal twist, as a unit vector.
    centres = _genre_centres(catalog, g)
    taste = start @ centres + 0.6 * rng.normal(size=(u, params.dim)) / np.sqrt(params.dim)
    taste /= np.linalg.norm(taste, axis=1, keepdims=True)

    no_favourites = np.zeros((u, 0), dtype=np.int64)
    listeners = Listeners(genre_start=start, genre_end=end, taste=taste.astype(np.float32), favourites=no_favourites)
    favourites = _pick_favourites(listeners, catalog, params, rng)
    return Listeners(genre_start=start, genre_end=end, taste=listeners.taste, favourites=favourites)


def _pick_favourites(listeners: Listeners, catalog: Catalog, params: WorldParams, rng: np.random.Generator) -> np.ndarray:
    """(U, F) favourite tracks: drawn from each user's top tracks at the *start* of the history, so they
    keep coming back after a drift (that is what makes them favourites rather than current taste)."""
    n_users, n_items = listeners.taste.shape[0], catalog.genre.shape[0]
    pool = min(4 * params.favourites, n_items)
    chosen = []
    block = max(1, _CELLS_PER_BLOCK // n_items)
    for first in range(0, n_users, block):
        ids = np.arange(first, min(first + block, n_users))
        early = _base_scores(ids, np.zeros(len(ids)), catalog, listeners, params)
        top = np.sort(np.argpartition(-early, pool - 1, axis=1)[:, :pool], axis=1)
        pick = np.argsort(rng.random(top.shape), axis=1)[:, : params.favourites]
        chosen.append(np.take_along_axis(top, pick, axis=1))
    return np.concatenate(chosen).astype(np.int64)


def _genre_centres(catalog: Catalog, g: int) -> np.ndarray:
    sums = np.zeros((g, catalog.vectors.shape[1]))
    np.add.at(sums, catalog.genre, catalog.vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return sums / np.where(norms > 0, norms, 1.0)


def _genre_weights(users: np.ndarray, t: np.ndarray, listeners: Listeners) -> np.ndarray:
    """Genre weights of ``users`` at times ``t`` (0 = start of history, 1 = now): linear drift."""
    t = t[:, None]
    return (1 - t) * listeners.genre_start[users] + t * listeners.genre_end[users]


def _base_scores(
    users: np.ndarray,
    t: np.ndarray,
    catalog: Catalog,
    listeners: Listeners,
    params: WorldParams,
    static: np.ndarray | None = None,
) -> np.ndarray:
    """Context-free part of the explore logits for ``users`` at times ``t``: (len(users), I) float32.

    ``static`` is the time-independent part (taste and popularity) from ``_static_scores`` for the same
    users, when the caller computes it once for many time points.
    """
    # The floor keeps disliked genres reachable (discovery) but rare.
    genre_term = (params.genre_weight * np.log(_genre_weights(users, t, listeners) + 0.02)).astype(np.float32)
    logits = np.take(genre_term, catalog.genre, axis=1)  # C-ordered: every later step streams rows
    logits += _static_scores(users, catalog, listeners, params) if static is None else static
    return logits


def _static_scores(users: np.ndarray, catalog: Catalog, listeners: Listeners, params: WorldParams) -> np.ndarray:
    static = params.taste_weight * (listeners.taste[users] @ catalog.vectors.T)
    static += params.popularity_weight * catalog.log_popularity
    return static


@dataclass(frozen=True)
class _Truth:
    """Everything the next-track model needs, with the context term precomputed.

    The context part of the explore logits, ``similarity_weight * v_prev . v + continuity_bonus *
    [genre(v) == g]``, depends only on a *context row*: the previous track ``p`` (row ``p``, with ``g`` its
    genre) or, at a session start, the session genre ``g`` alone (row ``I + g``). For catalogs of up to
    ``_TABLE_MAX_ITEMS`` items the whole (I + G, I) table is computed once and a generation step is a row
    gather: small matrix products are slower than that, and multi-threaded BLAS spinning on a busy
    machine made them several times slower still.
    """

    catalog: Catalog
    listeners: Listeners
    params: WorldParams
    query_rows: np.ndarray  # (I + G, d + G) float32: [sw * v_p, cb * onehot(g_p)] then [0, cb * onehot(g)]
    keys: np.ndarray  # (I, d + G) float32: [v, onehot(genre)]
    table: np.ndarray | None  # (I + G, I) float32 = query_rows @ keys.T, when small enough

    @classmethod
    def build(cls, catalog: Catalog, listeners: Listeners, params: WorldParams) -> _Truth:
        n_items, n_genres = catalog.genre.shape[0], listeners.genre_start.shape[1]
        genre_onehot = np.eye(n_genres, dtype=np.float32)
        keys = np.hstack([catalog.vectors, genre_onehot[catalog.genre]])
        sw, cb = params.similarity_weight, params.continuity_bonus
        track_rows = np.hstack([sw * catalog.vectors, cb * genre_onehot[catalog.genre]])
        genre_rows = np.hstack([np.zeros((n_genres, catalog.vectors.shape[1]), np.float32), cb * genre_onehot])
        query_rows = np.vstack([track_rows, genre_rows]).astype(np.float32)
        table = query_rows @ keys.T if n_items <= _TABLE_MAX_ITEMS else None
        return cls(catalog, listeners, params, query_rows, keys, table)

    def context_rows(self, prev: np.ndarray, genre: np.ndarray) -> np.ndarray:
        """Context row per batch entry: the previous track, or the session genre where ``prev`` is -1."""
        return np.where(prev >= 0, prev, self.catalog.genre.shape[0] + genre)

    def explore_logits(self, base: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Explore logits (B, I) for context ``rows``, *not* masked. ``out`` lets the generator reuse a buffer."""
        if self.table is not None:
            out = np.take(self.table, rows, axis=0, out=out)
        else:
            out = np.matmul(self.query_rows[rows], self.keys.T, out=out)
        out += base
        return out

    def habit_probs(self, explore_p: np.ndarray, prev: np.ndarray, choice: np.ndarray, users: np.ndarray) -> np.ndarray:
        """Probability of ``choice`` under the habit mixture, given its explore probability."""
        nxt = self.catalog.next_in_album[prev]
        p_album = np.where((prev >= 0) & (nxt >= 0), self.params.p_album, 0.0)
        p_repeat = np.where(prev >= 0, self.params.p_repeat, 0.0)
        favourites = self.listeners.favourites[users]
        in_favourites = (favourites == choice[:, None]).sum(axis=1) / max(favourites.shape[1], 1)
        return (1 - p_album - p_repeat) * explore_p + p_album * (choice == nxt) + p_repeat * in_favourites

    def next_log_probs(self, user: int, base: np.ndarray, prev: int) -> tuple[np.ndarray, float, float]:
        """Exact next-track log-probabilities of one user, plus the (mean, scale) that standardise them.

        The standardisation is that of the explore logits (the previous track unmasked), so a single
        masked track cannot distort it; the generator uses the same statistics.
        """
        n_items = base.shape[0]
        if prev < 0:  # session start: a genre from the user's weights "now", then explore within it
            weights = self.listeners.genre_end[user]
            genres = np.arange(weights.shape[0])
            logits = self.explore_logits(base[None, :], self.context_rows(np.full(len(genres), -1), genres))
            log_p = np.log(np.maximum(weights @ _softmax(logits), 1e-30))
            return log_p, float(log_p.mean()), float(log_p.std() + 1e-9)
        logits = self.explore_logits(base[None, :], np.array([prev]))[0]
        mean_logit, scale = float(logits.mean()), float(logits.std() + 1e-9)
        logits[prev] = -np.inf
        lse = float(_logsumexp(logits))
        explore_p = np.exp(logits - lse)
        every = np.arange(n_items)
        probs = self.habit_probs(explore_p, np.full(n_items, prev), every, np.full(n_items, user))
        return np.log(np.maximum(probs, 1e-30)), mean_logit - lse, scale


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _logsumexp(row: np.ndarray) -> float:
    top = row.max()
    return float(top + np.log(np.exp(row - top).sum()))


# ---- history generation ------------------------------------------------------------------------------------


def _generate_history(settings: SimulatorSettings, truth: _Truth, seed: int) -> _History:
    """The organic history, generated in blocks of users so memory stays bounded for big worlds.

    Each block has its own random stream (seed, stream, block index). The block size depends only on
    the catalog size, so a world is reproducible from its settings alone.
    """
    block = max(1, _CELLS_PER_BLOCK // settings.items)
    parts = [
        _generate_block(np.arange(first, min(first + block, settings.users)), settings, truth,
                        np.random.default_rng([seed, _STREAM_HISTORY, first // block]))
        for first in range(0, settings.users, block)
    ]
    return _History(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(_History)))


def _generate_block(ids: np.ndarray, settings: SimulatorSettings, truth: _Truth, rng: np.random.Generator) -> _History:
    n_users, n_sessions, n_steps = len(ids), settings.sessions_per_user, settings.events_per_session
    catalog, listeners, params = truth.catalog, truth.listeners, truth.params
    users = np.arange(n_users)  # row positions in this block; ``ids`` are the user ids
    window_ms = settings.days * DAY_MS
    slot_ms = window_ms / n_sessions
    items = np.empty((n_users, n_sessions, n_steps), dtype=np.int64)
    kinds = np.empty_like(items)
    ratios = np.empty(items.shape, dtype=np.float64)
    starts = np.empty((n_users, n_sessions))
    n_fav = listeners.favourites.shape[1]
    n_items = catalog.genre.shape[0]
    logits_buf = np.empty((n_users, n_items), dtype=np.float32)
    static = _static_scores(ids, catalog, listeners, params)  # tastes do not drift, genre weights do

    for s in range(n_sessions):
        # One session per slot of the window, starting at a random point of its first 80%.
        start = (s + 0.8 * rng.random(n_users)) * slot_ms
        starts[:, s] = start
        t = np.clip(start / window_ms, 0.0, 1.0)
        base = _base_scores(ids, t, catalog, listeners, params, static)
        weights = _genre_weights(ids, t, listeners)
        genre = _sample_rows(weights, rng)[0]  # the session's opening genre
        prev = np.full(n_users, -1)
        for step in range(n_steps):
            logits = truth.explore_logits(base, truth.context_rows(prev, genre), out=logits_buf)
            mean_logit = logits.mean(axis=1, dtype=np.float64)
            scale = np.sqrt(np.maximum(np.einsum("ij,ij->i", logits, logits) / n_items - mean_logit**2, 0.0)) + 1e-9
            if step > 0:
                logits[users, prev] = -np.inf  # the same track right again only via the repeat habit
            top = logits.max(axis=1)
            weights_e = np.exp(np.subtract(logits, top[:, None], out=logits), out=logits)  # in place
            choice, total = _sample_rows(weights_e, rng)
            if step > 0:
                # Habits override exploration: album continuation, then repeats of favourites.
                nxt = catalog.next_in_album[prev]
                r = rng.random(n_users)
                album_play = (nxt >= 0) & (r < params.p_album)
                repeat = ~album_play & (r >= params.p_album) & (r < params.p_album + params.p_repeat) & (n_fav > 0)
                favourite = listeners.favourites[ids, rng.integers(0, max(n_fav, 1), n_users)] if n_fav else choice
                choice = np.where(album_play, nxt, np.where(repeat, favourite, choice))
                prob = truth.habit_probs(weights_e[users, choice] / total, prev, choice, ids)
            else:
                prob = weights_e[users, choice] / total  # judged within the session's genre
            log_mean = mean_logit - (top + np.log(total))  # mean log explore-probability over the catalog
            z = (np.log(np.maximum(prob, 1e-30)) - log_mean) / scale
            if params.quality_weight:  # reactions to the chosen track, never the choice itself
                z = z + params.quality_weight * catalog.quality[choice]
            kind, ratio = react(z, rng, params)
            items[:, s, step], kinds[:, s, step], ratios[:, s, step] = choice, kind, ratio
            prev = choice  # from now on the context row is the track just played

    offsets = _timeline(items, ratios, starts, slot_ms, catalog, rng)
    per_user = n_sessions * n_steps
    return _History(
        user=np.repeat(ids, per_user),
        seq=np.tile(np.arange(per_user), n_users),
        item=items.reshape(-1),
        event_type=kinds.reshape(-1),
        played_ratio=ratios.reshape(-1),
        offset_ms=offsets.reshape(-1),
    )


def _sample_rows(weights: np.ndarray, rng: np.random.Generator, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One categorical draw per row of a (B, K) matrix of unnormalised weights: (choices, row totals).

    Inverse CDF in two levels: pick a block of ``block`` columns from the block sums, then a column
    inside it. A full-row cumulative sum is sequential and was the generator's slowest step; block sums
    are a fast reduction and the two small cumulative sums are cheap.
    """
    rows, width = weights.shape
    starts = np.arange(0, width, block)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, axis=1, dtype=np.float64), axis=1)
    total = block_cdf[:, -1]
    target = rng.random(rows) * total
    chosen = np.minimum((block_cdf < target[:, None]).sum(axis=1), len(starts) - 1)
    before = np.where(chosen > 0, block_cdf[np.arange(rows), chosen - 1], 0.0)
    columns = chosen[:, None] * block + np.arange(block)
    inside = np.where(columns < width, np.take_along_axis(weights, np.minimum(columns, width - 1), axis=1), 0.0)
    position = (np.cumsum(inside, axis=1) < (target - before)[:, None]).sum(axis=1)
    return np.minimum(chosen * block + np.minimum(position, block - 1), width - 1), total


def _reaction_odds(z: np.ndarray, params: WorldParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(listen), P(like | listen), P(dislike | skip)) of plays with standardised true scores ``z``: the one
    statement of the reaction model, which ``react`` draws from and ``reaction_probabilities`` reads exactly."""
    return (_sigmoid(params.listen_slope * (z - params.listen_mid)),
            params.like_max * _sigmoid(3.0 * (z - params.like_mid)),
            params.dislike_max * _sigmoid(3.0 * (params.dislike_mid - z)))


def react(z: np.ndarray, rng: np.random.Generator, params: WorldParams) -> tuple[np.ndarray, np.ndarray]:
    """Reaction to plays with standardised true scores ``z``: (event type codes ``REACTION_NAMES`` indexes,
    played ratios). Shared by every world that answers slates (``features.lifelong`` too), so that a reaction
    means the same thing in all of them."""
    n = z.shape[0]
    p_listen, p_like, p_dislike = _reaction_odds(z, params)
    listened = rng.random(n) < p_listen
    # Listens are played mostly through, more so when the track fits; skips stop early.
    listen_ratio = np.clip(0.65 + 0.12 * (z - params.listen_mid) + 0.15 * rng.normal(size=n), 0.5, 1.0)
    skip_ratio = rng.uniform(0.02, 0.35, size=n)
    ratio = np.where(listened, listen_ratio, skip_ratio)
    liked = listened & (rng.random(n) < p_like)
    disliked = ~listened & (rng.random(n) < p_dislike)
    kind = np.where(liked, _LIKE, np.where(disliked, _DISLIKE, np.where(listened, _LISTEN, _SKIP)))
    return kind.astype(np.int64), ratio


def reaction_probabilities(z: np.ndarray, params: WorldParams) -> dict[str, np.ndarray]:
    """The exact probability of each reaction ``react`` draws for plays with standardised true scores ``z``:
    ``listen`` (a plain listen), ``like``, ``skip`` (a plain skip), ``dislike`` (they sum to 1) and ``played``
    (listen or like: what ``examines_next`` continues after)."""
    p_listen, p_like, p_dislike = _reaction_odds(z, params)
    return {"listen": p_listen * (1 - p_like), "like": p_listen * p_like, "skip": (1 - p_listen) * (1 - p_dislike),
            "dislike": (1 - p_listen) * p_dislike, "played": p_listen}


# The cascade: after a listen or a like the user looks at the next item of a slate more often than after a skip.
CONTINUE_AFTER_PLAY, CONTINUE_AFTER_SKIP = 0.9, 0.7


def examines_next(kind: int, rng: np.random.Generator) -> bool:
    """Whether the user goes on to the next item of a slate after reacting ``kind`` (a ``react`` code) to this
    one: one draw from ``rng``."""
    return bool(rng.random() <= (CONTINUE_AFTER_PLAY if kind in (_LISTEN, _LIKE) else CONTINUE_AFTER_SKIP))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _timeline(
    items: np.ndarray, ratios: np.ndarray, starts: np.ndarray, slot_ms: float, catalog: Catalog, rng: np.random.Generator
) -> np.ndarray:
    """Event times (ms since the window start), each event logged when its play stops.

    A session lasts the sum of its played durations plus 1-5 s between tracks. When a session would not
    fit before the next slot (tiny windows, huge sessions) it is compressed, so sessions never overlap,
    per-user times strictly increase and everything stays inside the window.
    """
    durations_ms = 1000 * (catalog.length_s[items] * ratios + rng.uniform(1, 5, size=items.shape))
    room = (np.arange(starts.shape[1])[None, :] + 1) * slot_ms - starts - 1.0  # until the next slot
    scale = np.minimum(1.0, room / np.maximum(durations_ms.sum(axis=2), 1.0))
    offsets = np.floor(starts[:, :, None] + np.cumsum(durations_ms * scale[:, :, None], axis=2)).astype(np.int64)
    # Compression can squeeze two plays into one ms; keep per-user order strict regardless.
    flat = offsets.reshape(offsets.shape[0], -1)
    steps = np.arange(flat.shape[1])
    return np.maximum.accumulate(flat - steps, axis=1) + steps


# ---- small helpers -----------------------------------------------------------------------------------------


def stable_digest(text: str) -> int:
    """A stable 32-bit integer from text (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _response_event_id(seed: int, user_id: int, request_id: str, rank: int) -> str:
    event_id = f"sim-{seed}-{user_id}-r-{request_id}-{rank}"
    if len(event_id) > 128:  # the schema's limit; long request ids are hashed, keeping the id stable
        event_id = f"sim-{seed}-{user_id}-r-{hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()}-{rank}"
    return event_id


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
