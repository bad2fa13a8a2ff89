"""`navil train CONFIG.yaml`: fine-tune or pre-train a NaViL as a YAML config says (`navil_hf.training`)."""

from ..errors import EXIT_OK, UsageError
from .arguments import add_force

HELP = "train a NaViL on conversations (YAML config; transformers Trainer; packed, padding-free)"
DESCRIPTION = (
    "Fine-tune or pre-train a NaViL Hub folder on JSONL conversations (chat or LLaVA format) as the YAML config says "
    "(navil_hf.training.train documents every key). Writes OUTPUT_DIR/checkpoints (resumable) and OUTPUT_DIR/model, "
    "a Hub folder. Runs on several processes under torchrun / accelerate launch (DDP, FSDP2)."
)


def add_arguments(parser):
    parser.add_argument("config", metavar="CONFIG", help="the training config (YAML)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    add_force(parser, help="start over, deleting OUTPUT_DIR's earlier checkpoints")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set training.max_steps=10",
    )


def run(args):
    from ..training.train import load_config, train

    if args.resume and args.force:
        raise UsageError("--resume continues a run and --force starts over: pass one of them")
    result = train(load_config(args.config, args.overrides), resume=args.resume, force=args.force)
    losses = {k: v for k, v in result.metrics.items() if k.endswith("loss")}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    print(f"trained model: {result.model_dir}" + (f" ({summary})" if summary else ""))
    return EXIT_OK
