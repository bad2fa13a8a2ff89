"""One point of the late- vs early-fusion sweep: a tiny NaViL built from scratch, trained on the shapes task.

`build_config` / `build_model_folder` make a randomly initialised model of a size (`SIZES`) and a variant
(`late`: a small ViT -> merge -> connector -> LLM; `early`: the same without the ViT blocks); `run_one`
trains it with `navil train`'s own code in two stages (color questions, then all kinds) and measures it at
the `eval_steps` (held-out loss, and exact match at each stage's end: `navil_hf.tasks.heldout`), reporting
each eval point as it is measured. `benchmarks/fusion_sweep.py` is the sweep's driver and describes the
method; `navil_hf.research.fusion_runs` keeps the runs on disk, fits and plots them.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

from navil_hf.tasks.heldout import encode_records, exact_match, heldout_loss, loss_batches

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


LR_SCALINGS = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}  # lr x (LR_BASE_HIDDEN / hidden) ** power


def run_lr(size: dict, lr: float, scaling: str) -> float:
    """The learning rate of a run of `size`: `lr` at LLM width LR_BASE_HIDDEN, x sqrt(64 / hidden) (`sqrt`),
    x 64 / hidden (`linear`), or `lr` at every width (`none`)."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"unknown learning-rate scaling {scaling!r} (one of {', '.join(LR_SCALINGS)})")
    return lr * (LR_BASE_HIDDEN / size["hidden"]) ** LR_SCALINGS[scaling]


# ------------------------------------------------------------------------------------------------ models


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


# ----------------------------------------------------------------------------------------------- one run

_REPORT = None  # where a worker process sends its progress (a multiprocessing queue); None: in this process


def init_worker(report_queue, threads):
    """A worker process's initializer: its progress goes to `report_queue`, torch uses `threads` threads."""
    global _REPORT
    import torch

    _REPORT = report_queue
    torch.set_num_threads(threads)


def _report(message, sink=None):
    (sink or _REPORT.put)(message)


def run_one(spec: dict, shared: dict, sink=None) -> dict:
    """Build, train and measure one model (`spec`: name, variant, size_name, size, steps, color_steps, lr, and
    `anneal`: True for a run of a `--budgets` sweep, whose mixed stage decays its learning rate to 0 (cosine)
    and is measured at its end only (and at the switch); `shared`: the sweep's settings and folders); returns
    its results, also written to runs/NAME/result.json.
    Each eval point goes to `sink` (a callable; in a worker process, `init_worker`'s queue) as it comes."""
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
    anneal = bool(spec.get("anneal"))  # a run of a --budgets sweep: one point, at its annealed end
    points = eval_steps(steps, 1 if anneal else shared["evals"], shared["warmup"], color_steps,
                        1 if anneal else shared["color_evals"])  # fmt: skip
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
                finals[self.stage] = exact_match(model, processor, test_records, data)
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

    class Tokens(TrainerCallback):  # the stage's LLM input tokens, at its end
        tokens = 0

        def on_train_end(self, _args, state, control, **kwargs):
            self.tokens = int(state.num_input_tokens_seen)

    stages = [("color", Path(shared["color_data"]), color_steps, run_dir / "color"),
              ("mixed", data, steps - color_steps, run_dir)]  # fmt: skip
    source, trained = model_dir, None
    for stage, folder, stage_steps, out_dir in [s for s in stages if s[2] > 0]:
        config = parse_config({
            "model": str(source), "output_dir": str(out_dir), "data": {"train": str(folder / "train.jsonl")},
            "train": "full", "seed": shared["seed"],
            "training": {
                "max_steps": stage_steps, "per_device_train_batch_size": shared["batch"], "learning_rate": lr,
                "lr_scheduler_type": "cosine" if anneal and stage == "mixed" else "constant_with_warmup",
                "warmup_steps": min(shared["warmup"], stage_steps // 5),
                "weight_decay": 0.0, "logging_strategy": "no", "save_strategy": "no",
                "include_num_input_tokens_seen": True, "disable_tqdm": True,
            },
        })  # fmt: skip
        seen = Tokens()
        torch.manual_seed(shared["seed"])
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's PrinterCallback prints its metrics dict
            result = train(config, force=True, callbacks=[Measure(stage, done["steps"] + stage_steps), seen])
        done["steps"] += stage_steps
        done["tokens"] += seen.tokens
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
