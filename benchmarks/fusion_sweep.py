"""Late vs early fusion at a few sizes: a small scaling sweep on the shapes task, on 2 CPU cores.

Builds tiny NaViLs from scratch (random init) at a few sizes in two variants and trains each briefly with
`navil train`'s own code (packed rows, transformers' Trainer) on the synthetic shapes task
(`navil_hf.tasks.shapes`, format v2: every shape at least one merged 32-px token):

* `late`: a small ViT (its blocks sized per size, `SIZES`) -> 2x2 merge -> MLP connector -> the LLM (NaViL);
  its blocks' LayerScale starts at `VISION_LAYER_SCALE` (0.1, `vision_config.initializer_factor`, as
  `navil init-from-llm` starts a fresh encoder: at 1.0 a fresh ViT learns slowly, issue 25);
* `early`: the same model without the ViT blocks: the 16-px patches' linear embedding (same width) ->
  2x2 merge -> connector -> the LLM (early fusion, as in Apple's "Scaling Laws for Native Multimodal
  Models"; the `none` vision preset of `navil init-from-llm`, at a small width).

This script parses the arguments, runs the runs (a process pool) and writes the results; the code it drives is
in the package: `navil_hf.research.fusion` (building and training one run), `navil_hf.research.fusion_runs`
(the runs on disk, the fits, the comparison plot) and `navil_hf.tasks.heldout` (the measurements).

Both variants take their visual tokens in the prompt's row order (`--token-order raster`, the default;
`vision_config.token_order`; `window` is the original NaViL's 4x4-window order).

The LLMs are Llama-style decoders (SwiGLU, RMSNorm, RoPE, tied embeddings) with NaViL's visual experts
(`--no-visual-experts`: none, every token takes the text weights; `text_config.visual_experts`). They use
the tokenizer, chat template and image settings of one NaViL folder (`--tokenizer`; default: the demo
model's, SmolLM2's 49k vocabulary), so the prompts are those of `benchmarks/learn_shapes.py`.

**Curriculum** (as learn_shapes'): every run first trains `--color-steps` steps (default a third of
`--steps`) on color questions alone (`shapes-color/`, another seed; `--color-task`: `one-shape`, the default,
one shape of 60-85% of the short side, "What color is the shape?", the task tests/training/test_learning.py shows a
tiny model learning to 1.00 in 200 steps; `all`: the task's own color questions, 1-3 shapes, as learn_shapes
trains them, which size s did not learn in 400 steps: color 0.22-0.24, chance 0.17), then the rest of
`--steps` on all four kinds (`shapes/`): two `navil train` calls, the second from the first's model (a
fresh AdamW state and warm-up). Late and early runs see the same samples in the same order: same steps,
batch and LLM tokens.

**Learning rates:** AdamW, constant after `--warmup` steps (in each stage), `--lr` at the smallest LLM
width (`LR_BASE_HIDDEN`, 64) and, with `--lr-scaling sqrt` (the default), `lr x sqrt(64 / hidden)` at the
others (m: 0.71x, l: 0.58x), the same for both variants. The evidence: the first sweep (RESULTS §10, one
lr 2e-3 for all) had late fusion at sizes m and l unstable (held-out loss rising late, 0.39 -> 0.53 and
0.44) while size s and all early runs were not, and a 5e-3 probe was worse; a smaller rate for wider
models (~1/sqrt(width) for Adam) is common practice. Not tuned per size (`--lr-scaling none`: one rate).

Measured, for every run, at eval points spaced geometrically over each stage's steps (`eval_steps`:
`--color-evals` in the color stage, `--evals` in the mixed one; and at step 0):

* the held-out loss: cross-entropy of the assistant tokens (the answer, `<|im_end|>` and the newline
  after it) of the first `--eval-records` records of the shapes test split (all four kinds, in both stages),
  teacher-forced, one packed forward per `--eval-batch` records without gradients; nats per assistant token
  (`loss`, what is fitted) and per answer (`loss_per_answer`);
* at the end of the color stage and at the end, held-out exact-match accuracy of greedy
  `model.batch_chat` answers on `--acc-records` records, overall and per kind (as in learn_shapes), against
  the majority-answer (`chance`) and answer-from-the-question (`blind`) baselines.

`blind_loss` is the loss a model that reads only the question could reach: -log p(answer | question) with
p the answer frequencies of each question text in the training split (add-one smoothed), the format tokens
free, per assistant token. A held-out loss below it means the model reads the image.

Each eval point is a row (N, D, loss, stage): N = parameters outside the token tables (ViT, connector,
decoder layers with both experts, final norm; not the tied embedding / LM head, not the 12-row
special-token table; from `navil_hf.research.accounting.count_parameters` on the built model), D = LLM
input tokens trained on so far, **the color stage's included** (text and visual positions of the packed
rows; the Trainer's `num_input_tokens_seen`, summed over the stages). Only the mixed stage's points
(`stage` = `mixed`) enter the fit: during the color stage the held-out loss of the other kinds is not being
trained, so those points are not on the law's curve. The learning rate is constant after a short warm-up,
so the points along one run stand in for separate runs trained to that D: an approximation (a separate run
per D would anneal its learning rate at its end and reach a somewhat lower loss; the fitted B and beta
describe this one schedule and curriculum). Then `L(N, D) = E + A/N^alpha + B/D^beta` is fitted per
variant (`navil_hf.research.scaling.fit_scaling_law`, with bootstrap intervals).

**Runs per D (`--budgets 100,200,400,800`):** instead of one constant-rate run per size and variant whose
points stand in for shorter runs, one run per size, variant and budget: `--color-steps` (default
`BUDGET_COLOR_STEPS`, 150) on color questions at a constant rate, then `budget` mixed steps with the learning
rate decayed to 0 (cosine after the warm-up), measured at the switch and at its end only. Each run gives one
point, its annealed end, and only those points are fitted, so the bootstrap resamples runs, not the
correlated points of one run. Their D is the mixed stage's tokens (`fusion_runs.annealed_point`): every run
starts from the same color stage, a fixed start like the initialisation, and the budget is what varies (with
the color stage's tokens counted, the short budgets crowd into a narrow D range and the fit reads the fast
drop after the switch as a step). The mixed data is the longest budget's (one epoch for it); the shorter runs
draw from the same records in the same seeded order.

    python benchmarks/fusion_sweep.py                  # 3 sizes x 2 variants, 1200 steps: ~40-50 min, 2 cores
    python benchmarks/fusion_sweep.py --budgets 100,200,400,800   # 24 annealed runs: ~45-55 min, 2 cores
    python benchmarks/fusion_sweep.py --sizes s,m --steps 200 --jobs 1
    python benchmarks/fusion_sweep.py --refit          # fit, plot, tabulate what WORKDIR has (partial too)
    python benchmarks/fusion_sweep.py --resume         # train only the runs WORKDIR has not finished
    python benchmarks/fusion_sweep.py --quick          # 2 tiny sizes, a few steps (CI, < 1 min)

`--jobs 2` (the default on 2+ cores) trains two runs at a time, in separate processes with one thread each,
so both cores stay busy without relying on intra-op threading of these small matrices (not measured
against `--jobs 1 --threads 2`).

Writes to WORKDIR (default `fusion-sweep/` beside the repo; `fusion-sweep-no-experts/` with
`--no-visual-experts`), **as it goes**: `runs.csv` (every eval point, appended as it is measured; `variant`
and `stage` columns) and `runs/NAME/result.json` (a finished run: its settings, parameter counts, curve and
accuracies), so a stopped sweep keeps its finished runs and `--refit` fits what is there. At the end (and
with `--refit`): `runs-late.csv` / `runs-early.csv` (one variant's fitted points, the mixed stage's:
`navil scaling fit WORKDIR/runs-late.csv --plot fit.png` reads them), `runs.json` (the runs),
`results.json` (settings, parameter counts, curves, accuracies, fits), `fit-late.png` / `fit-early.png`
(`ScalingFit.plot`), the comparison plot `fusion_sweep.png` (`--plot`), the shapes data in `shapes/` and
`shapes-color/`, and each trained Hub folder in `runs/NAME/model` (the color stage's in
`runs/NAME/color/model`).
"""

import argparse
import contextlib
import json
import os
import queue
import sys
import time
import traceback
from pathlib import Path

import _common  # the repository root on sys.path, for the imports below

# isort: split
from navil_hf.errors import UsageError
from navil_hf.research.fusion import (
    COLOR_TASKS,
    LR_BASE_HIDDEN,
    LR_SCALINGS,
    QUICK_SIZES,
    SIZES,
    VARIANTS,
    init_worker,
    run_lr,
    run_one,
)
from navil_hf.research.fusion_runs import (
    add_compute,
    append_csv,
    compute_winners,
    finished_runs,
    fit_variant,
    fitted_rows,
    minutes,
    plot_sweep,
    read_rows,
    sample_flops,
    saved_runs,
    write_csv,
)

# Optimizer steps of every run (a third of them, `--color-steps`, on color questions alone): with the CPU
# seconds per step below (batch 16, one thread, measured on a busy 2-core machine: RESULTS.md §10; also the
# ETA's first guess) the 6 runs add up to ~49 CPU-minutes, ~26 min of training on 2 cores with --jobs 2
# (the smallest sizes first), ~35-45 min in all with the evaluations (more points and two accuracy
# measurements per run) and other jobs on the cores.
STEPS = 1200
COMPUTE_SAMPLES = 256  # training records per stage whose mean FLOPs per sample price a run's training
BUDGET_COLOR_STEPS = 150  # the color stage of every run of a --budgets sweep
SECONDS_PER_STEP = {("late", "s"): 0.22, ("early", "s"): 0.17, ("late", "m"): 0.40, ("early", "m"): 0.36,
                    ("late", "l"): 0.73, ("early", "l"): 0.56}  # fmt: skip
RECIPE = dict(test=200, batch=16, lr=2e-3, lr_scaling="sqrt", warmup=20, evals=10, color_evals=4, eval_records=200,
              eval_batch=32, acc_records=200, bootstrap=200)  # fmt: skip
QUICK_STEPS = 6
QUICK = dict(train=32, test=16, batch=4, color_steps=2, warmup=0, evals=3, color_evals=2, eval_records=8,
             eval_batch=8, acc_records=8, bootstrap=10)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="default: fusion-sweep/ (-no-experts/) beside the repo")
    parser.add_argument("--tokenizer", default=None, help="a NaViL Hub folder whose tokenizer, chat template and "
                        "image settings the models use (default: the demo model, built once)")  # fmt: skip
    parser.add_argument("--sizes", default=None, help=f"comma-separated sizes (default: {','.join(SIZES)})")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="late, early or both (default)")
    parser.add_argument("--visual-experts", action=argparse.BooleanOptionalAction, default=True,
                        help="decoder layers with NaViL's visual experts (default) or without")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of every run (default {STEPS})")
    parser.add_argument("--budgets", default=None, help="comma-separated mixed-stage steps: one run per size, variant "
                        "and budget, each annealed to its end (cosine) and measured there, the fit on those end "
                        f"points (default: one constant-rate run per size and variant; color stage "
                        f"{BUDGET_COLOR_STEPS} steps)")  # fmt: skip
    parser.add_argument("--color-steps", type=int, default=None, help="of which first on color questions alone "
                        "(the curriculum; default: a third of --steps; 0: none)")  # fmt: skip
    parser.add_argument("--color-task", choices=tuple(COLOR_TASKS), default="one-shape",
                        help="the color stage's questions: one-shape (one large shape, default) or all (1-3 shapes)")  # fmt: skip
    parser.add_argument("--token-order", choices=("raster", "window"), default="raster",
                        help="visual token order of both variants (vision_config.token_order; default raster)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=RECIPE["batch"], help="samples per packed row")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW learning rate (constant after warm-up) "
                        f"at LLM width {LR_BASE_HIDDEN}")  # fmt: skip
    parser.add_argument("--lr-scaling", default=RECIPE["lr_scaling"], metavar="RULE or VARIANT:RULE,...",
                        help=f"sqrt (default): lr x sqrt({LR_BASE_HIDDEN} / hidden) per size; linear: lr x "
                        f"{LR_BASE_HIDDEN} / hidden; none: --lr for all; per variant, e.g. late:linear,early:sqrt "
                        "(a variant not named: sqrt)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=RECIPE["warmup"], help="linear warm-up steps")
    parser.add_argument("--train", type=int, default=None, help="training records of all kinds (default: mixed "
                        "steps x batch, one epoch; the color stage gets color steps x batch of its own)")  # fmt: skip
    parser.add_argument("--test", type=int, default=RECIPE["test"], help="held-out records generated")
    parser.add_argument("--evals", type=int, default=RECIPE["evals"], help="held-out loss points in the mixed stage")
    parser.add_argument("--color-evals", type=int, default=RECIPE["color_evals"],
                        help="held-out loss points in the color stage (not fitted)")  # fmt: skip
    parser.add_argument("--eval-records", type=int, default=RECIPE["eval_records"], help="records of the loss")
    parser.add_argument("--eval-batch", type=int, default=RECIPE["eval_batch"], help="records per packed forward")
    parser.add_argument("--acc-records", type=int, default=RECIPE["acc_records"], help="records of the accuracy")
    parser.add_argument("--bootstrap", type=int, default=RECIPE["bootstrap"], help="bootstrap resamples of the fits")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on 2+ cores, 1 in --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--plot", default=None, help="comparison PNG (default: WORKDIR/fusion_sweep.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 tiny sizes, a few steps (smoke run)")
    parser.add_argument("--refit", action="store_true", help="no training: fit, plot and tabulate WORKDIR's runs "
                        "again (WORKDIR/runs.json, written when the training ends; without it, a stopped sweep: "
                        "each finished run's runs/NAME/result.json, the points of unfinished ones from runs.csv)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="train only the runs without runs/NAME/result.json "
                        "in WORKDIR (same settings), keeping the finished ones")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    names = [name.strip() for name in args.sizes.split(",") if name.strip()] if args.sizes else list(sizes)
    unknown = [name for name in names if name not in sizes]
    if unknown or not names:
        parser.error(f"--sizes: unknown size {', '.join(unknown) or '(none given)'} (sizes: {', '.join(sizes)})")
    args.size_table = {name: sizes[name] for name in names}
    if args.budgets is not None:
        if args.steps is not None:
            parser.error("--steps and --budgets: choose one (a --budgets run has --color-steps + its budget steps)")
        try:
            args.budget_list = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
        except ValueError:
            args.budget_list = []
        if not args.budget_list or min(args.budget_list) < 1:
            parser.error(f"--budgets: expected comma-separated positive step counts, got {args.budgets!r}")
        if args.color_steps is None:
            args.color_steps = BUDGET_COLOR_STEPS
        args.steps = args.color_steps + max(args.budget_list)
        if args.color_steps < 0:
            parser.error(f"--color-steps must be >= 0, got {args.color_steps}")
    else:
        args.budget_list = None
        args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
        if args.color_steps is None:
            args.color_steps = args.steps // 3
        if not 0 <= args.color_steps < args.steps:
            parser.error(f"--color-steps must be in [0, --steps), got {args.color_steps}")
    if args.refit and args.resume:
        parser.error("--refit and --resume: choose one")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or any(v not in VARIANTS for v in args.variant_list):
        parser.error(f"--variants: expected some of {', '.join(VARIANTS)}, got {args.variants!r}")
    args.lr_rules = lr_rules(parser, args.lr_scaling)
    if not args.visual_experts:
        from configuration_navil import NaViLTextConfig

        if not hasattr(NaViLTextConfig(), "visual_experts"):
            parser.error("--no-visual-experts: this checkout's NaViLTextConfig has no `visual_experts` option yet")
    cores = os.cpu_count() or 1
    args.jobs = args.jobs or (1 if args.quick else min(2, cores))
    args.threads = args.threads or (1 if args.quick else max(1, cores // args.jobs))
    return args


def lr_rules(parser, text) -> dict[str, str]:
    """{variant: learning-rate scaling} from `--lr-scaling`: one rule for both, or VARIANT:RULE,... (sqrt for
    a variant not named); a usage error for anything else."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) == 1 and ":" not in items[0]:
        items = [f"{variant}:{items[0]}" for variant in VARIANTS]
    rules = dict.fromkeys(VARIANTS, "sqrt")
    for item in items or [""]:
        variant, _, rule = item.partition(":")
        if variant not in VARIANTS or rule not in LR_SCALINGS:
            parser.error(f"--lr-scaling: expected a rule ({', '.join(LR_SCALINGS)}) or VARIANT:RULE,... with VARIANT "
                         f"one of {', '.join(VARIANTS)}, got {text!r}")  # fmt: skip
        rules[variant] = rule
    return rules


# -------------------------------------------------------------------------------------------- the sweep


class Progress:
    """One line per eval point, with the sweep's ETA: each run's remaining steps at its measured wall seconds
    per step, evaluations included (runs not started: `SECONDS_PER_STEP` scaled by how the started runs
    compare with it), over `jobs`. Each eval point's row is appended to `csv_path` as it comes."""

    def __init__(self, specs, jobs, csv_path=None):
        self.jobs, self.start, self.out, self.csv_path = jobs, time.perf_counter(), sys.stdout, csv_path
        self.left = {s["name"]: s["steps"] for s in specs}
        self.prior = {s["name"]: SECONDS_PER_STEP.get((s["variant"], s["size_name"]), 0.5) for s in specs}
        self.rate = {}

    def eta(self) -> float:
        ratios = [self.rate[n] / self.prior[n] for n in self.rate]
        scale = sum(ratios) / len(ratios) if ratios else 1.0
        work = sum(left * self.rate.get(n, self.prior[n] * scale) for n, left in self.left.items())
        return work / self.jobs

    def __call__(self, message):
        name, elapsed = message["name"], (time.perf_counter() - self.start) / 60
        if message["kind"] == "start":
            print(f"[{elapsed:5.1f} min] {name}: N = {message['N']:,} (non-embedding), {message['steps']} steps at lr "
                  f"{message['lr']:.3g}; held-out loss at step 0 {message['loss']:.3f}", file=self.out, flush=True)  # fmt: skip
            return
        row = message["row"]
        if self.csv_path is not None:
            append_csv(self.csv_path, [row])
        self.left[name] = message["steps"] - message["step"]
        self.rate[name] = message["elapsed"] / message["step"]
        acc = ""
        if "accuracy" in message:
            kinds = ", ".join(f"{k[4:]} {v:.2f}" for k, v in message.items() if k.startswith("acc_"))
            acc = f", accuracy {message['accuracy']:.3f} ({kinds})"
        print(f"[{elapsed:5.1f} min] {name} step {message['step']}/{message['steps']} ({row['stage']}): "
              f"D = {row['D']:.3g} tokens, "
              f"held-out loss {row['loss']:.4f} ({row['loss_per_answer']:.3f} nats/answer){acc}; "
              f"{message['seconds_per_step']:.2f} s/step (CPU {message['cpu_seconds_per_step']:.2f}); "
              f"sweep ETA {self.eta() / 60:.1f} min", file=self.out, flush=True)  # fmt: skip


def run_all(specs, shared, jobs, threads, csv_path=None):
    progress = Progress(specs, jobs, csv_path)
    results = {}
    if jobs <= 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for spec in specs:
                results[spec["name"]] = run_one(spec, shared, sink=progress)
        finally:
            torch.set_num_threads(before)
        return [results[s["name"]] for s in specs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=init_worker, initargs=(messages, threads)) as pool:
        pending = {pool.submit(run_one, spec, shared): spec["name"] for spec in specs}
        while pending:
            try:
                progress(messages.get(timeout=1.0))
            except queue.Empty:
                pass
            for future in [f for f in pending if f.done()]:
                name = pending.pop(future)
                try:
                    results[name] = future.result()
                except Exception:  # noqa: BLE001 -- report the run's failure and keep the others
                    print(f"{name} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        while True:
            try:
                progress(messages.get_nowait())
            except queue.Empty:
                break
    return [results[s["name"]] for s in specs if s["name"] in results]


def main(argv=None):
    args = parse_args(argv)
    from navil_hf.tasks.heldout import blind_loss, encode_records
    from navil_hf.tasks.shapes import KINDS, blind_accuracy, chance_accuracy, make_shapes_dataset, read_jsonl

    started = time.perf_counter()
    default = "fusion-sweep" if args.visual_experts else "fusion-sweep-no-experts"
    workdir = Path(args.workdir or Path(_common.ROOT).parent / default)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from navil_hf.demo import ensure_demo_model

        args.tokenizer = str(ensure_demo_model(progress=True))
    data, color_data = workdir / "shapes", workdir / "shapes-color"
    budgets = args.budget_list or [None]
    specs = [
        {"name": f"{variant}-{size}" + (f"-{budget}" if budget else ""), "variant": variant, "size_name": size,
         "size": args.size_table[size], "steps": args.color_steps + budget if budget else args.steps,
         "color_steps": args.color_steps, "color_task": args.color_task,
         "lr": run_lr(args.size_table[size], args.lr, args.lr_rules[variant]),
         **({"anneal": True, "budget": budget} if budget else {})}
        for size in args.size_table for budget in budgets for variant in args.variant_list
    ]  # fmt: skip
    # Smallest sizes first (--sizes order; with --budgets the shortest budgets first), late and early of a size
    # side by side: a sweep stopped early has whole sizes finished. At the default sizes this ends ~1 min later
    # than longest-first would (~26 vs ~25 min of training at SECONDS_PER_STEP).
    mixed_samples = (args.steps - args.color_steps) * args.batch
    args.train = args.train or mixed_samples
    if args.train < mixed_samples:
        print(f"note: {args.train} training records for {mixed_samples} samples of the mixed stage per run "
              f"({mixed_samples / args.train:.1f} epochs)")  # fmt: skip
    reuse = (args.refit or args.resume) and (data / "test.jsonl").is_file()
    if not reuse:
        make_shapes_dataset(data, train=args.train, test=args.test, seed=args.seed, force=True)
    if args.color_steps and not (reuse and (color_data / "train.jsonl").is_file()):
        make_shapes_dataset(color_data, train=args.color_steps * args.batch, test=0, seed=args.seed + 1,
                            kinds=("color",), force=True, **COLOR_TASKS[args.color_task])  # fmt: skip
    train_records, test_records = list(read_jsonl(data / "train.jsonl")), list(read_jsonl(data / "test.jsonl"))
    from navil_hf.training.train import load_processor

    processor = load_processor(args.tokenizer)
    eval_samples = encode_records(processor, data / "test.jsonl", args.eval_records)
    scored = test_records[: args.acc_records]
    baselines = {
        "chance": chance_accuracy(scored),
        "blind": blind_accuracy(scored, train_records),
        "blind_loss": blind_loss(eval_samples, test_records[: len(eval_samples)], train_records),
    }
    for kind in KINDS:
        of_kind = [r for r in scored if r["kind"] == kind]
        baselines[f"chance_{kind}"] = chance_accuracy(of_kind)
        baselines[f"blind_{kind}"] = blind_accuracy(of_kind, train_records)
    shared = {
        "workdir": str(workdir), "data": str(data), "color_data": str(color_data), "base": str(args.tokenizer),
        "visual_experts": args.visual_experts, "token_order": args.token_order, "seed": args.seed,
        "batch": args.batch, "warmup": args.warmup, "evals": args.evals, "color_evals": args.color_evals,
        "eval_records": args.eval_records, "eval_batch": args.eval_batch, "acc_records": args.acc_records,
    }  # fmt: skip
    runs_file, csv_file = workdir / "runs.json", workdir / "runs.csv"
    try:  # what an earlier sweep left in WORKDIR
        if args.refit:
            results, trained_seconds = saved_runs(workdir, specs, data, test_records, args.acc_records)
        done = finished_runs(workdir, specs) if args.resume else {}
    except UsageError as e:
        raise SystemExit(str(e)) from None
    if not args.refit:
        rows_so_far = read_rows(csv_file) if args.resume else {}
        runs_file.unlink(missing_ok=True)
        csv_file.unlink(missing_ok=True)
        # runs.csv grows one row per eval point from here (the finished runs' rows first, with --resume)
        for name in done:
            append_csv(csv_file, rows_so_far.get(name) or done[name]["rows"])
        sweep = workdir / "sweep.json"
        if not (args.resume and sweep.is_file()):
            sweep.write_text(json.dumps({"started": time.time(), "date": time.strftime("%Y-%m-%d %H:%M")}))
        todo = [s for s in specs if s["name"] not in done]
        planned = sum(s["steps"] * SECONDS_PER_STEP.get((s["variant"], s["size_name"]), 0.5) for s in todo)
        rates = ", ".join(f"{s['name']} {s['lr']:.3g}" for s in todo)
        plan = (f"{args.color_steps} + {args.budget_list} steps (cosine to 0 after the switch)" if args.budget_list
                else f"{args.steps} steps")  # fmt: skip
        print(f"{len(todo)} runs ({', '.join(s['name'] for s in todo)}), {args.jobs} at a time x {args.threads} "
              f"thread(s); {plan} of {args.batch} ({args.color_steps} on color questions first); "
              f"lr {rates}; token order {args.token_order}; "
              f"planned ~{planned / args.jobs / 60:.0f} min of training; blind-baseline loss "
              f"{baselines['blind_loss']['per_token']:.4f} nats/token"
              + (f"; {len(done)} finished already ({', '.join(done)})" if done else ""), flush=True)  # fmt: skip
        new = run_all(todo, shared, args.jobs, args.threads, csv_file)
        by_name = {**done, **{r["name"]: r for r in new}}
        results = [by_name[s["name"]] for s in specs if s["name"] in by_name]
        with contextlib.suppress(OSError):
            (workdir / "models").rmdir()  # each run removes its initial weights when done
        trained_seconds = round(time.perf_counter() - started, 1)
        # The runs before anything is fitted: `--refit` starts from here.
        runs_file.write_text(json.dumps({"runs": results, "seconds": trained_seconds}, indent=1, default=str))

    results = with_compute(results, processor, data, color_data, args.batch)
    winners = compute_winners(results)
    all_rows = [row for r in results for row in r["rows"]]
    write_csv(csv_file, all_rows)
    fits, fit_objects = {}, {}
    for variant in args.variant_list:
        rows = fitted_rows(results, variant)
        write_csv(workdir / f"runs-{variant}.csv", rows)
        fit, fits[variant] = fit_variant(workdir / f"runs-{variant}.csv", args.bootstrap, args.seed)
        if fit is not None:
            fit_objects[variant] = fit
            try:
                fit.plot(workdir / f"fit-{variant}.png")
            except ImportError:
                pass
        which = "each run's annealed end" if args.budget_list else "the mixed stage's"
        print(f"\n{variant} fusion, L(N, D) fit on {len(rows)} points ({which}):")
        print(fits[variant].get("summary") or fits[variant]["skipped"])
    unfinished = [r["name"] for r in results if r.get("finished") is False]
    summary = {
        "command": "python benchmarks/fusion_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _common.machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "tokenizer": args.tokenizer,
        "visual_experts": args.visual_experts, "jobs": args.jobs, "threads_per_job": args.threads,
        "settings": {k: getattr(args, k) for k in ("batch", "lr", "lr_scaling", "lr_rules", "warmup", "steps", "budget_list",
                                                   "color_steps",
                                                   "color_task", "token_order", "train", "test", "evals", "color_evals",
                                                   "eval_records", "eval_batch", "acc_records", "bootstrap",
                                                   "seed")},
        "vision_layer_scale": _vision_layer_scale(),
        "N": "parameters outside the token tables (vision, connector, decoder layers incl. visual experts, final norm)",
        "D": "LLM input tokens of the annealed mixed stage (text and visual positions; the color stage, the same "
        "for every run, not counted)" if args.budget_list
        else "LLM input tokens trained on (text and visual positions), the color stage's included",
        "loss": "held-out cross-entropy (all four kinds), nats per assistant token",
        "fitted": "each run's last point, at the end of its annealed mixed stage" if args.budget_list
        else "the mixed stage's points (stage == 'mixed')",
        "C": "training FLOPs, forward and backward, of both stages (navil_hf.research.accounting.count_flops: the "
        "ViT, connector, LLM with its experts, attention, the LM head at labelled positions; the mean over the "
        f"first {COMPUTE_SAMPLES} training records of each stage x the samples trained)",
        "compute_winners": winners,
        "baselines": baselines, "runs": results, "unfinished": unfinished, "fits": fits,
        "seconds": trained_seconds if args.refit else round(time.perf_counter() - started, 1),
        "refit": args.refit,
    }  # fmt: skip
    (workdir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot = Path(args.plot) if args.plot else workdir / "fusion_sweep.png"
    plot_sweep(summary, fit_objects, plot)
    _print_table(results, baselines)
    if winners:
        _common.print_table("Which fusion is ahead at a training compute (lowest final loss of the runs that spent "
                            "at most C)", ["C (FLOPs)", *args.variant_list, "ahead"],
                            [[f"{w['C']:.3g}", *(f"{w[v][0]:.4f} ({w[v][1]})" if w.get(v) else "-"
                                                 for v in args.variant_list), w["ahead"] or "-"] for w in winners])  # fmt: skip
    print(f"\n{len(all_rows)} points in {csv_file}; fits, curves: {workdir / 'results.json'}; "
          f"plot: {plot}; {minutes(summary['seconds'])}"
          + (f"; not finished: {', '.join(unfinished)}" if unfinished else ""))  # fmt: skip
    return summary


def with_compute(results, processor, data, color_data, batch):
    """The runs with their training compute (`fusion_runs.add_compute`), FLOPs per sample from each (variant,
    size)'s config (a trained run's config.json) over the first `COMPUTE_SAMPLES` records of each stage's
    data; runs without a trained model are left as they are."""
    from navil_hf.research.accounting import load_config
    from navil_hf.tasks.heldout import encode_records

    samples = {"mixed": encode_records(processor, data / "train.jsonl", COMPUTE_SAMPLES)}
    color_file = color_data / "train.jsonl"
    samples["color"] = encode_records(processor, color_file, COMPUTE_SAMPLES) if color_file.is_file() else []
    per_sample, out = {}, []
    for run in results:
        model = Path(run.get("trained_model") or "")
        key = (run["variant"], run["size_name"])
        if key not in per_sample and (model / "config.json").is_file():
            config = load_config(model)
            per_sample[key] = {stage: sample_flops(config, s) if s else 0.0 for stage, s in samples.items()}
        out.append(add_compute(run, per_sample[key], batch) if key in per_sample else run)
    return out


def _vision_layer_scale():
    from navil_hf.conversion.init_llm import VISION_LAYER_SCALE

    return VISION_LAYER_SCALE


def _print_table(results, baselines):
    rows = []
    for r in results:
        points = r["rows"]
        last = points[-1] if points else {}
        switch = [p for p in points if p.get("stage") == "color"]
        final, color = r.get("final") or {}, r.get("after_color") or {}
        rows.append([r["name"] + ("" if r.get("finished", True) else " (unfinished)"), f"{r['params']['N']:,}",
                     f"{r.get('lr', float('nan')):.3g}", f"{last.get('step', 0)}/{r['steps']}",
                     f"{last.get('D', 0):.3g}", r["loss_step0"],
                     switch[-1]["loss"] if switch else float("nan"),
                     min((p["loss"] for p in points), default=float("nan")), last.get("loss", float("nan")),
                     color.get("acc_color", float("nan")), final.get("accuracy", float("nan")),
                     *(final.get(f"acc_{k}", float("nan")) for k in ("color", "shape", "count", "position")),
                     r.get("seconds_per_step") or float("nan")])  # fmt: skip
    rows.append(["blind (chance)", "", "", "", "", "", "", "", baselines["blind_loss"]["per_token"],
                 baselines.get("blind_color", float("nan")), baselines["blind"],
                 *(f"{baselines.get(f'blind_{k}', float('nan')):.2f} ({baselines.get(f'chance_{k}', float('nan')):.2f})"
                   for k in ("color", "shape", "count", "position")), ""])  # fmt: skip
    header = ["run", "N", "lr", "steps", "D", "loss step 0", "loss end of color stage", "lowest loss", "loss end",
              "color acc. after color stage", "accuracy end", "color", "shape", "count", "position", "s/step"]  # fmt: skip
    _common.print_table(
        "Fusion sweep (held-out loss: nats per assistant token, all kinds; accuracy: greedy exact match)", header, rows
    )


if __name__ == "__main__":
    main()
