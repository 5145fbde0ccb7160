"""Deterministic experiment assignment: which variant (if any) a unit sees.

Assignment is a pure function of ``(experiment config, unit_id)``: no state, no lookup table, no RNG.
Any process — the serving API, a batch job, an analysis notebook, a service in another language —
recomputes the same answer, so exposures can be audited after the fact.

Three independent hashes decide a unit's fate, each with its own salt:

1. **holdout** — a *global* salt shared by every experiment, so the same units form the long-term
   holdout everywhere (a holdout that differs per experiment would not hold anything out);
2. **traffic** — ``"{salt}/traffic"``: is the unit in this experiment at all?
3. **variant** — ``"{salt}/variant"``: which arm?

Mutually exclusive experiments share a **layer**: a fourth hash, ``"layer/{layer}"``, places every unit at
a fixed position in [0, 1) of its layer, and each experiment of the layer owns a disjoint slice
(``layer_range``) of that line. A unit falls in at most one slice, hence in at most one experiment of the
layer; experiments in different layers are independent (different salts). The store
(``experiments.store``) refuses overlapping slices of running or paused experiments.

Keeping (2) and (3) apart is what makes ramps safe: raising ``traffic`` only moves the inclusion threshold
on hash (2); a unit's position on hash (3) never changes, so every unit already included keeps its variant.
(With a single hash whose range is carved into "in traffic" and arms, ramping would move the arm
boundaries and reshuffle units that were already exposed, contaminating both arms.)

**Units.** A unit is a user id: an int64 >= 0 (``features.events``). ``canonical_unit_id`` turns every accepted
spelling into that int before hashing, so ``42``, ``numpy.int64(42)`` and ``"42"`` are one unit everywhere (the
service, a batch job, an analysis notebook). Spellings that are ambiguous or lossy are refused rather than
guessed: ``True`` (an int to Python), ``42.0`` (a float id has lost precision above 2**53 and usually means a
column went float through a missing value), ``"042"``, ``" 42"``, ``"+42"``. Since the hashed text then ends in
ASCII digits, ``"{prefix}:{digits}"`` splits at its last colon: two (prefix, unit) pairs never hash the same text.

**Salts.** The hashed prefixes are ``"{salt}/traffic"``, ``"{salt}/variant"``, ``"layer/{layer}"`` and
``HOLDOUT_SALT``. An experiment salt may not be ``"layer"``, start with ``"layer/"`` or be the holdout salt, so
no experiment hash can coincide with a layer's or the holdout's. Two experiments sharing a salt would assign
every unit the same position in both (perfectly confounded tests that an SRM check cannot see): the store
(``experiments.store``) generates a salt when a config has none and refuses one already used by any experiment
it holds or has held. Generation lives in the store, not here, so that assignment stays a pure function of the
stored config (an ``Experiment`` without a salt cannot assign).

**Resolution.** A unit's position on a hash is ``bucket / DEFAULT_BUCKETS``: 10,000 positions, 1e-4 apart.
A weight, traffic share, holdout share or layer bound between two positions would silently round (a weight of
0.00005 maps to no unit at all; traffic 0.00015 admits 2e-4). Rather than raise the resolution (which would
change the position of every unit, hence re-randomise every running experiment), ``Experiment`` refuses any
such value that is not a multiple of 1e-4, and checks exactly, with the very comparisons ``choose_variant``
makes, that every arm owns at least one position. The mapping itself is unchanged, so every existing
assignment is identical. Arm boundaries are float cumulative sums, which can land one position off the
decimal grid (0.1 + 0.2 > 0.3): an arm then owns one position (1e-4 of units) more or less than its weight;
``Experiment.realised_weights`` gives the exact shares, which is what a sample-ratio check should expect.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from features.events import MAX_ID
from infra.settings import RANKER_TARGET_PATTERN, EncoreSettings
from experiments.rollout_policy import RolloutPolicy
from experiments.sequential import SequentialPlan

DEFAULT_BUCKETS = 10_000

# A config value this close to a multiple of 1 / DEFAULT_BUCKETS (in buckets) is on the grid: configs are
# decimals, and 0.0003 * 10_000 is 2.9999999999999996 in binary.
GRID_TOLERANCE = 1e-6

# One salt for the long-term holdout across all experiments and layers (see module docstring). Changing it
# re-draws the holdout population, so it is a constant, not a setting.
HOLDOUT_SALT = "encore-global-holdout"
# The layer hashes' prefix ("layer/{layer}"): an experiment salt "layer" would hash "layer/traffic", the line of
# a layer named "traffic".
LAYER_PREFIX = "layer"

_CANONICAL_ID_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)

# A weight sum this close to 1 is accepted; configs are hand-written decimals (0.1 + 0.2 != 0.3).
WEIGHT_TOLERANCE = 1e-9

# "alias:<registered-model alias>", "version:<registered-model version>", or a bare built-in baseline
# such as "popularity". Kept loose on purpose: the router, not this module, decides which targets exist.
POPULARITY = "popularity"  # the built-in most-popular baseline
_TARGET_RE = re.compile(r"^(alias:[A-Za-z0-9_.-]+|version:[1-9][0-9]*|[a-z][a-z0-9_-]*)$")
_RANKER_RE = re.compile(RANKER_TARGET_PATTERN)  # rankers are registry targets only (infra.settings says why)
# Serving keeps retrievers and rankers in one pool of loaded models; a ranker's key carries this prefix so the
# two registries' "alias:champion" stay apart (``ranker_key``).
RANKER_KEY_PREFIX = "ranker/"


def ranker_key(target: str) -> str:
    """The model-pool key of a ranker target: ``alias:champion`` -> ``ranker/alias:champion``."""
    return RANKER_KEY_PREFIX + target

# An experiment's name is a folder of the store (``versions/<name>/``), a URL path segment of the admin API and
# a label in exposures and reports: lower-case letters, digits, '.', '_' and '-', at most 64 characters,
# starting with a letter or digit, and never '..' (so no name can be a path that leaves the store).
_EXPERIMENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# the same rule, '..' included, as the JSON Schema of the admin API states it (one pattern, no flags)
_EXPERIMENT_NAME_SCHEMA = r"^(?!.*\.\.)[a-z0-9][a-z0-9._-]{0,63}$"
# a share of traffic or units, as the validators below check it
_SHARE_SCHEMA = {"minimum": 0, "maximum": 1}
# Numbers are numbers: strict, so that JSON true or "0.5" is refused rather than read as 1.0 or 0.5 (an int is
# still a float). Per field, not per model: a ramp time is a string in JSON and YAML and must stay one that parses.
Share = Annotated[float, Field(strict=True, json_schema_extra=_SHARE_SCHEMA)]


def check_experiment_name(value: str) -> str:
    """``value`` if it is a valid experiment name, else ValueError saying what a name may hold."""
    if not isinstance(value, str) or not _EXPERIMENT_NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"experiment name {value!r} is invalid: use 1-64 lower-case letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit, without '..' (it names a folder of the store)")
    return value


class InvalidUnitId(ValueError):
    """A value that is not a user id in its one accepted form (see ``canonical_unit_id``)."""


def canonical_unit_id(unit_id: object) -> int:
    """The user id as the int every hash sees: an int (or numpy integer) in [0, 2**63 - 1], or the canonical
    decimal string of one (``"42"``: what a URL, a Kafka key or a CSV carries). Anything else is refused,
    because two spellings of one user that hash differently split that user across arms."""
    if isinstance(unit_id, bool):
        raise InvalidUnitId(f"unit id {unit_id!r} is a bool, not a user id (ids are integers 0..{MAX_ID})")
    if isinstance(unit_id, numbers.Integral):
        value = int(unit_id)
    elif isinstance(unit_id, str) and _CANONICAL_ID_RE.fullmatch(unit_id):
        value = int(unit_id)
    else:
        raise InvalidUnitId(f"unit id {unit_id!r} is not a user id: give an integer 0..{MAX_ID} or its decimal "
                            "string without sign, spaces or leading zeros (not 42.0, '042', ' 42' or True)")
    if not 0 <= value <= MAX_ID:
        raise InvalidUnitId(f"unit id {unit_id!r} is outside 0..{MAX_ID} (user ids are int64 >= 0)")
    return value


def check_salt(value: str) -> str:
    """``value`` if no experiment hash made with it can coincide with a layer's or the holdout's."""
    if value == LAYER_PREFIX or value.startswith(f"{LAYER_PREFIX}/") or value == HOLDOUT_SALT:
        raise ValueError(f"salt {value!r} is reserved: '{LAYER_PREFIX}', '{LAYER_PREFIX}/...' and "
                         f"{HOLDOUT_SALT!r} name the layer and holdout hashes")
    return value


def off_grid(value: float) -> bool:
    """Whether ``value`` falls between two of the hash's positions (it is not a multiple of 1 / DEFAULT_BUCKETS)."""
    scaled = value * DEFAULT_BUCKETS
    return abs(scaled - round(scaled)) > GRID_TOLERANCE


def _grid_problem(field: str, value: float) -> str | None:
    if not off_grid(value):
        return None
    return (f"{field} {value!r} is not a multiple of {1 / DEFAULT_BUCKETS:g}: assignment places units on "
            f"{DEFAULT_BUCKETS:,} positions, so it would silently round to {round(value * DEFAULT_BUCKETS)} "
            f"of them; use a value with at most {len(str(DEFAULT_BUCKETS)) - 1} decimals")


def arm_buckets(weights: list[float]) -> list[int]:
    """How many of the DEFAULT_BUCKETS positions each arm owns, exactly as ``choose_variant`` maps them."""
    boundaries = []
    cumulative = 0.0
    for w in weights[:-1]:
        cumulative += w  # the same float sums choose_variant makes
        # the number of positions b with b / N < cumulative; start at the nearest and step to the exact one
        k = min(DEFAULT_BUCKETS, max(0, math.ceil(cumulative * DEFAULT_BUCKETS)))
        while k > 0 and not (k - 1) / DEFAULT_BUCKETS < cumulative:
            k -= 1
        while k < DEFAULT_BUCKETS and k / DEFAULT_BUCKETS < cumulative:
            k += 1
        boundaries.append(k)
    edges = [0, *boundaries, DEFAULT_BUCKETS]
    return [max(0, hi - lo) for lo, hi in zip(edges, edges[1:])]


class Variant(BaseModel):
    """One arm of an experiment: what share of included units see it, and which model serves them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    # the validators are the rule; the schema extras state it to clients (the weights also sum to 1)
    weight: float = Field(strict=True, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    target: str = Field(json_schema_extra={"pattern": _TARGET_RE.pattern})
    ranker: str | None = Field(
        default=None, json_schema_extra={"pattern": _RANKER_RE.pattern},
        description="the ranker that reranks this arm's retrieved candidates (a target of the rankers' registered "
                    "model, e.g. 'alias:champion'); none: the retriever's order (serve.ranker is for requests "
                    "outside experiments)")

    @field_validator("weight")
    @classmethod
    def _positive_weight(cls, value: float) -> float:
        # A zero-weight arm is almost always a typo; it would also be silently unreachable.
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"variant weight must be a positive finite number, got {value}")
        return value

    @field_validator("target")
    @classmethod
    def _known_target_form(cls, value: str) -> str:
        if not _TARGET_RE.match(value):
            raise ValueError(
                f"target {value!r} is not 'alias:<name>', 'version:<positive int>' or a baseline name "
                "such as 'popularity'"
            )
        return value

    @field_validator("ranker")
    @classmethod
    def _ranker_form(cls, value: str | None) -> str | None:
        if value is not None and not _RANKER_RE.match(value):
            raise ValueError(f"ranker {value!r} is not 'alias:<name>' or 'version:<positive int>' of the rankers' "
                             "registered model")
        return value


class RampStep(BaseModel):
    """From ``at`` on, the experiment's traffic share is ``traffic`` (a ramp schedule is a list of steps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime
    traffic: Share

    @field_validator("at", mode="before")
    @classmethod
    def _a_time_not_a_number(cls, value: object) -> object:
        # a time is an ISO 8601 string (or a YAML timestamp); pydantic would also read 0 or 1.5 as seconds
        # since 1970, which no config means and the schema does not allow
        if isinstance(value, (int, float)):
            raise ValueError("ramp step time must be an ISO 8601 date-time, not a number")
        return value

    @field_validator("at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    @field_validator("traffic")
    @classmethod
    def _share(cls, value: float) -> float:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"ramp traffic must be within [0, 1], got {value}")
        return value


class Experiment(BaseModel):
    """An experiment's full, versionable definition. Changing ``salt`` re-randomises everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="1-64 lower-case letters, digits, '.', '_', '-'; "
                      "starts with a letter or digit; no '..'", json_schema_extra={"pattern": _EXPERIMENT_NAME_SCHEMA})
    # Optional on input only: the store generates a unique salt when a config omits it, so a stored experiment
    # always has one (see the module docstring: generation is not assignment's business).
    salt: str | None = Field(default=None, min_length=1, max_length=256)
    variants: list[Variant] = Field(min_length=1)
    # Experiments in one layer are meant to be mutually exclusive; the layer is carried here so a router can
    # group them. assign() looks at one experiment and does not enforce exclusivity itself.
    layer: str = Field(default="default", min_length=1)
    status: Literal["draft", "running", "paused", "stopped"] = "running"
    # Share of eligible (non-held-out) units that enter the experiment at all.
    traffic: Share = 1.0
    # Share of *all* units in the long-term holdout, excluded from every experiment (same units everywhere).
    holdout: Share = 0.0
    # The slice [lo, hi) of the layer's hash line this experiment owns (mutual exclusion inside a layer).
    layer_range: tuple[Share, Share] = (0.0, 1.0)
    # Simple targeting: request context key -> allowed values; every key must match (missing key = no match).
    targeting: dict[str, list[str]] = Field(default_factory=dict,
                                            json_schema_extra={"additionalProperties": {
                                                "type": "array", "items": {"type": "string"}, "minItems": 1}})
    # Ramp schedule: the last step whose time has passed overrides ``traffic``; steps must not decrease.
    ramp: list[RampStep] = Field(default_factory=list)
    description: str = Field(default="", max_length=2000)
    # What the test is sized to detect (MDE and/or horizon): sets the sequential test's τ and truncation.
    plan: SequentialPlan | None = None
    # A guarded ramp that acts on the experiment's own evidence (``experiments.rollout``): it advances the
    # traffic through its steps, rolls back on a guardrail's harm or an SRM, and decides at the last step.
    rollout: RolloutPolicy | None = None
    # Set by the store, never by hand: a change of the variants (or of the salt) of an experiment that has run
    # opens a new phase, because some units change arm then; analysis reads one phase at a time. Ramps,
    # pauses and resumes keep the phase (units keep their arm). Nothing in assignment reads these two fields.
    phase: int = Field(default=1, ge=1)
    phase_started_at: datetime | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_experiment_name(value)

    @field_validator("salt")
    @classmethod
    def _unreserved_salt(cls, value: str | None) -> str | None:
        return None if value is None else check_salt(value)

    @field_validator("phase_started_at")
    @classmethod
    def _aware_phase_start(cls, value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)

    @field_validator("traffic", "holdout")
    @classmethod
    def _share(cls, value: float, info: ValidationInfo) -> float:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{info.field_name} must be within [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _consistent_variants(self) -> Experiment:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique, duplicated: {duplicates}")
        total = math.fsum(v.weight for v in self.variants)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ValueError(f"variant weights must sum to 1 (±{WEIGHT_TOLERANCE:g}), they sum to {total!r}")
        lo, hi = self.layer_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
            raise ValueError(f"layer_range must satisfy 0 <= lo < hi <= 1, got {list(self.layer_range)}")
        times = [step.at for step in self.ramp]
        if times != sorted(times):
            raise ValueError("ramp steps must be in time order")
        shares = [step.traffic for step in self.ramp]
        if shares != sorted(shares):
            # ramping down would drop already exposed units out of the experiment: pause or stop instead
            raise ValueError("ramp steps must not decrease traffic (pause or stop the experiment instead)")
        for key, values in self.targeting.items():
            if not values:
                raise ValueError(f"targeting on {key!r} lists no values (it would match nobody)")
        self._check_resolution()
        self._check_rollout()
        return self

    def _check_rollout(self) -> None:
        """A rollout needs its two arms, a pinned treatment and an alias to roll out to."""
        policy = self.rollout
        if policy is None:
            return
        if self.ramp:
            # a timed schedule would raise traffic whatever the evidence says: the policy owns the ramp
            raise ValueError("an experiment with a rollout policy takes no ramp schedule (the policy ramps it)")
        names = {v.name: v for v in self.variants}
        missing = [n for n in (policy.treatment, policy.control) if n not in names]
        if missing:
            raise ValueError(f"rollout names variants {missing} that the experiment does not have "
                             f"(it has {sorted(names)})")
        if not names[policy.treatment].target.startswith("version:"):
            # an alias can move mid-rollout (a new challenger), and the evidence would then be about two
            # models; a rollback or promotion must also know exactly which version it acts on
            raise ValueError(f"the rollout's treatment {policy.treatment!r} must target a pinned "
                             f"'version:<n>', not {names[policy.treatment].target!r}")
        control = names[policy.control].target
        if policy.alias is None and not control.startswith("alias:"):
            raise ValueError(f"rollout: the control {policy.control!r} targets {control!r}, not an alias; "
                             "name the alias the treatment is rolled out to (rollout.alias)")

    def _check_resolution(self) -> None:
        """Refuse what the hash's 1e-4 resolution would round silently (see the module docstring)."""
        values = [(f"weight of variant {v.name!r}", v.weight) for v in self.variants]
        values += [("traffic", self.traffic), ("holdout", self.holdout),
                   ("layer_range start", self.layer_range[0]), ("layer_range end", self.layer_range[1])]
        values += [(f"ramp step traffic at {step.at.isoformat()}", step.traffic) for step in self.ramp]
        if self.rollout is not None:
            values += [(f"rollout step {i + 1} traffic", share) for i, share in enumerate(self.rollout.steps)]
        problems = [p for field, value in values if (p := _grid_problem(field, value))]
        if problems:
            raise ValueError("; ".join(problems))
        empty = [v.name for v, n in zip(self.variants, arm_buckets([v.weight for v in self.variants])) if n == 0]
        if empty:
            raise ValueError(f"variants {empty} would get no unit at the hash's {DEFAULT_BUCKETS:,} positions; "
                             "give every arm a weight of at least 0.0001")

    @property
    def realised_weights(self) -> dict[str, float]:
        """Variant name -> the exact share of units it gets (a weight, give or take one position of 1e-4)."""
        counts = arm_buckets([v.weight for v in self.variants])
        return {v.name: n / DEFAULT_BUCKETS for v, n in zip(self.variants, counts)}

    @property
    def hash_salt(self) -> str:
        """The salt the hashes use; an experiment that was never saved to a store may have none yet."""
        if self.salt is None:
            raise ValueError(f"experiment {self.name!r} has no salt: save it to the experiment store (which "
                             "generates a unique one) or set one")
        return self.salt

    def traffic_at(self, now: datetime | None = None) -> float:
        """The traffic share in force at ``now`` (the ramp schedule's last passed step, else ``traffic``)."""
        if not self.ramp:
            return self.traffic
        now = now or datetime.now(timezone.utc)
        share = self.traffic
        for step in self.ramp:
            if step.at <= now:
                share = step.traffic
        return share

    def targets(self, context: dict[str, str] | None) -> bool:
        """Whether a request with this context is eligible (targeting rules all match)."""
        if not self.targeting:
            return True
        context = context or {}
        return all(context.get(key) in values for key, values in self.targeting.items())

    @property
    def weights(self) -> dict[str, float]:
        """Variant name -> weight, the form ``analysis.srm_check`` expects."""
        return {v.name: v.weight for v in self.variants}

    @property
    def rollout_alias(self) -> str | None:
        """The alias the rollout's treatment is rolled out to: the policy's, else the control arm's alias."""
        policy = self.rollout
        if policy is None:
            return None
        if policy.alias is not None:
            return policy.alias
        return self.variant(policy.control).target.removeprefix("alias:")

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"experiment {self.name!r} has no variant {name!r}")


def bucket(salt: str, unit_id: str | int, buckets: int = DEFAULT_BUCKETS) -> int:
    """Map ``unit_id`` to one of ``buckets`` buckets, deterministically.

    Recipe (stable, reproducible in any language): SHA-256 of the UTF-8 bytes of ``f"{salt}:{unit_id}"``,
    the first 8 bytes read as a big-endian unsigned integer, modulo ``buckets``.

    Why not Python's ``hash()``: it is randomised per process (PYTHONHASHSEED), so two API replicas would
    disagree. SHA-256 is identical everywhere and mixes well enough that buckets are uniform and independent
    across salts. The modulo bias of 2**64 mod 10_000 is ~1e-15, i.e. nil.

    ``unit_id`` is a user id, hashed in its canonical form (``canonical_unit_id``: the decimal digits of the
    int), so the int 42 and the string "42" are the same unit, and "042", 42.0 or True are refused.
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be a positive int, got {buckets!r}")
    digest = hashlib.sha256(f"{salt}:{canonical_unit_id(unit_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=False) % buckets


def _unit_interval(salt: str, unit_id: str | int) -> float:
    """A uniform draw in [0, 1) with 1e-4 resolution (DEFAULT_BUCKETS): the unit's fixed position on a hash."""
    return bucket(salt, unit_id, DEFAULT_BUCKETS) / DEFAULT_BUCKETS


def in_holdout(unit_id: str | int, holdout: float) -> bool:
    """Whether the unit belongs to the global long-term holdout of size ``holdout``.

    Nested by construction: a unit held out at 2% is also held out at 5%.
    """
    return _unit_interval(HOLDOUT_SALT, unit_id) < holdout


def in_traffic(experiment: Experiment, unit_id: str | int, now: datetime | None = None) -> bool:
    """Whether the unit passes the experiment's traffic gate (ignoring holdout and status).

    Nested by construction: raising ``traffic`` only adds units, it never drops one.
    """
    return _unit_interval(f"{experiment.hash_salt}/traffic", unit_id) < experiment.traffic_at(now)


def in_layer_slice(experiment: Experiment, unit_id: str | int) -> bool:
    """Whether the unit's position on its layer's hash line falls in the experiment's slice."""
    lo, hi = experiment.layer_range
    if lo <= 0.0 and hi >= 1.0:
        return True
    return lo <= _unit_interval(f"{LAYER_PREFIX}/{experiment.layer}", unit_id) < hi


def choose_variant(experiment: Experiment, unit_id: str | int) -> str:
    """The arm the unit would see if included, from its position on the variant hash.

    The weights carve [0, 1) into consecutive intervals in the config's order; the last arm takes any
    floating-point remainder so that every position maps to some arm. (``arm_buckets`` counts, with the same
    comparisons, how many positions each arm owns; change both together or neither.)
    """
    u = _unit_interval(f"{experiment.hash_salt}/variant", unit_id)
    cumulative = 0.0
    for v in experiment.variants[:-1]:
        cumulative += v.weight
        if u < cumulative:
            return v.name
    return experiment.variants[-1].name


def assign(experiment: Experiment, unit_id: str | int, context: dict[str, str] | None = None,
           now: datetime | None = None) -> str | None:
    """The variant name the unit sees, or ``None`` when it gets the default experience.

    ``None`` means: the experiment is not running, the unit is in the long-term holdout, outside the
    experiment's slice of its layer, not targeted by the request context, or outside the traffic share. Callers serve the default model then and must not log an exposure
    for this experiment.
    """
    if experiment.status != "running":
        return None
    if in_holdout(unit_id, experiment.holdout):
        return None
    if not in_layer_slice(experiment, unit_id):
        return None
    if not experiment.targets(context):
        return None
    if not in_traffic(experiment, unit_id, now):
        return None
    return choose_variant(experiment, unit_id)


def default_experiment(settings: EncoreSettings) -> Experiment:
    """The settings' two-arm test: most-popular as control, the champion alias (what serving loads) as treatment."""
    e = settings.experiment
    return Experiment(
        name=e.name,
        salt=e.salt,
        variants=[
            Variant(name="control", weight=1 - e.treatment_share, target=POPULARITY),
            Variant(name="treatment", weight=e.treatment_share, target=f"alias:{settings.registry.champion_alias}"),
        ],
    )


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment from a ``.json``, ``.yaml`` or ``.yml`` file (validation errors propagate)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix in {".yaml", ".yml"}:
        # safe_load: a config file must never be able to construct arbitrary Python objects.
        data = yaml.safe_load(text)
    else:
        raise ValueError(f"{path}: expected a .json, .yaml or .yml experiment file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return Experiment.model_validate(data)
