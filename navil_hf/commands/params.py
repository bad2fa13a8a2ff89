"""`navil params FOLDER_OR_CONFIG_JSON`: parameters and FLOPs of a NaViL config, per component and token type
(`navil_hf.research.accounting`; the conventions: docs/research/accounting.md)."""

import argparse
import json

from ..errors import EXIT_OK, UsageError
from ..research.accounting import (
    CAUSAL_CONVENTIONS,
    LM_HEAD_POSITIONS,
    count_flops,
    count_parameters,
    format_flops,
    format_parameters,
    load_config,
    parse_image_size,
)
from .arguments import non_negative_int

HELP = "parameters and FLOPs of a NaViL config, per component and token type"
DESCRIPTION = (
    "Count parameters (total, trainable, active per text / visual token) and, given images or text, the FLOPs of "
    "a forward or training step. Reads config.json only (no weights, no code)."
)


def _image(text):
    try:
        return parse_image_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lm_head(text):
    if text in LM_HEAD_POSITIONS:
        return text
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(LM_HEAD_POSITIONS)} or a number of labelled positions, got {text!r}"
        ) from None


def add_arguments(parser):
    parser.add_argument(
        "model", metavar="FOLDER_OR_CONFIG_JSON", help="a model folder (its config.json only is read) or a config.json"
    )
    parser.add_argument(
        "--image",
        dest="images",
        action="append",
        type=_image,
        metavar="WxH",
        help="an image of WIDTHxHEIGHT pixels (repeatable): count the FLOPs of its scale pyramid",
    )
    parser.add_argument(
        "--text-tokens", type=non_negative_int, metavar="N", help="text tokens besides the images' own (FLOPs)"
    )
    parser.add_argument("--training", action="store_true", help="FLOPs of a training step (3x the forward)")
    parser.add_argument(
        "--causal",
        choices=CAUSAL_CONVENTIONS,
        default="exact",
        help="keys per query of the causal attention: exact (i+1), half (L/2) or full (L, dense kernels); "
        "default exact",
    )
    parser.add_argument(
        "--lm-head",
        type=_lm_head,
        default="all",
        metavar="POSITIONS",
        help="positions the LM head runs on: all (default), text, last, none, or a number of labelled positions",
    )
    parser.add_argument(
        "--trainable",
        metavar="PARTS",
        help="comma-separated parts or presets (e.g. stage1) to count as trainable (default: everything)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args) -> int:
    """Print the parameter table and, given images or text tokens, the FLOP table (or one JSON object). A bad
    config or option raises `UsageError`."""
    try:
        config = load_config(args.model)
        trainable = [p.strip() for p in args.trainable.split(",") if p.strip()] if args.trainable else None
        params = count_parameters(config, trainable=trainable)
        flops = None
        if args.images or args.text_tokens is not None:
            flops = count_flops(
                config, args.images, args.text_tokens, training=args.training, causal=args.causal, lm_head=args.lm_head
            )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        out = {"parameters": params.to_dict()}
        if flops is not None:
            out["flops"] = flops.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(format_parameters(params))
        if flops is not None:
            print()
            print(format_flops(flops))
    return EXIT_OK
