"""Runs NaViL through vLLM's offline `LLM` and prints the results as JSON (for tests/serving/test_vllm.py and
benchmarks/vllm_throughput.py, which run it in a subprocess: vLLM spawns processes, so the engine lives under
`if __name__ == "__main__":`).

    python tests/vllm_worker.py SPEC.json OUT.json

SPEC: {"model": folder, "requests": [{"prompt": str, "images": [path, ...]}, ...], "max_tokens": int,
"logprobs": bool, "engine": {extra `LLM(...)` kwargs, e.g. "enable_prefix_caching", "max_num_batched_tokens"},
"repeat": int (generate the same batch that many times, e.g. to hit the prefix cache)}.
OUT: {"results": [[{"prompt_token_ids", "token_ids", "logprobs"}, ...] per repeat], "seconds": [...]}.

The NaViL plugin is registered at import (also in vLLM's spawned processes, which import this module as
`__mp_main__`), so this works without the `vllm.general_plugins` entry point installed.
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import navil_hf.vllm  # noqa: E402

navil_hf.vllm.register()


def run(spec):
    from PIL import Image
    from vllm import LLM, SamplingParams

    engine = dict(dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
    engine.update(spec.get("engine", {}))
    llm = LLM(model=spec["model"], **engine)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec.get("max_tokens", 16),
        ignore_eos=spec.get("ignore_eos", True),
        logprobs=0 if spec.get("logprobs", True) else None,
    )
    inputs = []
    for request in spec["requests"]:
        item = {"prompt": request["prompt"]}
        if request.get("images"):
            item["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in request["images"]]}
        inputs.append(item)
    results, seconds = [], []
    for _ in range(spec.get("repeat", 1)):
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        batch = []
        for out in outputs:
            completion = out.outputs[0]
            logprobs = None
            if completion.logprobs is not None:
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
            batch.append(
                {
                    "prompt_token_ids": list(out.prompt_token_ids),
                    "token_ids": list(completion.token_ids),
                    "logprobs": logprobs,
                    "text": completion.text,
                }
            )
        results.append(batch)
    return {"results": results, "seconds": seconds}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    out = run(spec)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f)
