"""Proof that `navil train` teaches a NaViL to see: the synthetic shapes task on 2 CPUs.

The demo model (SmolLM2-135M-Instruct + a fresh, untrained 12-layer 384-wide vision encoder, built by
`navil init-from-llm`; `navil chat` without --model uses it) cannot see at first. This script generates
the shapes task (`navil_hf.training.shapes`: colored circles, squares and triangles on varied
backgrounds; questions about color, shape, count and position; a held-out test split), trains the model
with `navil train`'s own code (packed batches, Trainer), and measures exact-match accuracy of greedy
`model.batch_chat` answers on the held-out split before, during and after training, against the
majority-answer baseline (`chance`) and the best answer-from-the-question-alone baseline (`blind`).

    python benchmarks/learn_shapes.py                       # the recipe: ~25 min on 2 CPU cores
    python benchmarks/learn_shapes.py --steps 400 --parts full
    python benchmarks/learn_shapes.py --quick --model HUB   # a few steps (CI), any NaViL Hub folder

Writes `WORKDIR/run/model` (the trained Hub folder: `navil chat --model WORKDIR/run/model --image
IMG "What color is the circle?"`), `WORKDIR/results.json`, and the learning curve `--plot` (PNG).
"""

import argparse
import json
import time
from pathlib import Path

import _common

RECIPE = dict(train=3000, test=200, steps=100, batch=16, lr=5e-4, parts="stage1", eval_every=50, warmup=10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a NaViL Hub folder (default: the demo model, built once)")
    parser.add_argument("--workdir", default=None, help="default: learn-shapes/ beside the repo")
    parser.add_argument("--train", type=int, default=RECIPE["train"], help="training records")
    parser.add_argument("--test", type=int, default=RECIPE["test"], help="held-out records")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"], help="optimizer steps")
    parser.add_argument("--batch", type=int, default=RECIPE["batch"], help="samples per packed row")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--parts", default=RECIPE["parts"], help="parts or preset that train (stage1: the vision side)")
    parser.add_argument("--eval-every", type=int, default=RECIPE["eval_every"], help="held-out accuracy every N steps")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--plot", default=None, help="learning-curve PNG (default: WORKDIR/learning_curve.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps on a small split (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.test, args.steps, args.batch, args.eval_every, args.eval_batch = 16, 8, 3, 4, 3, 8
    return args


def evaluate(model, processor, records, base_dir, batch):
    """Greedy `batch_chat` answers on `records`, scored by exact match (`shapes.score`)."""
    import torch
    from PIL import Image

    from navil_hf.training.shapes import score

    was_training = model.training
    model.eval()
    answers = []
    with torch.no_grad():
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            questions = [r["messages"][0]["content"][1]["text"] for r in chunk]
            images = [[Image.open(base_dir / r["messages"][0]["content"][0]["path"])] for r in chunk]
            answers += model.batch_chat(
                processor, questions, images=images, generation_config=dict(max_new_tokens=4, do_sample=False)
            )
    model.train(was_training)
    return score(answers, records), answers


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import TrainerCallback

    from navil_hf.training.shapes import blind_accuracy, chance_accuracy, make_shapes_dataset, read_jsonl
    from navil_hf.training.train import load_model, load_processor, parse_config, train

    workdir = Path(args.workdir or Path(_common.ROOT).parent / "learn-shapes")
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "shapes"
    make_shapes_dataset(data, train=args.train, test=args.test, seed=args.seed, force=True)
    train_records, test_records = list(read_jsonl(data / "train.jsonl")), list(read_jsonl(data / "test.jsonl"))
    baselines = {"chance": chance_accuracy(test_records), "blind": blind_accuracy(test_records, train_records)}
    if args.model is None:
        from navil_hf.demo import ensure_demo_model

        args.model = str(ensure_demo_model(progress=True))
    processor = load_processor(args.model)
    curve, accuracy = [], []
    start = time.perf_counter()

    class Monitor(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                curve.append(
                    {"step": state.global_step, "loss": float(logs["loss"]), "seconds": time.perf_counter() - start}
                )

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                result, _ = evaluate(model, processor, test_records, data, args.eval_batch)
                accuracy.append({"step": state.global_step, **_flat(result)})
                print(f"step {state.global_step}: held-out accuracy {result['accuracy']:.3f}", flush=True)

    config = parse_config({
        "model": args.model,
        "output_dir": str(workdir / "run"),
        "data": {"train": str(data / "train.jsonl")},
        "train": args.parts,
        "seed": args.seed,
        "training": {
            "max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
            "lr_scheduler_type": "cosine", "warmup_steps": min(RECIPE["warmup"], args.steps // 5), "weight_decay": 0.0,
            "logging_steps": 1, "save_steps": max(args.steps, 1), "save_total_limit": 1, "disable_tqdm": args.quick,
        },
    })  # fmt: skip
    before, _ = evaluate(load_model(args.model), processor, test_records, data, args.eval_batch)
    accuracy.append({"step": 0, **_flat(before)})
    print(f"step 0: held-out accuracy {before['accuracy']:.3f}", flush=True)
    torch.manual_seed(args.seed)
    result = train(config, force=True, callbacks=[Monitor()])
    elapsed = time.perf_counter() - start
    final = accuracy[-1]
    summary = {
        "model": args.model, "steps": args.steps, "batch": args.batch, "lr": args.lr, "parts": args.parts,
        "train_records": args.train, "test_records": args.test, "train_seconds": round(elapsed, 1),
        "threads": torch.get_num_threads(), "baselines": baselines, "accuracy": accuracy, "curve": curve,
        "trained_model": str(result.model_dir),
    }  # fmt: skip
    (workdir / "results.json").write_text(json.dumps(summary, indent=1))
    plot = Path(args.plot) if args.plot else workdir / "learning_curve.png"
    _plot(summary, plot)
    print(f"held-out accuracy {before['accuracy']:.3f} -> {final['accuracy']:.3f} (chance {baselines['chance']:.3f}, "
          f"blind {baselines['blind']:.3f}) after {args.steps} steps in {elapsed / 60:.1f} min; per kind: "
          + ", ".join(f"{k[4:]} {v:.2f}" for k, v in final.items() if k.startswith("acc_")))  # fmt: skip
    print(f"trained model: {result.model_dir}; curve: {plot}; results: {workdir / 'results.json'}")
    return summary


def _flat(result):
    return {"accuracy": result["accuracy"], **{f"acc_{k}": v["accuracy"] for k, v in result["per_kind"].items()}}


def _plot(summary, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [p["step"] for p in summary["curve"]]
    left.plot(steps, [p["loss"] for p in summary["curve"]], lw=1)
    left.set(xlabel="step", ylabel="training loss (answer tokens)", title="Training loss", yscale="log")
    acc = summary["accuracy"]
    right.plot([a["step"] for a in acc], [a["accuracy"] for a in acc], "o-", label="held-out accuracy")
    for kind in sorted(k for k in acc[-1] if k.startswith("acc_")):
        right.plot([a["step"] for a in acc], [a[kind] for a in acc], ".--", lw=0.8, label=kind[4:])
    for name, value in summary["baselines"].items():
        right.axhline(value, color="gray", ls=":" if name == "chance" else "-.", lw=1, label=f"{name} {value:.2f}")
    right.set(xlabel="step", ylabel="exact match", ylim=(0, 1.02), title="Held-out shapes questions")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"demo NaViL (SmolLM2-135M + fresh ViT), {summary['parts']}, batch {summary['batch']}, "
                 f"{summary['train_seconds'] / 60:.0f} min on {summary['threads']} CPU threads", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
