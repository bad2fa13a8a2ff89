"""Scaling-law fits for NaViL-style studies: the Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta
(`fit_scaling_law`) and NaViL's joint ViT/LLM scaling, the loss-minimising ViT size against the LLM size
(`fit_joint`), with their result classes (`ScalingFit`, `JointFit`).

    from navil_hf.research.scaling import read_runs, fit_scaling_law, fit_joint
    runs = read_runs("runs.csv")
    fit = fit_scaling_law(runs.N, runs.D, runs.loss, bootstrap=200, holdout=0.1)
    print(fit.summary()); fit.predict(1e9, 2e10); fit.compute_optimal(1e21); fit.plot("fit.png")

The method (objective, numerics, uncertainty, allocation, the joint fit, runs files) is described in
docs/research/scaling.md; the command line is `navil scaling fit|joint` (`navil_hf/commands/scaling.py`). The
runs file is read by `runs.py`, the reports are written by `report.py` and the plots drawn by `plots.py`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from . import plots, report
from .runs import MIN_RUNS, Runs, RunsError, read_runs

__all__ = [
    "COARSE_GRID",
    "COLLAPSED",
    "GRADIENT_TOLERANCE",
    "GRIDS",
    "HOFFMANN_GRID",
    "LEVELS",
    "MAX_EXPONENT",
    "MIN_RUNS",
    "PARAMETERS",
    "JointFit",
    "Runs",
    "RunsError",
    "ScalingFit",
    "fit_joint",
    "fit_scaling_law",
    "read_runs",
]

PARAMETERS = ("E", "A", "B", "alpha", "beta")
# The grids of starting points, axes in the order (a, b, e, alpha, beta) of the optimiser's vector.
HOFFMANN_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
COARSE_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, 0.0, 1.0),
    "alpha": (0.25, 0.5, 1.0),
    "beta": (0.25, 0.5, 1.0),
}
GRIDS = {"hoffmann": HOFFMANN_GRID, "coarse": COARSE_GRID}
GRADIENT_TOLERANCE = 1e-6  # largest component of the normalised gradient at a converged fit
LEVELS = (0.8, 0.95)
# Beyond this an exponent makes its term a step inside the runs, not a power law (published fits: 0.2-0.8).
MAX_EXPONENT = 3.0
# Below this a coefficient has collapsed (losses are O(1) nats; the unconstrained fit can drive E to 1e-114).
COLLAPSED = 1e-9


def _check_arrays(N, D, loss, source="runs"):
    arrays = [np.asarray(x, dtype=float).ravel() for x in (N, D, loss)]
    if len({len(x) for x in arrays}) != 1:
        raise RunsError(f"{source}: N, D and loss differ in length ({', '.join(str(len(x)) for x in arrays)})")
    for name, x in zip(("N", "D", "loss"), arrays):
        bad = ~(np.isfinite(x) & (x > 0))
        if bad.any():
            raise RunsError(f"{source}: {name} must be positive and finite (run {int(np.argmax(bad))}: {x[bad][0]})")
    if len(arrays[0]) < MIN_RUNS:
        raise RunsError(f"{source}: {len(arrays[0])} runs; the 5-parameter fit needs at least {MIN_RUNS}")
    return arrays


def _one_blas_thread():
    """Limit BLAS to one thread while fitting (with threadpoolctl, when installed): every matrix here is tiny,
    and on a busy machine OpenBLAS's threads make scipy's L-BFGS-B 5-10x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ------------------------------------------------------------------------------------------ the objective


def _predict_log(P, lN, lD):
    """log(E + A N^-alpha + B D^-beta) for parameter rows P (..., 5) = (a, b, e, alpha, beta)."""
    P = np.asarray(P, dtype=float)
    a, b, e, alpha, beta = (P[..., i, None] for i in range(5))
    return np.logaddexp(np.logaddexp(a - alpha * lN, b - beta * lD), e)


def _huber(r, tau):
    ar = np.abs(r)
    return np.where(ar <= tau, 0.5 * r * r, tau * (ar - 0.5 * tau))


def _batch(P, lN, lD, y, c, tau, jac, exact=False):
    """The Huber objective sum_i c_i h_tau(r_i) of K parameter rows P (K, 5) at once (weights c: (n,) or (K, n);
    tau: scalar or (K, 1)); with `jac` also its gradient (K, 5) and a curvature matrix (K, 5, 5): the reweighted
    Gauss-Newton matrix J^T diag(c psi(r)/r) J, whose quadratic majorises the Huber loss, or with `exact` the
    exact Hessian (the objective is C^1; that of its current quadratic/linear pieces)."""
    a, b, e, alpha, beta = (P[:, i, None] for i in range(5))
    t0 = a - alpha * lN
    t1 = b - beta * lD
    m = np.maximum(np.maximum(t0, t1), e)
    w0 = np.exp(t0 - m)
    w1 = np.exp(t1 - m)
    w2 = np.exp(e - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - y
    f = (c * _huber(r, tau)).sum(axis=1)
    if not jac:
        return f
    w0 /= s
    w1 /= s
    w2 /= s
    J = np.stack([w0, w1, w2, -w0 * lN, -w1 * lD], axis=1)  # (K, 5, n): d r / d (a, b, e, alpha, beta)
    psi = c * np.clip(r, -tau, tau)
    g = (J @ psi[:, :, None])[:, :, 0]
    if not exact:
        omega = c * np.minimum(1.0, tau / np.maximum(np.abs(r), 1e-300))
        return f, g, (J * omega[:, None, :]) @ J.transpose(0, 2, 1)
    inside = c * (np.abs(r) <= tau)
    H = (J * (inside - psi)[:, None, :]) @ J.transpose(0, 2, 1)
    # + sum_i psi_i sum_j w_ij v_ij v_ij^T, v_0 = (1, 0, 0, -log N, 0), v_1 = (0, 1, 0, 0, -log D), v_2 = e_2
    for i, k, x, q in ((0, 3, lN, psi * w0), (1, 4, lD, psi * w1)):
        s0, s1, s2 = q.sum(axis=1), -(q * x).sum(axis=1), (q * x * x).sum(axis=1)
        H[:, i, i] += s0
        H[:, i, k] += s1
        H[:, k, i] += s1
        H[:, k, k] += s2
    H[:, 2, 2] += (psi * w2).sum(axis=1)
    return f, g, H


def _batch_lm(P, lN, lD, y, c=1.0, tau=1e-3, iters=50, rtol=1e-13, exact=False, gtol=None):
    """Vectorised Levenberg-Marquardt from each row of P on the Huber objective: iteratively reweighted
    Gauss-Newton, or with `exact` damped Newton. A row stops on a relative decrease < rtol (Gauss-Newton only),
    on a normalised gradient (gradient / (sum(c) tau^2)) <= gtol, or when no step descends.
    Returns (P, f, settled, gradient): gradient is each row's largest normalised gradient component."""
    P = np.array(P, dtype=float)
    K = len(P)
    c = np.asarray(c, dtype=float)
    tau = np.asarray(tau, dtype=float)
    norm = (np.broadcast_to(c, (K, len(y))).sum(axis=1) * np.broadcast_to(tau, (K, 1))[:, 0] ** 2)[:, None]

    def rows(x, idx):
        return x[idx] if x.ndim == 2 else x

    f, g, H = _batch(P, lN, lD, y, c, tau, True, exact)
    lam = np.full(K, 1e-6 if exact else 1e-3)
    active = np.isfinite(f)
    settled = np.zeros(K, dtype=bool)
    eye = np.eye(5)
    for _ in range(iters):
        if gtol is not None:
            settled |= np.max(np.abs(g) / norm, axis=1) <= gtol
            active &= ~settled
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        Hk = H[idx]
        d = np.abs(np.einsum("kii->ki", Hk))
        damp = lam[idx, None] * (d if not exact else d.max(axis=1, keepdims=True)) + 1e-12 * (
            1.0 + d.max(axis=1, keepdims=True)
        )
        try:
            step = np.linalg.solve(Hk + damp[:, :, None] * eye, -g[idx][:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = -g[idx] / (d + damp)
        trial = P[idx] + step
        cc, tt = rows(c, idx), rows(tau, idx)
        if exact:  # near the optimum f stops resolving; a step that keeps f and shrinks the gradient counts
            ft, gt, Ht = _batch(trial, lN, lD, y, cc, tt, True, True)
            smaller = np.max(np.abs(gt), axis=1) < np.max(np.abs(g[idx]), axis=1)
            ok = np.isfinite(ft) & ((ft < f[idx]) | ((ft <= f[idx] * (1 + 1e-14)) & smaller))
        else:
            ft = _batch(trial, lN, lD, y, cc, tt, False)
            ok = np.isfinite(ft) & (ft <= f[idx])
        good, bad = idx[ok], idx[~ok]
        if len(good):
            decrease = (f[good] - ft[ok]) / np.maximum(np.abs(f[good]), 1e-300)
            P[good] = trial[ok]
            if exact:
                f[good], g[good], H[good] = ft[ok], gt[ok], Ht[ok]
            else:
                f[good], g[good], H[good] = _batch(P[good], lN, lD, y, rows(c, good), rows(tau, good), True)
                settled[good[decrease < rtol]] = True
            lam[good] = np.maximum(lam[good] * 0.3, 1e-12)
        lam[bad] *= 10.0
        settled[bad[lam[bad] > 1e10]] = True
        active &= ~settled
    return P, f, settled, np.max(np.abs(g) / norm, axis=1)


def _fun_grad(p, lN, lD, y, c, tau, scale):
    f, g, _ = _batch(p[None, :], lN, lD, y, c, tau, True)
    return f[0] / scale, g[0] / scale


def _lbfgsb(p0, lN, lD, y, c, tau):
    from scipy.optimize import minimize

    scale = float(np.sum(c * np.ones_like(y))) * tau * tau
    result = minimize(
        _fun_grad,
        np.asarray(p0, dtype=float),
        args=(lN, lD, y, c, tau, scale),
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-14, "gtol": 1e-10, "maxiter": 3000, "maxfun": 6000, "maxcor": 10},
    )
    gradient = float(np.max(np.abs(result.jac))) if np.all(np.isfinite(result.jac)) else math.inf
    return result, gradient


def _huber_log_norm(delta):
    """log of the normalising constant of the Huber density exp(-h_delta(x)) (Epoch's huber_normalizing_factor)."""
    return math.log(math.sqrt(2 * math.pi) * math.erf(delta / math.sqrt(2)) + 2 * math.exp(-0.5 * delta**2) / delta)


def _scale_nll(q, lN, lD, y, delta):
    """Mean negative log-likelihood of log loss under a Huber density with scale exp(q[5]) (Epoch's `objective`
    divided by the number of runs), and its gradient."""
    p, log_sigma = q[:5], q[5]
    sigma = math.exp(log_sigma)
    a, b, e, alpha, beta = p
    t = np.stack([a - alpha * lN, b - beta * lD, np.full_like(lN, e)])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    w /= s
    u = (m + np.log(s) - y) / sigma
    n = len(y)
    f = _huber(u, delta).sum() / n + log_sigma + _huber_log_norm(delta)
    psi = np.clip(u, -delta, delta)
    gp = psi / (sigma * n)
    grad = np.array([gp @ w[0], gp @ w[1], gp @ w[2], -(gp * w[0]) @ lN, -(gp * w[1]) @ lD, 1.0 - (psi * u).sum() / n])
    return f, grad


# ------------------------------------------------------------------------------------------------ the fit


def _grid_points(grid):
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)} or starting points, not {grid!r}")
        grid = GRIDS[grid]
    if isinstance(grid, dict):
        axes = [tuple(float(v) for v in grid[k]) for k in ("a", "b", "e", "alpha", "beta")]
        return np.array(list(product(*axes)), dtype=float)
    points = np.asarray(grid, dtype=float)
    if points.ndim != 2 or points.shape[1] != 5 or not len(points) or not np.all(np.isfinite(points)):
        raise ValueError("grid: starting points must be an array of rows (a, b, e, alpha, beta)")
    return points


def _grid_name(grid):
    if isinstance(grid, str):
        return grid
    return "custom"


def _fit_huber(lN, lD, y, delta, starts, refine):
    """The best L-BFGS-B fit of the fixed-delta Huber objective from the grid `starts` (screened unless refine is
    None). Returns (p, objective, convergence dict)."""
    c = np.ones_like(y)
    if refine is None:
        candidates = starts
        screened = False
    else:
        chunk = max(1, 400_000 // len(y))
        P, f = [], []
        for i in range(0, len(starts), chunk):
            Pi, fi, _, _ = _batch_lm(starts[i : i + chunk], lN, lD, y, c, delta, iters=8)
            P.append(Pi)
            f.append(fi)
        P, f = np.concatenate(P), np.concatenate(f)
        f = np.where(np.isfinite(f), f, np.inf)
        keep = np.argsort(f, kind="stable")[:128]
        P, f, _, _ = _batch_lm(P[keep], lN, lD, y, c, delta, iters=60)
        f = np.where(np.isfinite(f), f, np.inf)
        order = np.argsort(f, kind="stable")
        candidates = []
        for i in order:
            if not np.isfinite(f[i]):
                break
            if all(np.max(np.abs(P[i] - q)) > 1e-6 for q in candidates):
                candidates.append(P[i])
            if len(candidates) >= max(1, refine):
                break
        candidates = np.array(candidates) if candidates else P[order[:1]]
        screened = True
    results = [_lbfgsb(p0, lN, lD, y, c, delta) for p0 in candidates]
    values = np.array([r.fun if np.isfinite(r.fun) else np.inf for r, _ in results])
    best = int(np.argmin(values))
    result, lbfgsb_gradient = results[best]
    at_best = int(np.sum(np.abs(values - values[best]) <= 1e-9 * max(abs(values[best]), 1e-300)))
    # Damped Newton on the exact Hessian: drives the gradient along the ill-conditioned (A, B, alpha, beta)
    # directions to its rounding floor, where L-BFGS-B stops first on its f tolerance.
    P, f, _, g = _batch_lm(result.x[None, :], lN, lD, y, c, delta, iters=60, exact=True, gtol=1e-10)
    p, value, gradient = P[0], float(f[0]), float(g[0])
    converged = bool(np.isfinite(value)) and gradient <= GRADIENT_TOLERANCE
    convergence = {
        "converged": converged,
        "method": "L-BFGS-B"
        + (" (after vectorised Levenberg-Marquardt screening of the grid)" if screened else "")
        + ", then Newton on the exact Hessian",
        "message": str(result.message),
        "iterations": int(result.nit),
        "lbfgsb_max_gradient": lbfgsb_gradient,
        "max_gradient": gradient,
        "n_starts": len(starts),
        "n_refined": len(candidates),
        "n_at_best": at_best,
    }
    return p, value, convergence


def _fit_scale(p0, lN, lD, y, delta):
    """Epoch's Huber-likelihood fit with a free scale: BFGS from p0, then Nelder-Mead on the kink."""
    from scipy.optimize import minimize

    r = _predict_log(p0, lN, lD) - y
    q0 = np.append(p0, math.log(max(delta * float(np.mean(np.abs(r))), 1e-300)))
    first = minimize(_scale_nll, q0, args=(lN, lD, y, delta), jac=True, method="BFGS", options={"maxiter": 5000})
    start = first.x if first.fun <= _scale_nll(q0, lN, lD, y, delta)[0] else q0
    polish = minimize(
        lambda q: _scale_nll(q, lN, lD, y, delta)[0],
        start,
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 40000, "maxfev": 40000},
    )
    q = polish.x if polish.fun <= first.fun else first.x
    value = min(polish.fun, first.fun)
    convergence = {
        "converged": bool(polish.success),
        "method": "BFGS then Nelder-Mead (Huber likelihood with a fitted scale)",
        "message": f"BFGS: {first.message}; Nelder-Mead: {polish.message}",
        "iterations": int(first.nit) + int(polish.nit),
        "max_gradient": float(np.max(np.abs(_scale_nll(q, lN, lD, y, delta)[1][:5]))),
    }
    return np.asarray(q[:5], dtype=float), float(q[5]), float(value) * len(y), convergence


def _bootstrap(p, lN, lD, y, tau, n_boot, rng):
    """Refits of multinomially reweighted runs from p: 30 reweighted Gauss-Newton steps, then damped Newton to a
    normalised gradient <= GRADIENT_TOLERANCE. Returns (P, converged)."""
    n = len(y)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    P, *_ = _batch_lm(np.tile(p, (n_boot, 1)), lN, lD, y, counts, tau, iters=30, rtol=1e-12)
    P, f, _, gradient = _batch_lm(P, lN, lD, y, counts, tau, iters=100, exact=True, gtol=GRADIENT_TOLERANCE / 10)
    return P, np.isfinite(f) & (gradient <= GRADIENT_TOLERANCE)


def _natural(P):
    """(a, b, e, alpha, beta) rows -> dict of E, A, B, alpha, beta and the allocation exponents a, b."""
    P = np.atleast_2d(P)
    alpha, beta = P[:, 3], P[:, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "E": np.exp(P[:, 2]),
            "A": np.exp(P[:, 0]),
            "B": np.exp(P[:, 1]),
            "alpha": alpha,
            "beta": beta,
            "a": beta / (alpha + beta),
            "b": alpha / (alpha + beta),
        }


@dataclass
class ScalingFit:
    """A fitted L(N, D) = E + A/N^alpha + B/D^beta (fields: the parameters, the fit's diagnostics)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    delta: float
    objective: float
    n_runs: int
    convergence: dict
    grid: str = "hoffmann"
    estimate_scale: bool = False
    sigma: float | None = None
    bootstrap: dict | None = None
    holdout: dict | None = None
    seed: int = 0
    data: dict = field(default_factory=dict, repr=False)
    _samples: np.ndarray | None = field(default=None, repr=False)

    # --- the law
    @property
    def params(self):
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}

    @property
    def converged(self) -> bool:
        return bool(self.convergence.get("converged"))

    def predict(self, N, D):
        """The fitted loss at model size N and data D (arrays broadcast)."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def degenerate(self) -> list[str]:
        """Why the fit is not a scaling law with diminishing returns in both N and D (empty when it is):
        a non-positive exponent, an exponent above `MAX_EXPONENT` (the term is a step within the runs,
        e.g. a plateau after a curriculum switch, not a power law), or a coefficient that collapsed below
        `COLLAPSED` (the fit is unconstrained, as Hoffmann et al.'s is, so runs that do not improve with N
        or D can give such fits)."""
        exponents = (("alpha", self.alpha), ("beta", self.beta))
        reasons = [f"{name} = {value:.4g} <= 0" for name, value in exponents if not value > 0]
        reasons += [f"{name} = {value:.4g} > {MAX_EXPONENT:g} (a step, not a power law)" for name, value in exponents
                    if value > MAX_EXPONENT]  # fmt: skip
        reasons += [f"{name} = {value:.4g} (collapsed)" for name, value in (("E", self.E), ("A", self.A), ("B", self.B))
                    if not value > COLLAPSED]  # fmt: skip
        return reasons

    @property
    def has_allocation(self) -> bool:
        """The compute-optimal allocation is meaningful: A and B have not collapsed and both exponents are
        those of a power law (0 < exponent <= `MAX_EXPONENT`); a degenerate E alone does not matter to it."""
        exponents_ok = all(0 < value <= MAX_EXPONENT for value in (self.alpha, self.beta))
        return exponents_ok and self.A > COLLAPSED and self.B > COLLAPSED

    @property
    def a(self) -> float:
        """The exponent of N_opt ~ C^a: beta / (alpha + beta) (nan without an allocation)."""
        return self.beta / (self.alpha + self.beta) if self.has_allocation else math.nan

    @property
    def b(self) -> float:
        """The exponent of D_opt ~ C^b: alpha / (alpha + beta) (nan without an allocation)."""
        return self.alpha / (self.alpha + self.beta) if self.has_allocation else math.nan

    @property
    def G(self) -> float:
        """(alpha A / (beta B))^(1 / (alpha + beta)) (nan without an allocation)."""
        if not self.has_allocation:
            return math.nan
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = C (nan when the fit has no allocation:
        `has_allocation`)."""
        C = np.asarray(C, dtype=float)
        N = self.G * (C / 6.0) ** self.a
        return N, C / (6.0 * N)

    def optimal_loss(self, C):
        return self.predict(*self.compute_optimal(C))

    def interval(self, name, level=0.95):
        """The bootstrap percentile interval of `name` (E, A, B, alpha, beta, a, b) at `level` (None without)."""
        if not self.bootstrap:
            return None
        return tuple(self.bootstrap["intervals"][_level_key(level)][name])

    @property
    def bootstrap_samples(self) -> dict | None:
        """The parameters of the converged bootstrap refits: arrays E, A, B, alpha, beta, a, b (None without a
        bootstrap)."""
        return None if self._samples is None else _natural(self._samples)

    # --- reporting
    def to_dict(self) -> dict:
        return report.fit_to_dict(self)

    def summary(self) -> str:
        return report.format_fit(self)

    def plot(self, path):
        """Write a PNG: loss against compute with iso-N fit curves and the compute-optimal frontier, and
        N_opt / D_opt against compute (bootstrap 95% bands)."""
        plots.plot_fit(self, path)
        return Path(path)


def _level_key(level):
    return f"{100 * level:g}"


def fit_scaling_law(
    N,
    D,
    loss,
    *,
    delta: float = 1e-3,
    grid="hoffmann",
    bootstrap: int = 200,
    seed: int = 0,
    holdout: float | None = 0.1,
    estimate_scale: bool = False,
    refine: int | None = 8,
    levels=LEVELS,
) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (model sizes N, training tokens D, final losses).

    delta: the Huber threshold on log loss (1e-3, Hoffmann's). grid: "hoffmann" (4500 starts), "coarse" (972),
    a dict of axes a, b, e, alpha, beta, or an array of rows (a, b, e, alpha, beta). bootstrap: resamples
    (0: none). holdout: the fraction of largest-compute runs to predict from a fit on the rest (None/0: none).
    estimate_scale: Epoch's Huber-likelihood fit with a fitted scale (their headline numbers). refine: how
    many screened grid starts L-BFGS-B refines (None: L-BFGS-B from every start). Raises RunsError on bad runs.
    """
    try:
        from scipy import optimize  # noqa: F401
    except ImportError:
        raise ImportError("the scaling fits need scipy (pip install 'navil-hf[research]')") from None
    with _one_blas_thread():
        return _fit_scaling_law(N, D, loss, delta, grid, bootstrap, seed, holdout, estimate_scale, refine, levels)


def _fit_scaling_law(N, D, loss, delta, grid, bootstrap, seed, holdout, estimate_scale, refine, levels):
    N, D, loss = _check_arrays(N, D, loss)
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if holdout is not None and not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
    starts = _grid_points(grid)
    lN, lD, y = np.log(N), np.log(D), np.log(loss)
    p, value, convergence = _fit_huber(lN, lD, y, delta, starts, refine)
    p_huber, sigma = p, None
    if estimate_scale:
        huber_convergence = convergence
        p, log_sigma, value, convergence = _fit_scale(p, lN, lD, y, delta)
        plain = {k: float(v[0]) for k, v in _natural(p_huber).items() if k in PARAMETERS}
        convergence = {**convergence, "start": {**huber_convergence, "parameters": plain}}
        sigma = math.exp(log_sigma)
    nat = {k: float(v[0]) for k, v in _natural(p).items()}
    fit = ScalingFit(
        E=nat["E"],
        A=nat["A"],
        B=nat["B"],
        alpha=nat["alpha"],
        beta=nat["beta"],
        delta=delta,
        objective=value,
        n_runs=len(N),
        convergence=convergence,
        grid=_grid_name(grid),
        estimate_scale=estimate_scale,
        sigma=sigma,
        seed=seed,
        data={"N": N, "D": D, "loss": loss},
    )
    rng = np.random.default_rng(seed)
    if bootstrap and bootstrap > 0:
        # Always the fixed-delta Huber loss (with estimate_scale too, as Epoch's bootstrap does: the likelihood's
        # kink minima have no gradient test of convergence), from the fixed-delta optimum.
        P, ok = _bootstrap(p_huber, lN, lD, y, delta, int(bootstrap), rng)
        fit._samples = P[ok]
        fit.bootstrap = _bootstrap_summary(P[ok], int(bootstrap), levels, delta)
    if holdout:
        fit.holdout = _holdout(N, D, loss, holdout, delta, grid, refine, estimate_scale)
    return fit


def _bootstrap_summary(P, n_boot, levels, delta):
    nat = _natural(P)
    out = {
        "n": n_boot,
        "n_converged": len(P),
        "method": "runs resampled with replacement, refitted from the point estimate; percentile intervals",
        "objective": f"huber, delta={delta:g}",
        "se": {k: float(np.std(v, ddof=1)) if len(v) > 1 else None for k, v in nat.items()},
        "intervals": {},
    }
    for level in levels:
        lo, hi = 50 * (1 - level), 50 * (1 + level)
        out["intervals"][_level_key(level)] = {
            k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else None for k, v in nat.items()
        }
    return out


def _holdout(N, D, loss, fraction, delta, grid, refine, estimate_scale):
    C = 6.0 * N * D
    n = len(N)
    n_held = max(1, math.ceil(fraction * n))
    order = np.argsort(C, kind="stable")
    held, kept = order[n - n_held :], order[: n - n_held]
    if len(kept) < MIN_RUNS:
        return {"fraction": fraction, "skipped": f"only {len(kept)} runs would remain for the fit"}
    sub = fit_scaling_law(
        N[kept],
        D[kept],
        loss[kept],
        delta=delta,
        grid=grid,
        bootstrap=0,
        holdout=None,
        estimate_scale=estimate_scale,
        refine=refine,
    )
    predicted = sub.predict(N[held], D[held])
    rel = (predicted - loss[held]) / loss[held]
    return {
        "fraction": fraction,
        "n_fit": len(kept),
        "n_held": n_held,
        "fit_max_compute": float(C[kept].max()),
        "held_min_compute": float(C[held].min()),
        "mean_abs_rel_error": float(np.mean(np.abs(rel))),
        "max_abs_rel_error": float(np.max(np.abs(rel))),
        "mean_rel_error": float(np.mean(rel)),
        "parameters": sub.params,
        "converged": sub.converged,
        "runs": [
            {"N": float(N[i]), "D": float(D[i]), "C": float(C[i]), "loss": float(loss[i]), "predicted": float(q)}
            for i, q in zip(held, predicted)
        ],
    }


# ------------------------------------------------------------------------------------- joint ViT / LLM fit


def _groups(llm, rel_tol=0.02):
    """Group labels for LLM sizes that agree within rel_tol (consecutive in sorted log size)."""
    order = np.argsort(llm, kind="stable")
    labels = np.empty(len(llm), dtype=int)
    label, anchor = -1, None
    for i in order:
        if anchor is None or math.log(llm[i] / anchor) > math.log1p(rel_tol):
            label += 1
            anchor = llm[i]
        labels[i] = label
    return labels


def _quadratic_minimum(u, loss, logd, weights=None):
    """Least squares of loss on (1, u, u^2[, log D]); returns (u*, coefficients, curvature) or None if singular."""
    cols = [np.ones_like(u), u, u * u]
    if logd is not None:
        cols.append(logd)
    X = np.stack(cols, axis=1)
    if weights is not None:
        sw = np.sqrt(weights)
        X, loss = X * sw[:, None], loss * sw
    coef, _, rank, _ = np.linalg.lstsq(X, loss, rcond=None)
    if rank < X.shape[1]:
        return None
    c1, c2 = coef[1], coef[2]
    return (-c1 / (2 * c2) if c2 > 0 else math.nan), coef, c2


@dataclass
class JointFit:
    """The optimal ViT size per LLM size and the log-log line log N_v* = k log N_l + c."""

    k: float
    c: float
    k_se: float | None
    r2: float | None
    groups: list
    bootstrap: dict | None = None
    seed: int = 0
    data: dict = field(default_factory=dict, repr=False)
    _samples: np.ndarray | None = field(default=None, repr=False)

    def optimal_vit(self, llm_params):
        """N_v* = e^c N_l^k."""
        return np.exp(self.c) * np.asarray(llm_params, dtype=float) ** self.k

    def interval(self, name="k", level=0.95):
        if not self.bootstrap:
            return None
        return tuple(self.bootstrap["intervals"][_level_key(level)][name])

    @property
    def group_labels(self) -> np.ndarray:
        """Each run's LLM size: its index in `groups`."""
        return _groups(self.data["llm"])

    def loss_curve(self, g):
        """The quadratic in u = log N_v through the runs of LLM size `g`, without the log D term (the curve the
        plot draws): (mu, (c0, c1, c2)) for loss = c0 + c1 (u - mu) + c2 (u - mu)^2, mu the runs' mean u; None
        with fewer than 3 ViT sizes or a singular fit."""
        sel = self.group_labels == g
        u = np.log(self.data["vit"][sel])
        if len(np.unique(np.round(u, 9))) < 3:
            return None
        mu = u.mean()
        fitted = _quadratic_minimum(u - mu, self.data["loss"][sel], None)
        return None if fitted is None else (mu, fitted[1])

    @property
    def bootstrap_samples(self) -> dict | None:
        """The lines of the bootstrap resamples: arrays k and c (None without a bootstrap)."""
        return None if self._samples is None else {"k": self._samples[:, 0], "c": self._samples[:, 1]}

    def to_dict(self) -> dict:
        return report.joint_to_dict(self)

    def summary(self) -> str:
        return report.format_joint(self)

    def plot(self, path):
        """Write a PNG: loss against ViT size per LLM size with the quadratics and their minima, and the
        log-log line of N_v* against N_l (bootstrap 95% band)."""
        plots.plot_joint(self, path)
        return Path(path)


def _joint_core(lv, ll, loss, logd, labels, n_groups, weights=None):
    """Per-group minima (log N_v*, log N_l, bracketed) for the given (possibly reweighted) runs."""
    out = []
    for g in range(n_groups):
        sel = labels == g
        if weights is not None:
            sel &= weights > 0
        u = lv[sel]
        if len(np.unique(np.round(u, 9))) < 3:
            out.append((math.nan, math.nan, False))
            continue
        ld = logd[sel] if logd is not None and np.ptp(logd[labels == g]) > math.log(1.01) else None
        mu = float(np.mean(u))
        fitted = _quadratic_minimum(
            u - mu, loss[sel], None if ld is None else ld - ld.mean(), None if weights is None else weights[sel]
        )
        if fitted is None:
            out.append((math.nan, math.nan, False))
            continue
        ustar = fitted[0] + mu
        bracketed = bool(np.isfinite(ustar) and u.min() <= ustar <= u.max())
        out.append((ustar, float(np.mean(ll[labels == g])), bracketed))
    return out


def _line(x, y):
    X = np.stack([x, np.ones_like(x)], axis=1)
    (k, c), *_ = np.linalg.lstsq(X, y, rcond=None)
    return float(k), float(c)


def fit_joint(vit_params, llm_params, loss, D=None, *, bootstrap: int = 200, seed: int = 0, levels=LEVELS) -> JointFit:
    """NaViL's joint scaling: the loss-minimising ViT size for each LLM size and the fit log N_v* = k log N_l + c
    (form and method: docs/research/scaling.md). Needs >= 2 LLM sizes with a bracketed minimum."""
    with _one_blas_thread():
        return _fit_joint(vit_params, llm_params, loss, D, bootstrap, seed, levels)


def _fit_joint(vit_params, llm_params, loss, D, bootstrap, seed, levels):
    arrays = [np.asarray(x, dtype=float).ravel() for x in (vit_params, llm_params, loss)]
    if D is not None:
        arrays.append(np.asarray(D, dtype=float).ravel())
    names = ("vit_params", "llm_params", "loss", "D")
    if len({len(x) for x in arrays}) != 1:
        raise RunsError("vit_params, llm_params and loss differ in length")
    for name, x in zip(names, arrays):
        if not np.all(np.isfinite(x) & (x > 0)):
            raise RunsError(f"{name} must be positive and finite")
    vit, llm, loss = arrays[:3]
    lv, ll = np.log(vit), np.log(llm)
    logd = np.log(arrays[3]) if D is not None else None
    labels = _groups(llm)
    n_groups = int(labels.max()) + 1
    core = _joint_core(lv, ll, loss, logd, labels, n_groups)
    groups = []
    for g, (ustar, _, bracketed) in enumerate(core):
        sel = labels == g
        note = ""
        if not bracketed:
            n_vit = len(np.unique(np.round(lv[sel], 9)))
            note = (
                "fewer than 3 ViT sizes"
                if n_vit < 3
                else "loss not convex in log N_v"
                if not np.isfinite(ustar)
                else "minimum outside the ViT sizes run"
            )
        groups.append(
            {
                "llm_params": float(np.exp(np.mean(ll[sel]))),
                "n_runs": int(sel.sum()),
                "vit_min": float(vit[sel].min()),
                "vit_max": float(vit[sel].max()),
                "vit_opt": float(math.exp(ustar)) if np.isfinite(ustar) else None,
                "bracketed": bracketed,
                "note": note,
            }
        )
    good = [(u, l) for u, l, b in core if b]
    if len(good) < 2:
        raise RunsError(
            f"the joint fit needs >= 2 LLM sizes whose loss has a minimum inside the ViT sizes run; got {len(good)} "
            f"of {n_groups} LLM sizes"
        )
    u, lm = np.array([g[0] for g in good]), np.array([g[1] for g in good])
    k, c = _line(lm, u)
    k_se = r2 = None
    if len(good) >= 3:
        resid = u - (k * lm + c)
        s2 = float(resid @ resid) / (len(good) - 2)
        k_se = math.sqrt(s2 / float(((lm - lm.mean()) ** 2).sum()))
        tot = float(((u - u.mean()) ** 2).sum())
        r2 = 1.0 - float(resid @ resid) / tot if tot > 0 else None
    fit = JointFit(k=k, c=c, k_se=k_se, r2=r2, groups=groups, seed=seed, data={"vit": vit, "llm": llm, "loss": loss})
    if bootstrap and bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(int(bootstrap)):
            w = np.zeros(len(loss))
            for g in range(n_groups):  # resample within each LLM size
                idx = np.flatnonzero(labels == g)
                w[idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)))
            res = [(u_, l_) for u_, l_, b_ in _joint_core(lv, ll, loss, logd, labels, n_groups, w) if b_]
            if len(res) >= 2 and len({round(l_, 9) for _, l_ in res}) >= 2:
                samples.append(_line(np.array([r[1] for r in res]), np.array([r[0] for r in res])))
        S = np.array(samples).reshape(-1, 2)
        fit._samples = S
        boot = {
            "n": int(bootstrap),
            "n_valid": len(S),
            "method": "runs resampled within each LLM size; quadratics and line refitted; percentile intervals",
            "se": {"k": float(np.std(S[:, 0], ddof=1)) if len(S) > 1 else None,
                   "c": float(np.std(S[:, 1], ddof=1)) if len(S) > 1 else None},
            "intervals": {},
        }  # fmt: skip
        for level in levels:
            lo, hi = 50 * (1 - level), 50 * (1 + level)
            boot["intervals"][_level_key(level)] = {
                name: [float(np.percentile(S[:, j], lo)), float(np.percentile(S[:, j], hi))] if len(S) else None
                for j, name in enumerate(("k", "c"))
            }
        fit.bootstrap = boot
    return fit
