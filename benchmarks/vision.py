"""Vision encoder: time and peak memory against image size, and a check that no tensor of size
patches^2 is ever built.

Encoder: 4 layers, hidden 512, 8 heads, MLP 2048, window 8 (64-patch windows), one full-attention
layer (the last), CPU float32, sdpa (the eager backend materialises each segment's scores, a
full-image one included, so it is not the memory-linear path). One image at 512^2, 1024^2 and
2048^2 pixels (1,024 / 4,096 / 16,384 patches, one scale).

Every size runs in a fresh subprocess so sizes cannot contaminate each other: build the model and
the inputs, note `ru_maxrss`, run the forward, report `ru_maxrss` minus that baseline (peak RSS
growth of the forward), then the median time of `--repeats` further forwards. The largest size is
then run once more under a `TorchDispatchMode` that records the largest tensor any op returns.

    python benchmarks/vision.py            # 512^2, 1024^2, 2048^2
    python benchmarks/vision.py --quick    # tiny encoder at 256^2 and 1024^2, smoke test
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from _common import machine, median, print_table

PATCH = 16
ENCODER = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
    window_size=8, fullatt_block_indexes=[3],
)  # fmt: skip
LINEAR_TOLERANCE = 1.5  # growth per patch may rise by this factor from one size to the next and still count as linear


def build(quick: bool):
    from configuration_navil import NaViLVisionConfig
    from modeling_navil import NaViLVisionModel

    torch.manual_seed(0)
    config = dict(ENCODER, hidden_size=64, intermediate_size=128, num_attention_heads=4) if quick else ENCODER
    model = NaViLVisionModel(NaViLVisionConfig(**config)).eval()
    model.set_attn_implementation("sdpa")
    return model


def largest_tensor(model, pixel_values, grid) -> tuple[int, str, list[str]]:
    """(numel, op) of the largest tensor any aten op returns during one forward, and the attention ops
    and kernels that ran."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel, self.op, self.attention = 0, "", set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket.__name__)
            if "attention" in name:
                self.attention.add(name)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                    self.numel, self.op = t.numel(), name
            return out

    with torch.inference_mode(), Largest() as mode:
        model(pixel_values, grid)
    # The mode sees sdpa before it picks a kernel; the profiler names the kernel that ran.
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(pixel_values, grid)
    kernels = {
        e.key for e in prof.key_averages() if "attention" in e.key and e.key != "aten::scaled_dot_product_attention"
    }
    return mode.numel, mode.op, sorted(mode.attention | kernels)


def child(size: int, repeats: int, quick: bool, check: bool) -> dict:
    model = build(quick)
    side = size // PATCH
    pixel_values = torch.randn(side * side, 3, PATCH, PATCH)
    grid = torch.tensor([[1, side, side]])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.inference_mode():
        model(pixel_values, grid)  # the peak-memory forward, also the warm-up
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        import time

        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values, grid)
            times.append(time.perf_counter() - start)
    result = dict(size=size, patches=side * side, peak_mib=peak / 1024, seconds=median(times))
    if check:
        result["largest"], result["largest_op"], result["attention_ops"] = largest_tensor(model, pixel_values, grid)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="image sides in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny encoder, 256^2 and 1024^2, in-process (smoke test)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child, args.repeats, args.quick, args.check)))
        return True
    if args.quick:
        args.sizes, args.repeats = [256, 1024], 1  # 4,096 patches: patches^2 dwarfs every linear tensor

    results = []
    for size in args.sizes:
        check = size == max(args.sizes)
        if args.quick:  # smoke run in this process (its memory numbers are not clean)
            results.append(child(size, args.repeats, quick=True, check=check))
            continue
        command = [sys.executable, os.path.abspath(__file__), "--child", str(size), "--repeats", str(args.repeats)]
        command += ["--check"] * check + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    rows, per_patch = [], []
    for r in results:
        per_patch.append(r["peak_mib"] * 1024 / r["patches"])
        square_mib = r["patches"] ** 2 * 4 / 2**20
        rows.append([
            f"{r['size']}x{r['size']}", r["patches"], r["seconds"] * 1e3, r["seconds"] * 1e6 / r["patches"],
            r["peak_mib"], per_patch[-1], square_mib,
        ])  # fmt: skip
    checked = results[-1]
    n = checked["patches"]
    no_square = checked["largest"] < n * n
    # at most linear: the growth per patch never rises by more than the tolerance from one size to the next
    linear = all(later <= LINEAR_TOLERANCE * earlier for earlier, later in zip(per_patch, per_patch[1:]))
    print(f"machine: {machine()}")
    print(
        f"encoder: {ENCODER if not args.quick else 'tiny'}, float32, sdpa; peak = ru_maxrss growth in a fresh process"
    )
    print_table(
        "Vision encoder: time and peak memory vs patches",
        ["image", "patches", "forward ms", "us / patch", "peak RSS growth MiB", "KiB / patch",
         "one patches^2 fp32 tensor would be MiB"],
        rows,
    )  # fmt: skip
    print(
        f"\nlargest tensor in the {checked['size']}^2 forward: {checked['largest']:,} elements ({checked['largest_op']}), "
        f"patches^2 = {n * n:,} -> {'no' if no_square else 'A'} tensor of size patches^2; "
        f"attention ops: {', '.join(checked['attention_ops'])}"
    )
    growth = " / ".join(f"{p:.1f}" for p in per_patch)
    print(f"peak growth per patch (KiB): {growth} -> {'at most linear' if linear else 'NOT linear'} in patches")
    assert no_square, "a tensor of size patches^2 was built"
    return no_square and linear


if __name__ == "__main__":
    main()
