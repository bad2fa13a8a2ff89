"""Decode step: NaViL's text model vs transformers' `Qwen3ForCausalLM` of the same dims, batch 1.

Both prefill the same `--context` tokens into a `DynamicCache` once; every timed call is one
forward `model(input_ids=<1 token>, past_key_values=cache, use_cache=True)` (per-step forward time,
not `generate`), and the cache is cropped back to `--context` (untimed) before the next call, so
every timed step sees the same context length. Ours is called as `generate` calls it
(`num_prompt_tokens` = prompt length), so the step takes the text-only dense path.

    python benchmarks/decode.py           # 4 layers, vocab 32000, 1024-token context
    python benchmarks/decode.py --quick   # tiny smoke run
"""

import argparse

import torch
from transformers.cache_utils import DynamicCache

from compat_navil import CACHE_KWARG

from _common import interleaved, machine, median, print_table, text_dims, text_model_pair, verdict

TARGET = 1.05


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny dims, 32-token context, one thread (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.layers, args.vocab, args.repeats, args.warmup = 32, 2, 512, 3, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, dense = text_model_pair(text_dims(args.quick), args.layers, args.vocab, args.context + 8)

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab - 12, (1, args.context), generator=generator)
    step = torch.randint(0, args.vocab - 12, (1, 1), generator=generator)
    caches = {}
    with torch.inference_mode():
        caches["dense"] = DynamicCache(config=dense.config)
        dense(input_ids=prompt, **{CACHE_KWARG: caches["dense"]}, use_cache=True)
        caches["ours"] = DynamicCache(config=ours.config.text_config)
        ours(input_ids=prompt, **{CACHE_KWARG: caches["ours"]}, use_cache=True, num_prompt_tokens=args.context)

        def run_dense():
            return dense(input_ids=step, **{CACHE_KWARG: caches["dense"]}, use_cache=True).logits

        def run_ours():
            return ours(
                input_ids=step, **{CACHE_KWARG: caches["ours"]}, use_cache=True, num_prompt_tokens=args.context
            ).logits

        def reset(name):
            extra = caches[name].get_seq_length() - args.context
            if extra:
                caches[name].crop(-extra)  # transformers 5 crops by a negative count of tokens to drop

        diff = (run_ours() - run_dense()).abs().max().item()
        assert diff < 1e-3, f"step logits differ by {diff}"
        for name in caches:
            reset(name)
        times = interleaved({"dense": run_dense, "ours": run_ours}, args.repeats, args.warmup, setup=reset)
        assert all(cache.get_seq_length() == args.context + 1 for cache in caches.values())
    t = {name: median(v) for name, v in times.items()}
    ratio = t["ours"] / t["dense"]
    print(f"machine: {machine()}")
    print(
        f"{args.layers} layers, vocab {args.vocab}, context {args.context}, float32, batch 1, sdpa, DynamicCache; "
        f"per-step forward, medians of {args.repeats} interleaved steps"
    )
    print_table(
        f"Decode step vs Qwen3ForCausalLM (target: ours/dense <= {TARGET})",
        ["Qwen3ForCausalLM ms/step", "NaViL ms/step", "ratio", "max |logit diff|", "target"],
        [[t["dense"] * 1e3, t["ours"] * 1e3, f"{ratio:.3f}", f"{diff:.1e}", verdict(ratio, TARGET)]],
    )
    return ratio <= TARGET


if __name__ == "__main__":
    main()
