"""Multi-scale preprocessing: `NaViLImageProcessor` vs a straightforward per-scale numpy pipeline.

Settings of NaViL-2B (the processor's defaults, from the checkpoint's `min_dynamic_patch=256`,
`max_dynamic_patch=24576`, `scale_downsample_ratio=0.7071`): every scale of the pyramid.

The baseline is the original's approach written plainly: for each scale, PIL bicubic resize from
the original image, convert to float32 numpy, rescale and normalise, pad bottom/right with the
normalised value of a zero pixel, cut into 16x16 patches in 2x2-merge-block order; concatenate.
Both return a torch tensor; `torch.equal` on the two `pixel_values` is asserted for every image.
"PIL resizes alone" times just the bicubic resizes both pipelines must do, one after the other (PIL's
fixed-point bicubic is what makes the pixels identical): naive / serial resizes is the ceiling of any
single-threaded speed-up. Ours runs the scales on `--processor-threads` threads (default: every CPU).

    python benchmarks/preprocess.py           # 1920x1080 (target), 448x448, 4000x3000, 200x2000
    python benchmarks/preprocess.py --processor-threads 1   # ours on one thread
    python benchmarks/preprocess.py --quick   # smoke test
"""

import argparse

import numpy as np
import torch
from PIL import Image

from image_processing_navil import NaViLImageProcessor, scale_pyramid

from _common import interleaved, machine, median, print_table, verdict

TARGET = 3.0  # naive / ours at 1920x1080, at least
TARGET_SIZE = (1920, 1080)


def naive_pixel_values(image: Image.Image, processor: NaViLImageProcessor) -> torch.Tensor:
    p, m = processor.patch_size, processor.merge_size
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    plan = scale_pyramid(
        image.height, image.width, processor.min_pixels, processor.max_pixels, processor.scale_downsample_ratio, p, m
    )
    scales = []
    for resized_h, resized_w, grid_h, grid_w in plan:
        resized = image.resize((resized_w, resized_h), resample=Image.BICUBIC)
        x = np.asarray(resized).astype(np.float32) / 255.0
        x = (x - mean) / std
        padded = np.empty((grid_h * p, grid_w * p, 3), dtype=np.float32)
        padded[...] = (np.float32(0) / 255.0 - mean) / std
        padded[:resized_h, :resized_w] = x
        # (H, W, C) -> (block row, block col, row in block, col in block, C, py, px)
        patches = padded.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        scales.append(patches.reshape(-1, 3, p, p))
    return torch.from_numpy(np.concatenate(scales))


def test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise, RGB uint8 (resize cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1920x1080", "448x448", "4000x3000", "200x2000"], help="WxH")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--processor-threads", type=int, default=None, help="ours: num_threads (default: all CPUs)")
    parser.add_argument("--quick", action="store_true", help="small images, one repeat (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup = ["320x180", "64x640"], 1, 0
    processor = NaViLImageProcessor(num_threads=args.processor_threads)  # NaViL-2B settings

    rows, ok = [], True
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        image = test_image(width, height)

        def run_naive():
            return naive_pixel_values(image, processor)

        def run_ours():
            return processor(image, return_tensors="pt")["pixel_values"]

        def run_resizes_only():  # the PIL resizes both pipelines must do: a floor for any bit-identical pipeline
            for resized_h, resized_w, _, _ in processor.pyramid(height, width):
                if (resized_w, resized_h) != image.size:
                    image.resize((resized_w, resized_h), resample=Image.BICUBIC)

        ours_pv = run_ours()
        assert torch.equal(ours_pv, run_naive()), f"pixel_values differ at {size}"
        candidates = {"naive": run_naive, "ours": run_ours, "resizes": run_resizes_only}
        times = interleaved(candidates, repeats=args.repeats, warmup=args.warmup)
        t = {name: median(v) for name, v in times.items()}
        speedup = t["naive"] / t["ours"]
        is_target = (width, height) == TARGET_SIZE
        met = verdict(speedup, TARGET, higher_is_better=True) if is_target else "(info)"
        ok &= met != "NOT met"
        scales = len(processor.pyramid(height, width))
        rows.append([
            size, scales, ours_pv.shape[0], t["naive"] * 1e3, t["ours"] * 1e3, f"{speedup:.2f}x", t["resizes"] * 1e3,
            f"{t['naive'] / t['resizes']:.2f}x", "yes", met,
        ])  # fmt: skip

    print(f"machine: {machine()}")
    print(
        f"processor: min_pixels {processor.min_pixels}, max_pixels {processor.max_pixels}, ratio "
        f"{processor.scale_downsample_ratio}, all scales, ours with num_threads={args.processor_threads or 'all CPUs'}; "
        f"medians of {args.repeats} interleaved runs"
    )
    print_table(
        f"Multi-scale preprocessing (target: naive/ours >= {TARGET} at 1920x1080)",
        [
            "image WxH",
            "scales",
            "patches",
            "naive ms",
            "ours ms",
            "speed-up",
            "serial PIL resizes alone ms",
            "naive / serial resizes (1-thread ceiling)",
            "pixel_values equal",
            "target",
        ],
        rows,
    )
    return ok


if __name__ == "__main__":
    main()
