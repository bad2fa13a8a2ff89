"""`navil scaling fit|joint RUNS.csv`: scaling-law fits from a CSV of training runs
(`navil_hf.research.scaling`; the method: docs/research/scaling.md)."""

import json

from ..errors import EXIT_FAILED, EXIT_OK
from .arguments import fraction, non_negative_int, positive_float

HELP = "fit scaling laws to training runs (Chinchilla L(N, D); NaViL's optimal ViT size vs LLM size)"
DESCRIPTION = (
    "Scaling-law fits from a CSV of training runs (columns: N/params, D/tokens or C/flops, loss; vit_params, "
    "llm_params for `joint`)."
)


def add_arguments(parser):
    """The subcommands `fit` and `joint` and their options, on the `scaling` parser (`args.scaling_command`
    names the one given)."""
    from ..research.scaling import GRIDS

    which = parser.add_subparsers(dest="scaling_command", metavar="{fit,joint}", required=True)
    fit = which.add_parser(
        "fit",
        help="fit L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss, L-BFGS-B from a grid, bootstrap)",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. / Epoch AI do: Huber loss (delta "
        "1e-3) on log loss, L-BFGS-B from a grid of starts; bootstrap intervals, a hold-out extrapolation error "
        "and the compute-optimal allocation.",
    )
    fit.add_argument("runs", metavar="RUNS.csv", help="the runs (columns N/params, D/tokens or C/flops, loss)")
    fit.add_argument("--plot", metavar="OUT.png", help="write a PNG of the fit and the compute-optimal frontier")
    fit.add_argument(
        "--bootstrap", type=non_negative_int, default=200, metavar="N", help="bootstrap resamples (default 200)"
    )
    fit.add_argument(
        "--holdout",
        type=fraction,
        default=0.1,
        metavar="FRACTION",
        help="predict the largest-compute FRACTION of runs from a fit on the rest (default 0.1; 0: none)",
    )
    fit.add_argument("--delta", type=positive_float, default=1e-3, help="Huber threshold on log loss (default 1e-3)")
    fit.add_argument("--grid", choices=sorted(GRIDS), default="hoffmann", help="starting grid (default hoffmann)")
    fit.add_argument(
        "--estimate-scale",
        action="store_true",
        help="Epoch AI's headline estimate: Huber likelihood with a fitted scale (in effect least absolute deviations)",
    )
    fit.add_argument(
        "--drop-highest-loss",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="leave out the K highest-loss runs (Epoch drops 5 on the Chinchilla data)",
    )
    fit.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")
    fit.add_argument("--json", action="store_true", help="print the result as JSON")

    joint = which.add_parser(
        "joint",
        help="NaViL's optimal ViT size vs LLM size: log N_v* = k log N_l + c",
        description="For each LLM size, the loss-minimising ViT size from a quadratic in log N_v; then the log-log "
        "line log N_v* = k log N_l + c with bootstrap intervals.",
    )
    joint.add_argument("runs", metavar="RUNS.csv", help="the runs (columns vit_params, llm_params, loss; D optional)")
    joint.add_argument("--plot", metavar="OUT.png", help="write a PNG of the per-LLM-size curves and the line")
    joint.add_argument(
        "--bootstrap", type=non_negative_int, default=200, metavar="N", help="bootstrap resamples (default 200)"
    )
    joint.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")
    joint.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    """Run `scaling fit` / `scaling joint`: prints the result; exit code 1 when the fit did not converge. Bad
    runs raise `RunsError` (a `UsageError`)."""
    from ..research.scaling import MIN_RUNS, RunsError, fit_joint, fit_scaling_law, read_runs

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
