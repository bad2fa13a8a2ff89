"""GPU rows of the speed issue (needs CUDA; exits with a message otherwise).

1. bf16 `flash_attention_2` vs `eager` parity: one random-weight NaViL (small Qwen3-style LLM,
   small ViT) in bf16, the same multimodal batch through both backends; max / mean |logit diff|.
   (Without flash-attn installed, `flash_attention_2` runs torch's varlen kernel in the ViT and
   sdpa in the LLM; the script says which.)
2. Prefill MFU at 8k tokens of a NaViL-2B-shaped language model (defaults: Qwen3-1.7B dims,
   28 layers, hidden 2048, 16 heads / 8 KV, head_dim 128, FFN 6144, vocab 151936; half the
   tokens visual), bf16, `--attn` backend. FLOPs counted analytically: 2 * (matmul params touched
   per token) * L + causal attention 2 * 2 * L^2 / 2 * heads * head_dim per layer + LM head.
3. Decode tokens/s at batch 1 and 32 with a 1k-token context: per-step forward with a
   DynamicCache cropped back to the context length before every step (same as decode.py).

    python benchmarks/gpu.py                      # all three on cuda:0
    python benchmarks/gpu.py --peak-tflops 989    # peak bf16 dense TFLOP/s of the GPU for the MFU
"""

import argparse
import sys

from _common import median, print_table

import torch
from transformers.cache_utils import DynamicCache

import modeling_navil
from configuration_navil import NaViLConfig

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def navil(text: dict, vision: dict, attn: str, device, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    special = list(range(text["vocab_size"] - 12, text["vocab_size"]))
    config = NaViLConfig(
        vision_config=vision, text_config=text, special_token_ids=special, image_token_id=special[2],
        image_start_token_id=special[4], image_end_token_id=special[3],
        image_line_break_token_id=special[10], image_frame_break_token_id=special[11],
    )  # fmt: skip
    model = modeling_navil.NaViLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(attn)
    return model


def cuda_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def parity(device) -> list:
    text = dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, qk_norm=True, max_position_embeddings=4096,
    )  # fmt: skip
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  window_size=8, fullatt_block_indexes=[1])  # fmt: skip
    model = navil(text, vision, "eager", device)
    grids = [(16, 24), (24, 32)]  # two scales of one image, in patches
    ids = [100, 101, model.config.image_start_token_id]
    for h, w in grids:
        row = [model.config.image_token_id] * (w // 2) + [model.config.image_line_break_token_id]
        ids += row * (h // 2) + [model.config.image_frame_break_token_id]
    ids += [model.config.image_end_token_id, 102, 103]
    inputs = dict(
        input_ids=torch.tensor([ids], device=device),
        pixel_values=torch.randn(sum(h * w for h, w in grids), 3, 16, 16, device=device, dtype=torch.bfloat16),
        image_grid_thw=torch.tensor([[1, h, w] for h, w in grids], device=device),
    )
    logits = {}
    with torch.inference_mode():
        for attn in ("eager", "flash_attention_2"):
            model.set_attn_implementation(attn)
            logits[attn] = model(**inputs).logits.float()
    diff = (logits["flash_attention_2"] - logits["eager"]).abs()
    kernel = "flash-attn" if modeling_navil.flash_attn_varlen_func is not None else "torch varlen (ViT) + sdpa (LLM)"
    return [[f"bf16 flash_attention_2 ({kernel}) vs eager", f"max {diff.max().item():.3g}, mean {diff.mean().item():.3g}"]]


def navil_2b_text(args) -> dict:
    return dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim, qk_norm=True,
        max_position_embeddings=max(args.prefill, args.context + 8),
    )  # fmt: skip


def prefill_flops(text: dict, length: int) -> float:
    h, d, heads, kv = text["hidden_size"], text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]
    per_token_params = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * text["intermediate_size"]  # one expert
    layer = 2 * per_token_params * length + 2 * 2 * (length * length / 2) * heads * d
    return text["num_hidden_layers"] * layer + 2 * h * text["vocab_size"] * length


def prefill(args, device, peak_tflops) -> list:
    text = navil_2b_text(args)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    model = navil(text, vision, args.attn, device)
    input_ids = torch.randint(0, args.vocab - 12, (1, args.prefill), device=device)
    mm = torch.zeros_like(input_ids)
    mm[:, args.prefill // 4 : args.prefill // 4 + args.prefill // 2] = 1  # half the tokens visual, one block
    with torch.inference_mode():
        seconds = cuda_time(lambda: model(input_ids=input_ids, mm_token_type_ids=mm, use_cache=False, logits_to_keep=0), 5)
    flops = prefill_flops(text, args.prefill)
    mfu = flops / seconds / (peak_tflops * 1e12)
    del model
    torch.cuda.empty_cache()
    return [[f"prefill {args.prefill} tokens, NaViL-2B-shaped LLM, bf16, {args.attn}",
             f"{seconds * 1e3:.1f} ms, {flops / seconds / 1e12:.1f} TFLOP/s, MFU {mfu:.1%} of {peak_tflops:.0f}"]]  # fmt: skip


def decode(args, device) -> list:
    text = navil_2b_text(args)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    model = navil(text, vision, args.attn, device)
    rows = []
    for batch in (1, 32):
        prompt = torch.randint(0, args.vocab - 12, (batch, args.context), device=device)
        step = torch.randint(0, args.vocab - 12, (batch, 1), device=device)
        cache = DynamicCache(config=model.config.text_config)
        with torch.inference_mode():
            model(input_ids=prompt, past_key_values=cache, use_cache=True, num_prompt_tokens=args.context)

            def one_step():
                extra = cache.get_seq_length() - args.context
                if extra:
                    cache.crop(-extra)
                model(input_ids=step, past_key_values=cache, use_cache=True, num_prompt_tokens=args.context)

            seconds = cuda_time(one_step, 20, warmup=3)
        rows.append([f"decode batch {batch}, context {args.context}, bf16, {args.attn}",
                     f"{seconds * 1e3:.2f} ms/step, {batch / seconds:.0f} tokens/s"])  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="flash_attention_2")
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak bf16 dense TFLOP/s (MFU)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device available; the GPU benchmarks were not run")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        sys.exit(f"gpu.py: unknown peak TFLOP/s for {name!r}; pass --peak-tflops")
    rows = parity(device) + prefill(args, device, peak) + decode(args, device)
    print(f"device: {name}, torch {torch.__version__}")
    print_table("GPU", ["measurement", "result"], rows)
    return True


if __name__ == "__main__":
    main()
