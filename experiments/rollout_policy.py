"""A rollout policy: how an experiment ramps its traffic and acts on its own evidence (``Experiment.rollout``).

The policy lives apart from ``experiments.rollout`` (which decides and acts) so that ``experiments.assignment``
can carry it on ``Experiment`` without importing the store or the registry. The hash's resolution rule for the
steps (multiples of 0.0001, like every other share) is checked by ``Experiment`` itself, with the same message.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from experiments.metrics import DEFAULT_GUARDRAILS, METRICS


def _known_metric(name: str) -> str:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: use one of {sorted(METRICS)}")
    return name


class RolloutPolicy(BaseModel):
    """A guarded ramp: traffic ``steps``, what a step must see before the next, the guardrails, who decides.

    ``steps`` are the experiment's traffic shares in order (``0.01, 0.05, 0.25, 0.5``); the arms' weights never
    change, so a ramp stays in the experiment's phase and both arms keep their users. At the last step the
    sequential test of ``primary_metric`` decides (or, at the plan's horizon, the fixed-horizon readout).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict, as every share of a config: JSON true or "0.5" is refused rather than read as 1.0 or 0.5
    steps: list[Annotated[float, Field(strict=True)]] = Field(min_length=1, description="traffic shares, strictly increasing, in (0, 1]")
    min_users_per_step: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]] = Field(
        description="users (all arms) that must enter during a step before the next: one number for every step, "
        "or one per step before the last (a later step, at more traffic, can ask for more)")
    min_hours_per_step: float | None = Field(default=None, gt=0, description="and hours a step must last "
                                             "(weekday/weekend and time-of-day effects), if set")
    primary_metric: str = Field(description="the metric whose sequential decision ends the rollout")
    guardrails: list[str] = Field(default_factory=lambda: list(DEFAULT_GUARDRAILS),
                                  description="metrics whose always-valid test showing harm rolls back")
    on_decision: Literal["promote", "approval"] = Field(
        default="approval", description="promote: a treatment decided better goes through the promotion gate "
        "and becomes champion; approval: it is marked as awaiting `encore models promote`")
    at_horizon: Literal["fixed_readout", "keep_control"] = Field(
        default="keep_control", description="at the plan's horizon without a sequential decision: keep_control "
        "keeps the control (a false promotion only from the sequential test, at most α/2: with the harm side's "
        "α/2, the rollout's false actions stay within α); fixed_readout lets the fixed-horizon test decide (more "
        "power at the planned size, but it is read after the sequential test was watched, so false promotions "
        "can reach α and false actions about 1.5 α)")
    treatment: str = "treatment"
    control: str = "control"
    alias: str | None = Field(
        default=None, description="the registry alias the treatment's version is rolled out to (it moves there "
        "on a promotion and back on a rollback); default: the control arm's alias")

    @field_validator("steps")
    @classmethod
    def _increasing_shares(cls, steps: list[float]) -> list[float]:
        for share in steps:
            if isinstance(share, bool) or not (math.isfinite(share) and 0.0 < share <= 1.0):
                raise ValueError(f"rollout steps are traffic shares in (0, 1], got {share!r}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            # a step down would drop exposed users out of the experiment (the store refuses it too)
            raise ValueError(f"rollout steps must strictly increase, got {steps}")
        return steps

    def min_users_for(self, step: int) -> int:
        """The users step ``step`` (1-based, before the last) must see before the next."""
        m = self.min_users_per_step
        return m if isinstance(m, int) else m[step - 1]

    @field_validator("primary_metric")
    @classmethod
    def _primary(cls, name: str) -> str:
        return _known_metric(name)

    @field_validator("guardrails")
    @classmethod
    def _guardrails(cls, names: list[str]) -> list[str]:
        for name in names:
            _known_metric(name)
        if len(set(names)) != len(names):
            raise ValueError(f"guardrails are listed twice: {names}")
        return names

    @model_validator(mode="after")
    def _one_minimum_per_step(self) -> RolloutPolicy:
        m = self.min_users_per_step
        if isinstance(m, list) and len(m) != len(self.steps) - 1:
            raise ValueError(f"min_users_per_step lists {len(m)} minimums for {len(self.steps)} steps: give one per "
                             f"step before the last ({len(self.steps) - 1}), or one number for all")
        return self

    @model_validator(mode="after")
    def _two_arms(self) -> RolloutPolicy:
        if self.treatment == self.control:
            raise ValueError("the rollout's treatment and control must be different variants")
        return self
