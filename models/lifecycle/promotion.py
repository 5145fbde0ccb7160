"""From challenger to champion: the promotion gate's verdict, promotion, approval, rollback.

:func:`judge` is the gate: it re-scores the champion on the challenger's data, applies ``PromotionSettings``
(``models.lifecycle.gate.decide``) and records the verdict on the version's tags. :func:`conclude` acts on a
recorded verdict: in ``auto`` mode the challenger becomes champion, in ``manual`` mode it is marked as
awaiting approval until a person runs ``encore models promote``. :func:`promote` and :func:`rollback` move
the champion alias by hand (or for the pipeline), each move an audit entry.

A VISTA version is also held to its summaries (``gate.summaries_check``): the gate and :func:`promote` refuse
one whose summariser version has no completed ``user_summaries`` backfill, or whose backfill is of another
summariser version, since serving would answer it from summaries it was not trained with (or none).

The Dagster assets ``promotion_gate`` and ``champion_model`` are thin wrappers around these.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from models.lifecycle.gate import (GateDecision, decide, decide_ranker, evaluate_recommender, summaries_check,
                                   with_summaries)
from models.lifecycle.registry import AWAITING_APPROVAL, GATE_CHECKS, GATE_PASSED, GATE_REASON, Registry

_log = logging.getLogger("encore.promotion")


class GateNotPassed(RuntimeError):
    """A version without a passing verdict of the promotion gate."""


class SummariesNotReady(GateNotPassed):
    """A VISTA version whose summariser's cached summaries are not backfilled (or are of another version)."""


def judge(registry: Registry, version: int, report: dict[str, Any], dataset: str | Path, promotion: Any, *,
          log: Any = _log) -> GateDecision:
    """The promotion gate for ``version`` (its evaluation ``report`` on the snapshot file ``dataset``).

    The champion is re-scored on the challenger's snapshot (same users, same held-out events), because the
    metrics older versions were registered with come from older data; if it cannot be re-scored, its
    registered metric stands in. The verdict is written to the version's tags. ``log`` takes ``info`` and
    ``warning`` calls (a Dagster context's log, or a logger)."""
    def rescore(champ: Any) -> float | None:
        champ_report = evaluate_recommender(champ, pd.read_parquet(dataset), sample_users=8)
        return champ_report[promotion.split].get(promotion.metric)

    champion, champion_value = _rescored_champion(registry, version, rescore,
                                                  f"{promotion.split}_{promotion.metric}", log)
    decision = decide(report, promotion, champion_version=champion, champion_value=champion_value)
    decision = with_summaries(decision, summaries_check(registry.tags(version), registry.summary_backfills()))
    return _record_verdict(registry, version, decision, "promotion gate", log)


def judge_ranker(registry: Registry, version: int, report: dict[str, Any], rescore: Callable[[Any], float], *,
                 margin: float = 0.0, log: Any = _log) -> GateDecision:
    """The rankers' gate for ``version`` of the rankers' registry (``report``: its test AUCs beside the head it
    started from and popularity; ``rescore``: a loaded ranker -> its AUC on the same test examples, used on the
    champion ranker). The verdict is written to the version's tags, as :func:`judge` does for retrievers."""
    champion, champion_value = _rescored_champion(registry, version, rescore, "ranker_auc", log)
    decision = decide_ranker(report, margin=margin, champion_version=champion, champion_value=champion_value)
    return _record_verdict(registry, version, decision, "ranker gate", log)


def _rescored_champion(registry: Registry, version: int, rescore: Callable[[Any], float | None],
                       registered_metric: str, log: Any) -> tuple[int | None, float | None]:
    """(champion version, its metric on the challenger's data) for a gate; (None, None) when there is no other
    champion (none yet, or ``version`` judged again after its own promotion). A champion that cannot be
    re-scored is read from its ``registered_metric``; a metric missing either way counts as 0."""
    champion = registry.champion_version()
    if champion is None or champion == version:
        return None, None
    try:
        champ, _ = registry.load(version=champion)
        value = rescore(champ)
        log.info(f"champion v{champion} re-scored on the challenger's data: {value}")
    except Exception as exc:  # noqa: BLE001 - fall back to the champion's registered metric
        log.warning(f"could not re-score champion v{champion} ({exc}); using its registered metric")
        value = registry.version_metric(champion, registered_metric)
    return champion, 0.0 if value is None else float(value)


def _record_verdict(registry: Registry, version: int, decision: GateDecision, gate: str, log: Any) -> GateDecision:
    """Write a gate's verdict to the version's tags (what ``conclude`` and ``encore models list`` read)."""
    registry.set_tags(version, {GATE_PASSED: str(decision.passed).lower(), GATE_REASON: decision.summary,
                                GATE_CHECKS: json.dumps(decision.checks)})
    log.info(f"{gate} for v{version}: {decision.summary}")
    return decision


def conclude(registry: Registry, version: int, mode: str) -> dict[str, Any]:
    """Act on the recorded verdict: ``auto`` promotes, ``manual`` marks the version as awaiting approval.
    Raises GateNotPassed for a version whose verdict is missing or negative."""
    tags = registry.tags(version)
    if tags.get(GATE_PASSED) != "true":
        raise GateNotPassed(f"version {version} has not passed the promotion gate: "
                            f"{tags.get(GATE_REASON, 'not run')}")
    reason = tags[GATE_REASON]
    if mode == "auto":
        entry = promote(registry, version, reason=reason, actor="pipeline")
        return {"version": version, "promoted": True,
                "reason": reason if entry["action"] != "noop" else entry["reason"]}
    registry.set_tags(version, {AWAITING_APPROVAL: "true"})
    return {"version": version, "promoted": False,
            "reason": f"{reason}; mode manual: awaiting `encore models promote {version}`"}


def promote(registry: Registry, version: int, *, reason: str, actor: str | None = None) -> dict:
    """Make ``version`` the champion (the gate's auto mode, or a person in manual mode). Raises NotRegistered
    for a version that does not exist, SummariesNotReady for a VISTA version without its summaries."""
    champion_alias = registry.names.champion_alias
    tags = registry.tags(version)  # raises when the version does not exist
    tie = summaries_check(tags, registry.summary_backfills())
    if tie is not None and not tie[0]:  # checked here too: a person's promotion skips the gate
        raise SummariesNotReady(f"version {version} cannot be champion: {tie[1]}")
    current = registry.champion_version()
    if current == int(version):
        return {"alias": champion_alias, "from": current, "to": current, "action": "noop",
                "reason": f"version {version} is already champion"}
    entry = registry.set_alias(champion_alias, version, reason=reason, actor=actor, action="promote")
    registry.delete_tag(version, AWAITING_APPROVAL)
    return entry


def rollback(registry: Registry, *, reason: str = "rollback", actor: str | None = None) -> dict:
    """Give the champion alias back to the version that held it before the current one.

    A rollback is never refused for want of summaries (it is the way out of a bad champion, and a VISTA model
    without its cached summaries still answers, from the online history). For a VISTA target the entry's
    ``summaries`` says what to run: the online ``user_summary`` rows belong to whichever summariser was pushed
    last, so answers say ``"stale"`` until the target's ``user_summaries`` partition runs again (a backfill
    first, if it has none)."""
    stack = registry.champion_stack()
    current = registry.champion_version()
    if current is None or len(stack) < 2:
        raise ValueError("nothing to roll back to: there has been at most one champion")
    target = stack[-2]
    entry = registry.set_alias(registry.names.champion_alias, target, reason=f"{reason} (from v{current})",
                               actor=actor, action="rollback")
    tags = registry.tags(target)
    tie = summaries_check(tags, registry.summary_backfills())
    if tie is not None:
        version = tags.get("summariser_version", "?")
        note = (f"v{target} reads summaries of summariser {version}: answers say 'stale' until user_summaries "
                f"partition {version} runs again and pushes its states online")
        entry = {**entry, "summaries": note if tie[0] else f"{note} ({tie[1]})"}
        _log.warning(entry["summaries"])
    return entry
