"""Whole text model: NaViL's routed LLM (`NaViLForConditionalGeneration`, no images) vs
transformers' dense `Qwen3ForCausalLM` of the same dims, logits-producing forward.

Both: CPU float32, batch 1, sdpa, `torch.inference_mode()`, `use_cache=False`, full logits
`[1, L, vocab]`. Ours gets `input_ids` plus `mm_token_type_ids` (one contiguous visual block, as an
image's `<IMG_CONTEXT>` run), so the time includes the special-token embedding lookup and the
once-per-forward modality routing. The visual experts carry the dense weights, so logits must agree.

    python benchmarks/text_model.py           # 4 layers, vocab 32000, L=2048, half the tokens visual
    python benchmarks/text_model.py --quick   # tiny smoke run
"""

import argparse

import torch

from _common import interleaved, machine, median, print_table, text_dims, text_model_pair, verdict, visual_mask

TARGET = 1.05


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--share", type=float, default=0.5, help="visual share (one contiguous block)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny dims, L=64, one repeat, one thread (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.layers, args.vocab, args.repeats, args.warmup = 64, 2, 512, 1, 0
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, dense = text_model_pair(text_dims(args.quick), args.layers, args.vocab, args.length)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab - 12, (1, args.length), generator=generator)
    mm_token_type_ids = visual_mask(args.length, args.share, 1).long()
    with torch.inference_mode():

        def run_dense():
            return dense(input_ids=input_ids, use_cache=False).logits

        def run_ours():
            return ours(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, use_cache=False).logits

        diff = (run_ours() - run_dense()).abs().max().item()
        assert diff < 1e-3, f"logits differ by {diff}"
        times = interleaved({"dense": run_dense, "ours": run_ours}, repeats=args.repeats, warmup=args.warmup)
    t = {name: median(v) for name, v in times.items()}
    ratio = t["ours"] / t["dense"]
    print(f"machine: {machine()}")
    print(
        f"{args.layers} layers, vocab {args.vocab}, L={args.length}, visual share {args.share} (one block), "
        f"float32, batch 1, sdpa, medians of {args.repeats} interleaved runs"
    )
    print_table(
        f"Text model forward (logits) vs Qwen3ForCausalLM (target: ours/dense <= {TARGET})",
        ["Qwen3ForCausalLM ms", "NaViL ms", "ratio", "max |logit diff|", "target"],
        [[t["dense"] * 1e3, t["ours"] * 1e3, f"{ratio:.3f}", f"{diff:.1e}", verdict(ratio, TARGET)]],
    )
    return ratio <= TARGET


if __name__ == "__main__":
    main()
