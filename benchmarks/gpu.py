"""GPU rows of the speed issue (CUDA; `--quick` runs tiny sizes anywhere, CPU included, as a smoke test).

1. bf16 parity of `flash_attention_2` against `eager`, vision encoder and whole model: one random NaViL
   in bf16, the same multimodal input through both backends; max / mean |diff| of the vision features
   and of the logits. Without flash-attn, `flash_attention_2` runs torch's varlen kernel in the ViT
   and sdpa in the LLM (the script says which). For scale, the bf16 eager-vs-float32 eager gap is
   printed too.
2. Prefill throughput of a NaViL-2B-shaped random model at 8k tokens: ViT of the `navil-2b` preset
   (~0.6B: 32 layers, width 1280, windows of 8x8 patches, 4 full-attention layers) on one
   2048x2048 image (16,384 patches -> 4,096 `<IMG_CONTEXT>` tokens + 64 line breaks), InternLM2-1.8B
   shaped LLM (24 layers, hidden 2048, 16 heads / 8 KV, FFN 8192, vocab 92,544, chained visual output
   projection), text filling the prompt to 8,192 tokens; bf16, last-token logits. Model FLOPs are
   counted analytically (matmuls + attention scores, vision + connector + LLM) and divided by the
   time and by the *measured* bf16 matmul peak (median of 8192^3 matmuls) for the MFU.
3. Decode tokens/s at batch 1 and 32, 1k-token context: per-step forward with a DynamicCache cropped
   back to the context length before every step (as decode.py).

    python benchmarks/gpu.py            # all three on cuda:0
    python benchmarks/gpu.py --quick    # tiny sizes, any device (smoke test)
"""

import argparse
import sys
import time

import torch
from transformers.cache_utils import DynamicCache

import modeling_navil
from compat_navil import CACHE_KWARG
from configuration_navil import NaViLConfig

from _common import median, print_table

NAVIL_2B_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       window_size=8, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
NAVIL_2B_TEXT = dict(vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, chain_visual_output=True)  # fmt: skip
QUICK_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    window_size=8, fullatt_block_indexes=[1])  # fmt: skip
QUICK_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, chain_visual_output=True)  # fmt: skip


def build(text: dict, vision: dict, attn: str, device, dtype=torch.bfloat16, seed=0, max_positions=16384):
    torch.manual_seed(seed)
    special = list(range(text["vocab_size"] - 12, text["vocab_size"]))
    config = NaViLConfig(
        vision_config=vision, text_config=dict(text, max_position_embeddings=max_positions),
        special_token_ids=special, image_token_id=special[2], image_start_token_id=special[4],
        image_end_token_id=special[3], image_line_break_token_id=special[10], image_frame_break_token_id=special[11],
    )  # fmt: skip
    model = modeling_navil.NaViLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(attn)
    return model


def timer(device, fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()`: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return median(times)


def image_prompt(config, grid_h: int, grid_w: int, total: int, device):
    """input_ids, pixel_values, image_grid_thw: text, one single-scale image, text, `total` tokens."""
    c = config
    row = [c.image_token_id] * (grid_w // 2) + [c.image_line_break_token_id]
    image = [c.image_start_token_id] + row * (grid_h // 2) + [c.image_frame_break_token_id, c.image_end_token_id]
    if len(image) >= total:
        raise ValueError(f"a {grid_h}x{grid_w}-patch image needs {len(image)} tokens, more than {total}")
    before = (total - len(image)) // 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, c.text_config.vocab_size - 12, (total - len(image),), generator=g).tolist()
    ids = torch.tensor([text[:before] + image + text[before:]], device=device)
    pixels = torch.randn(grid_h * grid_w, 3, 16, 16, generator=g).to(device=device, dtype=torch.bfloat16)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, grid_h, grid_w]], device=device))


def parity(device, quick: bool) -> list:
    text = QUICK_TEXT if quick else dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, qk_norm=True)  # fmt: skip
    vision = QUICK_VISION if quick else dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                             num_attention_heads=4, window_size=8, fullatt_block_indexes=[3])  # fmt: skip
    model = build(text, vision, "eager", device)
    inputs = image_prompt(model.config, 32, 48, 1024 if not quick else 512, device)
    out = {}
    with torch.inference_mode():
        for attn in ("eager", "flash_attention_2"):
            model.set_attn_implementation(attn)
            features = torch.cat(
                model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            ).float()
            out[attn] = (features, model(**inputs).logits.float())
        reference = build(text, vision, "eager", device, dtype=torch.float32)
        reference_logits = reference(**dict(inputs, pixel_values=inputs["pixel_values"].float())).logits
    rows = []
    if modeling_navil.flash_attn_varlen_func is not None:
        kernel = "flash-attn"
    elif device.type == "cuda":
        kernel = "torch varlen (ViT) + sdpa (LLM)"
    else:
        kernel = "sdpa fallback off CUDA"
    for i, part in enumerate(("vision features", "logits")):
        diff = (out["flash_attention_2"][i] - out["eager"][i]).abs()
        rows.append([f"bf16 {part}: flash_attention_2 ({kernel}) vs eager",
                     f"max {diff.max().item():.3g}, mean {diff.mean().item():.3g}"])  # fmt: skip
    gap = (out["eager"][1] - reference_logits).abs()
    rows.append(
        ["for scale: bf16 eager vs float32 eager logits", f"max {gap.max().item():.3g}, mean {gap.mean().item():.3g}"]
    )
    return rows


def measured_peak_tflops(device, quick: bool) -> float:
    n = 256 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = timer(device, lambda: a @ b, repeats=3 if quick else 20, warmup=1 if quick else 5)
    return 2 * n**3 / seconds / 1e12


def vision_flops(vision: dict, patches: int) -> float:
    h, f, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    full = len(vision["fullatt_block_indexes"])
    window = vision["window_size"] ** 2
    matmul = 2 * (4 * h * h + 2 * h * f) * patches * layers + 2 * 3 * 16 * 16 * h * patches  # + patch embedding
    scores = 4 * h * patches * (window * (layers - full) + patches * full)  # QK^T and AV, non-causal
    return matmul + scores


def text_flops(text: dict, tokens: int, visual: int, connector_in: int) -> float:
    h, d, heads, kv = text["hidden_size"], text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]
    per_token = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * text["intermediate_size"]  # one expert
    chained = h * h * visual if text.get("chain_visual_output") else 0
    layer = 2 * (per_token * tokens + chained) + 2 * 2 * (tokens * tokens / 2) * heads * d  # causal
    connector = 2 * (connector_in * h + h * h) * visual
    return text["num_hidden_layers"] * layer + connector + 2 * h * text["vocab_size"]  # last-token logits


def prefill(args, device, peak: float) -> list:
    text, vision = (QUICK_TEXT, QUICK_VISION) if args.quick else (NAVIL_2B_TEXT, NAVIL_2B_VISION)
    grid = 16 if args.quick else 128
    model = build(text, vision, args.attn, device)
    inputs = image_prompt(model.config, grid, grid, args.prefill, device)
    with torch.inference_mode():
        # the lambda runs inside timer(), before `del model` below
        seconds = timer(device, lambda: model(**inputs, use_cache=False, logits_to_keep=1), 2 if args.quick else 5)  # noqa: F821
    visual = (grid // 2) ** 2
    flops = vision_flops(vision, grid * grid) + text_flops(text, args.prefill, visual, 4 * vision["hidden_size"])
    params = sum(p.numel() for p in model.parameters()) / 1e9
    vit = sum(p.numel() for p in model.model.vision_model.parameters()) / 1e9
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [[f"prefill {args.prefill} tokens ({grid}x{grid}-patch image), {params:.2f}B params (ViT {vit:.2f}B), "
             f"bf16, {args.attn}",
             f"{seconds * 1e3:.1f} ms, {args.prefill / seconds:.0f} tokens/s, {flops / seconds / 1e12:.1f} TFLOP/s, "
             f"MFU {flops / seconds / (peak * 1e12):.1%} of the measured {peak:.0f} TFLOP/s"]]  # fmt: skip


def decode(args, device) -> list:
    text, vision = (QUICK_TEXT, QUICK_VISION) if args.quick else (NAVIL_2B_TEXT, NAVIL_2B_VISION)
    model = build(text, vision, args.attn, device)
    vocab = text["vocab_size"] - 12
    rows = []
    for batch in (1, 32):
        prompt = torch.randint(0, vocab, (batch, args.context), device=device)
        step = torch.randint(0, vocab, (batch, 1), device=device)
        cache = DynamicCache(config=model.config.text_config)
        with torch.inference_mode():
            model(input_ids=prompt, **{CACHE_KWARG: cache}, use_cache=True, num_prompt_tokens=args.context)

            def one_step():
                extra = cache.get_seq_length() - args.context
                if extra:
                    cache.crop(-extra)
                model(input_ids=step, **{CACHE_KWARG: cache}, use_cache=True, num_prompt_tokens=args.context)

            seconds = timer(device, one_step, 3 if args.quick else 20, warmup=1 if args.quick else 3)
        rows.append([f"decode batch {batch}, context {args.context}, bf16, {args.attn}",
                     f"{seconds * 1e3:.2f} ms/step, {batch / seconds:.0f} tokens/s"])  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="flash_attention_2")
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on any device (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prefill, args.context = 256, 32
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device available; the GPU benchmarks were not run (--quick runs tiny sizes anywhere)")
    else:
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = measured_peak_tflops(device, args.quick)
    rows = [["bf16 matmul peak (measured)", f"{peak:.1f} TFLOP/s"]]
    rows += parity(device, args.quick) + prefill(args, device, peak) + decode(args, device)
    print(f"device: {name}, torch {torch.__version__}")
    print_table(
        "GPU" if device.type == "cuda" else "GPU script smoke run (not a GPU measurement)",
        ["measurement", "result"],
        rows,
    )
    return True


if __name__ == "__main__":
    main()
