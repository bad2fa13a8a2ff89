"""`navil init-from-llm LLM_DIR_OR_GGUF OUT_DIR`: start a NaViL from a pretrained text LLM
(`navil_hf.conversion.init_llm`)."""

import argparse

from ..errors import EXIT_OK, UsageError
from .arguments import (
    add_dtype,
    add_force,
    add_max_shard_size,
    add_quiet,
    add_verify,
    positive_int,
    writing_options,
)

HELP = "start a NaViL checkpoint from a pretrained text LLM (Llama, Qwen2, Qwen3, InternLM2 or GGUF)"
DESCRIPTION = (
    "Build a Hub-ready NaViL folder from a pretrained LLM: text weights copied, every visual expert a copy of its "
    "text twin, NaViL's special tokens added, a fresh vision encoder and connector sized by --vision-preset, the "
    "LLM's chat template extended for images. Before writing, NaViL's logits on text-only prompts are checked "
    "against the LLM's (transformers, float32, max-abs <= 1e-4). --no-visual-experts builds no visual experts "
    "(every token through the text weights; with --vision-preset none: early fusion without experts)."
)
OUTPUT = "out_dir"  # the folder it creates (a failed verification's report says nothing was written there)


def add_arguments(parser):
    parser.add_argument("llm", metavar="LLM_DIR_OR_GGUF", nargs="?", help="a Hugging Face LLM folder or a .gguf file")
    parser.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="the folder to create")
    parser.add_argument("--vision-preset", default=None, help="vision encoder size (see --list-presets; default base)")
    parser.add_argument("--list-presets", action="store_true", help="print the vision presets and exit")
    parser.add_argument(
        "--visual-experts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give every decoder layer visual experts, copies of the text weights (default); "
        "--no-visual-experts: none, every token goes through the text weights",
    )
    add_dtype(parser, help="dtype of the written weights (auto: the LLM's; float32 for GGUF)")
    parser.add_argument(
        "--chat-template",
        metavar="FILE_OR_NAME",
        default=None,
        help="a Jinja file or qwen3-chat/internlm2-chat, for LLMs without a chat template (default: the LLM's)",
    )
    parser.add_argument(
        "--vision-layer-scale",
        type=float,
        default=None,
        metavar="X",
        help="starting LayerScale of the fresh encoder's blocks, in (0, 1] (default 0.1: blocks start close "
        "to the identity, which a fresh encoder learns from faster than 1.0)",
    )
    parser.add_argument(
        "--token-order",
        choices=("window", "raster"),
        default="window",
        help="order of the visual tokens the LLM receives: window (the original's, default) or raster (the "
        "prompt's rows: for new models; not convertible to the original layout)",
    )
    parser.add_argument("--min-dynamic-patch", type=positive_int, default=256, help="fewest patches per image")
    parser.add_argument("--max-dynamic-patch", type=positive_int, default=24576, help="most patches per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh vision encoder and connector")
    add_force(parser)
    add_verify(parser, help="check text parity with the LLM and the reloaded folder before writing (default)")
    add_max_shard_size(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the LLM folder's own code (InternLM2)")
    add_quiet(parser)


def run(args):
    from ..conversion.convert import print_checks
    from ..conversion.init_llm import DEFAULT_PRESET, describe_presets, init_from_llm

    if args.list_presets:
        print(describe_presets())
        return EXIT_OK
    if not args.llm or not args.out_dir:
        raise UsageError("LLM_DIR_OR_GGUF and OUT_DIR are required")
    result = init_from_llm(
        args.llm,
        args.out_dir,
        vision_preset=args.vision_preset or DEFAULT_PRESET,
        dtype=args.dtype,
        seed=args.seed,
        chat_template=args.chat_template,
        min_dynamic_patch=args.min_dynamic_patch,
        max_dynamic_patch=args.max_dynamic_patch,
        trust_remote_code=args.trust_remote_code,
        visual_experts=args.visual_experts,
        **({} if args.vision_layer_scale is None else {"vision_layer_scale": args.vision_layer_scale}),
        token_order=args.token_order,
        **writing_options(args),
    )
    counts = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in result.parameters.items())
    dtype = str(result.dtype).replace("torch.", "")
    experts = "" if result.visual_experts else "; no visual experts"
    print(
        f"wrote {result.out_dir} (vision preset {result.vision_preset}{experts}; {counts}; {dtype}) "
        f"in {result.seconds:.1f} s"
    )
    print(f"  added tokens: {' '.join(result.added_tokens) or 'none (the tokenizer had them)'}")
    print_checks(result)
    return EXIT_OK
