"""`navil_hf.training.precision`: bf16 only where a step is measured faster, and the reason says so."""

import time

from navil_hf.training.precision import MIN_SPEEDUP, choose_bf16


def _step(bf16_seconds, fp32_seconds):
    calls = []

    def step(bf16):
        calls.append(bf16)
        time.sleep(bf16_seconds if bf16 else fp32_seconds)

    return step, calls


def test_cpu_bf16_is_chosen_only_when_the_step_is_faster():
    fast, calls = _step(0.01, 0.04)
    choice = choose_bf16("cpu", step=fast)
    assert choice.bf16 and choice.reason.startswith("bf16: a training step") and "faster" in choice.reason
    assert calls.count(True) == calls.count(False) == 3  # one warm-up and two timed runs each
    slow, _ = _step(0.04, 0.01)  # what issue 25 measured for CPU autocast on an EPYC: bf16 13x slower
    choice = choose_bf16("cpu", step=slow)
    assert not choice.bf16 and choice.reason.startswith("float32:") and f"{MIN_SPEEDUP}x" in choice.reason
    same, _ = _step(0.02, 0.02)  # no clear gain: float32
    assert not choose_bf16("cpu", step=same).bf16


def test_other_devices_are_not_guessed():
    choice = choose_bf16("mps")
    assert not choice.bf16 and "not measured" in choice.reason
