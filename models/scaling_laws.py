"""Scaling-law analysis of a grid of trained points: saturating power laws, bootstrap intervals, an extrapolation
check, the Chinchilla loss surface with its compute-optimal frontier, iso-FLOP profiles, tables and plots.

A point is a mapping with at least ``backbone``, ``params`` (N, non-embedding parameters), ``tokens`` (D, history
positions processed in training), ``compute`` (C ~ 6 N D), ``seed``, ``eval_loss`` (exact full-catalogue
cross-entropy), ``ndcg@10`` and ``hr@10``. Pure numpy / scipy / matplotlib: no torch, no training here.

The laws fitted:

- one variable: L(x) = E + A x^-alpha, E >= 0 (irreducible loss), fitted on log residuals
  log L - log(E + A x^-alpha) so that every point weighs by its *relative* error whatever the loss scale;
  when E cannot be told apart from 0 (too few points, E at a bound, E within two standard errors of 0) the
  fit falls back to the pure power law L = A x^-alpha (``form == "pure"``) and says why in ``note``;
- two variables (Hoffmann et al. 2022, "approach 3"): L(N, D) = E + A / N^alpha + B / D^beta, Huber loss on
  log residuals; minimising it under C = 6 N D gives N*(C) = G (C/6)^(beta/(alpha+beta)),
  D*(C) = G^-1 (C/6)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta));
- "approach 2": among the points near a compute budget, the N of lowest measured loss (a parabola in log N
  when three or more sizes share the budget).

R^2 is reported twice: ``r2_log`` on log L (the scale the fit minimises; the one the 0.9 flag reads) and ``r2``
on L itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

Point = Mapping[str, Any]
ALPHA_MAX = 10.0  # an exponent at this bound means the curve is a step: no power law there
R2_FLAG = 0.9
E_MIN_Z = 2.0  # E is kept when at least this many standard errors above 0 (~ a 5% test against the pure law)


# --------------------------------------------------------------------------------------------------------------
# one-variable law: L(x) = E + A x^-alpha


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A x^-alpha. ``form``: "saturating" (E fitted) or "pure" (E = 0); "none" when under 2 points."""

    E: float
    A: float
    alpha: float
    r2_log: float  # R^2 of log L (the fitted scale)
    r2: float  # R^2 of L
    n: int
    form: str
    note: str = ""

    def predict(self, x: Any) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return self.E + self.A * x ** -self.alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _r2(obs: np.ndarray, pred: np.ndarray) -> float:
    ss_res, ss_tot = float(((obs - pred) ** 2).sum()), float(((obs - obs.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else math.nan)


def _usable(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def _finish(x: np.ndarray, y: np.ndarray, E: float, A: float, alpha: float, form: str, note: str) -> PowerLawFit:
    pred = E + A * x ** -alpha
    return PowerLawFit(E=float(E), A=float(A), alpha=float(alpha), r2_log=_r2(np.log(y), np.log(pred)),
                       r2=_r2(y, pred), n=len(x), form=form, note=note)


def _pure(x: np.ndarray, y: np.ndarray, note: str) -> PowerLawFit:
    # log L = log A - alpha log x: ordinary least squares, closed form
    slope, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return _finish(x, y, 0.0, math.exp(log_a), -slope, "pure", note)


def fit_power_law(x_in: ArrayLike, y_in: ArrayLike, *, min_points_saturating: int = 4) -> PowerLawFit:
    """Fit L(x) = E + A x^-alpha (E >= 0) on log residuals; the pure power law when E is not identifiable.

    Points with a non-positive or non-finite x or y are dropped. x is scaled by its geometric mean x0 inside
    (u = x / x0, so the optimiser sees O(1) numbers); A is reported in x's own units (A = a x0^alpha).
    """
    x, y = _usable(x_in, y_in)
    if len(x) < 2 or np.ptp(np.log(x)) == 0:
        return PowerLawFit(math.nan, math.nan, math.nan, math.nan, math.nan, len(x), "none", "under 2 distinct x")
    if len(x) < min_points_saturating or len(np.unique(x)) < min_points_saturating:
        return _pure(x, y, f"under {min_points_saturating} points: E not identifiable")

    x0 = math.exp(float(np.log(x).mean()))
    lu, ly, y_min = np.log(x / x0), np.log(y), float(y.min())

    # init: a grid over E in [0, min y); for each E, log(L - E) = log a - alpha log u is linear (closed form)
    E_grid = y_min * np.linspace(0.0, 0.98, 50)  # [G]
    z = np.log(y[None, :] - E_grid[:, None])  # [G, n]
    lu_c = lu - lu.mean()
    slope = (z - z.mean(axis=1, keepdims=True)) @ lu_c / float(lu_c @ lu_c)  # [G]
    log_a = z.mean(axis=1) - slope * lu.mean()  # [G]
    alpha0 = np.clip(-slope, 1e-3, ALPHA_MAX - 1e-3)
    pred = np.log(E_grid[:, None] + np.exp(log_a[:, None] - alpha0[:, None] * lu[None, :]))  # [G, n]
    best = int(np.argmin(((ly[None, :] - pred) ** 2).sum(axis=1)))
    p0 = np.array([E_grid[best], log_a[best], alpha0[best]])

    def residuals(p: np.ndarray) -> np.ndarray:  # [n]
        E, la, alpha = p
        return ly - np.log(E + np.exp(la - alpha * lu))

    e_hi = y_min * (1 - 1e-9)
    res = least_squares(residuals, p0, bounds=([0.0, -np.inf, 1e-4], [e_hi, np.inf, ALPHA_MAX]), method="trf",
                        x_scale="jac")
    E, la, alpha = (float(v) for v in res.x)
    pure = _pure(x, y, "")

    # identifiability: E is kept only when it is off its bounds and two standard errors from 0 (linearised
    # covariance s^2 (J^T J)^-1 at the optimum)
    dof = len(x) - 3
    sse = float((res.fun ** 2).sum())
    note = ""
    if E <= 1e-6 * y_min:
        note = "E at its bound 0"
    elif E >= y_min * (1 - 1e-4):
        note = "E at min(L): degenerate"
    elif alpha >= ALPHA_MAX * (1 - 1e-4):
        note = "alpha at its bound"
    elif sse > float(((ly - np.log(pure.predict(x))) ** 2).sum()):
        note = "saturating fit no better than the pure one"
    elif dof > 0 and sse > 0:
        jtj = res.jac.T @ res.jac
        try:
            se_E = math.sqrt(max(float(np.linalg.inv(jtj)[0, 0]) * sse / dof, 0.0))
        except np.linalg.LinAlgError:
            se_E = math.inf
        if not E > E_MIN_Z * se_E:
            note = f"E not identified (E={E:.3g} within {E_MIN_Z:g} standard errors ({se_E:.3g}) of 0)"
    if note:
        return _pure(x, y, note)
    return _finish(x, y, E, math.exp(la) * x0 ** alpha, alpha, "saturating", "")


# --------------------------------------------------------------------------------------------------------------
# bootstrap over seeds


@dataclass(frozen=True)
class Interval:
    lo: float  # 2.5th percentile
    hi: float  # 97.5th percentile
    median: float

    def contains(self, v: float) -> bool:
        return self.lo <= v <= self.hi


def _interval(samples: np.ndarray) -> Interval:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return Interval(math.nan, math.nan, math.nan)
    lo, med, hi = np.percentile(samples, [2.5, 50.0, 97.5])
    return Interval(float(lo), float(hi), float(med))


@dataclass(frozen=True)
class BootstrapResult:
    fit: PowerLawFit  # on all the data
    n_boot: int
    n_ok: int  # replicates that gave a fit
    resampled: str  # "seeds" or "points"
    alpha: Interval
    E: Interval
    A: Interval
    saturating_share: float  # share of replicates whose fit kept E
    predict_x: tuple[float, ...]
    predict: tuple[Interval, ...]
    alphas: np.ndarray = field(repr=False)  # [n_ok] for differences between fits

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "alphas"}
        d["fit"] = self.fit.to_dict()
        return d


def mean_by_x(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Distinct x (sorted) and the mean y at each (seeds averaged)."""
    ux, inv = np.unique(np.asarray(x, np.float64).ravel(), return_inverse=True)
    return ux, np.bincount(inv, weights=np.asarray(y, np.float64).ravel()) / np.bincount(inv)


def _cells(rows: Sequence[Point], x_key: str, group: str) -> tuple[str, list[list[Point]]]:
    """The strata a replicate resamples. With two or more seeds at every x, each x's seeds are drawn with
    replacement on their own (a stratified bootstrap: seed noise is independent from one size to the next, and k
    seeds at m sizes give about C(2k-1, k)^m distinct replicates where drawing whole seeds gives C(2k-1, k), 3 for
    k = 2); otherwise one stratum of all points, drawn with replacement."""
    by_x: dict[Any, list[Point]] = {}
    for r in rows:
        by_x.setdefault(r[x_key], []).append(r)
    if by_x and all(len({r[group] for r in c}) >= 2 for c in by_x.values()):
        return "seeds within sizes", [sorted(c, key=lambda r: str(r[group])) for _, c in sorted(by_x.items())]
    return "points", [list(rows)]


def _draw(cells: list[list[Point]], rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, len(c), len(c)) for c in cells]


def _refit(cells: list[list[Point]], picks: list[np.ndarray], x_key: str, y_key: str,
           fitter: Callable[..., PowerLawFit]) -> PowerLawFit:
    rows = [c[i] for c, pick in zip(cells, picks) for i in pick]
    return fitter(*mean_by_x([r[x_key] for r in rows], [r[y_key] for r in rows]))


def bootstrap(points: Sequence[Point], *, x_key: str = "params", y_key: str = "eval_loss", group: str = "seed",
              n_boot: int = 1000, seed: int = 0, predict_at: Sequence[float] = (),
              fitter: Callable[..., PowerLawFit] = fit_power_law) -> BootstrapResult:
    """Percentile intervals (2.5 / 97.5) of alpha, E, A and of L at ``predict_at``, from ``n_boot`` refits on
    each size's seeds drawn with replacement (points drawn with replacement when a size has one seed; see
    ``_cells``); each replicate averages y over its drawn seeds at every x, like the point fit. Deterministic
    given ``seed``. With two seeds a size the intervals are still coarse: cite those of three or more.
    """
    rows = list(points)
    full = fitter(*mean_by_x([r[x_key] for r in rows], [r[y_key] for r in rows]))
    kind, cells = _cells(rows, x_key, group)
    rng = np.random.default_rng(seed)
    xs = np.asarray(predict_at, np.float64)
    params, preds, saturating = [], [], 0
    for _ in range(n_boot):
        f = _refit(cells, _draw(cells, rng), x_key, y_key, fitter)
        if f.form == "none" or not math.isfinite(f.alpha):
            continue
        params.append((f.alpha, f.E, f.A))
        preds.append(f.predict(xs))
        saturating += f.form == "saturating"
    p = np.asarray(params, np.float64).reshape(-1, 3)  # [n_ok, 3]
    pr = np.asarray(preds, np.float64).reshape(len(params), len(xs))  # [n_ok, len(xs)]
    return BootstrapResult(fit=full, n_boot=n_boot, n_ok=len(p), resampled=kind, alpha=_interval(p[:, 0]),
                           E=_interval(p[:, 1]), A=_interval(p[:, 2]),
                           saturating_share=saturating / len(p) if len(p) else math.nan,
                           predict_x=tuple(float(v) for v in xs),
                           predict=tuple(_interval(pr[:, j]) for j in range(len(xs))), alphas=p[:, 0])


@dataclass(frozen=True)
class AlphaDifference:
    """alpha(a) - alpha(b) and its bootstrap interval; ``paired``: both refits drew the same seeds."""

    a: str
    b: str
    diff: float
    interval: Interval
    paired: bool
    common_seeds: int
    n_ok: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_alpha(points_a: Sequence[Point], points_b: Sequence[Point], *, names: tuple[str, str] = ("a", "b"),
                  x_key: str = "params", y_key: str = "eval_loss", group: str = "seed", n_boot: int = 1000,
                  seed: int = 0, fitter: Callable[..., PowerLawFit] = fit_power_law) -> AlphaDifference:
    """alpha(a) - alpha(b) with a percentile interval. Paired when both have the same seeds at each size (rank):
    each replicate draws each size's seeds once and refits both on them, so a seed's luck shared by both cancels;
    else the two are resampled independently."""
    a, b = list(points_a), list(points_b)
    fa = fitter(*mean_by_x([r[x_key] for r in a], [r[y_key] for r in a]))
    fb = fitter(*mean_by_x([r[x_key] for r in b], [r[y_key] for r in b]))
    kind_a, ca = _cells(a, x_key, group)
    kind_b, cb = _cells(b, x_key, group)
    # paired: the same sizes (by rank) hold the same seeds in both, so one draw picks the same seeds for both
    paired = (kind_a == kind_b == "seeds within sizes" and len(ca) == len(cb)
              and all([r[group] for r in u] == [r[group] for r in v] for u, v in zip(ca, cb)))
    common = sorted({r[group] for r in a} & {r[group] for r in b}, key=str)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        pa = _draw(ca, rng)
        pb = pa if paired else _draw(cb, rng)
        diffs.append(_refit(ca, pa, x_key, y_key, fitter).alpha - _refit(cb, pb, x_key, y_key, fitter).alpha)
    d = np.asarray(diffs, np.float64)
    return AlphaDifference(a=names[0], b=names[1], diff=fa.alpha - fb.alpha, interval=_interval(d),
                           paired=paired, common_seeds=len(common), n_ok=int(np.isfinite(d).sum()))


# --------------------------------------------------------------------------------------------------------------
# extrapolation: does the law fitted on the smaller sizes predict the largest?


@dataclass(frozen=True)
class ExtrapolationCheck:
    x_heldout: float
    predicted: float
    measured: float  # mean over seeds at the held-out x
    rel_error: float  # (predicted - measured) / measured, signed
    fit: PowerLawFit  # on all but the largest x

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fit"] = self.fit.to_dict()
        return d


def extrapolation_check(x: ArrayLike, y: ArrayLike,
                        fitter: Callable[..., PowerLawFit] = fit_power_law) -> ExtrapolationCheck:
    """Fit on every x but the largest (seeds averaged), predict the largest, compare with its measured mean."""
    ux, uy = mean_by_x(*_usable(x, y))
    if len(ux) < 3:
        nan = math.nan
        return ExtrapolationCheck(nan, nan, nan, nan, PowerLawFit(nan, nan, nan, nan, nan, len(ux), "none",
                                                                  "under 3 distinct x"))
    fit = fitter(ux[:-1], uy[:-1])
    predicted = float(fit.predict(ux[-1]))
    return ExtrapolationCheck(x_heldout=float(ux[-1]), predicted=predicted, measured=float(uy[-1]),
                              rel_error=(predicted - float(uy[-1])) / float(uy[-1]), fit=fit)


# --------------------------------------------------------------------------------------------------------------
# two-variable law and the compute-optimal frontier


@dataclass(frozen=True)
class SurfaceFit:
    """L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla approach 3)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    r2_log: float
    n: int
    huber_delta: float

    def predict(self, N: Any, D: Any) -> np.ndarray:
        N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
        return self.E + self.A * N ** -self.alpha + self.B * D ** -self.beta

    @property
    def n_exponent(self) -> float:
        """a in N*(C) ~ C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        """b in D*(C) ~ C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal(self, compute: Any) -> tuple[np.ndarray, np.ndarray]:
        """(N*(C), D*(C)) minimising L under C = 6 N D."""
        c6 = np.asarray(compute, np.float64) / 6.0
        return self.G * c6 ** self.n_exponent, c6 ** self.d_exponent / self.G

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_exponent": self.n_exponent, "d_exponent": self.d_exponent, "G": self.G}


def fit_loss_surface(N_in: ArrayLike, D_in: ArrayLike, L_in: ArrayLike, *, huber_delta: float = 1e-3) -> SurfaceFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta with the Huber loss (delta ``huber_delta``, Chinchilla's 1e-3) on
    log residuals. Starts: a grid over (E, alpha, beta) where A, B solve the then-linear least squares; the three
    best starts are refined and the lowest objective kept. N and D are scaled by their geometric means inside.
    """
    N, D, L = (np.asarray(v, np.float64).ravel() for v in (N_in, D_in, L_in))
    ok = (N > 0) & (D > 0) & (L > 0) & np.isfinite(N) & np.isfinite(D) & np.isfinite(L)
    N, D, L = N[ok], D[ok], L[ok]
    if len(L) < 6 or len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError(f"a loss surface needs >= 6 points over >= 2 sizes and >= 2 data sizes, got {len(L)}")
    n0, d0 = math.exp(float(np.log(N).mean())), math.exp(float(np.log(D).mean()))
    ln, ld, lL, L_min = np.log(N / n0), np.log(D / d0), np.log(L), float(L.min())

    starts = []
    for E in L_min * np.array([0.0, 0.3, 0.6, 0.8, 0.95]):
        for alpha in (0.05, 0.15, 0.3, 0.6, 1.0):
            for beta in (0.05, 0.15, 0.3, 0.6, 1.0):
                X = np.stack([np.exp(-alpha * ln), np.exp(-beta * ld)], axis=1)  # [n, 2]
                coef, *_ = np.linalg.lstsq(X, L - E, rcond=None)
                coef = np.maximum(coef, 1e-6)
                sse = float(((lL - np.log(E + X @ coef)) ** 2).sum())
                starts.append((sse, [E, math.log(coef[0]), alpha, math.log(coef[1]), beta]))
    starts.sort(key=lambda s: s[0])

    def residuals(p: np.ndarray) -> np.ndarray:  # [n]
        E, a, alpha, b, beta = p
        return lL - np.log(E + np.exp(a - alpha * ln) + np.exp(b - beta * ld))

    lo, hi = [0.0, -np.inf, 1e-4, -np.inf, 1e-4], [L_min * (1 - 1e-9), np.inf, ALPHA_MAX, np.inf, ALPHA_MAX]
    fits = [least_squares(residuals, np.clip(p0, np.array(lo) + 1e-12, np.array(hi) - 1e-12), bounds=(lo, hi),
                          loss="huber", f_scale=huber_delta, method="trf") for _, p0 in starts[:3]]
    E, a, alpha, b, beta = (float(v) for v in min(fits, key=lambda r: r.cost).x)
    A, B = math.exp(a) * n0 ** alpha, math.exp(b) * d0 ** beta
    fit = SurfaceFit(E=E, A=A, alpha=alpha, B=B, beta=beta, r2_log=0.0, n=len(L), huber_delta=huber_delta)
    return SurfaceFit(**{**asdict(fit), "r2_log": _r2(lL, np.log(fit.predict(N, D)))})


@dataclass(frozen=True)
class IsoFlopProfile:
    """L along C = 6 N D as a function of N, from a surface fit; its minimum is the surface's N*(C)."""

    compute: float
    N: tuple[float, ...]
    D: tuple[float, ...]
    L: tuple[float, ...]
    N_opt: float
    L_opt: float


def isoflop_profiles(surface: SurfaceFit, budgets: ArrayLike, *, span: float = 30.0,
                     n_grid: int = 61) -> list[IsoFlopProfile]:
    """For each budget C, L(N, C / 6N) for N over [N*/span, N* span] (log grid), and the optimum."""
    out = []
    for c in np.asarray(budgets, np.float64).ravel():
        n_star, d_star = surface.optimal(c)
        Ns = np.geomspace(float(n_star) / span, float(n_star) * span, n_grid)
        Ds = c / (6.0 * Ns)
        Ls = surface.predict(Ns, Ds)
        out.append(IsoFlopProfile(compute=float(c), N=tuple(Ns.tolist()), D=tuple(Ds.tolist()), L=tuple(Ls.tolist()),
                                  N_opt=float(n_star), L_opt=float(surface.predict(n_star, d_star))))
    return out


@dataclass(frozen=True)
class IsoFlopBin:
    """Approach 2 at one budget: the measured points within ``tolerance_dex`` of it (seeds averaged per N)."""

    compute: float  # the bin's centre (geometric mean of its points' compute)
    params: tuple[float, ...]
    losses: tuple[float, ...]
    N_best: float  # the size of lowest measured loss
    L_best: float
    bracketed: bool  # N_best has a measured size on each side: a minimum, not the edge of the grid
    N_parabola: float  # vertex of a parabola in log N through the bin, nan when < 3 sizes or no interior minimum


def isoflop_empirical(points: Sequence[Point], budgets: ArrayLike | None = None, *,
                      tolerance_dex: float = 0.15, min_sizes: int = 3) -> list[IsoFlopBin]:
    """Bin points near each budget (|log10 C - log10 budget| <= ``tolerance_dex``); without budgets, points are
    clustered greedily in log10 C (width 2 x tolerance). Bins with fewer than ``min_sizes`` distinct N are
    skipped: the grid does not allow approach 2 there."""
    rows = [p for p in points if p["compute"] > 0 and math.isfinite(p["eval_loss"])]
    lc = np.log10([p["compute"] for p in rows])
    if budgets is None:
        centres, order, start = [], np.argsort(lc), 0
        while start < len(order):
            stop = start
            while stop + 1 < len(order) and lc[order[stop + 1]] - lc[order[start]] <= 2 * tolerance_dex:
                stop += 1
            centres.append(float(lc[order[start:stop + 1]].mean()))
            start = stop + 1
    else:
        centres = np.log10(np.asarray(budgets, np.float64).ravel()).tolist()
    out = []
    for centre in centres:
        near = [r for r, v in zip(rows, lc) if abs(v - centre) <= tolerance_dex]
        if len({r["params"] for r in near}) < min_sizes:
            continue
        Ns, Ls = mean_by_x([r["params"] for r in near], [r["eval_loss"] for r in near])
        i = int(np.argmin(Ls))
        vertex = math.nan
        if len(Ns) >= 3:
            c2, c1, _ = np.polyfit(np.log(Ns), Ls, 2)
            if c2 > 0 and np.log(Ns[0]) <= -c1 / (2 * c2) <= np.log(Ns[-1]):
                vertex = math.exp(-c1 / (2 * c2))
        out.append(IsoFlopBin(compute=10 ** centre, params=tuple(Ns.tolist()),
                              losses=tuple(Ls.tolist()), N_best=float(Ns[i]), L_best=float(Ls[i]),
                              bracketed=0 < i < len(Ns) - 1, N_parabola=vertex))
    return out


def approach2_exponent(bins: Sequence[IsoFlopBin]) -> float:
    """a in N_best ~ C^a by least squares in log-log over the bracketed bins; nan under two of them."""
    ok = [b for b in bins if b.bracketed]
    if len({b.compute for b in ok}) < 2:
        return math.nan
    return float(np.polyfit(np.log([b.compute for b in ok]), np.log([b.N_best for b in ok]), 1)[0])


# --------------------------------------------------------------------------------------------------------------
# the whole report


def _near_max(rows: Sequence[Point], key: str, rtol: float = 0.01) -> list[Point]:
    """Rows whose ``key`` is within ``rtol`` of its largest value (the largest data size / model size)."""
    top = max(r[key] for r in rows)
    return [r for r in rows if r[key] >= top * (1 - rtol)]


def _jsonable(v: Any) -> Any:
    """Strict JSON: non-finite floats become None, numpy scalars and arrays plain Python."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def surface_of(rows: Sequence[Point]) -> SurfaceFit | None:
    """The loss surface of one backbone's points on seed means per (N, D) (seeds are repeats of a point, not
    more points of the law); None when the grid has under 6 cells or a single N or D."""
    keys = sorted({(r["params"], r["tokens"]) for r in rows})
    if len(keys) < 6 or len({k[0] for k in keys}) < 2 or len({k[1] for k in keys}) < 2:
        return None
    L = [float(np.mean([r["eval_loss"] for r in rows if (r["params"], r["tokens"]) == k])) for k in keys]
    return fit_loss_surface([k[0] for k in keys], [k[1] for k in keys], L)


def backbone_summary(rows: Sequence[Point], *, n_boot: int = 1000, seed: int = 0,
                     r2_threshold: float = R2_FLAG) -> dict[str, Any]:
    """Everything the report needs for one backbone (see ``summarise``)."""
    at_d = _near_max(rows, "tokens")  # L(N): the largest data size
    at_n = _near_max(rows, "params")  # L(D): the largest model
    sizes = sorted({r["params"] for r in rows})
    boot = bootstrap(at_d, n_boot=n_boot, seed=seed, predict_at=[sizes[-1], 10 * sizes[-1]])
    l_n = boot.fit
    ext = extrapolation_check([r["params"] for r in at_d], [r["eval_loss"] for r in at_d])
    l_d = fit_power_law(*mean_by_x([r["tokens"] for r in at_n], [r["eval_loss"] for r in at_n]))
    out: dict[str, Any] = {
        "points": len(rows), "sizes": sizes, "data_sizes": sorted({r["tokens"] for r in rows}),
        "seeds": sorted({r["seed"] for r in rows}, key=str), "tokens_for_L_N": max(r["tokens"] for r in rows),
        "params_for_L_D": sizes[-1],
        "L_N": l_n.to_dict(), "L_N_bootstrap": boot.to_dict(), "L_N_r2_ok": bool(l_n.r2_log >= r2_threshold),
        "extrapolation": ext.to_dict(), "L_D": l_d.to_dict(),
        "metrics_by_size": [{"params": n, **{k: float(np.mean([r[k] for r in at_d if r["params"] == n]))
                                             for k in ("eval_loss", "ndcg@10", "hr@10")}}
                            for n in sorted({r["params"] for r in at_d})],
        "surface": None,
    }
    bins = isoflop_empirical(rows)
    out["isoflop"] = [asdict(b) for b in bins]
    out["approach2_n_exponent"] = approach2_exponent(bins)
    surface = surface_of(rows)
    out["surface"] = None if surface is None else surface.to_dict()
    return out


def summarise(points: Sequence[Point], *, reference: str = "hstu", n_boot: int = 1000, seed: int = 0,
              r2_threshold: float = R2_FLAG) -> dict[str, Any]:
    """Per backbone: the L(N) fit at the largest data size (seeds averaged per N) with bootstrap intervals, the
    extrapolation check, the R^2 (log L) >= ``r2_threshold`` flag, the L(D) fit at the largest size, the loss
    surface with its N*(C) exponent, approach-2 bins and their N*(C) exponent; plus alpha(reference) -
    alpha(other) for every other backbone with a bootstrap interval (paired by seed where seeds match).
    Strict-JSON serialisable."""
    by_bb: dict[str, list[Point]] = {}
    for p in points:
        by_bb.setdefault(str(p["backbone"]), []).append(p)
    backbones = {name: backbone_summary(rows, n_boot=n_boot, seed=seed, r2_threshold=r2_threshold)
                 for name, rows in sorted(by_bb.items())}
    comparisons = []
    if reference in by_bb:
        ref_rows = _near_max(by_bb[reference], "tokens")
        for name, rows in sorted(by_bb.items()):
            if name != reference:
                comparisons.append(compare_alpha(ref_rows, _near_max(rows, "tokens"), names=(reference, name),
                                                 n_boot=n_boot, seed=seed).to_dict())
    # ARGUS's second task: does its held-out feedback log loss follow a power law in N too?
    feedback = {name: feedback_summary(rows, n_boot=n_boot, seed=seed) for name, rows in sorted(by_bb.items())
                if all(r.get("feedback_loss") is not None for r in rows)}
    return _jsonable({"reference": reference, "n_boot": n_boot, "seed": seed, "r2_threshold": r2_threshold,
                      "r2_on": "log L", "backbones": backbones, "comparisons": comparisons, "feedback": feedback})


def feedback_summary(rows: Sequence[Point], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The feedback task's log loss against N at the largest data size: fit, bootstrap of alpha, extrapolation."""
    at_d = _near_max(rows, "tokens")
    x, y = [r["params"] for r in at_d], [r["feedback_loss"] for r in at_d]
    fit = fit_power_law(*mean_by_x(x, y))
    boot = bootstrap(at_d, y_key="feedback_loss", n_boot=n_boot, seed=seed)
    return {"L_N": fit.to_dict(), "alpha": boot.to_dict()["alpha"], "extrapolation": extrapolation_check(x, y).to_dict(),
            "by_size": [{"params": n, "feedback_loss": float(np.mean([r["feedback_loss"] for r in at_d if r["params"] == n])),
                         "feedback_auc": float(np.mean([r.get("feedback_auc", math.nan) for r in at_d if r["params"] == n]))}
                        for n in sorted(set(x))]}


def _f(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def to_markdown(summary: Mapping[str, Any]) -> str:
    """Tables for the docs: L(N) fits with alpha's interval, the extrapolation check, L(D), the surface and
    frontier, and the alpha differences."""
    bbs = summary["backbones"]
    out = [f"L(N) = E + A·N^-α at each backbone's largest data size (seeds averaged; R² on log L, flag at "
           f"{summary['r2_threshold']}; 95% bootstrap over {summary['n_boot']} resamples)", "",
           "| backbone | form | E | A | α | α 95% CI | R² (log L) | R² (L) | R² ok | points |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in bbs.items():
        f, ci = s["L_N"], s["L_N_bootstrap"]["alpha"]
        out.append(f"| {name} | {f['form']} | {_f(f['E'])} | {_f(f['A'])} | {_f(f['alpha'])} | "
                   f"[{_f(ci['lo'])}, {_f(ci['hi'])}] | {_f(f['r2_log'], '.3f')} | {_f(f['r2'], '.3f')} | "
                   f"{'yes' if s['L_N_r2_ok'] else 'no'} | {f['n']} |")
    out += ["", "Extrapolation: fit on all but the largest N, predict it", "",
            "| backbone | held-out N | predicted L | measured L | relative error |", "|---|---|---|---|---|"]
    for name, s in bbs.items():
        e = s["extrapolation"]
        out.append(f"| {name} | {_f(e['x_heldout'], '.3g')} | {_f(e['predicted'])} | {_f(e['measured'])} | "
                   f"{_f(None if e['rel_error'] is None else 100 * e['rel_error'], '+.2f')}% |")
    out += ["", "L(D) = E + B·D^-β at each backbone's largest size", "",
            "| backbone | form | E | B | β | R² (log L) | points |", "|---|---|---|---|---|---|---|"]
    for name, s in bbs.items():
        f = s["L_D"]
        out.append(f"| {name} | {f['form']} | {_f(f['E'])} | {_f(f['A'])} | {_f(f['alpha'])} | "
                   f"{_f(f['r2_log'], '.3f')} | {f['n']} |")
    out += ["", "Loss surface L(N, D) = E + A/N^α + B/D^β and the compute-optimal frontier N* ∝ C^a, "
            "D* ∝ C^b", "",
            "(a from approach 2: least squares over the compute bins whose best measured N is bracketed)", "",
            "| backbone | E | A | α | B | β | R² (log L) | a = β/(α+β) | b = α/(α+β) | a (approach 2) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in bbs.items():
        f, a2 = s["surface"], _f(s["approach2_n_exponent"], ".3f")
        if f is None:
            out.append(f"| {name} | – | – | – | – | – | – | – | – | {a2} |")
        else:
            out.append(f"| {name} | {_f(f['E'])} | {_f(f['A'])} | {_f(f['alpha'])} | {_f(f['B'])} | "
                       f"{_f(f['beta'])} | {_f(f['r2_log'], '.3f')} | {_f(f['n_exponent'], '.3f')} | "
                       f"{_f(f['d_exponent'], '.3f')} | {a2} |")
    if summary["comparisons"]:
        out += ["", f"α({summary['reference']}) − α(other), 95% bootstrap interval", "",
                "| other | difference | 95% CI | paired by seed | common seeds |", "|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            out.append(f"| {c['b']} | {_f(c['diff'], '+.4f')} | [{_f(c['interval']['lo'], '+.4f')}, "
                       f"{_f(c['interval']['hi'], '+.4f')}] | {'yes' if c['paired'] else 'no'} | "
                       f"{c['common_seeds']} |")
    for name, fb in (summary.get("feedback") or {}).items():
        f, ci, e = fb["L_N"], fb["alpha"], fb["extrapolation"]
        out += ["", f"{name}: the feedback task's held-out log loss L_fb(N) = E + A·N^-α", "",
                "| form | E | A | α | α 95% CI | R² (log L) | extrapolation error | AUC by size |",
                "|---|---|---|---|---|---|---|---|",
                f"| {f['form']} | {_f(f['E'])} | {_f(f['A'])} | {_f(f['alpha'])} | [{_f(ci['lo'])}, {_f(ci['hi'])}] | "
                f"{_f(f['r2_log'], '.3f')} | {_f(None if e['rel_error'] is None else 100 * e['rel_error'], '+.2f')}% | "
                + ", ".join(_f(b["feedback_auc"], ".3f") for b in fb["by_size"]) + " |"]
    return "\n".join(out) + "\n"


def write_summary(summary: Mapping[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, allow_nan=False))
    return path


# --------------------------------------------------------------------------------------------------------------
# plots


def _by_backbone(points: Iterable[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(str(p["backbone"]), []).append(p)
    return dict(sorted(out.items()))


def _spread(rows: Sequence[Point], x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct x, and the mean, min, max of the loss over seeds at each."""
    xs = np.array(sorted({r[x_key] for r in rows}), np.float64)
    ys = [np.array([r["eval_loss"] for r in rows if r[x_key] == x]) for x in xs]
    return xs, np.array([y.mean() for y in ys]), np.array([y.min() for y in ys]), np.array([y.max() for y in ys])


def plot_loss_vs_params(points: Sequence[Point], path: Path) -> Path:
    """(a) L vs N (log-log), one colour per backbone, at its largest data size: seed means with min–max bars,
    the law fitted on all sizes but the largest (solid), extended dashed to the held-out largest size."""
    from models.plots import _save, plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in _by_backbone(points).items():
        at_d = _near_max(rows, "tokens")
        xs, mean, lo, hi = _spread(at_d, "params")
        bars = ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], fmt="o", ms=4, capsize=2, label=name)
        colour = bars[0].get_color()
        ext = extrapolation_check([r["params"] for r in at_d], [r["eval_loss"] for r in at_d])
        if ext.fit.form != "none":
            fitted = np.geomspace(xs[0], xs[-2], 50)
            ax.plot(fitted, ext.fit.predict(fitted), "-", color=colour, lw=1,
                    label=f"{name}: α={ext.fit.alpha:.3f} ({ext.fit.form})")
            held = np.geomspace(xs[-2], xs[-1], 20)
            ax.plot(held, ext.fit.predict(held), "--", color=colour, lw=1)
            ax.plot([xs[-1]], [ext.predicted], "x", color=colour, ms=7)
    ax.set(xscale="log", yscale="log", xlabel="N (non-embedding parameters)", ylabel="eval loss (full softmax CE)",
           title="loss vs size (dashed: extrapolated to the held-out largest size, ×: its prediction)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_vs_tokens(points: Sequence[Point], path: Path) -> Path:
    """(b) L vs D, one panel per backbone, one line per size (seed means, min–max band); dotted: the surface
    fit's L(N, D) where one could be fitted."""
    from models.plots import _save, plt

    groups = _by_backbone(points)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], groups.items()):
        surface = surface_of(rows)
        for n in sorted({r["params"] for r in rows}):
            xs, mean, lo, hi = _spread([r for r in rows if r["params"] == n], "tokens")
            (line,) = ax.plot(xs, mean, "o-", ms=3, label=f"N={n:.3g}")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
            if surface is not None:
                grid = np.geomspace(xs[0], xs[-1], 40)
                ax.plot(grid, surface.predict(n, grid), ":", color=line.get_color(), lw=1)
        ax.set(xscale="log", yscale="log", xlabel="D (training tokens)", ylabel="eval loss", title=name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_isoflop(points: Sequence[Point], path: Path, *, backbone: str | None = None,
                 budgets: ArrayLike | None = None, tolerance_dex: float = 0.15) -> Path:
    """(c) Iso-FLOP profiles of one backbone (the first, alphabetically, by default): L along C = 6 N D against
    N from the surface fit, its optimum starred; measured points within ``tolerance_dex`` of each budget."""
    from models.plots import _save, plt

    groups = _by_backbone(points)
    name = backbone or next(iter(groups))
    rows = groups[name]
    surface = surface_of(rows)
    if surface is None:
        raise ValueError(f"{name}: too few (N, D) cells for a loss surface")
    if budgets is None:  # five budgets across the measured compute range
        lc = np.log10([r["compute"] for r in rows])
        budgets = np.logspace(float(np.percentile(lc, 20)), float(np.percentile(lc, 95)), 5)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = {round(math.log10(b.compute), 6): b for b in isoflop_empirical(rows, budgets, tolerance_dex=tolerance_dex,
                                                                         min_sizes=1)}
    for prof in isoflop_profiles(surface, budgets):
        (line,) = ax.plot(prof.N, prof.L, "-", lw=1, label=f"C={prof.compute:.2g}")
        ax.plot([prof.N_opt], [prof.L_opt], "*", color=line.get_color(), ms=11, mec="k", mew=0.5)
        b = bins.get(round(math.log10(prof.compute), 6))
        if b is not None:
            ax.plot(b.params, b.losses, "o", color=line.get_color(), ms=4, mfc="none")
    ax.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="eval loss",
           title=f"{name}: iso-FLOP profiles from the surface fit (★ optimum, ○ measured near the budget)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_frontier(points: Sequence[Point], path: Path) -> Path:
    """(d) N*(C) log-log per backbone: the surface fit's frontier (line, exponent in the legend) over the
    measured compute range, and approach 2's best measured size per compute bin where it is bracketed."""
    from models.plots import _save, plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (name, rows) in enumerate(_by_backbone(points).items()):
        cs = np.geomspace(min(r["compute"] for r in rows), max(r["compute"] for r in rows), 50)
        colour = None
        surface = surface_of(rows)
        if surface is not None:
            (line,) = ax.plot(cs, surface.optimal(cs)[0], "-", label=f"{name}: N* ∝ C^{surface.n_exponent:.3f}")
            colour = line.get_color()
        bins = [b for b in isoflop_empirical(rows) if b.bracketed]  # an edge of the grid is no optimum
        if bins:
            ax.plot([b.compute for b in bins], [b.N_best for b in bins], "os^Dvp"[k % 6], color=colour, ms=6,
                    mfc="none", label=f"{name}: best measured N per compute bin")
    ax.set(xscale="log", yscale="log", xlabel="C (FLOPs, 6·N·D)", ylabel="N* (compute-optimal size)",
           title="compute-optimal frontier")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(points: Sequence[Point], out_dir: Path) -> dict[str, Path]:
    """The four figures under ``out_dir``; the iso-FLOP one for every backbone with enough points."""
    out_dir = Path(out_dir)
    paths = {"loss_vs_params": plot_loss_vs_params(points, out_dir / "loss_vs_params.png"),
             "loss_vs_tokens": plot_loss_vs_tokens(points, out_dir / "loss_vs_tokens.png"),
             "frontier": plot_frontier(points, out_dir / "frontier.png")}
    for name, rows in _by_backbone(points).items():
        if surface_of(rows) is not None:
            paths[f"isoflop_{name}"] = plot_isoflop(points, out_dir / f"isoflop_{name}.png", backbone=name)
    return paths
