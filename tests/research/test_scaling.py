"""navil_hf.research.scaling: the Chinchilla-form fit recovers known parameters from noisy synthetic runs (and the
truth lies in its bootstrap intervals), reproduces Epoch AI's refit of Hoffmann et al.'s extracted data
(tests/research/data/README.md) to the digits Epoch reports, its compute-optimal allocation equals a brute-force
minimisation, the joint ViT/LLM fit recovers a known slope, bad runs files fail on one line, and the command
line prints a report and writes PNGs."""

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the scaling fits need scipy (the `research` extra)")

from navil_hf.cli import main as navil
from navil_hf.research import scaling
from navil_hf.research.scaling import RunsError, fit_joint, fit_scaling_law, read_runs

DATA = Path(__file__).resolve().parent / "data"
# Epoch AI's refit of Chinchilla's extracted runs (their five highest-loss runs dropped), analyzing-chinchilla
# notebook: the headline estimate (Huber likelihood with a fitted scale; printed to 5 decimals) and its
# negative log-likelihood, and the "Replicate exactly" grid fit of the fixed-delta Huber loss.
EPOCH_HEADLINE = {"E": 1.81686, "A": 482.00572, "B": 2085.43420, "alpha": 0.34781, "beta": 0.36585}
EPOCH_NLL = -879.7731390602344
EPOCH_REPLICATE = {"E": 1.817235504, "A": 477.8417125, "B": 2143.863788, "alpha": 0.3473126576, "beta": 0.3671826174}

TRUE = {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}
# Tolerances for one noisy synthetic data set (64 runs, 1% lognormal noise): ~3 standard deviations of each
# estimate over 20 seeds (sd: E 0.020, alpha 0.010, beta 0.006 (+0.004 bias), log A 0.16, log B 0.12).
TOLERANCE = {"E": 0.06, "alpha": 0.03, "beta": 0.025, "log A": 0.5, "log B": 0.4}


def law(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def synthetic_runs(seed=0, sigma=0.01):
    """An 8 x 8 grid of N in 1e7..1e10 and D in 1e8..1e12, loss with lognormal noise."""
    rng = np.random.default_rng(seed)
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e8, 1e12, 8)))
    return N, D, law(N, D) * np.exp(sigma * rng.standard_normal(N.size))


@pytest.fixture(scope="module")
def synthetic_fit():
    N, D, loss = synthetic_runs()
    return fit_scaling_law(N, D, loss, grid="coarse", bootstrap=200, holdout=0.1, seed=0)


def test_synthetic_parameters_recovered_within_tolerance_and_intervals(synthetic_fit):
    fit = synthetic_fit
    assert fit.converged and fit.convergence["max_gradient"] <= scaling.GRADIENT_TOLERANCE
    assert fit.convergence["n_at_best"] >= 2  # more than one refined start reached the optimum
    assert abs(fit.E - TRUE["E"]) < TOLERANCE["E"]
    assert abs(fit.alpha - TRUE["alpha"]) < TOLERANCE["alpha"]
    assert abs(fit.beta - TRUE["beta"]) < TOLERANCE["beta"]
    assert abs(math.log(fit.A / TRUE["A"])) < TOLERANCE["log A"]
    assert abs(math.log(fit.B / TRUE["B"])) < TOLERANCE["log B"]
    boot = fit.bootstrap
    assert boot["n"] == 200 and boot["n_converged"] >= 195
    for name, value in TRUE.items():
        lo95, hi95 = fit.interval(name, 0.95)
        lo80, hi80 = fit.interval(name, 0.8)
        assert lo95 <= value <= hi95, (name, value, lo95, hi95)
        assert lo95 <= lo80 <= getattr(fit, name) <= hi80 <= hi95
        assert boot["se"][name] > 0
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    lo, hi = fit.interval("a", 0.95)
    assert lo <= a <= hi and fit.a + fit.b == pytest.approx(1.0)


def test_predict_and_to_dict(synthetic_fit):
    fit = synthetic_fit
    N, D, loss = synthetic_runs()
    assert np.max(np.abs(fit.predict(N, D) / loss - 1)) < 0.05
    assert fit.predict(1e9, 1e10) == pytest.approx(law(1e9, 1e10, fit.params))
    out = json.loads(json.dumps(fit.to_dict()))  # JSON as it is
    assert out["parameters"]["alpha"] == pytest.approx(fit.alpha)
    assert out["allocation"]["a"] == pytest.approx(fit.a) and out["convergence"]["converged"] is True
    assert set(out["bootstrap"]["intervals"]) == {"80", "95"}
    assert "summary" not in out and "E" in fit.summary() and "hold-out" in fit.summary()


def test_holdout_predicts_the_largest_compute_runs(synthetic_fit):
    h = synthetic_fit.holdout
    N, D, loss = synthetic_runs()
    C = np.sort(6 * N * D)
    assert h["n_held"] == math.ceil(0.1 * 64) and h["n_fit"] == 64 - h["n_held"]
    assert h["held_min_compute"] == pytest.approx(C[-h["n_held"]]) and h["fit_max_compute"] < h["held_min_compute"]
    assert h["converged"]
    # 1% noise on each run: the extrapolated losses are within a few per cent
    assert h["mean_abs_rel_error"] < 0.02 and h["max_abs_rel_error"] < 0.04
    for run in h["runs"]:
        assert run["predicted"] == pytest.approx(law(run["N"], run["D"], h["parameters"]))


def test_compute_optimal_allocation_equals_brute_force(synthetic_fit):
    from scipy.optimize import minimize_scalar

    fit = synthetic_fit
    for C in (1e19, 1e21, 1e23, 1e25):
        n_opt, d_opt = fit.compute_optimal(C)
        assert 6 * n_opt * d_opt == pytest.approx(C)
        # brute force: a fine grid in log N, then a bounded 1-D minimisation around its best point
        grid = np.linspace(math.log(C / 6) - 40, 40, 200_001)
        grid = grid[grid < math.log(C / 6)]
        losses = fit.predict(np.exp(grid), C / (6 * np.exp(grid)))
        best = grid[np.argmin(losses)]
        res = minimize_scalar(
            lambda u, C=C: float(fit.predict(math.exp(u), C / (6 * math.exp(u)))),
            bounds=(best - 1e-3, best + 1e-3),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert math.exp(res.x) == pytest.approx(n_opt, rel=1e-6)
        assert fit.optimal_loss(C) == pytest.approx(res.fun, rel=1e-12)
    # the exponents: N_opt ~ C^a, D_opt ~ C^b
    (n1, d1), (n2, d2) = fit.compute_optimal(1e20), fit.compute_optimal(1e24)
    assert math.log(n2 / n1) / math.log(1e4) == pytest.approx(fit.a)
    assert math.log(d2 / d1) / math.log(1e4) == pytest.approx(fit.b)
    assert fit.G == pytest.approx((fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta)))


def test_screened_grid_finds_the_optimum_of_lbfgsb_from_every_start():
    """refine=None (L-BFGS-B from every grid start, Hoffmann/Epoch's procedure) and the default screening agree."""
    N, D, loss = synthetic_runs(seed=3)
    grid = {"a": (0, 10), "b": (0, 10, 20), "e": (-1, 1), "alpha": (0.5, 1.0), "beta": (0.5, 1.0)}
    every = fit_scaling_law(N, D, loss, grid=grid, bootstrap=0, holdout=None, refine=None)
    screened = fit_scaling_law(N, D, loss, grid=grid, bootstrap=0, holdout=None)
    assert every.convergence["n_refined"] == every.convergence["n_starts"] == 48
    assert every.converged and screened.converged
    assert screened.objective == pytest.approx(every.objective, rel=1e-12)
    for name in TRUE:
        assert getattr(screened, name) == pytest.approx(getattr(every, name), rel=1e-7)


def test_reproduces_epochs_chinchilla_refit():
    runs = read_runs(DATA / "chinchilla_svg_extracted_data.csv")
    assert len(runs) == 245
    assert runs.D == pytest.approx(runs.C / (6 * runs.N))
    runs = runs.drop_highest_loss(5)  # Epoch: losses < sorted(losses)[-5]
    assert len(runs) == 240
    fit = fit_scaling_law(runs.N, runs.D, runs.loss, grid="hoffmann", bootstrap=0, holdout=None, estimate_scale=True)
    # Epoch's headline estimate, to the digits they print (A, B to 5 decimals, the others to 5 decimals too)
    assert fit.converged
    for name, value in EPOCH_HEADLINE.items():
        assert round(getattr(fit, name), 5) == value, (name, getattr(fit, name), value)
    assert fit.objective == pytest.approx(EPOCH_NLL, abs=1e-8)
    assert fit.sigma == pytest.approx(math.exp(-12.26662388), rel=1e-6)
    # The fixed-delta Huber fit (Hoffmann's objective) it starts from: converged, from the full 4500-start grid;
    # Epoch's "Replicate exactly" stopped at scipy's default tolerances, within 2e-4 of the optimum.
    start = fit.convergence["start"]
    assert start["converged"] and start["n_starts"] == 4500 and start["n_at_best"] >= 4
    for name, value in EPOCH_REPLICATE.items():
        assert start["parameters"][name] == pytest.approx(value, rel=2.5e-4), name
    plain = {"E": 1.817218, "A": 477.826, "B": 2143.42, "alpha": 0.3473105, "beta": 0.3671724}
    for name, value in plain.items():
        assert start["parameters"][name] == pytest.approx(value, rel=1e-5), name


def test_estimate_scale_fit_and_its_bootstrap():
    """Epoch's Huber likelihood with a fitted scale on synthetic runs: near the truth and the fixed-delta fit,
    sigma ~ mean |residual| * delta, and the bootstrap (fixed-delta refits, as Epoch's) converges."""
    N, D, loss = synthetic_runs(seed=1)
    fit = fit_scaling_law(N, D, loss, grid="coarse", bootstrap=50, holdout=None, estimate_scale=True)
    assert fit.converged and fit.convergence["start"]["converged"]
    assert abs(fit.alpha - TRUE["alpha"]) < TOLERANCE["alpha"] and abs(fit.beta - TRUE["beta"]) < TOLERANCE["beta"]
    plain = fit.convergence["start"]["parameters"]
    assert abs(fit.alpha - plain["alpha"]) < 0.02 and abs(fit.E - plain["E"]) < 0.03
    residual = np.abs(np.log(fit.predict(N, D) / loss)).mean()
    assert fit.sigma == pytest.approx(1e-3 * residual, rel=0.05)
    assert fit.bootstrap["n_converged"] == 50 and "sigma" in fit.summary()


# --------------------------------------------------------------------------------------------- joint fit

K_TRUE = 0.6


def joint_runs(seed=0, k=K_TRUE, sigma=0.002):
    """5 LLM sizes x 9 ViT sizes; at each LLM size the loss is quadratic in log N_v around
    log N_v* = log 3e8 + k log(N_l / 1e9)."""
    rng = np.random.default_rng(seed)
    llm, vit = (x.ravel() for x in np.meshgrid(np.geomspace(5e8, 3e10, 5), np.geomspace(3e7, 1e10, 9)))
    ustar = math.log(3e8) + k * np.log(llm / 1e9)
    loss = 1.7 + 300 / llm**0.3 + 0.01 * (np.log(vit) - ustar) ** 2
    return vit, llm, loss * np.exp(sigma * rng.standard_normal(loss.size))


def test_joint_fit_recovers_the_slope(tmp_path):
    vit, llm, loss = joint_runs()
    fit = fit_joint(vit, llm, loss, bootstrap=200, seed=0)
    assert len(fit.groups) == 5 and all(g["bracketed"] for g in fit.groups)
    assert abs(fit.k - K_TRUE) < 0.05
    lo, hi = fit.interval("k", 0.95)
    assert lo <= K_TRUE <= hi and hi - lo < 0.3
    assert fit.bootstrap["n_valid"] == 200 and fit.k_se > 0 and fit.r2 > 0.99
    assert fit.optimal_vit(1e9) == pytest.approx(3e8, rel=0.1)
    assert json.loads(json.dumps(fit.to_dict()))["k"] == pytest.approx(fit.k)
    assert "slope k" in fit.summary()
    assert fit.plot(tmp_path / "joint.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_joint_fit_flags_unbracketed_minima():
    vit, llm, loss = joint_runs()
    keep = ~((llm > 2e10) & (vit > 1e9))  # the largest LLM: its optimum (~2.4e9) is no longer inside
    fit = fit_joint(vit[keep], llm[keep], loss[keep], bootstrap=0)
    assert [g["bracketed"] for g in fit.groups] == [True, True, True, True, False]
    assert fit.groups[-1]["note"] == "minimum outside the ViT sizes run"
    with pytest.raises(RunsError, match="needs >= 2 LLM sizes"):
        fit_joint(vit[llm < 6e8], llm[llm < 6e8], loss[llm < 6e8], bootstrap=0)


# ------------------------------------------------------------------------------------------- runs files


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_runs_columns(tmp_path):
    N, D, loss = synthetic_runs()
    path = write_csv(
        tmp_path / "r.csv",
        ["Name", "PARAMS", "Flops", "Loss"],
        [[f"r{i}", n, 6 * n * d, l] for i, (n, d, l) in enumerate(zip(N, D, loss))],
    )
    runs = read_runs(path)
    assert runs.N == pytest.approx(N) and runs.D == pytest.approx(D) and runs.names[3] == "r3"
    assert runs.vit_params is None
    path = write_csv(tmp_path / "j.csv", ["vit_params", "llm_params", "tokens", "loss"], [[1e8, 1e9, 1e10, 2.5]] * 3)
    runs = read_runs(path, kind="joint")
    assert runs.N == pytest.approx([1.1e9] * 3) and runs.D == pytest.approx([1e10] * 3)  # N = vit + llm


@pytest.mark.parametrize(
    "header,rows,kind,fragment",
    [
        (["N", "D"], [[1, 2]] * 5, "fit", "no 'loss' column (columns: N, D)"),
        (["D", "loss"], [[1, 2]] * 5, "fit", "no model-size column"),
        (["N", "loss"], [[1, 2]] * 5, "fit", "no data column (D or tokens) and no compute column"),
        (["N", "D", "loss"], [[1, 2, 3]] * 4, "fit", "4 runs; the 5-parameter fit needs at least 5"),
        (["N", "D", "loss"], [[1, 2, 3]] * 3 + [[1, -2, 3]] * 2, "fit", "line 5: D must be positive"),
        (["N", "D", "loss"], [[1, 2, 3]] * 3 + [[1, 2, 0]] * 2, "fit", "line 5: loss must be positive"),
        (["N", "D", "loss"], [[1, 2, "nan"]] * 5, "fit", "line 2: loss must be positive and finite"),
        (["N", "D", "loss"], [[1, 2, "abc"]] * 5, "fit", "column 'loss': 'abc' is not a number"),
        (["N", "D", "loss"], [[1, 2, ""]] * 5, "fit", "line 2: no value in column 'loss'"),
        (["N", "params", "D", "loss"], [[1, 1, 2, 3]] * 5, "fit", "columns 'N', 'params' all mean N"),
        (["N", "D", "loss"], [[1, 2, 3]] * 5, "joint", "no 'vit_params' column"),
    ],
)
def test_read_runs_errors_are_one_line(tmp_path, header, rows, kind, fragment):
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(RunsError) as info:
        read_runs(path, kind=kind)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert fragment in message and str(path) in message


def test_fit_rejects_bad_arrays():
    with pytest.raises(RunsError, match="at least 5"):
        fit_scaling_law([1e8] * 4, [1e9] * 4, [3.0] * 4)
    with pytest.raises(RunsError, match="loss must be positive"):
        fit_scaling_law([1e8] * 5, [1e9] * 5, [3.0, 3.0, 3.0, 3.0, -1.0])


# ------------------------------------------------------------------------------------------ command line


def test_degenerate_names_steps_and_collapsed_terms(synthetic_fit):
    """A fit can converge and still not be a law: an exponent of 12 (a step inside the runs) or an E of
    1e-114 (collapsed) is named, as a non-positive exponent is; Chinchilla-like parameters are not."""
    fit = synthetic_fit
    assert fit.degenerate == []
    step = dataclasses.replace(fit, alpha=12.0, E=1e-114)
    assert step.degenerate == ["alpha = 12 > 3 (a step, not a power law)", "E = 1e-114 (collapsed)"]
    assert not step.has_allocation and math.isnan(step.a) and "N_opt =" not in step.summary()
    assert dataclasses.replace(fit, beta=-0.1).degenerate == ["beta = -0.1 <= 0"]
    collapsed_floor = dataclasses.replace(fit, E=0.0)
    assert collapsed_floor.degenerate == ["E = 0 (collapsed)"] and collapsed_floor.has_allocation


def test_runs_without_diminishing_returns_give_a_degenerate_fit_that_still_reports(tmp_path):
    """Runs that do not improve with N (a sweep stuck on a plateau): the unconstrained fit has a collapsed
    term or a non-positive exponent; it says so, has no compute-optimal allocation (nan), and its report,
    dict (strict JSON) and plot still work (they used to fail on log(0) and complex powers)."""
    rng = np.random.default_rng(0)
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(3e5, 5e6, 3), np.geomspace(1e5, 2e6, 10)))
    loss = 0.40 * np.exp(0.01 * rng.standard_normal(N.size)) + 0.02 * (D / 2e6) ** 2  # flat in N, rising in D
    fit = fit_scaling_law(N, D, loss, grid="coarse", bootstrap=20, seed=0)
    assert fit.degenerate and not fit.has_allocation
    assert all(math.isnan(x) for x in (fit.a, fit.b, fit.G, *fit.compute_optimal(1e15)))
    assert "degenerate fit" in fit.summary() and "N_opt =" not in fit.summary()
    json.dumps(fit.to_dict(), allow_nan=False)
    fit.plot(tmp_path / "fit.png")
    assert (tmp_path / "fit.png").stat().st_size > 0


def test_cli_fit_prints_and_plots(tmp_path, capsys):
    N, D, loss = synthetic_runs()
    path = write_csv(tmp_path / "runs.csv", ["N", "tokens", "loss"], zip(N, D, loss))
    png = tmp_path / "fit.png"
    assert navil(["scaling", "fit", str(path), "--plot", str(png), "--bootstrap", "50", "--grid", "coarse"]) == 0
    out = capsys.readouterr().out
    for fragment in ("alpha", "95% interval", "a = beta/(alpha+beta)", "hold-out:", "convergence: converged"):
        assert fragment in out, fragment
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code = navil(["scaling", "fit", str(path), "--bootstrap", "0", "--holdout", "0", "--grid", "coarse", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bootstrap"] is None and out["holdout"] is None and out["convergence"]["converged"]


def test_cli_joint_and_errors(tmp_path, capsys):
    vit, llm, loss = joint_runs()
    path = write_csv(tmp_path / "joint.csv", ["vit_params", "llm_params", "loss"], zip(vit, llm, loss))
    png = tmp_path / "joint.png"
    assert navil(["scaling", "joint", str(path), "--plot", str(png), "--bootstrap", "20"]) == 0
    assert "slope k = " in capsys.readouterr().out and png.is_file()
    bad = write_csv(tmp_path / "bad.csv", ["N", "D"], [[1, 2]] * 5)
    for argv, fragment in (
        (["fit", str(bad)], "no 'loss' column"),
        (["fit", str(tmp_path / "missing.csv")], "cannot read"),
        (["fit", str(path)], "no data column"),
        (["fit", str(bad), "--holdout", "1.5"], "fraction in [0, 1)"),
    ):
        assert navil(["scaling", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err


def test_the_command_module_wires_into_a_parent_parser(tmp_path, capsys):
    """As `navil` does: the `scaling` subparser gets the command's options; `run(args)` runs the command."""
    import argparse

    from navil_hf.commands import scaling as command

    parser = argparse.ArgumentParser(prog="navil")
    command.add_arguments(parser.add_subparsers(dest="command", required=True).add_parser("scaling"))
    vit, llm, loss = joint_runs()
    path = write_csv(tmp_path / "joint.csv", ["vit_params", "llm_params", "loss"], zip(vit, llm, loss))
    args = parser.parse_args(["scaling", "joint", str(path), "--bootstrap", "0", "--json"])
    assert command.run(args) == 0
    assert json.loads(capsys.readouterr().out)["k"] == pytest.approx(K_TRUE, abs=0.05)
    args = parser.parse_args(["scaling", "fit", str(path)])
    with pytest.raises(RunsError, match="no data column"):
        command.run(args)
