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
    DEFAULT_BUCKETS,
    Experiment,
    InvalidUnitId,
    Variant,
    arm_buckets,
    assign,
    bucket,
    canonical_unit_id,
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
    assert bucket("encore-ab-1", 7, 100) == bucket("encore-ab-1", "7", 100) == 76
    assert bucket("s", 0, 2**64) == 2436573086444620709
    cases: list[tuple[str, str | int]] = [("a", 1), ("exp-ü", 2**63 - 1), ("x:y", "17")]
    for salt, unit in cases:
        expected = int.from_bytes(hashlib.sha256(f"{salt}:{unit}".encode()).digest()[:8], "big") % 10_000
        assert bucket(salt, unit) == expected


def test_bucket_is_stable_across_processes_with_different_hash_seeds() -> None:
    code = "from experiments.assignment import bucket; print([bucket('salt', u) for u in (1, '2', 7)])"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(run.stdout.strip())
    assert outputs == {str([bucket("salt", u) for u in (1, "2", 7)])}


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
        counts[assign(exp, u)] += 1  # type: ignore[index]
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


# ---------------------------------------------------------------- unit ids: one canonical form


def test_every_accepted_spelling_of_a_user_id_hashes_as_the_same_unit() -> None:
    import numpy as np

    exp = _experiment(traffic=0.5)
    for unit in (0, 42, 2**63 - 1):
        spellings = [unit, str(unit), np.int64(unit), np.uint64(unit)]
        assert {canonical_unit_id(s) for s in spellings} == {unit}
        assert len({bucket("s", s) for s in spellings}) == 1
        assert len({assign(exp, s) for s in spellings}) == 1


@pytest.mark.parametrize("bad", [True, False, 42.0, 42.5, "042", " 42", "42 ", "+42", "-1", -1, 2**63, "4_2",
                                 "٤٢", "", "user-7", None, b"42"])
def test_ambiguous_or_lossy_user_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidUnitId, match="unit id"):
        canonical_unit_id(bad)
    with pytest.raises(InvalidUnitId):
        assign(_experiment(), bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- salts


@pytest.mark.parametrize("salt", ["layer", "layer/ranking", "layer/traffic", "encore-global-holdout"])
def test_salts_that_would_hash_like_a_layer_or_the_holdout_are_refused(salt: str) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        _experiment(salt=salt)


def test_an_experiment_without_a_salt_validates_but_cannot_assign() -> None:
    exp = _experiment(salt=None)
    assert exp.salt is None
    assert assign(exp.model_copy(update={"status": "paused"}), 1) is None
    with pytest.raises(ValueError, match="no salt"):
        assign(exp, 1)


# ---------------------------------------------------------------- resolution: no silent rounding


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"variants": _variants(0.99995, 0.00005)}, "weight of variant 'v1'"),
        ({"variants": _variants(1 / 3, 1 / 3, 1 / 3)}, "weight of variant 'v0'"),
        ({"traffic": 0.00015}, "traffic"),
        ({"holdout": 0.12345}, "holdout"),
        ({"layer_range": (0.0, 0.33333)}, "layer_range end"),
        ({"layer_range": (0.00001, 1.0)}, "layer_range start"),
        ({"ramp": [{"at": "2026-01-01T00:00:00Z", "traffic": 0.123456}]}, "ramp step traffic"),
    ],
)
def test_values_between_two_hash_positions_are_refused(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}.*not a multiple of 0.0001"):
        _experiment(**overrides)


def test_a_tiny_weight_on_the_grid_gets_its_units() -> None:
    exp = _experiment(variants=_variants(0.9998, 0.0001, 0.0001))
    assert arm_buckets([v.weight for v in exp.variants]) == [9998, 1, 1]
    # the first units found at the last positions of the variant hash, mapped by choose_variant itself
    wanted = {9997: "v0", 9998: "v1", 9999: "v2"}
    found: dict[int, str] = {}
    for u in range(1_000_000):
        b = bucket(f"{exp.salt}/variant", u)
        if b in wanted and b not in found:
            found[b] = choose_variant(exp, u)
            if len(found) == len(wanted):
                break
    assert found == wanted


def test_arm_buckets_agree_with_choose_variant_exactly() -> None:
    """Float sums can put a boundary one position off the decimal grid; arm_buckets must see it where
    choose_variant does (it is what the resolution check and realised_weights rely on)."""
    weights = [0.1914, 0.0332, 0.257, 0.2094, 0.1732, 0.1358]  # 0.1914 + 0.0332 lands above 0.2246
    exp = _experiment(variants=_variants(*weights))
    counts = arm_buckets(weights)
    by_position = [0] * len(weights)
    cumulative, arm = [], 0.0
    for w in weights[:-1]:
        arm += w
        cumulative.append(arm)
    for b in range(DEFAULT_BUCKETS):
        u = b / DEFAULT_BUCKETS
        by_position[next((i for i, c in enumerate(cumulative) if u < c), len(weights) - 1)] += 1
    assert counts == by_position and sum(counts) == DEFAULT_BUCKETS
    assert all(abs(n - w * DEFAULT_BUCKETS) <= 1 for n, w in zip(counts, weights))
    assert exp.realised_weights == {f"v{i}": n / DEFAULT_BUCKETS for i, n in enumerate(counts)}


def test_the_mapping_is_unchanged_for_configs_on_the_grid() -> None:
    """Guarding resolution must not move anyone: the golden positions of the default experiment still hold."""
    exp = _experiment()
    assert [choose_variant(exp, u) for u in range(12)] == [_golden_variant(u) for u in range(12)]


def _golden_variant(unit: int) -> str:
    """The recipe before any guard: first 8 bytes of SHA-256 of "{salt}/variant:{unit}" mod 10,000, < 5,000."""
    digest = hashlib.sha256(f"encore-ab-1/variant:{unit}".encode()).digest()
    return "control" if int.from_bytes(digest[:8], "big") % 10_000 / 10_000 < 0.5 else "treatment"
