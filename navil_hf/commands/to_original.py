"""`navil to-original HF_DIR ORIGINAL_OUT`: a converted NaViL folder back into the original OpenGVLab
layout (`navil_hf.conversion.back`)."""

from ..errors import EXIT_OK
from .arguments import add_force, add_max_shard_size, add_quiet, add_verify, writing_options

HELP = "convert a converted NaViL folder back into the original OpenGVLab layout"
DESCRIPTION = (
    "Convert a folder written by `navil convert` (or `navil init-from-llm`) back into the original OpenGVLab "
    "layout: config.json, safetensors with the original tensor names, the tokenizer. The folder is built and "
    "verified beside the target (original tensors bit for bit, forward again, config, tokenizer) and moved into "
    "place only if every check passes."
)
OUTPUT = "original_out"  # the folder it creates (a failed verification's report says nothing was written there)


def add_arguments(parser):
    parser.add_argument("hf_dir", metavar="HF_DIR", help="a converted NaViL folder")
    parser.add_argument("original_out", metavar="ORIGINAL_OUT", help="the original-layout folder to create")
    add_force(parser, help="replace ORIGINAL_OUT if it exists")
    add_verify(parser)
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="accept a --fold-visual-output folder and recover wo_ve by least squares (reports the error)",
    )
    add_max_shard_size(parser)
    add_quiet(parser)


def run(args):
    from ..conversion.back import convert_to_original
    from ..conversion.convert import print_checks

    result = convert_to_original(
        args.hf_dir,
        args.original_out,
        approximate=args.approximate,
        **writing_options(args),
    )
    dtype = str(result.dtype).replace("torch.", "")
    print(
        f"wrote {result.original_dir} in the original layout ({result.num_written_tensors} tensors from "
        f"{result.num_tensors}, {dtype}) in {result.seconds:.1f} s"
    )
    print_checks(result)
    if result.approximate:
        print(
            f"  approximate: wo_ve recovered by least squares from the folded o_proj_ve; max-abs error of the "
            f"refolded product {result.approximation_error:.3g}"
        )
    return EXIT_OK
