"""Deterministic assignment: recipe, balance, ramp stability, holdout and config validation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from experiments.assignment import (
    Experiment,
    Variant,
    assign,
    bucket,
    choose_variant,
    in_holdout,
    load_experiment,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _experiment(**overrides: object) -> Experiment:
    base: dict[str, object] = {
        "name": "hstu-vs-popularity",
        "salt": "encore-ab-1",
        "variants": [
            {"name": "control", "weight": 0.5, "target": "popularity"},
            {"name": "treatment", "weight": 0.5, "target": "alias:champion"},
        ],
    }
    base.update(overrides)
    return Experiment.model_validate(base)


def _within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------- bucket: the documented recipe


def test_bucket_matches_documented_recipe_and_golden_values() -> None:
    # Golden values pin the recipe: any change to it would silently re-randomise every running experiment.
    assert bucket("encore-ab-1", 42) == 8512
    assert bucket("encore-ab-1", "user-7", 100) == 92
    assert bucket("s", 0, 2**64) == 2436573086444620709
    cases: list[tuple[str, str | int]] = [("a", 1), ("exp-ü", "ünït"), ("x:y", "z")]
    for salt, unit in cases:
        expected = int.from_bytes(hashlib.sha256(f"{salt}:{unit}".encode()).digest()[:8], "big") % 10_000
        assert bucket(salt, unit) == expected


def test_bucket_is_stable_across_processes_with_different_hash_seeds() -> None:
    code = "from experiments.assignment import bucket; print([bucket('salt', u) for u in ('a', 'b', 7)])"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(run.stdout.strip())
    assert outputs == {str([bucket("salt", u) for u in ("a", "b", 7)])}


def test_bucket_treats_int_and_str_ids_alike_and_rejects_bad_bucket_counts() -> None:
    assert bucket("s", 42) == bucket("s", "42")
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="buckets"):
            bucket("s", 1, bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- assign


def test_assign_is_deterministic() -> None:
    exp = _experiment()
    first = [assign(exp, u) for u in range(2000)]
    assert first == [assign(_experiment(), u) for u in range(2000)]
    assert set(first) == {"control", "treatment"}


def test_different_salts_give_independent_assignments() -> None:
    a, b = _experiment(salt="s1"), _experiment(salt="s2")
    agree = sum(assign(a, u) == assign(b, u) for u in range(10_000))
    assert _within_binomial(agree, 10_000, 0.5)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.9, 0.1), (0.5, 0.3, 0.2)])
def test_balance_within_binomial_tolerance(weights: tuple[float, ...]) -> None:
    variants = [{"name": f"v{i}", "weight": w, "target": f"version:{i + 1}"} for i, w in enumerate(weights)]
    exp = _experiment(variants=variants)
    n = 10_000
    counts = {f"v{i}": 0 for i in range(len(weights))}
    for u in range(n):
        counts[assign(exp, f"user-{u}")] += 1  # type: ignore[index]
    for i, w in enumerate(weights):
        assert _within_binomial(counts[f"v{i}"], n, w), (counts, weights)


def test_traffic_share_and_balance_among_included_units() -> None:
    exp = _experiment(traffic=0.2)
    assigned = [assign(exp, u) for u in range(10_000)]
    included = [a for a in assigned if a is not None]
    assert _within_binomial(len(included), 10_000, 0.2)
    # The traffic gate and the variant choice use independent hashes, so the split stays 50/50 within it.
    assert _within_binomial(included.count("control"), len(included), 0.5)


def test_ramping_traffic_keeps_included_units_in_their_variant() -> None:
    units = range(10_000)
    previous: dict[int, str] = {}
    for traffic in (0.01, 0.05, 0.2, 0.5, 0.9, 1.0):
        exp = _experiment(traffic=traffic)
        current = {u: v for u in units if (v := assign(exp, u)) is not None}
        assert previous.keys() <= current.keys(), "ramping up dropped units from the experiment"
        moved = [u for u in previous if current[u] != previous[u]]
        assert moved == [], f"ramping to {traffic} moved {len(moved)} units to another variant"
        assert _within_binomial(len(current), len(units), traffic)
        previous = current
    # At full traffic the variant is exactly the unconditional choice.
    assert all(choose_variant(_experiment(), u) == v for u, v in previous.items())


def test_holdout_is_excluded_shared_across_experiments_and_nested() -> None:
    a = _experiment(salt="s1", holdout=0.1)
    b = _experiment(salt="s2", holdout=0.1, layer="ranking")
    units = range(10_000)
    held_a = {u for u in units if assign(a, u) is None}
    held_b = {u for u in units if assign(b, u) is None}
    # Same units held out in unrelated experiments: that is what makes it a long-term holdout.
    assert held_a == held_b == {u for u in units if in_holdout(u, 0.1)}
    assert _within_binomial(len(held_a), len(units), 0.1)
    assert {u for u in units if in_holdout(u, 0.05)} <= held_a


def test_holdout_and_traffic_combine() -> None:
    exp = _experiment(traffic=0.5, holdout=0.2)
    included = sum(assign(exp, u) is not None for u in range(10_000))
    assert _within_binomial(included, 10_000, 0.5 * 0.8)


@pytest.mark.parametrize("status", ["draft", "paused", "stopped"])
def test_only_running_experiments_assign(status: str) -> None:
    exp = _experiment(status=status)
    assert all(assign(exp, u) is None for u in range(200))


def test_full_holdout_or_zero_traffic_assigns_nobody() -> None:
    assert all(assign(_experiment(holdout=1.0), u) is None for u in range(500))
    assert all(assign(_experiment(traffic=0.0), u) is None for u in range(500))


# ---------------------------------------------------------------- validation


def _variants(*weights: float) -> list[dict[str, object]]:
    return [{"name": f"v{i}", "weight": w, "target": "popularity"} for i, w in enumerate(weights)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variants": _variants(0.5, 0.4)}, "sum to 1"),
        ({"variants": _variants(0.6, 0.6)}, "sum to 1"),
        ({"variants": _variants(1.5, -0.5)}, "positive"),
        ({"variants": _variants(1.0, 0.0)}, "positive"),
        ({"variants": _variants(float("nan"), 1.0)}, "positive"),
        ({"variants": []}, "at least 1"),
        (
            {
                "variants": [
                    {"name": "a", "weight": 0.5, "target": "popularity"},
                    {"name": "a", "weight": 0.5, "target": "popularity"},
                ]
            },
            "unique",
        ),
        ({"traffic": 1.5}, "traffic must be within"),
        ({"traffic": -0.1}, "traffic must be within"),
        ({"holdout": 2.0}, "holdout must be within"),
        ({"status": "live"}, "status"),
        ({"salt": ""}, "salt"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_experiments_are_rejected_with_clear_messages(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _experiment(**overrides)


def test_weight_sum_tolerance_accepts_decimal_rounding() -> None:
    exp = _experiment(variants=_variants(0.1, 0.2, 0.7))  # 0.1 + 0.2 + 0.7 != 1.0 exactly in binary
    assert exp.weights == {"v0": 0.1, "v1": 0.2, "v2": 0.7}
    with pytest.raises(ValidationError, match="sum to 1"):
        _experiment(variants=_variants(0.5, 0.5 + 1e-6))


@pytest.mark.parametrize("target", ["alias:champion", "version:3", "popularity", "random"])
def test_valid_targets(target: str) -> None:
    assert Variant(name="x", weight=1.0, target=target).target == target


@pytest.mark.parametrize("target", ["", "alias:", "version:0", "version:abc", "Champion!", "s3://model"])
def test_invalid_targets(target: str) -> None:
    with pytest.raises(ValidationError, match="target"):
        Variant(name="x", weight=1.0, target=target)


# ---------------------------------------------------------------- loading


def test_load_experiment_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_path = tmp_path / "exp.yaml"
    yaml_path.write_text(
        "name: hstu-vs-popularity\n"
        "salt: encore-ab-1\n"
        "traffic: 0.5\n"
        "variants:\n"
        "  - {name: control, weight: 0.5, target: popularity}\n"
        "  - {name: treatment, weight: 0.5, target: 'alias:champion'}\n"
    )
    from_yaml = load_experiment(yaml_path)
    json_path = tmp_path / "exp.json"
    json_path.write_text(json.dumps(from_yaml.model_dump()))
    from_json = load_experiment(json_path)
    assert from_yaml == from_json
    assert from_yaml.traffic == 0.5 and from_yaml.layer == "default" and from_yaml.status == "running"
    assert from_yaml.variant("treatment").target == "alias:champion"


def test_load_experiment_rejects_bad_files(tmp_path: Path) -> None:
    bad_suffix = tmp_path / "exp.toml"
    bad_suffix.write_text("name = 'x'")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        load_experiment(bad_suffix)
    not_mapping = tmp_path / "exp.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_experiment(not_mapping)
    bad_weights = tmp_path / "bad.json"
    bad_weights.write_text(json.dumps({"name": "x", "salt": "s", "variants": _variants(0.3, 0.3)}))
    with pytest.raises(ValidationError, match="sum to 1"):
        load_experiment(bad_weights)
