"""Late vs early fusion at a few sizes: a small scaling sweep on the shapes task, on 2 CPU cores.

Builds tiny NaViLs from scratch (random init) at a few sizes in two variants and trains each briefly with
`navil train`'s own code (packed rows, transformers' Trainer) on the synthetic shapes task
(`navil_hf.training.shapes`):

* `late`: a small ViT (its blocks sized per size, `SIZES`) -> 2x2 merge -> MLP connector -> the LLM (NaViL);
* `early`: the same model without the ViT blocks: the 16-px patches' linear embedding (same width) ->
  2x2 merge -> connector -> the LLM (early fusion, as in Apple's "Scaling Laws for Native Multimodal
  Models"; the `none` vision preset of `navil init-from-llm`, at a small width).

The LLMs are Llama-style decoders (SwiGLU, RMSNorm, RoPE, tied embeddings) with NaViL's visual experts
(`--no-visual-experts`: none, every token takes the text weights; `text_config.visual_experts`). They use
the tokenizer, chat template and image settings of one NaViL folder (`--tokenizer`; default: the demo
model's, SmolLM2's 49k vocabulary), so the prompts are those of `benchmarks/learn_shapes.py`.

Measured, for every run, at `--evals` points spaced geometrically over its steps (and at step 0):

* the held-out loss: cross-entropy of the assistant tokens (the answer, `<|im_end|>` and the newline
  after it) of the first `--eval-records` records of the shapes test split, teacher-forced, one packed
  forward per `--eval-batch` records without gradients; nats per assistant token (`loss`, what is fitted)
  and per answer (`loss_per_answer`);
* at the end, held-out exact-match accuracy of greedy `model.batch_chat` answers on `--acc-records`
  records (as in learn_shapes), against the majority-answer (`chance`) and answer-from-the-question
  (`blind`) baselines.

`blind_loss` is the loss a model that reads only the question could reach: -log p(answer | question) with
p the answer frequencies of each question text in the training split (add-one smoothed), the format tokens
free, per assistant token. A held-out loss below it means the model reads the image.

Each eval point is a row (N, D, loss): N = parameters outside the token tables (ViT, connector, decoder
layers with both experts, final norm; not the tied embedding / LM head, not the 12-row special-token
table; from `navil_hf.research.accounting.count_parameters` on the built model), D = LLM input tokens
trained on so far (text and visual positions of the packed rows; the Trainer's `num_input_tokens_seen`).
The learning rate is constant after a short warm-up, so the points along one run stand in for separate
runs trained to that D: an approximation (a separate run per D would anneal its learning rate at its end
and reach a somewhat lower loss; the fitted B and beta describe this one schedule). Then
`L(N, D) = E + A/N^alpha + B/D^beta` is fitted per variant (`navil_hf.research.scaling.fit_scaling_law`).

    python benchmarks/fusion_sweep.py                  # 3 sizes x 2 variants, 1500 steps: ~35-40 min, 2 cores
    python benchmarks/fusion_sweep.py --sizes s,m --steps 200 --jobs 1
    python benchmarks/fusion_sweep.py --quick          # 2 tiny sizes, a few steps (CI, < 1 min)

`--jobs 2` (the default on 2+ cores) trains two runs at a time, in separate processes with one thread each,
so both cores stay busy without relying on intra-op threading of these small matrices (not measured
against `--jobs 1 --threads 2`).

Writes to WORKDIR (default `fusion-sweep/` beside the repo; `fusion-sweep-no-experts/` with
`--no-visual-experts`): `runs.csv` (every eval point; a `variant` column), `runs-late.csv` /
`runs-early.csv` (one variant each: `navil scaling fit WORKDIR/runs-late.csv --plot fit.png` reads them),
`results.json` (settings, parameter counts, curves, accuracies, fits), `fit-late.png` / `fit-early.png`
(`ScalingFit.plot`), the comparison plot `fusion_sweep.png` (`--plot`), the shapes data in `shapes/`, and
each trained Hub folder in `runs/VARIANT-SIZE/model`.
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
# Optimizer steps of every run: with the CPU seconds per step below (batch 16, one thread, measured on a
# busy 2-core machine: RESULTS.md §10; also the ETA's first guess) the 6 runs add up to ~61 CPU-minutes,
# ~32 min of training on 2 cores with --jobs 2 (the longest runs first), ~35-40 min in all.
STEPS = 1500
SECONDS_PER_STEP = {("late", "s"): 0.22, ("early", "s"): 0.17, ("late", "m"): 0.40, ("early", "m"): 0.36,
                    ("late", "l"): 0.73, ("early", "l"): 0.56}  # fmt: skip
RECIPE = dict(test=200, batch=16, lr=2e-3, warmup=20, evals=10, eval_records=200, eval_batch=32, acc_records=200,
              bootstrap=200)  # fmt: skip
QUICK = dict(train=48, test=16, batch=4, steps=4, warmup=0, evals=3, eval_records=8, eval_batch=8, acc_records=8,
             bootstrap=10)  # fmt: skip
CSV_COLUMNS = ("name", "variant", "size", "N", "D", "loss", "step", "samples", "loss_per_answer", "n_vision",
               "n_connector", "n_llm", "n_total", "seconds")  # fmt: skip


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
    parser.add_argument("--batch", type=int, default=RECIPE["batch"], help="samples per packed row")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW learning rate (constant after warm-up)")
    parser.add_argument("--warmup", type=int, default=RECIPE["warmup"], help="linear warm-up steps")
    parser.add_argument("--train", type=int, default=None, help="training records (default: steps x batch, one epoch)")
    parser.add_argument("--test", type=int, default=RECIPE["test"], help="held-out records generated")
    parser.add_argument("--evals", type=int, default=RECIPE["evals"], help="held-out loss points per run")
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
                        "again (WORKDIR/runs.json, written when the training ends; without it runs.csv and the "
                        "trained models, their accuracy measured again)")  # fmt: skip
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


def eval_steps(steps: int, evals: int, warmup: int) -> list[int]:
    """`evals` steps spaced geometrically from max(2 x warm-up, steps / 20) to `steps` (distinct, >= 1)."""
    first = max(1, min(steps, max(2 * warmup, steps // 20)))
    if evals <= 1 or first == steps:
        return [steps]
    ratio = (steps / first) ** (1 / (evals - 1))
    return sorted({min(steps, max(1, round(first * ratio**i))) for i in range(evals)} | {steps})


# ----------------------------------------------------------------------------------------------- models


def build_config(base, size: dict, variant: str, visual_experts: bool):
    """A `NaViLConfig` of `size` and `variant` with the token ids and image settings of `base` (a NaViLConfig)."""
    from configuration_navil import NaViLConfig

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
    )  # fmt: skip
    names = ("special_token_ids", "image_token_id", "image_start_token_id", "image_end_token_id",
             "image_line_break_token_id", "image_frame_break_token_id", "template", "min_dynamic_patch",
             "max_dynamic_patch", "scale_downsample_ratio")  # fmt: skip
    return NaViLConfig(
        vision_config=vision, text_config=text, downsample_ratio=0.5, special_token_table="everywhere",
        tie_word_embeddings=True, **{name: getattr(base, name) for name in names},
    )  # fmt: skip


def build_model_folder(base_dir, size, variant, visual_experts, out_dir, seed):
    """Write a randomly initialised NaViL of `size` / `variant` as a Hub folder; returns its parameter counts."""
    import torch
    from transformers import GenerationConfig

    from modeling_navil import NaViLForConditionalGeneration
    from navil_hf.conversion.folders import quiet_transformers
    from navil_hf.conversion.hub import build_generation_config, write_hub_folder
    from navil_hf.research.accounting import count_parameters, load_config
    from navil_hf.training.train import load_processor

    config = build_config(load_config(base_dir), size, variant, visual_experts)
    torch.manual_seed(seed)
    model = NaViLForConditionalGeneration(config).eval()
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
    from navil_hf.training.shapes import ANSWERS

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
    from navil_hf.training.shapes import chat_answers, flat_score, score

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

    from navil_hf.training.shapes import read_jsonl
    from navil_hf.training.train import load_model, load_processor, parse_config, train

    started = time.perf_counter()
    name, steps = spec["name"], spec["steps"]
    workdir, data = Path(shared["workdir"]), Path(shared["data"])
    model_dir = workdir / "models" / name
    counts, parts = build_model_folder(shared["base"], spec["size"], spec["variant"], shared["visual_experts"],
                                       model_dir, shared["seed"])  # fmt: skip
    processor = load_processor(model_dir)
    test_records = list(read_jsonl(data / "test.jsonl"))
    batches = loss_batches(encode_records(processor, data / "test.jsonl", shared["eval_records"]), shared["eval_batch"])
    points = eval_steps(steps, shared["evals"], shared["warmup"])
    loss0 = heldout_loss(load_model(model_dir), batches)
    rows, final = [], {}
    common = {"name": name, "variant": spec["variant"], "size": spec["size_name"], **counts}
    _report({"kind": "start", "name": name, "steps": steps, "loss": loss0[0], "N": counts["N"]}, sink)

    class Measure(TrainerCallback):
        def on_train_begin(self, _args, state, control, **kwargs):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            self.eval_seconds = self.eval_cpu = 0.0

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            step = state.global_step
            if step not in points:
                return
            t0, c0 = time.perf_counter(), time.process_time()
            loss, per_answer = heldout_loss(model, batches)
            if step == steps:
                final.update(accuracy(model, processor, test_records[: shared["acc_records"]], data))
            self.eval_seconds += time.perf_counter() - t0
            self.eval_cpu += time.process_time() - c0
            self.cpu_per_step = (time.process_time() - self.cpu_start - self.eval_cpu) / step
            seconds = time.perf_counter() - self.start
            row = {**common, "D": int(state.num_input_tokens_seen), "loss": loss, "step": step,
                   "samples": step * shared["batch"], "loss_per_answer": per_answer,
                   "seconds": round(seconds, 2)}  # fmt: skip
            rows.append(row)
            train_seconds = seconds - self.eval_seconds
            _report({"kind": "eval", "name": name, "step": step, "steps": steps, "row": row,
                     "seconds_per_step": train_seconds / step, "cpu_seconds_per_step": self.cpu_per_step,
                     "elapsed": seconds, **final}, sink)  # fmt: skip

    config = parse_config({
        "model": str(model_dir), "output_dir": str(workdir / "runs" / name),
        "data": {"train": str(data / "train.jsonl")}, "train": "full", "seed": shared["seed"],
        "training": {
            "max_steps": steps, "per_device_train_batch_size": shared["batch"], "learning_rate": shared["lr"],
            "lr_scheduler_type": "constant_with_warmup", "warmup_steps": min(shared["warmup"], steps // 5),
            "weight_decay": 0.0, "logging_strategy": "no", "save_strategy": "no",
            "include_num_input_tokens_seen": True, "disable_tqdm": True,
        },
    })  # fmt: skip
    measure = Measure()
    torch.manual_seed(shared["seed"])
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's PrinterCallback prints its metrics dict
        result = train(config, force=True, callbacks=[measure])
    shutil.rmtree(model_dir, ignore_errors=True)  # the initial weights (the seed rebuilds them); runs/NAME/model stays
    train_seconds = rows[-1]["seconds"] - measure.eval_seconds if rows else None
    return {
        **spec, "params": counts, "parts": parts, "loss_step0": loss0[0], "loss_per_answer_step0": loss0[1],
        "rows": rows, "final": final, "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps if train_seconds else None,
        "cpu_seconds_per_step": getattr(measure, "cpu_per_step", None),
        "eval_seconds": round(getattr(measure, "eval_seconds", 0.0), 1),
        "seconds": round(time.perf_counter() - started, 1), "trained_model": str(result.model_dir),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


# -------------------------------------------------------------------------------------------- the sweep


class Progress:
    """One line per eval point, with the sweep's ETA: each run's remaining steps at its measured wall seconds
    per step, evaluations included (runs not started: `SECONDS_PER_STEP` scaled by how the started runs
    compare with it), over `jobs`."""

    def __init__(self, specs, jobs):
        self.jobs, self.start, self.out = jobs, time.perf_counter(), sys.stdout
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
            print(f"[{elapsed:5.1f} min] {name}: N = {message['N']:,} (non-embedding), {message['steps']} steps; "
                  f"held-out loss at step 0 {message['loss']:.3f}", file=self.out, flush=True)  # fmt: skip
            return
        row = message["row"]
        self.left[name] = message["steps"] - message["step"]
        self.rate[name] = message["elapsed"] / message["step"]
        acc = f", accuracy {message['accuracy']:.3f}" if "accuracy" in message else ""
        print(f"[{elapsed:5.1f} min] {name} step {message['step']}/{message['steps']}: D = {row['D']:.3g} tokens, "
              f"held-out loss {row['loss']:.4f} ({row['loss_per_answer']:.3f} nats/answer){acc}; "
              f"{message['seconds_per_step']:.2f} s/step (CPU {message['cpu_seconds_per_step']:.2f}); "
              f"sweep ETA {self.eta() / 60:.1f} min", file=self.out, flush=True)  # fmt: skip


def run_all(specs, shared, jobs, threads):
    progress = Progress(specs, jobs)
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


def _saved_runs(workdir, specs, data, test_records, args):
    """The runs of an earlier sweep in `workdir`: runs.json as the training wrote it, or (a sweep that stopped
    while fitting, before runs.json existed) the rows of runs.csv with each trained model's accuracy measured
    again (no step-0 loss or timings then)."""
    runs_file = workdir / "runs.json"
    if runs_file.is_file():
        saved = json.loads(runs_file.read_text())
        return saved["runs"], saved.get("seconds")
    import csv

    from navil_hf.training.train import load_model, load_processor

    if not (workdir / "runs.csv").is_file():
        raise SystemExit(f"--refit: {workdir} has neither runs.json nor runs.csv (run the sweep first)")
    with open(workdir / "runs.csv", newline="") as f:
        table = list(csv.DictReader(f))
    numeric = {"N", "D", "step", "samples", "n_vision", "n_connector", "n_llm", "n_total"}
    results = []
    for spec in specs:
        rows = [
            {k: (int(v) if k in numeric else float(v) if k in ("loss", "loss_per_answer", "seconds") else v)
             for k, v in row.items()}
            for row in table if row["name"] == spec["name"]
        ]  # fmt: skip
        model_dir = workdir / "runs" / spec["name"] / "model"
        if not rows or not model_dir.is_dir():
            continue
        final = accuracy(load_model(model_dir), load_processor(model_dir), test_records[: args.acc_records], data)
        params = {"N": rows[0]["N"], **{k: rows[0][k] for k in ("n_vision", "n_connector", "n_llm", "n_total")}}
        results.append({
            **spec, "params": params, "rows": rows, "final": final, "loss_step0": float("nan"),
            "seconds_per_step": None, "trained_model": str(model_dir), "rebuilt_from_csv": True,
        })  # fmt: skip
        print(f"{spec['name']}: {len(rows)} points from runs.csv, accuracy {final['accuracy']:.3f} measured again")
    return results, None


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


def main(argv=None):
    args = parse_args(argv)
    from navil_hf.training.shapes import blind_accuracy, chance_accuracy, make_shapes_dataset, read_jsonl

    started = time.perf_counter()
    default = "fusion-sweep" if args.visual_experts else "fusion-sweep-no-experts"
    workdir = Path(args.workdir or Path(_common.ROOT).parent / default)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from navil_hf.demo import ensure_demo_model

        args.tokenizer = str(ensure_demo_model(progress=True))
    data = workdir / "shapes"
    specs = [
        {"name": f"{variant}-{size}", "variant": variant, "size_name": size, "size": args.size_table[size],
         "steps": args.steps}
        for size in args.size_table for variant in args.variant_list
    ]  # fmt: skip
    # Longest runs first, so that the two job slots end close together.
    specs.sort(key=lambda s: -s["steps"] * SECONDS_PER_STEP.get((s["variant"], s["size_name"]), 0.5))
    args.train = args.train or args.steps * args.batch
    if args.train < args.steps * args.batch:
        print(f"note: {args.train} training records for {args.steps * args.batch} samples per run "
              f"({args.steps * args.batch / args.train:.1f} epochs)")  # fmt: skip
    if not (args.refit and (data / "test.jsonl").is_file()):
        make_shapes_dataset(data, train=args.train, test=args.test, seed=args.seed, force=True)
    train_records, test_records = list(read_jsonl(data / "train.jsonl")), list(read_jsonl(data / "test.jsonl"))
    from navil_hf.training.train import load_processor

    eval_samples = encode_records(load_processor(args.tokenizer), data / "test.jsonl", args.eval_records)
    baselines = {
        "chance": chance_accuracy(test_records[: args.acc_records]),
        "blind": blind_accuracy(test_records[: args.acc_records], train_records),
        "chance_color": chance_accuracy([r for r in test_records[: args.acc_records] if r["kind"] == "color"]),
        "blind_loss": blind_loss(eval_samples, test_records[: len(eval_samples)], train_records),
    }
    shared = {
        "workdir": str(workdir), "data": str(data), "base": str(args.tokenizer), "visual_experts": args.visual_experts,
        "seed": args.seed, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "evals": args.evals,
        "eval_records": args.eval_records, "eval_batch": args.eval_batch, "acc_records": args.acc_records,
    }  # fmt: skip
    runs_file = workdir / "runs.json"
    if args.refit:
        results, trained_seconds = _saved_runs(workdir, specs, data, test_records, args)
    else:
        planned = sum(s["steps"] * SECONDS_PER_STEP.get((s["variant"], s["size_name"]), 0.5) for s in specs)
        print(f"{len(specs)} runs ({', '.join(s['name'] for s in specs)}), {args.jobs} at a time x {args.threads} "
              f"thread(s); planned ~{planned / args.jobs / 60:.0f} min of training; blind-baseline loss "
              f"{baselines['blind_loss']['per_token']:.4f} nats/token", flush=True)  # fmt: skip
        results = run_all(specs, shared, args.jobs, args.threads)
        with contextlib.suppress(OSError):
            (workdir / "models").rmdir()  # each run removes its initial weights when done
        trained_seconds = round(time.perf_counter() - started, 1)
        # The runs before anything is fitted: `--refit` starts from here.
        runs_file.write_text(json.dumps({"runs": results, "seconds": trained_seconds}, indent=1, default=str))

    all_rows = [row for r in results for row in r["rows"]]
    write_csv(workdir / "runs.csv", all_rows)
    fits, fit_objects = {}, {}
    for variant in args.variant_list:
        rows = [row for row in all_rows if row["variant"] == variant]
        write_csv(workdir / f"runs-{variant}.csv", rows)
        fit, fits[variant] = fit_variant(rows, args.bootstrap, args.seed)
        if fit is not None:
            fit_objects[variant] = fit
            try:
                fit.plot(workdir / f"fit-{variant}.png")
            except ImportError:
                pass
        print(f"\n{variant} fusion, L(N, D) fit on {len(rows)} points:")
        print(fits[variant].get("summary") or fits[variant]["skipped"])
    summary = {
        "command": "python benchmarks/fusion_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _common.machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "tokenizer": args.tokenizer,
        "visual_experts": args.visual_experts, "jobs": args.jobs, "threads_per_job": args.threads,
        "settings": {k: getattr(args, k) for k in ("batch", "lr", "warmup", "train", "test", "evals", "eval_records",
                                                   "eval_batch", "acc_records", "bootstrap", "seed")},
        "N": "parameters outside the token tables (vision, connector, decoder layers incl. visual experts, final norm)",
        "D": "LLM input tokens trained on (text and visual positions)",
        "loss": "held-out cross-entropy, nats per assistant token",
        "baselines": baselines, "runs": results, "fits": fits,
        "seconds": trained_seconds if args.refit else round(time.perf_counter() - started, 1),
        "refit": args.refit,
    }  # fmt: skip
    (workdir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot = Path(args.plot) if args.plot else workdir / "fusion_sweep.png"
    _plot(summary, fit_objects, plot)
    _print_table(results)
    print(f"\n{len(all_rows)} points in {workdir / 'runs.csv'}; fits, curves: {workdir / 'results.json'}; "
          f"plot: {plot}; {_minutes(summary['seconds'])}")  # fmt: skip
    return summary


def _minutes(seconds) -> str:
    return "time not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def _print_table(results):
    rows = []
    for r in results:
        last = r["rows"][-1] if r["rows"] else {}
        rows.append([r["name"], f"{r['params']['N']:,}", r["steps"], f"{last.get('D', 0):.3g}", r["loss_step0"],
                     last.get("loss", float("nan")), last.get("loss_per_answer", float("nan")),
                     r["final"].get("accuracy", float("nan")), r["final"].get("acc_color", float("nan")),
                     r["seconds_per_step"] or float("nan")])  # fmt: skip
    _common.print_table(
        "Fusion sweep (held-out loss: nats per assistant token)",
        ["run", "N", "steps", "D", "loss step 0", "loss end", "nats/answer end", "accuracy end", "color", "s/step"],
        rows,
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    runs = summary["runs"]
    sizes = sorted(
        {r["size_name"] for r in runs}, key=lambda s: min(r["params"]["N"] for r in runs if r["size_name"] == s)
    )
    colors = {s: plt.get_cmap("viridis")(0.85 * i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}
    styles = {"late": ("o", "-"), "early": ("s", "--")}
    for r in runs:
        if not r["rows"]:
            continue
        marker, line = styles[r["variant"]]
        D = np.array([p["D"] for p in r["rows"]], dtype=float)
        loss = np.array([p["loss"] for p in r["rows"]])
        color = colors[r["size_name"]]
        left.plot(D, loss, marker, color=color, ms=5, ls="none", mfc=color if r["variant"] == "late" else "none",
                  label=f"{r['variant']} {r['size_name']} (N={r['params']['N'] / 1e6:.2f}M)")  # fmt: skip
        if r["variant"] in fits:
            d_line = np.geomspace(D.min(), D.max(), 100)
            left.plot(d_line, fits[r["variant"]].predict(r["params"]["N"], d_line), line, color=color, lw=1)
    blind = summary["baselines"]["blind_loss"]["per_token"]
    left.axhline(blind, color="gray", ls=":", lw=1, label=f"blind (question only) {blind:.3f}")
    left.set(
        xscale="log", yscale="log", xlabel="D: LLM tokens trained on", ylabel="held-out loss (nats / assistant token)"
    )
    left.set_title("points: measured; lines: L(N, D) fit per variant (solid late, dashed early)", fontsize=9)
    left.legend(fontsize=7)
    for variant in ("late", "early"):
        chosen = [r for r in runs if r["variant"] == variant and r["final"]]
        if chosen:
            marker, line = styles[variant]
            chosen.sort(key=lambda r: r["params"]["N"])
            N = [r["params"]["N"] for r in chosen]
            right.plot(
                N,
                [r["final"]["accuracy"] for r in chosen],
                marker + line,
                color="C0" if variant == "late" else "C1",
                label=f"{variant} fusion: all questions",
            )
            color = [r["final"].get("acc_color", float("nan")) for r in chosen]
            right.plot(N, color, marker + line, lw=0.8, ms=3, color="C2" if variant == "late" else "C3",
                       label=f"{variant} fusion: color questions")  # fmt: skip
    for name, style, label in (("chance", ":", "chance"), ("blind", "-.", "blind"),
                               ("chance_color", (0, (1, 3)), "chance (color)")):  # fmt: skip
        value = summary["baselines"][name]
        right.axhline(value, color="gray", ls=style, lw=1, label=f"{label} {value:.2f}")
    right.set(xscale="log", xlabel="N: non-embedding parameters", ylabel="held-out exact match", ylim=(0, 1.02))
    right.set_title("accuracy at the end of each run (greedy batch_chat)", fontsize=9)
    right.legend(fontsize=7)
    settings = summary["settings"]
    fig.suptitle(f"late vs early fusion on the shapes task: batch {settings['batch']}, lr {settings['lr']:g} constant, "
                 f"visual experts {'on' if summary['visual_experts'] else 'off'}, {_minutes(summary['seconds'])}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
