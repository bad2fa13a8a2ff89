"""Scaling-law fits for NaViL-style studies: the Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et
al. 2022, "Approach 3"; the form Apple's "Scaling Laws for Native Multimodal Models" fits) and NaViL's joint
ViT/LLM scaling (the loss-minimising ViT size against the LLM size, on a log scale).

    from navil_hf.research.scaling import read_runs, fit_scaling_law, fit_joint
    runs = read_runs("runs.csv")
    fit = fit_scaling_law(runs.N, runs.D, runs.loss, bootstrap=200, holdout=0.1)
    print(fit.summary()); fit.predict(1e9, 2e10); fit.compute_optimal(1e21); fit.plot("fit.png")
    joint = fit_joint(runs.vit_params, runs.llm_params, runs.loss); print(joint.summary())

    navil scaling fit RUNS.csv [--plot out.png] [--bootstrap N] [--holdout FRACTION] [--json] ...
    navil scaling joint RUNS.csv [--plot out.png] [--bootstrap N] [--json] ...
    (also `python -m navil_hf.research.scaling fit|joint ...`)

numpy is needed throughout, scipy for the fits (the `research` extra), matplotlib only for the plots.

The fit (`fit_scaling_law`)
---------------------------
As Hoffmann et al. describe it and Epoch AI's replication ("Chinchilla Scaling: A replication attempt",
Besiroglu et al. 2024, github.com/epoch-research/analyzing-chinchilla) runs it: with a = log A, b = log B,
e = log E, minimise over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

LSE the log-sum-exp (so the prediction is log(E + A/N^alpha + B/D^beta), computed without overflow), with
L-BFGS-B from every point of a grid of starts, and keep the best. `HOFFMANN_GRID` is their grid: alpha, beta in
{0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4500 starts); `COARSE_GRID` (972 starts)
drops the degenerate alpha = 0 / beta = 0 starts and thins e.

Numerics. The gradient is analytic. The objective is ~1e-3 and scipy's L-BFGS-B measures its `ftol` against
max(|f|, 1): with the defaults it stops once f changes by < 2e-9, a relative change of ~1e-6, which on a
problem this ill-conditioned (the normalised Hessian's eigenvalues span ~1e7, mostly along A-B-alpha-beta)
leaves the parameters off in the 4th digit: Epoch's "Replicate exactly" cell (default tolerances) reports
A = 477.84, B = 2143.86 where the converged optimum is A = 477.83, B = 2143.42. Here the objective is divided
by sum(weights) * delta^2 (a mean Huber loss in units of delta^2, ~1-10), L-BFGS-B runs with ftol 1e-14 and
gtol 1e-10, and damped Newton steps on the exact Hessian (the objective is C^1 and piecewise smooth) then
take the gradient to its rounding floor (~1e-10). The fit counts as converged when the largest component of
that normalised gradient is <= 1e-6 (`GRADIENT_TOLERANCE`); the report gives it, L-BFGS-B's own message and
how many of the refined starts reached the best objective. Running L-BFGS-B from all 4500 starts takes
minutes, so by default (`refine=8`) every start first takes 8 vectorised Levenberg-Marquardt steps on the
Huber loss (iteratively reweighted Gauss-Newton, all starts at once), the 128 best take 60 more, and
L-BFGS-B runs from the `refine` best distinct ones; `refine=None` runs L-BFGS-B from every grid start (the
exact procedure; the same optimum on the Chinchilla data). BLAS is limited to one thread while fitting when
threadpoolctl is installed (the matrices are 5x5; threaded OpenBLAS makes L-BFGS-B 5-10x slower on a busy
machine).

`estimate_scale=True` fits Epoch's headline estimate instead: their notebook's `objective` maximises the
likelihood of a Huber density with a fitted scale sigma, sum_i [Huber_delta(r_i/sigma) + log sigma] + const
(BFGS from Hoffmann's parameters). Since Huber_delta(r/sigma) = Huber_{delta sigma}(r)/sigma^2 and the fitted
sigma is ~5e-6 on the Chinchilla data, the effective Huber threshold delta*sigma is ~5e-9 and the estimate
is in effect a least-absolute-deviations fit of log loss; its minimum sits on a kink, where BFGS stops with
"precision loss" (as in Epoch's notebook). Here BFGS starts from the fixed-delta fit and Nelder-Mead polishes
the kink; convergence means Nelder-Mead met its tolerances (the fixed-delta start's convergence is reported
too, with its parameters). On Epoch's extracted data (the five highest-loss runs dropped, as they do) this
gives their reported E = 1.8169, A = 482.01, B = 2085.43, alpha = 0.34781, beta = 0.36585 to every digit
(and their log-likelihood 879.7731); the fixed-delta fit gives E = 1.8172, A = 477.83, B = 2143.42,
alpha = 0.34731, beta = 0.36717 (tests/research/test_scaling.py). Dropping those five runs matters: on all 245 runs the
likelihood fit is E = 1.885, A = 463.3, B = 12530, alpha = 0.3454, beta = 0.4519 (log-likelihood 770.64 against
757.80 at the 240-run parameters); the notebook's ~1e-9 difference comes from a BFGS that, started on the
240-run kink, does not move.

Uncertainty. `bootstrap` resamples the runs with replacement (multinomial weights), refits each resample
from the point estimate (30 vectorised reweighted Gauss-Newton steps, then damped Newton on the exact
Hessian to a normalised gradient <= 1e-6) and reports standard errors (sd of the converged refits) and
percentile intervals (default 80% and 95%). The refits always minimise the fixed-delta Huber loss, from its
optimum: with `estimate_scale` too, as Epoch's bootstrap does (their SEs and intervals come from refits of
`huber_loss_objective`); the likelihood's kink minima would offer no gradient test of convergence. `holdout` sorts runs by compute
C = 6 N D, refits (same settings) without the largest ceil(holdout * n) runs and reports the relative error
(predicted - actual) / actual of the loss of those held-out runs (extrapolation error).

Compute-optimal allocation (C = 6 N D; minimise L(N, C/(6N)) over N):
    N_opt(C) = G (C/6)^a,  D_opt(C) = G^-1 (C/6)^b,  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta/(alpha+beta),  b = alpha/(alpha+beta).

The joint ViT/LLM fit (`fit_joint`)
-----------------------------------
NaViL (Tian et al. 2025) finds the loss-minimising ViT size growing log-linearly with the LLM size. Like
Hoffmann's "Approach 2" (IsoFLOP parabolas), for each LLM size (runs whose llm_params agree within 2%)
with >= 3 distinct ViT sizes the loss is fitted as a quadratic in u = log N_v,

    L = c0 + c1 u + c2 u^2 (+ c3 log D, when D is given and varies within the group),

its minimum u* = -c1/(2 c2) is the optimal ViT size N_v* (used only when c2 > 0 and N_v* lies inside the
sampled ViT sizes: "bracketed"), and ordinary least squares on the bracketed groups gives

    log N_v* = k log N_l + c     (N_v* = e^c N_l^k),

with the classical standard error of k (>= 3 groups) and bootstrap percentile intervals (runs resampled
within each LLM size, the quadratics and the line refitted).

Runs files (`read_runs`)
------------------------
A CSV file with a header; column names are case-insensitive, spaces and hyphens count as underscores, other
columns are ignored:

    model size N:  N, params, parameters, n_params, num_params, model_size
                   (absent: vit_params + llm_params when both are given)
    data D:        D, tokens, n_tokens, num_tokens, training_tokens
    or compute C:  C, flops, compute, training_flop, training_flops   (then D = C / (6 N); D wins if both)
    loss:          loss
    optional:      vit_params (or n_v), llm_params (or n_l), name (or run)

Values must be positive finite numbers. Mistakes raise `RunsError` (a `ValueError`) with a one-line message
naming the file and line. Epoch's data/svg_extracted_data.csv ("Model Size", "Training FLOP", "loss") reads
as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from ..errors import UsageError

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
MIN_RUNS = 5  # five parameters
GRADIENT_TOLERANCE = 1e-6  # largest component of the normalised gradient at a converged fit
LEVELS = (0.8, 0.95)
# Beyond this an exponent makes its term a step inside the runs, not a power law (published fits: 0.2-0.8).
MAX_EXPONENT = 3.0
# Below this a coefficient has collapsed (losses are O(1) nats; the unconstrained fit can drive E to 1e-114).
COLLAPSED = 1e-9


class RunsError(UsageError):
    """Unusable runs (a missing column, a non-positive value, too few runs): a one-line message."""


# --------------------------------------------------------------------------------------------------- runs


_ALIASES = {
    "N": ("n", "params", "parameters", "n_params", "num_params", "model_size"),
    "D": ("d", "tokens", "n_tokens", "num_tokens", "training_tokens"),
    "C": ("c", "flops", "compute", "training_flop", "training_flops"),
    "loss": ("loss",),
    "vit_params": ("vit_params", "n_v"),
    "llm_params": ("llm_params", "n_l"),
    "name": ("name", "run"),
}


@dataclass(frozen=True)
class Runs:
    """Training runs read from a CSV file (arrays of equal length; None where the file has no such column)."""

    loss: np.ndarray
    N: np.ndarray | None = None
    D: np.ndarray | None = None
    vit_params: np.ndarray | None = None
    llm_params: np.ndarray | None = None
    names: tuple[str, ...] = ()
    source: str = "runs"

    def __len__(self):
        return len(self.loss)

    @property
    def C(self):
        """Training compute 6 N D (None without N and D)."""
        return None if self.N is None or self.D is None else 6.0 * self.N * self.D

    def select(self, keep) -> Runs:
        """The runs where boolean mask `keep` is true."""
        keep = np.asarray(keep, dtype=bool)

        def pick(x):
            return None if x is None else x[keep]

        names = tuple(n for n, k in zip(self.names, keep) if k) if self.names else ()
        return Runs(
            pick(self.loss),
            pick(self.N),
            pick(self.D),
            pick(self.vit_params),
            pick(self.llm_params),
            names,
            self.source,
        )

    def drop_highest_loss(self, k: int) -> Runs:
        """Without the `k` runs of highest loss (Epoch drops 5 on the Chinchilla data: `losses <
        sorted(losses)[-5]`)."""
        if k <= 0:
            return self
        if k >= len(self):
            raise RunsError(f"{self.source}: cannot drop {k} of {len(self)} runs")
        return self.select(self.loss < np.sort(self.loss)[-k])


def _normalise(name):
    return "_".join(name.strip().lower().replace("-", " ").split())


def read_runs(path, *, kind: str = "fit") -> Runs:
    """The runs in CSV file `path` (columns: the module docstring). `kind` says what the file must hold:
    "fit" N and D (or C) and loss, "joint" vit_params, llm_params and loss; "any" loss only."""
    if kind not in ("fit", "joint", "any"):
        raise ValueError(f"kind must be 'fit', 'joint' or 'any', not {kind!r}")
    path = Path(path)
    source = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise RunsError(f"{source}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise RunsError(f"{source}: not a CSV text file ({_one_line(e)})") from None
    while rows and not any(cell.strip() for cell in rows[0]):
        rows.pop(0)
    if not rows:
        raise RunsError(f"{source}: empty file (expected a header row such as N,D,loss)")
    header = [_normalise(h) for h in rows[0]]
    columns = {}
    for key, aliases in _ALIASES.items():
        found = [i for i, h in enumerate(header) if h in aliases]
        if len(found) > 1:
            names = ", ".join(repr(rows[0][i].strip()) for i in found)
            raise RunsError(f"{source}: columns {names} all mean {key}; keep one")
        if found:
            columns[key] = found[0]
    if "loss" not in columns:
        raise RunsError(f"{source}: no 'loss' column (columns: {', '.join(h.strip() for h in rows[0])})")
    data = {key: [] for key in columns}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        for key, i in columns.items():
            cell = row[i].strip() if i < len(row) else ""
            if key == "name":
                data[key].append(cell)
                continue
            if not cell:
                raise RunsError(f"{source} line {line}: no value in column {rows[0][i].strip()!r}")
            try:
                value = float(cell)
            except ValueError:
                raise RunsError(
                    f"{source} line {line}: column {rows[0][i].strip()!r}: {cell!r} is not a number"
                ) from None
            if not (math.isfinite(value) and value > 0):
                raise RunsError(f"{source} line {line}: {rows[0][i].strip()} must be positive and finite, got {cell}")
            data[key].append(value)
    arrays = {key: np.asarray(values, dtype=float) for key, values in data.items() if key != "name"}
    N = arrays.get("N")
    if N is None and "vit_params" in arrays and "llm_params" in arrays:
        N = arrays["vit_params"] + arrays["llm_params"]
    D = arrays.get("D")
    if D is None and "C" in arrays and N is not None:
        D = arrays["C"] / (6.0 * N)
    if kind == "fit":
        if N is None:
            raise RunsError(f"{source}: no model-size column (N or params; or vit_params and llm_params)")
        if D is None:
            raise RunsError(f"{source}: no data column (D or tokens) and no compute column (C or flops)")
    if kind == "joint":
        for key in ("vit_params", "llm_params"):
            if key not in arrays:
                raise RunsError(f"{source}: no {key!r} column (the joint fit needs vit_params, llm_params and loss)")
    runs = Runs(
        arrays["loss"], N, D, arrays.get("vit_params"), arrays.get("llm_params"), tuple(data.get("name", ())), source
    )
    need = MIN_RUNS if kind == "fit" else 3 if kind == "joint" else 1
    if len(runs) < need:
        what = {"fit": "the 5-parameter fit", "joint": "the joint fit", "any": "a fit"}[kind]
        raise RunsError(f"{source}: {len(runs)} runs; {what} needs at least {need}")
    return runs


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

    # --- reporting
    def to_dict(self) -> dict:
        out = {
            "model": "L(N, D) = E + A / N**alpha + B / D**beta",
            "parameters": self.params,
            "log_parameters": {
                k: math.log(v) if v > 0 else None for k, v in (("e", self.E), ("a", self.A), ("b", self.B))
            },
            "degenerate": self.degenerate,
            "objective": {
                "kind": "huber_likelihood" if self.estimate_scale else "huber",
                "delta": self.delta,
                "value": self.objective,
                "sigma": self.sigma,
                "n_runs": self.n_runs,
            },
            "fit": {"grid": self.grid, "seed": self.seed},
            "convergence": self.convergence,
            "allocation": {
                "formula": "N_opt = G (C/6)**a, D_opt = (C/6)**b / G, C = 6 N D",
                "a": self.a,
                "b": self.b,
                "G": self.G,
            },
            "bootstrap": self.bootstrap,
            "holdout": self.holdout,
        }
        return _jsonable(out)

    def summary(self) -> str:
        return _format_fit(self)

    def plot(self, path):
        """Write a PNG: loss against compute with iso-N fit curves and the compute-optimal frontier, and
        N_opt / D_opt against compute (bootstrap 95% bands)."""
        _plot_fit(self, path)
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


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _fmt(x, digits=5):
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _format_fit(fit: ScalingFit) -> str:
    kind = (
        f"Huber likelihood with fitted scale sigma={fit.sigma:.3g} (delta={fit.delta:g}; Epoch's headline estimate)"
        if fit.estimate_scale
        else f"Huber loss, delta={fit.delta:g}, on log loss"
    )
    conv = fit.convergence
    start = conv.get("start", conv)
    lines = [
        "L(N, D) = E + A/N^alpha + B/D^beta",
        f"  {fit.n_runs} runs; {kind}; grid {fit.grid}: {start['n_starts']} starts, L-BFGS-B from the best "
        f"{start['n_refined']}",
    ]
    boot = fit.bootstrap
    levels = list(boot["intervals"]) if boot else []
    head = f"  {'':6} {'estimate':>11} {'std err':>10}" + "".join(f" {f'{lv}% interval':>24}" for lv in levels)
    lines.append(head)
    values = {**fit.params, "a": fit.a, "b": fit.b}
    for name in (*PARAMETERS, "a", "b"):
        if name == "a":
            lines.append("  compute-optimal exponents (N_opt ~ C^a, D_opt ~ C^b; a = beta/(alpha+beta)):")
        row = f"  {name:6} {_fmt(values[name]):>11} {_fmt(boot['se'][name] if boot else None, 3):>10}"
        for lv in levels:
            iv = boot["intervals"][lv][name]
            row += f" {f'[{_fmt(iv[0])}, {_fmt(iv[1])}]' if iv else '-':>24}"
        lines.append(row)
    if boot:
        lines.append(f"  bootstrap: {boot['n_converged']}/{boot['n']} resampled refits converged")
    c_max = float(np.max(6.0 * fit.data["N"] * fit.data["D"])) if fit.data else None
    if fit.degenerate:
        allocation = "" if fit.has_allocation else " (no compute-optimal allocation)"
        lines.append(f"  degenerate fit: {'; '.join(fit.degenerate)}: the runs do not follow a law with diminishing "
                     f"returns in both N and D{allocation}")  # fmt: skip
    if fit.has_allocation:
        lines.append(
            f"  N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A/(beta B))^(1/(alpha+beta)) = {_fmt(fit.G)}"
        )
    if c_max and fit.has_allocation:
        n_opt, d_opt = (float(v) for v in fit.compute_optimal(c_max))
        lines.append(
            f"  at the largest compute C = {c_max:.3g}: N_opt = {n_opt:.3g}, D_opt = {d_opt:.3g} "
            f"({d_opt / n_opt:.3g} tokens per parameter), L = {float(fit.predict(n_opt, d_opt)):.4g}"
        )
    h = fit.holdout
    if h and "skipped" in h:
        lines.append(f"  hold-out: skipped ({h['skipped']})")
    elif h:
        lines.append(
            f"  hold-out: fitted {h['n_fit']} runs with C <= {h['fit_max_compute']:.3g}, predicted the {h['n_held']} "
            f"largest-compute runs (C >= {h['held_min_compute']:.3g}): mean |relative error| "
            f"{100 * h['mean_abs_rel_error']:.2f}%, max {100 * h['max_abs_rel_error']:.2f}%, "
            f"mean signed {100 * h['mean_rel_error']:+.2f}%"
            + ("" if h["converged"] else " (that fit did not converge)")
        )
    status = "converged" if conv["converged"] else "NOT CONVERGED"
    if fit.estimate_scale:  # a kink minimum: the gradient need not vanish there
        plain = start["parameters"]
        detail = (
            f"{conv['method']}: {conv['message']}; started from the fixed-delta fit E={plain['E']:.5g}, "
            f"A={plain['A']:.5g}, B={plain['B']:.5g}, alpha={plain['alpha']:.5g}, beta={plain['beta']:.5g} "
            f"({'converged' if start['converged'] else 'NOT CONVERGED'}, max |normalised gradient| "
            f"{start['max_gradient']:.2g})"
        )
    else:
        detail = f"{conv['method']}: {conv['message']}; max |normalised gradient| {conv['max_gradient']:.2g}"
    if "n_at_best" in start:
        detail += f"; {start['n_at_best']}/{start['n_refined']} refined starts reached the best objective"
    lines.append(f"  convergence: {status} ({detail})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots


def _figure(width, height, ncols):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RunsError("plotting needs matplotlib (pip install matplotlib)") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _plot_fit(fit: ScalingFit, path):
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import ScalarFormatter

    N, D, loss = fit.data["N"], fit.data["D"], fit.data["loss"]
    C = 6.0 * N * D
    fig, (ax, ax2) = _figure(13, 5.2, 2)
    cmap = colormaps["viridis"]
    norm = LogNorm(vmin=N.min(), vmax=max(N.max(), N.min() * 1.0001))
    held = np.zeros(len(N), dtype=bool)
    if fit.holdout and "runs" in fit.holdout:
        held_c = fit.holdout["held_min_compute"]
        held = C >= held_c
    ax.scatter(C[~held], loss[~held], c=N[~held], cmap=cmap, norm=norm, s=18, edgecolors="k", linewidths=0.3)
    if held.any():
        ax.scatter(C[held], loss[held], c=N[held], cmap=cmap, norm=norm, s=40, marker="D", edgecolors="r")
    sizes = np.unique(N)
    pick = sizes[np.unique(np.linspace(0, len(sizes) - 1, min(len(sizes), 7)).round().astype(int))]
    d_line = np.geomspace(D.min(), D.max(), 200)
    for n in pick:
        ax.plot(6 * n * d_line, fit.predict(n, d_line), color=cmap(norm(n)), lw=1, alpha=0.8)
    c_line = np.geomspace(C.min() / 2, C.max() * 10, 200)
    ax.plot(c_line, fit.optimal_loss(c_line), "k--", lw=2, label="compute-optimal frontier")
    if fit.holdout and "parameters" in fit.holdout:
        q = fit.holdout["parameters"]
        sub = ScalingFit(**q, delta=fit.delta, objective=0.0, n_runs=0, convergence={})
        ax.plot(c_line, sub.optimal_loss(c_line), ":", color="0.4", lw=1.5, label="frontier without held-out runs")
        ax.scatter([], [], marker="D", facecolors="none", edgecolors="r", label="held-out runs")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOP)", ylabel="loss")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(
        f"E={fit.E:.3g}  A={fit.A:.4g}  B={fit.B:.4g}  alpha={fit.alpha:.3f}  beta={fit.beta:.3f}", fontsize=10
    )
    ax.legend(fontsize=8, loc="upper right")
    cbar = fig.colorbar(ax.collections[0], ax=ax)
    cbar.set_label("model size N (lines: fit at iso-N)")

    n_opt, d_opt = fit.compute_optimal(c_line)
    ax2.plot(c_line, n_opt, "C0", lw=2, label=f"N_opt ~ C^{fit.a:.3f}")
    ax2.plot(c_line, d_opt, "C1", lw=2, label=f"D_opt ~ C^{fit.b:.3f}")
    if fit._samples is not None and len(fit._samples) > 2:
        nat = _natural(fit._samples)
        with np.errstate(all="ignore"):
            G = (nat["alpha"] * nat["A"] / (nat["beta"] * nat["B"])) ** (1 / (nat["alpha"] + nat["beta"]))
            Nb = G[:, None] * (c_line[None, :] / 6) ** nat["a"][:, None]
            Db = c_line[None, :] / (6 * Nb)
        for band, color in ((Nb, "C0"), (Db, "C1")):
            ax2.fill_between(c_line, *np.nanpercentile(band, [2.5, 97.5], axis=0), color=color, alpha=0.2, lw=0)
    ax2.scatter(C, N, s=8, color="C0", alpha=0.35, label="runs: N")
    ax2.scatter(C, D, s=8, color="C1", alpha=0.35, label="runs: D")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOP)", ylabel="parameters / tokens")
    bands = fit._samples is not None and len(fit._samples) > 2
    ax2.set_title("compute-optimal allocation" + (" (bands: bootstrap 95%)" if bands else ""), fontsize=10)
    ax2.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)


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

    def to_dict(self) -> dict:
        return _jsonable(
            {
                "model": "per LLM size: loss = c0 + c1 u + c2 u^2 (+ c3 log D), u = log N_v; log N_v* = k log N_l + c",
                "k": self.k,
                "c": self.c,
                "k_se": self.k_se,
                "r2": self.r2,
                "groups": self.groups,
                "bootstrap": self.bootstrap,
            }
        )

    def summary(self) -> str:
        lines = [
            "Optimal ViT size per LLM size (quadratic in log N_v per LLM size), then log N_v* = k log N_l + c",
            f"  {'llm_params':>12} {'runs':>5} {'vit range':>21} {'N_v*':>11}  bracketed",
        ]
        for g in self.groups:
            rng_ = f"{g['vit_min']:.3g}..{g['vit_max']:.3g}"
            lines.append(
                f"  {g['llm_params']:>12.4g} {g['n_runs']:>5} {rng_:>21} {_fmt(g['vit_opt'], 4):>11}  "
                f"{'yes' if g['bracketed'] else 'no (' + g['note'] + ')'}"
            )
        boot = self.bootstrap
        row = f"  slope k = {self.k:.4f}"
        if self.k_se is not None:
            row += f" (OLS std err {self.k_se:.3g})"
        if boot:
            row += f", bootstrap std err {_fmt(boot['se']['k'], 3)}"
            for lv, iv in boot["intervals"].items():
                row += f", {lv}% [{_fmt(iv['k'][0], 4)}, {_fmt(iv['k'][1], 4)}]"
        lines.append(row)
        lines.append(
            f"  intercept c = {self.c:.4f}: N_v* = {math.exp(self.c):.4g} * N_l^{self.k:.4f}"
            + (f"; R^2 = {self.r2:.4f}" if self.r2 is not None else "")
        )
        if boot:
            lines.append(f"  bootstrap: {boot['n_valid']}/{boot['n']} resamples gave a line")
        return "\n".join(lines)

    def plot(self, path):
        """Write a PNG: loss against ViT size per LLM size with the quadratics and their minima, and the
        log-log line of N_v* against N_l (bootstrap 95% band)."""
        _plot_joint(self, path)
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
    (form and method: the module docstring). Needs >= 2 LLM sizes with a bracketed minimum."""
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


def _plot_joint(fit: JointFit, path):
    from matplotlib import colormaps

    vit, llm, loss = fit.data["vit"], fit.data["llm"], fit.data["loss"]
    labels = _groups(llm)
    fig, (ax, ax2) = _figure(12, 5, 2)
    cmap = colormaps["plasma"]
    n_groups = int(labels.max()) + 1
    for g, info in enumerate(fit.groups):
        sel = labels == g
        color = cmap(0.85 * g / max(1, n_groups - 1))
        ax.scatter(vit[sel], loss[sel], color=color, s=20, label=f"LLM {info['llm_params']:.3g}")
        u = np.log(vit[sel])
        if len(np.unique(np.round(u, 9))) >= 3:
            mu = u.mean()
            fitted = _quadratic_minimum(u - mu, loss[sel], None)
            if fitted is not None:
                coef = fitted[1]
                uu = np.linspace(u.min(), u.max(), 100) - mu
                ax.plot(np.exp(uu + mu), coef[0] + coef[1] * uu + coef[2] * uu * uu, color=color, lw=1)
        if info["bracketed"]:
            ustar = math.log(info["vit_opt"])
            fitted = _quadratic_minimum(u - u.mean(), loss[sel], None)
            if fitted is not None:
                coef, du = fitted[1], ustar - u.mean()
                ax.plot(info["vit_opt"], coef[0] + coef[1] * du + coef[2] * du * du, "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="ViT parameters N_v", ylabel="loss")
    ax.set_title("loss vs ViT size per LLM size (stars: minima)", fontsize=10)
    ax.legend(fontsize=7)
    bracketed = [g for g in fit.groups if g["bracketed"]]
    xl = np.array([g["llm_params"] for g in bracketed])
    yv = np.array([g["vit_opt"] for g in bracketed])
    ax2.scatter(xl, yv, color="k", zorder=3, label="N_v* per LLM size")
    x_line = np.geomspace(xl.min() / 1.5, xl.max() * 1.5, 100)
    ax2.plot(x_line, fit.optimal_vit(x_line), "C3", label=f"N_v* = {math.exp(fit.c):.3g} N_l^{fit.k:.3f}")
    if fit._samples is not None and len(fit._samples) > 2:
        band = np.exp(fit._samples[:, 1:2]) * x_line[None, :] ** fit._samples[:, 0:1]
        ax2.fill_between(x_line, *np.percentile(band, [2.5, 97.5], axis=0), color="C3", alpha=0.2, lw=0)
    ax2.set(xscale="log", yscale="log", xlabel="LLM parameters N_l", ylabel="optimal ViT parameters N_v*")
    ax2.set_title("optimal ViT size vs LLM size (band: bootstrap 95%)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)


# ----------------------------------------------------------------------------------------- command line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_arguments(subparsers):
    """Add `scaling fit` and `scaling joint` to an argparse subparsers object (`navil`'s commands); each sets
    `handler=run` (call `args.handler(args)`, which returns the exit code and raises `RunsError` on bad input)."""
    scaling = subparsers.add_parser(
        "scaling",
        help="fit scaling laws to training runs (Chinchilla L(N, D); NaViL's optimal ViT size vs LLM size)",
        description="Scaling-law fits from a CSV of training runs (columns: N/params, D/tokens or C/flops, loss; "
        "vit_params, llm_params for `joint`).",
    )
    _add_commands(scaling.add_subparsers(dest="scaling_command", metavar="{fit,joint}", required=True))
    return scaling


def _add_commands(which):
    fit = which.add_parser(
        "fit",
        help="fit L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss, L-BFGS-B from a grid, bootstrap)",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. / Epoch AI do: Huber loss (delta "
        "1e-3) on log loss, L-BFGS-B from a grid of starts; bootstrap intervals, a hold-out extrapolation error "
        "and the compute-optimal allocation.",
    )
    fit.add_argument("runs", metavar="RUNS.csv", help="the runs (columns N/params, D/tokens or C/flops, loss)")
    fit.add_argument("--plot", metavar="OUT.png", help="write a PNG of the fit and the compute-optimal frontier")
    fit.add_argument("--bootstrap", type=_count, default=200, metavar="N", help="bootstrap resamples (default 200)")
    fit.add_argument(
        "--holdout",
        type=_fraction,
        default=0.1,
        metavar="FRACTION",
        help="predict the largest-compute FRACTION of runs from a fit on the rest (default 0.1; 0: none)",
    )
    fit.add_argument("--delta", type=_positive, default=1e-3, help="Huber threshold on log loss (default 1e-3)")
    fit.add_argument("--grid", choices=sorted(GRIDS), default="hoffmann", help="starting grid (default hoffmann)")
    fit.add_argument(
        "--estimate-scale",
        action="store_true",
        help="Epoch AI's headline estimate: Huber likelihood with a fitted scale (in effect least absolute deviations)",
    )
    fit.add_argument(
        "--drop-highest-loss",
        type=_count,
        default=0,
        metavar="K",
        help="leave out the K highest-loss runs (Epoch drops 5 on the Chinchilla data)",
    )
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    fit.add_argument("--json", action="store_true", help="print the result as JSON")
    fit.set_defaults(handler=run)

    joint = which.add_parser(
        "joint",
        help="NaViL's optimal ViT size vs LLM size: log N_v* = k log N_l + c",
        description="For each LLM size, the loss-minimising ViT size from a quadratic in log N_v; then the log-log "
        "line log N_v* = k log N_l + c with bootstrap intervals.",
    )
    joint.add_argument("runs", metavar="RUNS.csv", help="the runs (columns vit_params, llm_params, loss; D optional)")
    joint.add_argument("--plot", metavar="OUT.png", help="write a PNG of the per-LLM-size curves and the line")
    joint.add_argument("--bootstrap", type=_count, default=200, metavar="N", help="bootstrap resamples (default 200)")
    joint.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    joint.add_argument("--json", action="store_true", help="print the result as JSON")
    joint.set_defaults(handler=run)


def run(args) -> int:
    """Run a parsed `scaling fit` / `scaling joint` command; prints the result, returns the exit code."""
    try:
        import scipy  # noqa: F401
    except ImportError:
        raise RunsError("the scaling fits need scipy (pip install 'navil-hf[research]')") from None
    if args.scaling_command == "fit":
        runs = read_runs(args.runs, kind="fit").drop_highest_loss(args.drop_highest_loss)
        if len(runs) < MIN_RUNS:
            raise RunsError(f"{runs.source}: {len(runs)} runs left; the fit needs at least {MIN_RUNS}")
        result = fit_scaling_law(
            runs.N,
            runs.D,
            runs.loss,
            delta=args.delta,
            grid=args.grid,
            bootstrap=args.bootstrap,
            seed=args.seed,
            holdout=args.holdout or None,
            estimate_scale=args.estimate_scale,
        )
    else:
        runs = read_runs(args.runs, kind="joint")
        result = fit_joint(
            runs.vit_params, runs.llm_params, runs.loss, runs.D, bootstrap=args.bootstrap, seed=args.seed
        )
    if args.plot:
        result.plot(args.plot)
    if args.json:
        out = result.to_dict()
        if args.plot:
            out["plot"] = str(args.plot)
        print(json.dumps(out, indent=2))
    else:
        print(f"{runs.source}:")
        print(result.summary())
        if args.plot:
            print(f"plot: {args.plot}")
    if args.scaling_command == "fit" and not result.converged:
        return EXIT_FAILED
    return EXIT_OK


def main(argv=None) -> int:
    """`navil scaling ...` on its own (also `python -m navil_hf.research.scaling`): returns the exit code; bad
    input ends with one line on stderr and exit code 2."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    parser = Parser(
        prog="navil scaling",
        description="Scaling-law fits from a CSV of training runs (columns: N/params, D/tokens or C/flops, loss; "
        "vit_params, llm_params for `joint`).",
    )
    _add_commands(parser.add_subparsers(dest="scaling_command", metavar="{fit,joint}", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except (RunsError, ValueError) as e:
        print(f"navil scaling {args.scaling_command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
