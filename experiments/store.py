"""Experiment management: a versioned store with an audit log, validation, and the request router.

The store lives under ``<data_dir>/experiments/``::

    state.json                    current configs, per-experiment version numbers, global version, kill switch
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
* a name, once created, keeps its salt: a changed salt would silently re-randomise exposed users.

The **kill switch** turns every experiment off at once (everyone gets the default model) without touching
their configs; turning it off restores them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from experiments.assignment import POPULARITY, Experiment, RampStep, assign, check_experiment_name
from infra.settings import EncoreSettings

BASELINES = frozenset({POPULARITY})

TargetChecker = Callable[[str], str | None]  # target -> problem (None when the target exists)


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
    """Checks ``alias:``/``version:`` targets against the settings' registered model in the MLflow registry."""
    from models.lifecycle.registry import Registry

    return Registry(tracking_uri, settings.registry).target_problem


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
    if problems:
        raise ExperimentError("; ".join(problems))


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
            folder.mkdir(parents=True, exist_ok=True)
            self._inside(folder / f"v{version:04d}.yaml").write_text(
                yaml.safe_dump({"saved_at": _now_iso(), "actor": actor, "action": action,
                                "config": entry["config"]}, sort_keys=False), encoding="utf-8")
        with open(self._inside(self.audit_file), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": _now_iso(), "actor": actor, "action": action, "experiment": name,
                                 "version": version, "store_version": state["version"], "change": change},
                                default=str) + "\n")
        tmp = self._inside(self.state_file.with_suffix(".tmp"))
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, self._inside(self.state_file))
        return state["version"]

    def _others(self, state: dict, name: str) -> list[Experiment]:
        return [Experiment.model_validate(x["config"]) for n, x in state["experiments"].items() if n != name]

    def create(self, experiment: Experiment, *, actor: str = "cli", check_target: TargetChecker | None = None,
               replace: bool = False) -> int:
        """Add an experiment (or, with ``replace``, save a new version of it). Returns its version number."""
        with self._locked() as state:
            old = state["experiments"].get(experiment.name)
            if old and not replace:
                raise Conflict(f"experiment {experiment.name!r} exists (version {old['version']}); "
                               "change it with ramp/pause/stop or replace it explicitly")
            if old and old["config"]["salt"] != experiment.salt and old["config"]["status"] != "draft":
                raise Conflict(f"{experiment.name!r}: the salt of an experiment that has run cannot change "
                                      "(it would re-randomise exposed users); create a new experiment instead")
            validate_set(self._others(state, experiment.name) + [experiment], check_target)
            self._commit(state, actor=actor, action="replace" if old else "create", name=experiment.name,
                         change=experiment.model_dump(mode="json"), saved=experiment)
            return state["experiments"][experiment.name]["version"]

    def update(self, name: str, *, actor: str = "cli", action: str = "update",
               check_target: TargetChecker | None = None, **changes: object) -> Experiment:
        """Apply field changes (status, traffic, ramp, ...) to an experiment as a new version."""
        with self._locked() as state:
            if name not in state["experiments"]:
                raise NotFound(f"no experiment named {name!r}")
            current = Experiment.model_validate(state["experiments"][name]["config"])
            if current.status == "stopped" and changes.get("status", "stopped") != "stopped":
                raise Conflict(f"{name!r} is stopped; a stopped experiment cannot restart "
                                      "(create a new one with a new salt)")
            try:
                updated = Experiment.model_validate({**current.model_dump(), **changes})
            except ValueError as exc:
                raise ExperimentError(str(exc)) from exc
            validate_set(self._others(state, name) + [updated], check_target)
            self._commit(state, actor=actor, action=action, name=name,
                         change={k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v)
                                 for k, v in changes.items()} | {"status_before": current.status},
                         saved=updated)
            return updated

    def ramp(self, name: str, traffic: float | None = None, schedule: list[RampStep] | None = None,
             *, actor: str = "cli") -> Experiment:
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
        return self.update(name, actor=actor, action="ramp", **changes)

    def set_status(self, name: str, status: str, *, actor: str = "cli") -> Experiment:
        return self.update(name, actor=actor, action=status if status != "running" else "resume", status=status)

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
                out.append(Assignment(e.name, variant, self.snapshot.versions.get(e.name, 0),
                                      e.variant(variant).target))
        return out

    def targets(self) -> set[str]:
        return {v.target for e in self.running for v in e.variants}
