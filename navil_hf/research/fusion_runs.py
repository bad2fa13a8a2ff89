"""The fusion sweep's runs on disk, their fits and plot.

A sweep (`benchmarks/fusion_sweep.py`) writes every eval point to `runs.csv` as it is measured
(`append_csv`; `CSV_COLUMNS`) and each finished run to `runs/NAME/result.json` (`navil_hf.research.fusion`).
`finished_runs` and `saved_runs` read them back for `--resume` and `--refit`; `fit_variant` fits one
variant's CSV through `navil_hf.research.scaling` (`read_runs`, `fit_scaling_law`: the file and reader
`navil scaling fit` uses); `sample_flops`, `add_compute` and `compute_winners` put each run's training
compute on one scale (the package's FLOP accounting, the ViT included) and say which variant is ahead at a
given compute; `plot_sweep` draws the comparison of the variants.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from navil_hf.errors import UsageError, one_line
from navil_hf.tasks.heldout import exact_match

CSV_COLUMNS = ("name", "variant", "size", "N", "D", "loss", "stage", "step", "samples", "loss_per_answer", "lr",
               "n_vision", "n_connector", "n_llm", "n_total", "seconds")  # fmt: skip


NUMERIC = {"N": int, "D": int, "step": int, "samples": int, "n_vision": int, "n_connector": int, "n_llm": int,
           "n_total": int, "loss": float, "loss_per_answer": float, "seconds": float, "lr": float}  # fmt: skip


def read_rows(path) -> dict[str, list[dict]]:
    """The eval points of a runs.csv, per run name, typed (a first sweep's file has no `stage`: mixed)."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    runs = {}
    for row in table:
        typed = {k: NUMERIC[k](float(v)) if k in NUMERIC and v not in (None, "") else v for k, v in row.items()}
        typed.setdefault("stage", "mixed")
        runs.setdefault(row["name"], []).append(typed)
    return runs


def finished_runs(workdir, specs) -> dict[str, dict]:
    """The runs of `specs` that finished in `workdir` (runs/NAME/result.json), by name; each must match its
    spec's settings (steps, color steps, color task, learning rate: UsageError if not)."""
    done = {}
    for spec in specs:
        path = Path(workdir) / "runs" / spec["name"] / "result.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for key in ("steps", "color_steps", "color_task", "lr"):
            if key in result and result[key] != spec[key]:
                raise UsageError(f"{path}: {key} {result[key]} where this sweep has {spec[key]}; use the same settings "
                                 "(or another --workdir)")  # fmt: skip
        done[spec["name"]] = result
    return done


def saved_runs(workdir, specs, data, test_records, acc_records):
    """The runs of an earlier sweep in `workdir`: runs.json as the training wrote it at its end; else (a sweep
    that stopped, or is still going) each finished run's runs/NAME/result.json and, for the others, their
    points so far from runs.csv (`finished`: False, no accuracy), or with a trained model but no result.json
    (a first-version sweep stopped while fitting) its accuracy measured again on `acc_records` of `test_records`
    (images under `data`). Returns (runs, seconds); UsageError when `workdir` holds no runs."""
    runs_file = workdir / "runs.json"
    if runs_file.is_file():
        saved = json.loads(runs_file.read_text())
        return saved["runs"], saved.get("seconds")
    from navil_hf.training.train import load_model, load_processor

    done = finished_runs(workdir, specs)
    table = read_rows(workdir / "runs.csv")
    if not done and not table:
        raise UsageError(f"--refit: {workdir} has no runs.json, result.json or runs.csv (run the sweep first)")
    results = []
    for spec in specs:
        if spec["name"] in done:
            results.append(done[spec["name"]])
            print(f"{spec['name']}: finished, {len(done[spec['name']]['rows'])} points (its result.json)")
            continue
        rows = table.get(spec["name"])
        if not rows:
            continue
        params = {"N": rows[0]["N"], **{k: rows[0][k] for k in ("n_vision", "n_connector", "n_llm", "n_total")}}
        run = {**spec, "params": params, "rows": rows, "final": {}, "after_color": {}, "loss_step0": float("nan"),
               "seconds_per_step": None, "finished": False}  # fmt: skip
        model_dir = workdir / "runs" / spec["name"] / "model"
        if (model_dir / "config.json").is_file() and "color" not in {r["stage"] for r in rows}:
            run["final"] = exact_match(load_model(model_dir), load_processor(model_dir), test_records[:acc_records],
                                       data)  # fmt: skip
            run.update(finished=True, trained_model=str(model_dir), rebuilt_from_csv=True)
            print(f"{spec['name']}: {len(rows)} points from runs.csv, accuracy {run['final']['accuracy']:.3f} "
                  "measured again")  # fmt: skip
        else:
            print(f"{spec['name']}: not finished, {len(rows)} points so far (to step {rows[-1]['step']} of "
                  f"{spec['steps']}) from runs.csv")  # fmt: skip
        results.append(run)
    seconds = None
    sweep = workdir / "sweep.json"
    if sweep.is_file() and (workdir / "runs.csv").is_file():  # the sweep's start to its last point
        seconds = round((workdir / "runs.csv").stat().st_mtime - json.loads(sweep.read_text())["started"], 1)
    return results, seconds


def fit_variant(path, bootstrap, seed):
    """`fit_scaling_law` on the runs of one variant's CSV `path` (read by `read_runs`, as `navil scaling fit`
    reads it; 10% held out from 10 rows on): (the fit, its dict and summary), or (None, {"skipped": why})."""
    try:
        from navil_hf.research.scaling import fit_scaling_law, read_runs

        runs = read_runs(path)
        fit = fit_scaling_law(runs.N, runs.D, runs.loss, bootstrap=bootstrap, seed=seed,
                              holdout=0.1 if len(runs) >= 10 else None)  # fmt: skip
    except (ImportError, ValueError) as e:  # RunsError (a UsageError) for too few or bad rows; no scipy
        return None, {"skipped": f"no fit: {one_line(e)}"}
    return fit, {**fit.to_dict(), "summary": fit.summary()}


def annealed_point(run) -> dict:
    """The fitted point of an annealed run (`--budgets`): its last row, with D the tokens of its mixed stage
    alone (the end's D less the switch's). Every run of such a sweep starts from the same color stage (same
    steps and data), so that stage is a fixed start, like the initialisation, and D is what the budget varies."""
    switch = [row["D"] for row in run["rows"] if row.get("stage") == "color"]
    end = run["rows"][-1]
    return {**end, "D": end["D"] - (switch[-1] if switch else 0)}


def fitted_points(run) -> list[dict]:
    """The points of one run that its variant's L(N, D) fit takes (and the plot draws against the fit): every
    mixed-stage point of a constant-rate run (the points along it stand in for runs to each D, which counts
    both stages' tokens), the one `annealed_point` of an annealed run; none before its mixed stage is measured."""
    mixed = [row for row in run["rows"] if row.get("stage", "mixed") == "mixed"]
    return [annealed_point(run)] if run.get("anneal") and mixed else mixed


def fitted_rows(results, variant) -> list[dict]:
    """The points of `variant` that its L(N, D) fit takes (`fitted_points` of each of its runs)."""
    return [row for run in results if run["variant"] == variant for row in fitted_points(run)]


def sample_flops(config, samples) -> float:
    """Mean training FLOPs (forward and backward: `accounting.count_flops(training=True)`) per sample of
    `samples` (encoded as `navil train` encodes them) for a model of `config`: each sample's own sequence, its
    images' scales through the ViT (none in early fusion) and connector, and the LM head at its labelled
    positions only (the training forward's logits). Packed rows attend within each sample, so a row's FLOPs
    are the sum of its samples'."""
    from ..training.collate import IGNORE_INDEX
    from .accounting import count_flops

    if not samples:
        raise ValueError("sample_flops needs at least one sample")
    total = 0
    for sample in samples:
        labelled = int((sample["labels"] != IGNORE_INDEX).sum())
        total += count_flops(config, grids=sample["image_grid_thw"].tolist(), num_scales=sample["num_scales"].tolist(),
                             token_types=sample["mm_token_type_ids"], training=True, lm_head=labelled).total  # fmt: skip
    return total / len(samples)


def add_compute(run, per_sample: dict, batch: int) -> dict:
    """`run` with `compute`: its training FLOPs so far, at each row (`C`) and in all (`total`, `color`,
    `mixed`), from `per_sample` {"color": FLOPs per color-stage sample, "mixed": per mixed-stage sample}
    (`sample_flops` of each stage's data) and the samples trained: `batch` x the steps of each stage."""
    color_samples = run["color_steps"] * batch

    def flops(samples):
        color = min(samples, color_samples)
        return color * per_sample["color"] + (samples - color) * per_sample["mixed"]

    rows = [{**row, "C": flops(row["samples"])} for row in run["rows"]]
    samples = rows[-1]["samples"] if rows else 0
    total, color = flops(samples), flops(min(samples, color_samples))
    return {**run, "rows": rows, "compute": {"per_sample": per_sample, "total": total, "color": color,
                                             "mixed": total - color}}  # fmt: skip


def compute_winners(runs, points: int = 8) -> list[dict]:
    """Which variant is ahead at which training compute: at `points` budgets spaced geometrically from the
    smallest to the largest total compute of the finished runs, each variant's lowest final held-out loss over
    its runs that spent at most that budget (the compute frontier), and the variant with the lower one (None
    while a variant has no run that cheap)."""
    import numpy as np

    ends = _priced_ends(runs)
    if not ends:
        return []
    variants = sorted({v for v, *_ in ends})
    frontiers = {variant: compute_frontier(runs, variant) for variant in variants}
    out = []
    for budget in np.geomspace(min(c for _, c, *_ in ends), max(c for _, c, *_ in ends), points):
        row = {"C": float(budget)}
        for variant in variants:
            within = [(loss, name) for c, loss, name in frontiers[variant] if c <= budget * (1 + 1e-9)]
            row[variant] = within[-1] if within else None  # the frontier's losses fall as C grows
        losses = {v: row[v][0] for v in variants if row[v] is not None}
        row["ahead"] = min(losses, key=losses.get) if len(losses) == len(variants) else None
        out.append(row)
    return out


def _priced_ends(runs) -> list[tuple]:
    """(variant, total compute, final loss, name) of each finished run with its compute (`add_compute`)."""
    return [(r["variant"], r["compute"]["total"], r["rows"][-1]["loss"], r["name"])
            for r in runs if r.get("compute") and r["rows"] and r.get("finished", True)]  # fmt: skip


def compute_frontier(runs, variant) -> list[tuple]:
    """(compute, loss, name) of the runs of `variant` on its compute frontier, by compute: each is the lowest
    final loss reached for at most that much training compute."""
    frontier, best = [], float("inf")
    ends = sorted((e for e in _priced_ends(runs) if e[0] == variant), key=lambda e: (e[1], e[2]))
    for _, compute, loss, name in ends:
        if loss < best:
            best = loss
            frontier.append((compute, loss, name))
    return frontier


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def append_csv(path, rows):
    """Append `rows` to the CSV `path` (its header first when the file is new or empty), flushed at once."""
    path = Path(path)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def minutes(seconds) -> str:
    return "time not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def plot_sweep(summary, fits, path):
    """The comparison PNG of a sweep's `summary` (results.json): loss against D per run with each variant's
    fitted curves (`fits`: {variant: ScalingFit}), loss against training compute with each variant's frontier
    (runs with `compute`, `add_compute`), and final accuracy against N with the baselines."""
    import numpy as np

    from .plots import figure

    try:
        fig, (left, middle, right) = figure(19, 5.2, 3, layout=None)
    except UsageError as e:  # no matplotlib
        print(f"no plot: {e}")
        return
    from matplotlib import colormaps

    runs = summary["runs"]
    sizes = sorted(
        {r["size_name"] for r in runs}, key=lambda s: min(r["params"]["N"] for r in runs if r["size_name"] == s)
    )
    colors = {s: colormaps["viridis"](0.85 * i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}
    styles = {"late": ("o", "-"), "early": ("s", "--")}
    switch, labelled, spans = None, set(), {}
    for r in runs:
        if not r["rows"]:
            continue
        marker, line = styles[r["variant"]]
        color = colors[r["size_name"]]
        fill = color if r["variant"] == "late" else "none"
        mixed = fitted_points(r)
        # an annealed run's color stage is the same for all runs and not on its D axis (its mixed stage's tokens)
        early_points = [] if r.get("anneal") else [p for p in r["rows"] if p.get("stage") == "color"]
        if early_points:
            switch = early_points[-1]["D"]
            left.plot([p["D"] for p in early_points], [p["loss"] for p in early_points], marker, color=color, ms=4,
                      ls="none", mfc=fill, alpha=0.35)  # fmt: skip
        unfinished = "" if r.get("finished", True) else ", unfinished"
        group = (r["variant"], r["size_name"])  # the runs of a --budgets sweep: one label and fit line per size
        label = None
        if group not in labelled or unfinished:
            labelled.add(group)
            label = (f"{r['variant']} {r['size_name']} (N={r['params']['N'] / 1e6:.2f}M, lr {r.get('lr', 0):.2g}"
                     f"{unfinished})")  # fmt: skip
        left.plot([p["D"] for p in mixed], [p["loss"] for p in mixed], marker, color=color, ms=5, ls="none", mfc=fill,
                  label=label)  # fmt: skip
        if r["variant"] in fits and mixed:
            spans.setdefault(group, (r["params"]["N"], color, line, []))[3].extend(p["D"] for p in mixed)
    for (variant, _), (N, color, line, D) in spans.items():
        d_line = np.geomspace(min(D), max(D), 100)
        left.plot(d_line, fits[variant].predict(N, d_line), line, color=color, lw=1)
    if switch is not None:
        left.axvline(switch, color="gray", lw=0.6, ls="-.", label="end of the color stage (first run)")
    blind = summary["baselines"]["blind_loss"]["per_token"]
    left.axhline(blind, color="gray", ls=":", lw=1, label=f"blind (question only) {blind:.3f}")
    budgets = summary["settings"].get("budget_list")
    left.set(
        xscale="log", yscale="log",
        xlabel="D: LLM tokens of the annealed mixed stage (one run each)" if budgets
        else "D: LLM tokens trained on (color stage included)",
        ylabel="held-out loss, all kinds (nats / assistant token)",
    )  # fmt: skip
    left.set_title("points: measured (faded: color stage, not fitted); lines: L(N, D) fit per variant on the mixed "
                   "stage (solid late, dashed early)" if not budgets else "points: each run's annealed end; lines: "
                   "L(N, D) fit per variant (solid late, dashed early)", fontsize=8)  # fmt: skip
    left.legend(fontsize=7)
    _plot_compute(middle, runs, colors, styles)
    for variant in ("late", "early"):
        chosen = [r for r in runs if r["variant"] == variant and r.get("final")]
        if any(r.get("anneal") for r in chosen):  # a --budgets sweep: each size's longest run
            chosen = list({r["size_name"]: r for r in sorted(chosen, key=lambda r: r["steps"])}.values())
        if not chosen:
            continue
        marker, line = styles[variant]
        chosen.sort(key=lambda r: r["params"]["N"])
        N = [r["params"]["N"] for r in chosen]
        for key, label, lw, ms, shade in (("accuracy", "all questions", 1.6, 6, 0), ("acc_color", "color", 0.8, 3, 1),
                                          ("acc_shape", "shape", 0.8, 3, 2), ("acc_count", "count", 0.8, 3, 3),
                                          ("acc_position", "position", 0.8, 3, 4)):  # fmt: skip
            right.plot(N, [r["final"].get(key, float("nan")) for r in chosen], marker + line, lw=lw, ms=ms,
                       color=colormaps["tab10"](shade), mfc="none" if variant == "early" else None,
                       label=f"{variant}: {label}")  # fmt: skip
    base = summary["baselines"]
    for name, style, label in (("chance", ":", "chance"), ("blind", "-.", "blind")):
        right.axhline(base[name], color="gray", ls=style, lw=1, label=f"{label} (all) {base[name]:.2f}")
    if "blind_color" in base:
        right.axhline(base["blind_color"], color=colormaps["tab10"](1), ls=(0, (1, 3)), lw=1,
                      label=f"blind (color) {base['blind_color']:.2f}")  # fmt: skip
    right.set(xscale="log", xlabel="N: non-embedding parameters", ylabel="held-out exact match", ylim=(0, 1.02))
    right.set_title("accuracy at the end of each run (greedy batch_chat; solid markers late, hollow early)", fontsize=8)
    right.legend(fontsize=6, ncol=2)
    settings = summary["settings"]
    rules = settings.get("lr_rules") or dict.fromkeys(("late", "early"), settings.get("lr_scaling", "none"))
    scaled = {"sqrt": " x sqrt(64 / width)", "linear": " x 64 / width", "none": ""}
    if len(set(rules.values())) == 1:
        lr = f"lr {settings['lr']:g}" + scaled.get(next(iter(rules.values())), "")
    else:
        lr = "lr " + ", ".join(
            f"{settings['lr']:g}{scaled.get(rule, '')} ({variant})" for variant, rule in rules.items()
        )
    steps = f"runs of {settings['color_steps']} + {budgets} steps" if budgets else f"{settings.get('steps', '?')} steps"
    schedule = "cosine to 0 in the mixed stage, one point per run" if budgets else "constant"
    fig.suptitle(f"late vs early fusion on the shapes task: {steps} of {settings['batch']} "
                 f"({settings.get('color_steps', 0)} on {settings.get('color_task', 'all')} color questions first), "
                 f"{lr} {schedule},\ntoken order {settings.get('token_order', 'window')}, ViT LayerScale {summary.get('vision_layer_scale', 1.0)}, "
                 f"visual experts {'on' if summary['visual_experts'] else 'off'}, {minutes(summary['seconds'])}"
                 + (f"; unfinished: {', '.join(summary['unfinished'])}" if summary.get("unfinished") else ""),
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_compute(axes, runs, colors, styles):
    """Held-out loss against training FLOPs: each run's measured points of its mixed stage (an annealed run:
    its end, joined across the budgets of one size), and per variant the frontier, the lowest loss reached
    for at most that compute."""
    priced = [r for r in runs if r.get("compute") and r["rows"]]
    if not priced:
        axes.set_axis_off()
        axes.set_title("no training compute recorded", fontsize=8)
        return
    groups = {}
    for r in priced:
        points = [p for p in fitted_points(r) if "C" in p] if not r.get("anneal") else [r["rows"][-1]]
        groups.setdefault((r["variant"], r["size_name"]), []).extend(points)
    for (variant, size), points in groups.items():
        marker, line = styles[variant]
        color = colors[size]
        points.sort(key=lambda p: p["C"])
        axes.plot([p["C"] for p in points], [p["loss"] for p in points], marker + line, color=color, ms=5, lw=0.8,
                  mfc=color if variant == "late" else "none", label=f"{variant} {size}")  # fmt: skip
    for variant, shade in (("late", "black"), ("early", "tab:red")):
        frontier = compute_frontier(priced, variant)
        if frontier:
            axes.step([c for c, *_ in frontier], [loss for _, loss, _ in frontier], where="post", color=shade, lw=2.5,
                      alpha=0.3, label=f"{variant}: frontier (best loss for <= C)")  # fmt: skip
    axes.set(xscale="log", yscale="log", xlabel="C: training FLOPs, both stages (count_flops, ViT included)",
             ylabel="held-out loss (nats / assistant token)")  # fmt: skip
    axes.set_title("loss against training compute: each run's end (solid late, dashed early)", fontsize=8)
    axes.legend(fontsize=6, ncol=2)
