"""Experiment management: a versioned store with an audit log, validation, and the request router.

The store lives under ``<data_dir>/experiments/``::

    state.json                    current configs, per-experiment version numbers, global version, kill switch,
                                  every salt ever saved (never reused)
    versions/<name>/v0001.yaml    every version of every experiment, as it was saved (never rewritten)
    audit.jsonl                   one JSON line per change: time, actor, action, experiment, version, change

Writers (``encore ab ...``, the service's admin API) take an exclusive file lock, validate the whole resulting
set of experiments, write the version file, the audit line, then replace ``state.json`` atomically. Readers
(the service polls ``state.json``'s global version) never see a half-written state.

Experiment names are folder names here, so ``Experiment`` refuses any name that could be a path (see
``experiments.assignment.check_experiment_name``); as a second line of defence the store resolves every path
it writes or reads by name and refuses one that would land outside its folder.

Validation beyond one experiment's own rules (``experiments.assignment.Experiment``):

* experiments of one layer that are ``running`` or ``paused`` must own disjoint ``layer_range`` slices
  (mutual exclusion); ``draft`` and ``stopped`` ones hold no slice;
* every variant target must exist: ``alias:<a>`` must be a registered-model alias, ``version:<n>`` a version
  (checked by a caller-supplied function against the MLflow registry), bare names must be a known baseline;
* a name, once created, keeps its salt: a changed salt would silently re-randomise exposed users (only an
  explicit ``rerandomise`` rotates it, and that opens a new phase).

**Salts are unique.** A config without a salt gets a fresh one (``secrets.token_hex(8)``, 64 random bits) when
it is first saved; a salt that any experiment of the store holds or has held (whatever its layer or status,
stopped and draft ones included, and the salts retired by a re-randomisation) is refused. Two experiments with
one salt put every unit at the same position in both, so their arms coincide: in different layers the tests
are perfectly confounded, and reusing a stopped experiment's salt correlates the new test with the old one's
users (their carry-over effects land in one arm). No experiment is ever deleted from the store, so "held" is
"ever saved". Only salts introduced from now on are checked: two experiments that already share one keep
loading, so that the confounded one can still be stopped.

**Phases.** Changing the variants (weights, arms, targets or their order) of an experiment that has run —
``running`` or ``paused`` — starts a new phase: ``phase`` goes up by one and ``phase_started_at`` is the time
of the change, both saved in the config and in the audit line. With new weights some units necessarily change
arm (the boundaries on the variant hash move), and the units that kept theirs have been exposed to the old
split: data from before and after the change is not one experiment, so the analysis reads the current phase
alone (``experiments.readout``). The salt stays by default, which keeps every unit whose position still falls
in the same arm in that arm (fewest switches, a consistent experience); ``rerandomise=True`` rotates the salt
(a fresh one, or a given unused one) so the new phase is a clean randomisation, independent of the previous
phases' exposure — at the price of moving about half the units. A ramp (``traffic``, schedules) is not a
phase: inclusion is nested on its own hash and arms keep their units, so the data before and after a ramp is
one experiment; pause and resume are not phases either.

The **kill switch** turns every experiment off at once (everyone gets the default model) without touching
their configs; turning it off restores them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from experiments.assignment import (
    POPULARITY,
    RANKER_KEY_PREFIX,
    Experiment,
    RampStep,
    assign,
    check_experiment_name,
    ranker_key,
)
from infra.settings import EncoreSettings

BASELINES = frozenset({POPULARITY})

# target -> problem (None when the target exists); a ranker's target arrives as its pool key (``ranker_key``)
TargetChecker = Callable[[str], str | None]


class ExperimentError(ValueError):
    """A change that the store refuses; the message says why."""


class NotFound(ExperimentError):
    pass


class Conflict(ExperimentError):
    """A change that is well formed but clashes with the experiment's current state (the admin API's 409)."""


@dataclass(frozen=True)
class Snapshot:
    version: int = 0
    kill: bool = False
    experiments: tuple[Experiment, ...] = ()
    versions: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        raise NotFound(f"no experiment named {name!r}")


def registry_target_checker(settings: EncoreSettings, tracking_uri: str) -> TargetChecker:
    """Checks ``alias:``/``version:`` targets against the settings' registered model in the MLflow registry, and
    rankers' targets (``ranker/alias:...``) against the rankers' registered model."""
    from models.lifecycle.registry import Registry

    retrievers = Registry(tracking_uri, settings.registry)
    rankers = Registry(tracking_uri, settings.registry.for_rankers())

    def check(target: str) -> str | None:
        if target.startswith(RANKER_KEY_PREFIX):
            return rankers.target_problem(target.removeprefix(RANKER_KEY_PREFIX))
        return retrievers.target_problem(target)

    return check


def validate_set(experiments: list[Experiment], check_target: TargetChecker | None = None) -> None:
    """Raise ExperimentError naming every problem of a set of experiments taken together."""
    problems: list[str] = []
    active = [e for e in experiments if e.status in ("running", "paused")]
    by_layer: dict[str, list[Experiment]] = {}
    for e in active:
        by_layer.setdefault(e.layer, []).append(e)
    for layer, members in sorted(by_layer.items()):
        members.sort(key=lambda e: e.layer_range)
        for a, b in zip(members, members[1:]):
            if b.layer_range[0] < a.layer_range[1]:
                problems.append(f"layer {layer!r}: {a.name!r} {list(a.layer_range)} overlaps {b.name!r} "
                                f"{list(b.layer_range)}; give them disjoint layer_range slices or different layers")
    for e in experiments:
        for v in e.variants:
            if ":" not in v.target:
                if v.target not in BASELINES:
                    problems.append(f"{e.name}/{v.name}: unknown baseline {v.target!r} (known: {sorted(BASELINES)})")
            elif check_target is not None and e.status in ("running", "paused", "draft"):
                problem = check_target(v.target)
                if problem:
                    problems.append(f"{e.name}/{v.name}: {problem}")
            if v.ranker is not None and v.target == POPULARITY:
                problems.append(f"{e.name}/{v.name}: a ranker reranks a retriever's candidates; the "
                                f"{POPULARITY!r} baseline has none (drop the ranker or name a model target)")
            elif v.ranker is not None and check_target is not None and e.status in ("running", "paused", "draft"):
                problem = check_target(ranker_key(v.ranker))
                if problem:
                    problems.append(f"{e.name}/{v.name}: ranker {problem}")
    if problems:
        raise ExperimentError("; ".join(problems))


def new_salt() -> str:
    """A fresh salt: 64 random bits, so two generated salts coincide with probability ~1e-19 per pair."""
    return secrets.token_hex(8)


def _phase(current: Experiment | None, proposed: Experiment, salt: str, now: datetime) -> tuple[int, datetime | None]:
    """The phase (and its start) of ``proposed`` once saved over ``current`` (see the module docstring)."""
    if current is None:
        return 1, now if proposed.status in ("running", "paused") else None
    has_run = current.status in ("running", "paused")
    if has_run and (proposed.variants != current.variants or salt != current.salt):
        return current.phase + 1, now
    started = current.phase_started_at
    if started is None and proposed.status in ("running", "paused"):  # a draft starts: its phase 1 begins now
        started = now
    return current.phase, started


class ExperimentStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.state_file = self.root / "state.json"
        self.audit_file = self.root / "audit.jsonl"

    def _inside(self, path: Path) -> Path:
        """``path`` if it resolves (symbolic links and '..' followed) to a place inside the store's folder."""
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and not resolved.is_relative_to(root):
            raise ExperimentError(f"refusing {path}: it is outside the experiment store {root}")
        return path

    def _versions_dir(self, name: str) -> Path:
        """The folder of an experiment's versions, checked: a valid name, one folder directly under versions/."""
        try:
            check_experiment_name(name)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from exc
        folder = self._inside(self.root / "versions" / name)
        if folder.resolve().parent != (self.root / "versions").resolve():
            raise ExperimentError(f"refusing {folder}: not a folder directly under {self.root / 'versions'}")
        return folder

    # ------------------------------------------------------------------ reading

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": 0, "kill": False, "experiments": {}}

    def snapshot(self) -> Snapshot:
        state = self._read_state()
        exps = tuple(sorted((Experiment.model_validate(x["config"]) for x in state["experiments"].values()),
                            key=lambda e: (e.layer, e.name)))
        return Snapshot(version=int(state["version"]), kill=bool(state.get("kill", False)), experiments=exps,
                        versions={n: int(x["version"]) for n, x in state["experiments"].items()})

    def version(self) -> int:
        return int(self._read_state()["version"])

    def history(self, name: str) -> list[dict]:
        try:
            folder = self._versions_dir(name)
        except ExperimentError as exc:
            raise NotFound(f"no experiment named {name!r}") from exc
        if not folder.is_dir():
            raise NotFound(f"no experiment named {name!r}")
        return [{"version": int(p.stem[1:]), **yaml.safe_load(p.read_text(encoding="utf-8"))}
                for p in sorted(folder.glob("v*.yaml"))]

    def phases(self, name: str) -> dict[int, int]:
        """Config version -> phase of an experiment (versions saved before phases existed are phase 1)."""
        return {h["version"]: int(h["config"].get("phase", 1)) for h in self.history(name)}

    def salts_used(self, state: dict | None = None) -> dict[str, str]:
        """Every salt the store's experiments hold or have held -> the (first) experiment that used it.

        ``state.json`` keeps this register (``salts``) so a write does not re-read every version file; a store
        written before it existed gets it from the current configs and the saved versions, once."""
        state = self._read_state() if state is None else state
        if "salts" in state:
            return dict(state["salts"])
        used: dict[str, str] = {}
        for name, entry in sorted(state["experiments"].items()):
            configs = [entry["config"]]
            with contextlib.suppress(NotFound):
                configs += [h["config"] for h in self.history(name)]  # salts retired by a re-randomisation
            for config in configs:
                if config.get("salt"):
                    used.setdefault(config["salt"], name)
        return used

    def audit(self, name: str | None = None, limit: int = 100) -> list[dict]:
        if not self.audit_file.is_file():
            return []
        rows = [json.loads(line) for line in self.audit_file.read_text(encoding="utf-8").splitlines() if line]
        if name:
            rows = [r for r in rows if r.get("experiment") == name]
        return rows[-limit:]

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._inside(self.root / ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._read_state()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit(self, state: dict, *, actor: str, action: str, name: str | None, change: dict,
                saved: Experiment | None) -> int:
        # checked before anything changes: a refused name leaves no trace
        folder = self._versions_dir(name) if saved is not None and name is not None else None
        state["version"] = int(state["version"]) + 1
        version = None
        if saved is not None and name is not None and folder is not None:
            entry = state["experiments"].setdefault(name, {"version": 0})
            entry["version"] = version = int(entry["version"]) + 1
            entry["config"] = saved.model_dump(mode="json")
            salts = self.salts_used(state)  # the register of every salt ever saved (see salts_used)
            salts.setdefault(saved.hash_salt, name)
            state["salts"] = salts
            folder.mkdir(parents=True, exist_ok=True)
            self._inside(folder / f"v{version:04d}.yaml").write_text(
                yaml.safe_dump({"saved_at": _now_iso(), "actor": actor, "action": action,
                                "config": entry["config"]}, sort_keys=False), encoding="utf-8")
        row = {"time": _now_iso(), "actor": actor, "action": action, "experiment": name, "version": version,
               "store_version": state["version"], "change": change}
        if saved is not None:
            row["phase"] = saved.phase
        self._append_audit(row)
        tmp = self._inside(self.state_file.with_suffix(".tmp"))
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, self._inside(self.state_file))
        return state["version"]

    def _append_audit(self, row: dict) -> None:
        with open(self._inside(self.audit_file), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")

    def record(self, name: str, *, actor: str, action: str, change: dict) -> None:
        """An audit line about ``name`` that changes no config (an action taken elsewhere, e.g. in the model
        registry, on the experiment's behalf). The store's version stays: readers have nothing to reload."""
        with self._locked() as state:
            if name not in state["experiments"]:
                raise NotFound(f"no experiment named {name!r}")
            entry = state["experiments"][name]
            self._append_audit({"time": _now_iso(), "actor": actor, "action": action, "experiment": name,
                                "version": int(entry["version"]), "store_version": int(state["version"]),
                                "change": change, "phase": int(entry["config"].get("phase", 1))})

    def _settle(self, state: dict, current: Experiment | None, proposed: Experiment, *,
                rerandomise: bool) -> tuple[Experiment, dict]:
        """``proposed`` as it will be saved over ``current``: its salt (kept, generated or rotated, never one in
        use) and its phase; and what the audit line should say about them."""
        name = proposed.name
        used = self.salts_used(state)
        if current is not None and current.status == "stopped" and rerandomise:
            raise Conflict(f"{name!r} is stopped; create a new experiment instead of re-randomising it")
        if current is not None and not rerandomise and proposed.salt in (None, current.salt):
            salt = current.salt  # the usual case: the salt stays, units keep their positions
        elif current is not None and not rerandomise and current.status != "draft":
            raise Conflict(f"{name!r}: the salt of an experiment that has run cannot change (it would "
                           "re-randomise exposed users); re-randomise explicitly (a new phase) or create a "
                           "new experiment instead")
        else:  # a new experiment, a draft's new salt, or an explicit re-randomisation
            salt = proposed.salt
            if salt is None or (current is not None and salt == current.salt):
                salt = new_salt()
                while salt in used:  # 64 random bits: practically never, but never reuse is the rule
                    salt = new_salt()
            if salt in used:
                owner = used[salt]
                whose = "it" if owner == name else f"experiment {owner!r}"
                raise Conflict(f"{name!r}: salt {salt!r} is already used by {whose}: experiments sharing a "
                               "salt assign every user the same position in both (confounded tests, even "
                               "across layers or after a stop); omit the salt to get a generated one")
        now = datetime.now(timezone.utc)
        phase, started = _phase(current, proposed, salt, now)
        try:
            settled = Experiment.model_validate({**proposed.model_dump(), "salt": salt, "phase": phase,
                                                 "phase_started_at": started})
        except ValueError as exc:
            raise ExperimentError(str(exc)) from exc
        note: dict = {}
        if current is None or salt != current.salt:
            note["salt"] = salt
        if current is not None and phase != current.phase:
            note["new_phase"] = {"phase": phase, "started_at": started.isoformat() if started else None,
                                 "rerandomised": salt != current.salt,
                                 "reason": "variants changed" if proposed.variants != current.variants
                                 else "re-randomised"}
        return settled, note

    def _others(self, state: dict, name: str) -> list[Experiment]:
        return [Experiment.model_validate(x["config"]) for n, x in state["experiments"].items() if n != name]

    def create(self, experiment: Experiment, *, actor: str = "cli", check_target: TargetChecker | None = None,
               replace: bool = False, rerandomise: bool = False) -> int:
        """Add an experiment (or, with ``replace``, save a new version of it). Returns its version number.

        A config without a salt gets a generated one (a replaced experiment keeps its own); ``rerandomise``
        (with ``replace``) rotates the salt of an experiment that has run, which opens a new phase."""
        with self._locked() as state:
            old = state["experiments"].get(experiment.name)
            if old and not replace:
                raise Conflict(f"experiment {experiment.name!r} exists (version {old['version']}); "
                               "change it with ramp/pause/stop or replace it explicitly")
            if rerandomise and not old:
                raise ExperimentError(f"{experiment.name!r} does not exist: there is nothing to re-randomise")
            current = Experiment.model_validate(old["config"]) if old else None
            if current is not None and current.status == "stopped" and experiment.status != "stopped":
                raise Conflict(f"{experiment.name!r} is stopped; a stopped experiment cannot restart "
                               "(create a new one)")
            saved, note = self._settle(state, current, experiment, rerandomise=rerandomise)
            validate_set(self._others(state, experiment.name) + [saved], check_target)
            self._commit(state, actor=actor, action="replace" if old else "create", name=experiment.name,
                         change=saved.model_dump(mode="json") | note, saved=saved)
            return state["experiments"][experiment.name]["version"]

    def update(self, name: str, *, actor: str = "cli", action: str = "update",
               check_target: TargetChecker | None = None, rerandomise: bool = False, note: dict | None = None,
               **changes: object) -> Experiment:
        """Apply field changes (status, traffic, ramp, variants, ...) to an experiment as a new version.

        New variants on an experiment that has run open a new phase; ``rerandomise`` also rotates the salt.
        ``note`` is added to the audit line's change (why the change was made, e.g. a rollout's evidence)."""
        if {"phase", "phase_started_at"} & changes.keys():
            raise ExperimentError("the store sets phase and phase_started_at (change the variants, or "
                                  "re-randomise, to open a new phase)")
        with self._locked() as state:
            if name not in state["experiments"]:
                raise NotFound(f"no experiment named {name!r}")
            current = Experiment.model_validate(state["experiments"][name]["config"])
            if current.status == "stopped" and changes.get("status", "stopped") != "stopped":
                raise Conflict(f"{name!r} is stopped; a stopped experiment cannot restart "
                               "(create a new one with a new salt)")
            try:
                proposed = Experiment.model_validate({**current.model_dump(), **changes})
            except ValueError as exc:
                raise ExperimentError(str(exc)) from exc
            updated, settled = self._settle(state, current, proposed, rerandomise=rerandomise)
            validate_set(self._others(state, name) + [updated], check_target)
            self._commit(state, actor=actor, action=action, name=name,
                         change={k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v)
                                 for k, v in changes.items()} | {"status_before": current.status} | settled
                         | (note or {}),
                         saved=updated)
            return updated

    def ramp(self, name: str, traffic: float | None = None, schedule: list[RampStep] | None = None,
             *, actor: str = "cli", note: dict | None = None) -> Experiment:
        changes: dict = {}
        if traffic is not None:
            current = self.snapshot().get(name)
            if traffic < current.traffic_at():
                raise Conflict(f"ramping {name!r} down from {current.traffic_at()} to {traffic} would drop "
                               "exposed users; pause or stop it instead")
            changes["traffic"] = traffic
        if schedule is not None:
            changes["ramp"] = [s.model_dump() for s in schedule]
        if not changes:
            raise ExperimentError("ramp needs a traffic share or a schedule")
        return self.update(name, actor=actor, action="ramp", note=note, **changes)

    def set_status(self, name: str, status: str, *, actor: str = "cli", note: dict | None = None) -> Experiment:
        return self.update(name, actor=actor, action=status if status != "running" else "resume", note=note,
                           status=status)

    def set_kill(self, on: bool, *, actor: str = "cli", reason: str = "") -> int:
        with self._locked() as state:
            state["kill"] = bool(on)
            return self._commit(state, actor=actor, action="kill" if on else "unkill", name=None,
                                change={"kill": bool(on), "reason": reason}, saved=None)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Assignment:
    experiment: str
    variant: str
    version: int
    target: str
    ranker: str | None = None  # the variant's ranker target (of the rankers' registered model), if it names one


class Router:
    """Which experiments (at most one per layer) and which model a request gets, from one snapshot.

    Layers are visited in name order; the serving model is the target of the first assigned variant
    (so a model-changing experiment should own its layer; other layers may only vary other things).
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.running = [e for e in snapshot.experiments if e.status == "running"] if not snapshot.kill else []

    def assign(self, unit_id: int, context: dict[str, str] | None = None,
               now: datetime | None = None) -> list[Assignment]:
        out: list[Assignment] = []
        taken: set[str] = set()
        for e in self.running:
            if e.layer in taken:
                continue
            variant = assign(e, unit_id, context, now)
            if variant is not None:
                taken.add(e.layer)
                arm = e.variant(variant)
                out.append(Assignment(e.name, variant, self.snapshot.versions.get(e.name, 0), arm.target, arm.ranker))
        return out

    def targets(self) -> set[str]:
        """The models the running experiments need: retriever targets and rankers' pool keys (``ranker_key``)."""
        return set().union(*(models_of(e) for e in self.running))


def models_of(experiment: Experiment) -> set[str]:
    """The models an experiment's arms need: each retriever target and each ranker's pool key."""
    return {v.target for v in experiment.variants} | {
        ranker_key(v.ranker) for v in experiment.variants if v.ranker is not None}
