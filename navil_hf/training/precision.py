"""bf16 mixed precision only where the machine runs it faster than float32 (`choose_bf16`; the shapes
benchmark's `--precision auto`; `navil train` takes `training.bf16` as a plain true/false).

On a GPU that supports bf16 it is the usual choice. On a CPU it depends on the chip and on torch's kernels,
not on the flags it advertises: on a 2-core AMD EPYC that lists `avx512_bf16`, a training step of the demo
model under CPU bf16 autocast ran 13x slower than in float32 (issue 25), while a bare matmul ran faster. So on
a CPU `auto` measures the step itself when given one (the model's forward and backward on a real batch), else
a linear layer and GELU at training-like sizes, under autocast and without, and picks bf16 only when it is
clearly (`MIN_SPEEDUP`) faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MIN_SPEEDUP = 1.2
_SIZES = (1024, 576, 1536)  # tokens, width, hidden: a small model's MLP


@dataclass(frozen=True)
class PrecisionChoice:
    bf16: bool
    reason: str


def _seconds(step, bf16: bool, repeats: int) -> float:
    step(bf16)  # warm-up: kernel selection, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(bf16)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _mlp_step(bf16: bool) -> None:
    import torch

    tokens, width, hidden = _SIZES
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator)
    up = torch.randn(hidden, width, generator=generator).mul_(0.02).requires_grad_()
    down = torch.randn(width, hidden, generator=generator).mul_(0.02).requires_grad_()

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, up)), down)
    y.float().square().mean().backward()


def choose_bf16(device: str | None = None, step=None, repeats: int = 2) -> PrecisionChoice:
    """Whether to train in bf16 mixed precision on `device` ("cuda", "cpu", ...; default: cuda when
    available), and why, in words. On a CPU, `step(bf16: bool)` (one training forward and backward, run
    1 + `repeats` times in each precision) is what is timed; without it, a small MLP's."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(True, f"bf16: {torch.cuda.get_device_name()} supports it")
        return PrecisionChoice(False, f"float32: {torch.cuda.get_device_name()} has no bf16")
    if device != "cpu":
        return PrecisionChoice(False, f"float32: bf16 speed on {device} is not measured here")
    what = "a training step" if step is not None else "an MLP step"
    step = step or _mlp_step
    fp32, bf16 = _seconds(step, False, repeats), _seconds(step, True, repeats)
    speedup = fp32 / bf16
    measured = f"{what} on this CPU takes {bf16 * 1e3:.0f} ms in bf16 autocast, {fp32 * 1e3:.0f} ms in float32"
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice(True, f"bf16: {measured} ({speedup:.1f}x faster)")
    return PrecisionChoice(False, f"float32: {measured} (bf16 is not {MIN_SPEEDUP}x faster here)")
