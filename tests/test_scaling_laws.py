"""Scaling-law analysis on points drawn from known laws: the fits must recover the laws' constants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.scaling_laws import (approach2_exponent, bootstrap, compare_alpha, extrapolation_check,
                                 fit_loss_surface, fit_power_law, isoflop_empirical, isoflop_profiles, plot_all,
                                 summarise, to_markdown)

# the law the grids are drawn from: L = E + A / N^alpha + B / D^beta
E, A, ALPHA, B, BETA = 1.2, 300.0, 0.35, 2000.0, 0.28


def law(N, D, alpha=ALPHA):
    return E + A * np.asarray(N, float) ** -alpha + B * np.asarray(D, float) ** -BETA


def grid(backbones=(("hstu", ALPHA), ("sasrec", 0.25)), sizes=np.geomspace(1e5, 1e7, 5),
         tokens=np.geomspace(1e7, 1e9, 4), seeds=(0, 1, 2), noise=0.004, seed=0):
    """Points of every backbone x size x data size x seed; each seed shifts its points by one shared factor
    (a seed's luck) and each point by its own, both log-normal."""
    rng = np.random.default_rng(seed)
    points = []
    for name, alpha in backbones:
        shift = {s: rng.normal(0, noise) for s in seeds}
        for N in sizes:
            for D in tokens:
                for s in seeds:
                    loss = float(law(N, D, alpha) * math.exp(shift[s] + rng.normal(0, noise)))
                    points.append({"backbone": name, "params": float(N), "tokens": float(D), "compute": 6 * N * D,
                                   "seed": s, "eval_loss": loss, "ndcg@10": 0.1 / loss, "hr@10": 0.2 / loss})
    return points


def test_saturating_fit_recovers_the_law_exactly_and_under_noise():
    x = np.geomspace(1e5, 1e8, 7)
    y = 1.5 + 400.0 * x ** -0.4
    exact = fit_power_law(x, y)
    assert exact.form == "saturating" and exact.n == 7
    assert exact.alpha == pytest.approx(0.4, rel=1e-6) and exact.E == pytest.approx(1.5, rel=1e-6)
    assert exact.A == pytest.approx(400.0, rel=1e-5) and exact.r2_log == pytest.approx(1.0)
    assert np.allclose(exact.predict(x), y, rtol=1e-9)
    for s in range(3):
        noisy = fit_power_law(x, y * np.exp(np.random.default_rng(s).normal(0, 0.005, len(x))))
        assert noisy.form == "saturating" and abs(noisy.alpha - 0.4) < 0.03 and abs(noisy.E - 1.5) < 0.05
        assert 0.99 < noisy.r2_log < 1.0 and 0.99 < noisy.r2 < 1.0


def test_pure_power_law_fallback():
    x = np.geomspace(1e5, 1e8, 7)
    # E = 0 truly: the fit must not invent an irreducible loss from noise
    for s in range(4):
        f = fit_power_law(x, 3.0 * x ** -0.07 * np.exp(np.random.default_rng(s).normal(0, 0.005, len(x))))
        assert f.form == "pure" and f.E == 0.0 and abs(f.alpha - 0.07) < 0.005 and f.note
    # three points: E is not identifiable whatever the data
    few = fit_power_law(x[:3], 1.5 + 400.0 * x[:3] ** -0.4)
    assert few.form == "pure" and "points" in few.note
    assert fit_power_law([10.0], [1.0]).form == "none" and math.isnan(fit_power_law([10.0], [1.0]).alpha)
    # unusable points are dropped, not fitted
    assert fit_power_law([10, 100, 0, 1000], [1.0, 0.5, 2.0, float("nan")]).n == 2


def test_bootstrap_over_seeds_contains_the_truth_and_is_deterministic():
    rows = [p for p in grid(backbones=(("hstu", ALPHA),), seeds=(0, 1, 2, 3, 4)) if p["tokens"] == 1e9]
    a = bootstrap(rows, n_boot=200, seed=3, predict_at=[1e7, 1e8])
    assert a.resampled == "seeds within sizes" and a.n_ok == 200 and a.fit.form == "saturating"
    assert a.alpha.contains(ALPHA) and a.alpha.hi - a.alpha.lo < 0.1
    assert a.E.contains(E + B * 1e9 ** -BETA)  # at fixed D the asymptote is E + B / D^beta
    assert a.predict[1].contains(float(law(1e8, 1e9))) and a.predict_x == (1e7, 1e8)
    b = bootstrap(rows, n_boot=200, seed=3, predict_at=[1e7, 1e8])
    assert a.alpha == b.alpha and np.array_equal(a.alphas, b.alphas)
    assert bootstrap(rows, n_boot=200, seed=4).alpha != a.alpha
    one_seed = bootstrap([r for r in rows if r["seed"] == 0], n_boot=50)
    assert one_seed.resampled == "points" and one_seed.n_ok > 0


def test_paired_alpha_difference():
    points = [p for p in grid() if p["tokens"] == 1e9]
    d = compare_alpha([p for p in points if p["backbone"] == "hstu"], [p for p in points if p["backbone"] == "sasrec"],
                      names=("hstu", "sasrec"), n_boot=200)
    assert d.paired and d.common_seeds == 3 and d.interval.contains(ALPHA - 0.25) and d.interval.lo > 0


def test_extrapolation_check():
    x = np.geomspace(1e5, 1e8, 6)
    exact = extrapolation_check(x, 1.5 + 400.0 * x ** -0.4)
    assert exact.x_heldout == 1e8 and exact.fit.n == 5 and abs(exact.rel_error) < 1e-6
    assert exact.measured == pytest.approx(1.5 + 400.0 * 1e8 ** -0.4)
    # a largest point that bends off the law is reported as a miss of the right sign and size
    y = 1.5 + 400.0 * x ** -0.4
    y[-1] *= 1.1
    off = extrapolation_check(x, y)
    assert off.rel_error == pytest.approx(1 / 1.1 - 1, rel=1e-4) and off.predicted < off.measured
    # seeds at the held-out size are averaged
    seeds = extrapolation_check(np.r_[x, x[-1]], np.r_[1.5 + 400.0 * x ** -0.4, 2 * y[-1]])
    assert seeds.measured == pytest.approx((1.5 + 400.0 * 1e8 ** -0.4 + 2 * y[-1]) / 2)


def test_surface_fit_recovers_exponents_and_the_frontier():
    points = grid(backbones=(("hstu", ALPHA),), sizes=np.geomspace(1e5, 1e8, 6), tokens=np.geomspace(1e7, 1e10, 6),
                  seeds=(0,), noise=0.002)
    fit = fit_loss_surface(*([p[k] for p in points] for k in ("params", "tokens", "eval_loss")))
    assert abs(fit.alpha - ALPHA) < 0.05 and abs(fit.beta - BETA) < 0.05 and fit.r2_log > 0.99
    assert abs(fit.n_exponent - BETA / (ALPHA + BETA)) < 0.03
    N, D = fit.optimal(np.array([1e18, 1e20]))
    assert np.allclose(6 * N * D, [1e18, 1e20])
    # the closed form is the minimum of the iso-FLOP profile
    for prof in isoflop_profiles(fit, [1e18, 1e20]):
        assert prof.L_opt <= min(prof.L) + 1e-12 and prof.N_opt == pytest.approx(prof.N[int(np.argmin(prof.L))],
                                                                                rel=0.15)
    with pytest.raises(ValueError):
        fit_loss_surface([1e5, 1e6], [1e7, 1e8], [2.0, 1.9])


def test_isoflop_empirical_finds_the_best_size_near_each_budget():
    sizes = np.geomspace(1e3, 1e10, 29)  # 0.25 dex apart
    budgets = (1e15, 1e17, 1e19, 1e21)
    points = [{"params": n, "tokens": c / (6 * n), "compute": c, "eval_loss": float(law(n, c / (6 * n)))}
              for c in budgets for n in sizes]
    bins = isoflop_empirical(points)
    assert [round(math.log10(b.compute)) for b in bins] == [15, 17, 19, 21] and all(b.bracketed for b in bins)
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    for b in bins:
        n_star = G * (b.compute / 6) ** (BETA / (ALPHA + BETA))
        assert b.L_best == min(b.losses) and abs(math.log10(b.N_best / n_star)) <= 0.125 + 1e-9  # half a step
        assert abs(math.log10(b.N_parabola / n_star)) < 0.5
    assert abs(approach2_exponent(bins) - BETA / (ALPHA + BETA)) < 0.05
    # a budget whose sizes stop before the optimum: its best is the grid's edge, not bracketed, not counted
    edge = isoflop_empirical([p for p in points if p["params"] < 1e5], budgets=[1e19, 1e21])
    assert not any(b.bracketed for b in edge) and math.isnan(approach2_exponent(edge))


def test_summarise_markdown_and_plots(tmp_path):
    points = grid(backbones=(("gpt", 0.3), ("hstu", ALPHA), ("sasrec", 0.25)))
    # a backbone the grid barely covers: two sizes, one data size, one seed; reported, not fitted
    points += grid(backbones=(("llama", 0.3),), sizes=[1e5, 1e6], tokens=[1e9], seeds=(7,), seed=1)
    summary = summarise(points, n_boot=60)
    json.dumps(summary, allow_nan=False)
    assert set(summary["backbones"]) == {"gpt", "hstu", "llama", "sasrec"}
    llama = summary["backbones"]["llama"]
    assert llama["surface"] is None and llama["extrapolation"]["rel_error"] is None
    assert llama["L_N"]["form"] == "pure" and llama["L_N"]["n"] == 2
    hstu = summary["backbones"]["hstu"]
    assert hstu["L_N_r2_ok"] and hstu["tokens_for_L_N"] == 1e9 and hstu["params_for_L_D"] == 1e7
    assert abs(hstu["L_N"]["alpha"] - ALPHA) < 0.1 and abs(hstu["L_D"]["alpha"] - BETA) < 0.1
    assert abs(hstu["extrapolation"]["rel_error"]) < 0.02
    assert hstu["surface"] is not None and abs(hstu["surface"]["n_exponent"] - BETA / (ALPHA + BETA)) < 0.1
    assert [c["b"] for c in summary["comparisons"]] == ["gpt", "llama", "sasrec"]
    assert [c["paired"] for c in summary["comparisons"]] == [True, False, True]
    sasrec = next(c for c in summary["comparisons"] if c["b"] == "sasrec")
    assert sasrec["interval"]["lo"] > 0  # hstu's exponent is the larger, and the interval says so
    md = to_markdown(summary)
    assert md.count("| hstu |") == 4 and "| sasrec | +" in md and "nan" not in md.lower()
    paths = plot_all(points, tmp_path)
    assert set(paths) == {"loss_vs_params", "loss_vs_tokens", "frontier", "isoflop_gpt", "isoflop_hstu",
                          "isoflop_sasrec"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_feedback_loss_of_a_two_task_backbone_is_fitted_too():
    points = grid(backbones=(("hstu", ALPHA), ("argus", ALPHA)))
    for p in points:
        if p["backbone"] == "argus":  # the feedback task's own law: 0.4 + 2 N^-0.2
            p["feedback_loss"], p["feedback_auc"] = 0.4 + 2.0 * p["params"] ** -0.2, 0.7
    summary = summarise(points, n_boot=60)
    assert set(summary["feedback"]) == {"argus"}  # only backbones whose every point has the task
    fb = summary["feedback"]["argus"]
    assert abs(fb["L_N"]["alpha"] - 0.2) < 0.01 and abs(fb["extrapolation"]["rel_error"]) < 1e-3
    assert fb["alpha"]["lo"] <= 0.2 + 1e-3 and fb["by_size"][0]["feedback_auc"] == pytest.approx(0.7)
    assert "argus: the feedback task's held-out log loss" in to_markdown(summary)
