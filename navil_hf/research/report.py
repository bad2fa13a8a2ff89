"""What the scaling fits report: the text summaries of `ScalingFit` and `JointFit` and their JSON-ready
dicts (`navil_hf.research.scaling`; their methods `summary` and `to_dict` call these)."""

from __future__ import annotations

import math

import numpy as np


def jsonable(x):
    """`x` with numpy scalars and arrays as plain Python values and non-finite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def number(x, digits=5):
    """`x` to `digits` significant digits; "-" for None or a non-finite number."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def fit_to_dict(fit) -> dict:
    """A `ScalingFit` as a dict of plain JSON values (non-finite numbers: None)."""
    out = {
        "model": "L(N, D) = E + A / N**alpha + B / D**beta",
        "parameters": fit.params,
        "log_parameters": {k: math.log(v) if v > 0 else None for k, v in (("e", fit.E), ("a", fit.A), ("b", fit.B))},
        "degenerate": fit.degenerate,
        "objective": {
            "kind": "huber_likelihood" if fit.estimate_scale else "huber",
            "delta": fit.delta,
            "value": fit.objective,
            "sigma": fit.sigma,
            "n_runs": fit.n_runs,
        },
        "fit": {"grid": fit.grid, "seed": fit.seed},
        "convergence": fit.convergence,
        "allocation": {
            "formula": "N_opt = G (C/6)**a, D_opt = (C/6)**b / G, C = 6 N D",
            "a": fit.a,
            "b": fit.b,
            "G": fit.G,
        },
        "bootstrap": fit.bootstrap,
        "holdout": fit.holdout,
    }
    return jsonable(out)


def format_fit(fit) -> str:
    """The text summary of a `ScalingFit`: its parameters with bootstrap errors and intervals, the allocation,
    the hold-out error and the convergence."""
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
    for name in values:  # E, A, B, alpha, beta, a, b
        if name == "a":
            lines.append("  compute-optimal exponents (N_opt ~ C^a, D_opt ~ C^b; a = beta/(alpha+beta)):")
        row = f"  {name:6} {number(values[name]):>11} {number(boot['se'][name] if boot else None, 3):>10}"
        for lv in levels:
            iv = boot["intervals"][lv][name]
            row += f" {f'[{number(iv[0])}, {number(iv[1])}]' if iv else '-':>24}"
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
            f"  N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A/(beta B))^(1/(alpha+beta)) = {number(fit.G)}"
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


def joint_to_dict(fit) -> dict:
    """A `JointFit` as a dict of plain JSON values (non-finite numbers: None)."""
    return jsonable(
        {
            "model": "per LLM size: loss = c0 + c1 u + c2 u^2 (+ c3 log D), u = log N_v; log N_v* = k log N_l + c",
            "k": fit.k,
            "c": fit.c,
            "k_se": fit.k_se,
            "r2": fit.r2,
            "groups": fit.groups,
            "bootstrap": fit.bootstrap,
        }
    )


def format_joint(fit) -> str:
    """The text summary of a `JointFit`: the optimal ViT size per LLM size, then the line with its errors."""
    lines = [
        "Optimal ViT size per LLM size (quadratic in log N_v per LLM size), then log N_v* = k log N_l + c",
        f"  {'llm_params':>12} {'runs':>5} {'vit range':>21} {'N_v*':>11}  bracketed",
    ]
    for g in fit.groups:
        rng_ = f"{g['vit_min']:.3g}..{g['vit_max']:.3g}"
        lines.append(
            f"  {g['llm_params']:>12.4g} {g['n_runs']:>5} {rng_:>21} {number(g['vit_opt'], 4):>11}  "
            f"{'yes' if g['bracketed'] else 'no (' + g['note'] + ')'}"
        )
    boot = fit.bootstrap
    row = f"  slope k = {fit.k:.4f}"
    if fit.k_se is not None:
        row += f" (OLS std err {fit.k_se:.3g})"
    if boot:
        row += f", bootstrap std err {number(boot['se']['k'], 3)}"
        for lv, iv in boot["intervals"].items():
            row += f", {lv}% [{number(iv['k'][0], 4)}, {number(iv['k'][1], 4)}]"
    lines.append(row)
    lines.append(
        f"  intercept c = {fit.c:.4f}: N_v* = {math.exp(fit.c):.4g} * N_l^{fit.k:.4f}"
        + (f"; R^2 = {fit.r2:.4f}" if fit.r2 is not None else "")
    )
    if boot:
        lines.append(f"  bootstrap: {boot['n_valid']}/{boot['n']} resamples gave a line")
    return "\n".join(lines)
