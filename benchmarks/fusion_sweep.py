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

    python benchmarks/fusion_sweep.py                  # 3 sizes x 2 variants, 1200 steps: ~40-50 min, 2 cores
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
import csv
import io
import json
import math
import os
import queue
import shutil
import sys
import time
import traceback
from pathlib import Path

import _common

VARIANTS = ("late", "early")
# Per size: the LLM (hidden, layers; head_dim 32, plain MHA, SwiGLU width 3 x hidden) and the late-fusion
# ViT (width, blocks; head_dim 32, MLP width 4 x width). The early variant keeps the ViT width as its patch
# embedding's width, without the blocks.
SIZES = {
    "s": dict(hidden=64, layers=2, vit_width=64, vit_layers=1),
    "m": dict(hidden=128, layers=3, vit_width=96, vit_layers=2),
    "l": dict(hidden=192, layers=4, vit_width=128, vit_layers=2),
}
QUICK_SIZES = {
    "xs": dict(hidden=32, layers=1, vit_width=32, vit_layers=1),
    "s": dict(hidden=64, layers=1, vit_width=32, vit_layers=1),
}
HEAD_DIM = 32
# The color stage's data (`make_shapes_dataset` arguments besides kinds=("color",)).
COLOR_TASKS = {"one-shape": dict(max_shapes=1, target_fraction=(0.6, 0.85)), "all": {}}
LR_BASE_HIDDEN = 64  # --lr is the rate at this LLM width; --lr-scaling sqrt: lr x sqrt(64 / hidden) elsewhere
# Optimizer steps of every run (a third of them, `--color-steps`, on color questions alone): with the CPU
# seconds per step below (batch 16, one thread, measured on a busy 2-core machine: RESULTS.md §10; also the
# ETA's first guess) the 6 runs add up to ~49 CPU-minutes, ~26 min of training on 2 cores with --jobs 2
# (the smallest sizes first), ~35-45 min in all with the evaluations (more points and two accuracy
# measurements per run) and other jobs on the cores.
STEPS = 1200
SECONDS_PER_STEP = {("late", "s"): 0.22, ("early", "s"): 0.17, ("late", "m"): 0.40, ("early", "m"): 0.36,
                    ("late", "l"): 0.73, ("early", "l"): 0.56}  # fmt: skip
RECIPE = dict(test=200, batch=16, lr=2e-3, lr_scaling="sqrt", warmup=20, evals=10, color_evals=4, eval_records=200,
              eval_batch=32, acc_records=200, bootstrap=200)  # fmt: skip
QUICK = dict(train=32, test=16, batch=4, steps=6, color_steps=2, warmup=0, evals=3, color_evals=2, eval_records=8,
             eval_batch=8, acc_records=8, bootstrap=10)  # fmt: skip
CSV_COLUMNS = ("name", "variant", "size", "N", "D", "loss", "stage", "step", "samples", "loss_per_answer", "lr",
               "n_vision", "n_connector", "n_llm", "n_total", "seconds")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="default: fusion-sweep/ (-no-experts/) beside the repo")
    parser.add_argument("--tokenizer", default=None, help="a NaViL Hub folder whose tokenizer, chat template and "
                        "image settings the models use (default: the demo model, built once)")  # fmt: skip
    parser.add_argument("--sizes", default=None, help=f"comma-separated sizes (default: {','.join(SIZES)})")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="late, early or both (default)")
    parser.add_argument("--visual-experts", action=argparse.BooleanOptionalAction, default=True,
                        help="decoder layers with NaViL's visual experts (default) or without")  # fmt: skip
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps of every run (default {STEPS})")
    parser.add_argument("--color-steps", type=int, default=None, help="of which first on color questions alone "
                        "(the curriculum; default: a third of --steps; 0: none)")  # fmt: skip
    parser.add_argument("--color-task", choices=tuple(COLOR_TASKS), default="one-shape",
                        help="the color stage's questions: one-shape (one large shape, default) or all (1-3 shapes)")  # fmt: skip
    parser.add_argument("--token-order", choices=("raster", "window"), default="raster",
                        help="visual token order of both variants (vision_config.token_order; default raster)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=RECIPE["batch"], help="samples per packed row")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW learning rate (constant after warm-up) "
                        f"at LLM width {LR_BASE_HIDDEN}")  # fmt: skip
    parser.add_argument("--lr-scaling", choices=("sqrt", "none"), default=RECIPE["lr_scaling"],
                        help=f"sqrt (default): lr x sqrt({LR_BASE_HIDDEN} / hidden) per size; none: --lr for all")  # fmt: skip
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
    if args.color_steps is None:
        args.color_steps = args.steps // 3
    if not 0 <= args.color_steps < args.steps:
        parser.error(f"--color-steps must be in [0, --steps), got {args.color_steps}")
    if args.refit and args.resume:
        parser.error("--refit and --resume: choose one")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or any(v not in VARIANTS for v in args.variant_list):
        parser.error(f"--variants: expected some of {', '.join(VARIANTS)}, got {args.variants!r}")
    if not args.visual_experts:
        from configuration_navil import NaViLTextConfig

        if not hasattr(NaViLTextConfig(), "visual_experts"):
            parser.error("--no-visual-experts: this checkout's NaViLTextConfig has no `visual_experts` option yet")
    cores = os.cpu_count() or 1
    args.jobs = args.jobs or (1 if args.quick else min(2, cores))
    args.threads = args.threads or (1 if args.quick else max(1, cores // args.jobs))
    return args


def eval_steps(steps: int, evals: int, warmup: int, color_steps: int = 0, color_evals: int = 0) -> dict[int, str]:
    """{step: stage} of the held-out eval points. Without a color stage: `evals` steps spaced geometrically
    from max(2 x warm-up, steps / 20) to `steps`. With one: `color_evals` steps spaced geometrically over the color stage
    (its last step included: the switch), then `evals` steps spaced geometrically in the total step count (so
    evenly in log D, as the fit sees them) from the mixed stage's own max(2 x warm-up, mixed steps / 20)-th
    step after the switch (past the switch's transient, the warm-up included) to `steps`. Distinct, >= 1."""

    def geometric(first, last, count):
        first = max(1, min(last, first))
        if count <= 1 or first == last:
            return {last}
        ratio = (last / first) ** (1 / (count - 1))
        return {min(last, max(first, round(first * ratio**i))) for i in range(count)} | {last}

    mixed = steps - color_steps
    points = {}
    if color_steps:
        first = max(2 * warmup, steps // 20)
        points.update(dict.fromkeys(geometric(first, color_steps, color_evals), "color"))
    start = max(1, 2 * warmup, mixed // 20)  # after the switch: the switch itself is the color stage's last point
    points.update(dict.fromkeys(geometric(color_steps + start, steps, evals), "mixed"))
    return dict(sorted(points.items()))


def run_lr(size: dict, lr: float, scaling: str) -> float:
    """The learning rate of a run of `size`: `lr` at LLM width LR_BASE_HIDDEN, x sqrt(64 / hidden) (`sqrt`)."""
    return lr * (LR_BASE_HIDDEN / size["hidden"]) ** 0.5 if scaling == "sqrt" else lr


# ----------------------------------------------------------------------------------------------- models


def build_config(base, size: dict, variant: str, visual_experts: bool, token_order: str = "raster"):
    """A `NaViLConfig` of `size` and `variant` with the token ids and image settings of `base` (a NaViLConfig):
    the encoder's LayerScale starting at `VISION_LAYER_SCALE` (as `navil init-from-llm` builds a fresh
    encoder; no blocks in `early`), its output in `token_order`."""
    from configuration_navil import NaViLConfig
    from navil_hf.conversion.init_llm import VISION_LAYER_SCALE

    tc = base.text_config
    hidden, width = size["hidden"], size["vit_width"]
    text = dict(
        vocab_size=tc.vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=size["layers"],
        num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=hidden // HEAD_DIM, head_dim=HEAD_DIM,
        hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, qk_norm=False, tie_word_embeddings=True,
        visual_experts=visual_experts, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
    )  # fmt: skip
    blocks = size["vit_layers"] if variant == "late" else 0
    vision = dict(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=blocks,
        num_attention_heads=width // HEAD_DIM, fullatt_block_indexes=None if blocks else [], patch_size=16,
        spatial_merge_size=2, qkv_bias=True, norm_type="rms_norm", hidden_act="gelu", window_size=8,
        initializer_factor=VISION_LAYER_SCALE, token_order=token_order,
    )  # fmt: skip
    names = ("special_token_ids", "image_token_id", "image_start_token_id", "image_end_token_id",
             "image_line_break_token_id", "image_frame_break_token_id", "template", "min_dynamic_patch",
             "max_dynamic_patch", "scale_downsample_ratio")  # fmt: skip
    return NaViLConfig(
        vision_config=vision, text_config=text, downsample_ratio=0.5, special_token_table="everywhere",
        tie_word_embeddings=True, **{name: getattr(base, name) for name in names},
    )  # fmt: skip


def build_model_folder(base_dir, size, variant, visual_experts, out_dir, seed, token_order="raster"):
    """Write a randomly initialised NaViL of `size` / `variant` as a Hub folder; returns its parameter counts."""
    import torch
    from transformers import GenerationConfig

    from modeling_navil import NaViLForConditionalGeneration
    from navil_hf.folders import quiet_transformers
    from navil_hf.hub import build_generation_config, write_hub_folder
    from navil_hf.research.accounting import count_parameters, load_config
    from navil_hf.training.train import load_processor

    config = build_config(load_config(base_dir), size, variant, visual_experts, token_order)
    torch.manual_seed(seed)
    model = NaViLForConditionalGeneration(config).eval()
    scale = config.vision_config.initializer_factor
    if any(not torch.all(b.ls1 == scale) or not torch.all(b.ls2 == scale) for b in model.model.vision_model.layers):
        raise RuntimeError("the ViT blocks' LayerScale did not start at vision_config.initializer_factor")
    has_experts = any("_ve" in name for name, _ in model.named_parameters())
    if has_experts != visual_experts:
        raise RuntimeError("this checkout's NaViLTextConfig has no `visual_experts` option: the model has experts")
    processor = load_processor(base_dir)
    try:
        generation_config = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation_config = build_generation_config(processor.tokenizer)
    card = f"# Random-init NaViL ({variant} fusion, size {size}) for benchmarks/fusion_sweep.py\n"
    with quiet_transformers():
        write_hub_folder(model, config, processor.tokenizer, out_dir, processor=processor,
                         generation_config=generation_config, model_card=card)  # fmt: skip
    total = count_parameters(model).total
    counts = {
        "N": sum(total.values()) - total["embeddings"] - total["lm_head"] - total["special_tokens"],
        "n_vision": total["vision"],
        "n_connector": total["connector"],
        "n_llm": total["text"] + total["visual_experts"],
        "n_total": sum(total.values()),
    }
    return counts, {part: int(n) for part, n in total.items()}


# --------------------------------------------------------------------------------------------- measuring


def encode_records(processor, path, count):
    """The first `count` records of the jsonl `path`, encoded as `navil train` encodes them."""
    from navil_hf.training.data import ConversationDataset, SampleEncoder

    dataset = ConversationDataset([str(path)], SampleEncoder(processor))
    return [dataset[i] for i in range(min(count, len(dataset)))]


def loss_batches(samples, batch):
    """Packed rows of `batch` samples each, with the positions whose next token is an assistant token."""
    from navil_hf.training.collate import IGNORE_INDEX, PackedCollator

    collate = PackedCollator()
    out = []
    for start in range(0, len(samples), batch):
        row = collate(samples[start : start + batch])
        labels = row.pop("labels")[0]
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
        out.append((row, positions, labels[positions + 1], len(samples[start : start + batch])))
    return out


def heldout_loss(model, batches):
    """(nats per assistant token, nats per record): teacher-forced cross-entropy of the assistant tokens."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, tokens, records = 0.0, 0, 0
    with torch.no_grad():
        for row, positions, targets, n in batches:
            logits = model(**row, logits_to_keep=positions, use_cache=False).logits[0].float()
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            tokens += len(targets)
            records += n
    model.train(was_training)
    return total / tokens, total / records


def blind_loss(test_samples, test_records, train_records) -> dict:
    """The loss of a model that answers from the question alone: -log p(answer | question text), p the
    add-one smoothed answer frequencies of that question in the training split (its kind's answers when
    the question never occurs there), the format tokens free; per assistant token and per record."""
    from collections import Counter, defaultdict

    from navil_hf.training.collate import IGNORE_INDEX
    from navil_hf.tasks.shapes import ANSWERS

    per_question = defaultdict(Counter)
    for record in train_records:
        per_question[record["question"]][record["answer"]] += 1
    nats = 0.0
    for record in test_records:
        counts = per_question.get(record["question"], Counter())
        options = set(counts) | {record["answer"]} if counts else set(ANSWERS[record["kind"]])
        nats -= math.log((counts[record["answer"]] + 1) / (sum(counts.values()) + len(options)))
    tokens = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in test_samples)
    return {"per_token": nats / tokens, "per_answer": nats / len(test_records)}


def accuracy(model, processor, records, base_dir, batch=32):
    """Exact-match accuracy of greedy `batch_chat` answers (`shapes.chat_answers`, `shapes.score`), as
    learn_shapes measures it: overall and `acc_KIND`."""
    from navil_hf.tasks.shapes import chat_answers, flat_score, score

    return flat_score(score(chat_answers(model, processor, records, base_dir, batch), records))


# ----------------------------------------------------------------------------------------------- one run

_REPORT = None  # where a worker process sends its progress (a multiprocessing queue); None: in this process


def _init_worker(report_queue, threads):
    global _REPORT
    import torch

    _REPORT = report_queue
    torch.set_num_threads(threads)


def _report(message, sink=None):
    (sink or _REPORT.put)(message)


def run_one(spec: dict, shared: dict, sink=None) -> dict:
    """Build, train and measure one model (`spec`: name, variant, size, steps); returns its results."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _run_one(spec, shared, sink)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run_one(spec, shared, sink):
    import torch
    from transformers import TrainerCallback

    from navil_hf.tasks.shapes import read_jsonl
    from navil_hf.training.train import load_model, load_processor, parse_config, train

    started = time.perf_counter()
    name, steps, color_steps, lr = spec["name"], spec["steps"], spec["color_steps"], spec["lr"]
    workdir, data = Path(shared["workdir"]), Path(shared["data"])
    model_dir = workdir / "models" / name
    run_dir = workdir / "runs" / name
    (run_dir / "result.json").unlink(missing_ok=True)
    counts, parts = build_model_folder(shared["base"], spec["size"], spec["variant"], shared["visual_experts"],
                                       model_dir, shared["seed"], shared["token_order"])  # fmt: skip
    processor = load_processor(model_dir)
    test_records = list(read_jsonl(data / "test.jsonl"))[: shared["acc_records"]]
    batches = loss_batches(encode_records(processor, data / "test.jsonl", shared["eval_records"]), shared["eval_batch"])
    points = eval_steps(steps, shared["evals"], shared["warmup"], color_steps, shared["color_evals"])
    loss0 = heldout_loss(load_model(model_dir), batches)
    rows, finals = [], {}
    common = {"name": name, "variant": spec["variant"], "size": spec["size_name"], "lr": lr, **counts}
    _report({"kind": "start", "name": name, "steps": steps, "loss": loss0[0], "N": counts["N"], "lr": lr}, sink)
    clock = {"start": time.perf_counter(), "cpu": time.process_time(), "eval": 0.0, "eval_cpu": 0.0}
    done = {"steps": 0, "tokens": 0}  # of the stages before the running one

    class Measure(TrainerCallback):
        def __init__(self, stage, last_step):
            self.stage, self.last_step = stage, last_step

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            step = done["steps"] + state.global_step
            if points.get(step) != self.stage:
                return
            t0, c0 = time.perf_counter(), time.process_time()
            loss, per_answer = heldout_loss(model, batches)
            if step == self.last_step:  # the stage's end: exact match through batch_chat, per kind
                finals[self.stage] = accuracy(model, processor, test_records, data)
            clock["eval"] += time.perf_counter() - t0
            clock["eval_cpu"] += time.process_time() - c0
            cpu_per_step = (time.process_time() - clock["cpu"] - clock["eval_cpu"]) / step
            seconds = time.perf_counter() - clock["start"]
            row = {**common, "D": int(done["tokens"] + state.num_input_tokens_seen), "loss": loss, "stage": self.stage,
                   "step": step, "samples": step * shared["batch"], "loss_per_answer": per_answer,
                   "seconds": round(seconds, 2)}  # fmt: skip
            rows.append(row)
            _report({"kind": "eval", "name": name, "step": step, "steps": steps, "row": row,
                     "seconds_per_step": (seconds - clock["eval"]) / step, "cpu_seconds_per_step": cpu_per_step,
                     "elapsed": seconds, **finals.get(self.stage, {})}, sink)  # fmt: skip

    stages = [("color", Path(shared["color_data"]), color_steps, run_dir / "color"),
              ("mixed", data, steps - color_steps, run_dir)]  # fmt: skip
    source, trained = model_dir, None
    for stage, folder, stage_steps, out_dir in [s for s in stages if s[2] > 0]:
        config = parse_config({
            "model": str(source), "output_dir": str(out_dir), "data": {"train": str(folder / "train.jsonl")},
            "train": "full", "seed": shared["seed"],
            "training": {
                "max_steps": stage_steps, "per_device_train_batch_size": shared["batch"], "learning_rate": lr,
                "lr_scheduler_type": "constant_with_warmup", "warmup_steps": min(shared["warmup"], stage_steps // 5),
                "weight_decay": 0.0, "logging_strategy": "no", "save_strategy": "no",
                "include_num_input_tokens_seen": True, "disable_tqdm": True,
            },
        })  # fmt: skip
        seen = {}

        class Tokens(TrainerCallback):
            def on_train_end(self, _args, state, control, **kwargs):
                seen["tokens"] = int(state.num_input_tokens_seen)

        torch.manual_seed(shared["seed"])
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's PrinterCallback prints its metrics dict
            result = train(config, force=True, callbacks=[Measure(stage, done["steps"] + stage_steps), Tokens()])
        done["steps"] += stage_steps
        done["tokens"] += seen["tokens"]
        source = trained = result.model_dir
    shutil.rmtree(model_dir, ignore_errors=True)  # the initial weights (the seed rebuilds them); runs/NAME/model stays
    train_seconds = rows[-1]["seconds"] - clock["eval"] if rows else None
    out = {
        **spec, "params": counts, "parts": parts, "loss_step0": loss0[0], "loss_per_answer_step0": loss0[1],
        "rows": rows, "final": finals.get("mixed", {}), "after_color": finals.get("color", {}),
        "tokens": done["tokens"], "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps if train_seconds else None,
        "cpu_seconds_per_step": (time.process_time() - clock["cpu"] - clock["eval_cpu"]) / steps,
        "eval_seconds": round(clock["eval"], 1),
        "seconds": round(time.perf_counter() - started, 1), "trained_model": str(trained),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    # The finished run on its own: a sweep stopped later keeps it (`--refit`, `--resume`).
    (run_dir / "result.json").write_text(json.dumps(out, indent=1, default=str))
    return out


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
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(messages, threads)) as pool:
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
    spec's settings (steps, color steps, learning rate)."""
    done = {}
    for spec in specs:
        path = Path(workdir) / "runs" / spec["name"] / "result.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for key in ("steps", "color_steps", "color_task", "lr"):
            if key in result and result[key] != spec[key]:
                raise SystemExit(f"{path}: {key} {result[key]} where this sweep has {spec[key]}; use the same settings "
                                 "(or another --workdir)")  # fmt: skip
        done[spec["name"]] = result
    return done


def _saved_runs(workdir, specs, data, test_records, args):
    """The runs of an earlier sweep in `workdir`: runs.json as the training wrote it at its end; else (a sweep
    that stopped, or is still going) each finished run's runs/NAME/result.json and, for the others, their
    points so far from runs.csv (`finished`: False, no accuracy), or with a trained model but no result.json
    (a first-version sweep stopped while fitting) its accuracy measured again. Returns (runs, seconds)."""
    runs_file = workdir / "runs.json"
    if runs_file.is_file():
        saved = json.loads(runs_file.read_text())
        return saved["runs"], saved.get("seconds")
    from navil_hf.training.train import load_model, load_processor

    done = finished_runs(workdir, specs)
    table = read_rows(workdir / "runs.csv")
    if not done and not table:
        raise SystemExit(f"--refit: {workdir} has no runs.json, result.json or runs.csv (run the sweep first)")
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
            run["final"] = accuracy(load_model(model_dir), load_processor(model_dir), test_records[: args.acc_records],
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


def fit_variant(rows, bootstrap, seed):
    """`fit_scaling_law` on one variant's rows: its dict, summary and the fit (None and the reason if it cannot run)."""
    try:
        from navil_hf.research.scaling import MIN_RUNS, RunsError, fit_scaling_law
    except ImportError as e:
        return None, {"skipped": f"no fit: {e}"}
    if len(rows) < MIN_RUNS:
        return None, {"skipped": f"{len(rows)} points; the 5-parameter fit needs at least {MIN_RUNS}"}
    N, D, loss = ([r[key] for r in rows] for key in ("N", "D", "loss"))
    try:
        fit = fit_scaling_law(N, D, loss, bootstrap=bootstrap, seed=seed, holdout=0.1 if len(rows) >= 10 else None)
    except (RunsError, ImportError, ValueError) as e:
        return None, {"skipped": f"no fit: {' '.join(str(e).split())}"}
    return fit, {**fit.to_dict(), "summary": fit.summary()}


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


def main(argv=None):
    args = parse_args(argv)
    from navil_hf.tasks.shapes import (
        KINDS,
        blind_accuracy,
        chance_accuracy,
        make_shapes_dataset,
        read_jsonl,
    )

    started = time.perf_counter()
    default = "fusion-sweep" if args.visual_experts else "fusion-sweep-no-experts"
    workdir = Path(args.workdir or Path(_common.ROOT).parent / default)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from navil_hf.demo import ensure_demo_model

        args.tokenizer = str(ensure_demo_model(progress=True))
    data, color_data = workdir / "shapes", workdir / "shapes-color"
    specs = [
        {"name": f"{variant}-{size}", "variant": variant, "size_name": size, "size": args.size_table[size],
         "steps": args.steps, "color_steps": args.color_steps, "color_task": args.color_task,
         "lr": run_lr(args.size_table[size], args.lr, args.lr_scaling)}
        for size in args.size_table for variant in args.variant_list
    ]  # fmt: skip
    # Smallest sizes first (--sizes order), late and early of a size side by side: a sweep stopped early has
    # whole sizes finished. At the default sizes this ends ~1 min later than longest-first would (~26 vs
    # ~25 min of training at SECONDS_PER_STEP).
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

    eval_samples = encode_records(load_processor(args.tokenizer), data / "test.jsonl", args.eval_records)
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
    if args.refit:
        results, trained_seconds = _saved_runs(workdir, specs, data, test_records, args)
    else:
        done = finished_runs(workdir, specs) if args.resume else {}
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
        print(f"{len(todo)} runs ({', '.join(s['name'] for s in todo)}), {args.jobs} at a time x {args.threads} "
              f"thread(s); {args.steps} steps of {args.batch} ({args.color_steps} on color questions first); "
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

    all_rows = [row for r in results for row in r["rows"]]
    write_csv(csv_file, all_rows)
    fits, fit_objects = {}, {}
    for variant in args.variant_list:
        rows = [row for row in all_rows if row["variant"] == variant and row.get("stage", "mixed") == "mixed"]
        write_csv(workdir / f"runs-{variant}.csv", rows)
        fit, fits[variant] = fit_variant(rows, args.bootstrap, args.seed)
        if fit is not None:
            fit_objects[variant] = fit
            try:
                fit.plot(workdir / f"fit-{variant}.png")
            except ImportError:
                pass
        print(f"\n{variant} fusion, L(N, D) fit on {len(rows)} points (the mixed stage's):")
        print(fits[variant].get("summary") or fits[variant]["skipped"])
    unfinished = [r["name"] for r in results if r.get("finished") is False]
    summary = {
        "command": "python benchmarks/fusion_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _common.machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "tokenizer": args.tokenizer,
        "visual_experts": args.visual_experts, "jobs": args.jobs, "threads_per_job": args.threads,
        "settings": {k: getattr(args, k) for k in ("batch", "lr", "lr_scaling", "warmup", "steps", "color_steps",
                                                   "color_task", "token_order", "train", "test", "evals", "color_evals",
                                                   "eval_records", "eval_batch", "acc_records", "bootstrap",
                                                   "seed")},
        "vision_layer_scale": _vision_layer_scale(),
        "N": "parameters outside the token tables (vision, connector, decoder layers incl. visual experts, final norm)",
        "D": "LLM input tokens trained on (text and visual positions), the color stage's included",
        "loss": "held-out cross-entropy (all four kinds), nats per assistant token",
        "fitted": "the mixed stage's points (stage == 'mixed')",
        "baselines": baselines, "runs": results, "unfinished": unfinished, "fits": fits,
        "seconds": trained_seconds if args.refit else round(time.perf_counter() - started, 1),
        "refit": args.refit,
    }  # fmt: skip
    (workdir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot = Path(args.plot) if args.plot else workdir / "fusion_sweep.png"
    _plot(summary, fit_objects, plot)
    _print_table(results, baselines)
    print(f"\n{len(all_rows)} points in {csv_file}; fits, curves: {workdir / 'results.json'}; "
          f"plot: {plot}; {_minutes(summary['seconds'])}"
          + (f"; not finished: {', '.join(unfinished)}" if unfinished else ""))  # fmt: skip
    return summary


def _vision_layer_scale():
    from navil_hf.conversion.init_llm import VISION_LAYER_SCALE

    return VISION_LAYER_SCALE


def _minutes(seconds) -> str:
    return "time not recorded" if seconds is None else f"{seconds / 60:.1f} min"


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


def _plot(summary, fits, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'navil-hf[research]')")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    runs = summary["runs"]
    sizes = sorted(
        {r["size_name"] for r in runs}, key=lambda s: min(r["params"]["N"] for r in runs if r["size_name"] == s)
    )
    colors = {s: plt.get_cmap("viridis")(0.85 * i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}
    styles = {"late": ("o", "-"), "early": ("s", "--")}
    switch = None
    for r in runs:
        if not r["rows"]:
            continue
        marker, line = styles[r["variant"]]
        color = colors[r["size_name"]]
        fill = color if r["variant"] == "late" else "none"
        mixed = [p for p in r["rows"] if p.get("stage", "mixed") == "mixed"]
        early_points = [p for p in r["rows"] if p.get("stage") == "color"]
        if early_points:
            switch = early_points[-1]["D"]
            left.plot([p["D"] for p in early_points], [p["loss"] for p in early_points], marker, color=color, ms=4,
                      ls="none", mfc=fill, alpha=0.35)  # fmt: skip
        unfinished = "" if r.get("finished", True) else ", unfinished"
        left.plot([p["D"] for p in mixed], [p["loss"] for p in mixed], marker, color=color, ms=5, ls="none", mfc=fill,
                  label=f"{r['variant']} {r['size_name']} (N={r['params']['N'] / 1e6:.2f}M, lr {r.get('lr', 0):.2g}"
                  f"{unfinished})")  # fmt: skip
        if r["variant"] in fits and mixed:
            D = np.array([p["D"] for p in mixed], dtype=float)
            d_line = np.geomspace(D.min(), D.max(), 100)
            left.plot(d_line, fits[r["variant"]].predict(r["params"]["N"], d_line), line, color=color, lw=1)
    if switch is not None:
        left.axvline(switch, color="gray", lw=0.6, ls="-.", label="end of the color stage (first run)")
    blind = summary["baselines"]["blind_loss"]["per_token"]
    left.axhline(blind, color="gray", ls=":", lw=1, label=f"blind (question only) {blind:.3f}")
    left.set(
        xscale="log", yscale="log", xlabel="D: LLM tokens trained on (color stage included)",
        ylabel="held-out loss, all kinds (nats / assistant token)",
    )  # fmt: skip
    left.set_title("points: measured (faded: color stage, not fitted); lines: L(N, D) fit per variant on the mixed "
                   "stage (solid late, dashed early)", fontsize=8)  # fmt: skip
    left.legend(fontsize=7)
    for variant in ("late", "early"):
        chosen = [r for r in runs if r["variant"] == variant and r.get("final")]
        if not chosen:
            continue
        marker, line = styles[variant]
        chosen.sort(key=lambda r: r["params"]["N"])
        N = [r["params"]["N"] for r in chosen]
        for key, label, lw, ms, shade in (("accuracy", "all questions", 1.6, 6, 0), ("acc_color", "color", 0.8, 3, 1),
                                          ("acc_shape", "shape", 0.8, 3, 2), ("acc_count", "count", 0.8, 3, 3),
                                          ("acc_position", "position", 0.8, 3, 4)):  # fmt: skip
            right.plot(N, [r["final"].get(key, float("nan")) for r in chosen], marker + line, lw=lw, ms=ms,
                       color=plt.get_cmap("tab10")(shade), mfc="none" if variant == "early" else None,
                       label=f"{variant}: {label}")  # fmt: skip
    base = summary["baselines"]
    for name, style, label in (("chance", ":", "chance"), ("blind", "-.", "blind")):
        right.axhline(base[name], color="gray", ls=style, lw=1, label=f"{label} (all) {base[name]:.2f}")
    if "blind_color" in base:
        right.axhline(base["blind_color"], color=plt.get_cmap("tab10")(1), ls=(0, (1, 3)), lw=1,
                      label=f"blind (color) {base['blind_color']:.2f}")  # fmt: skip
    right.set(xscale="log", xlabel="N: non-embedding parameters", ylabel="held-out exact match", ylim=(0, 1.02))
    right.set_title("accuracy at the end of each run (greedy batch_chat; solid markers late, hollow early)", fontsize=8)
    right.legend(fontsize=6, ncol=2)
    settings = summary["settings"]
    lr = f"lr {settings['lr']:g}" + (" x sqrt(64 / width)" if settings.get("lr_scaling") == "sqrt" else "")
    fig.suptitle(f"late vs early fusion on the shapes task: {settings.get('steps', '?')} steps of {settings['batch']} "
                 f"({settings.get('color_steps', 0)} on {settings.get('color_task', 'all')} color questions first), "
                 f"{lr} constant, token order {settings.get('token_order', 'window')}, ViT LayerScale {summary.get('vision_layer_scale', 1.0)}, "
                 f"visual experts {'on' if summary['visual_experts'] else 'off'}, {_minutes(summary['seconds'])}"
                 + (f"; unfinished: {', '.join(summary['unfinished'])}" if summary.get("unfinished") else ""),
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
