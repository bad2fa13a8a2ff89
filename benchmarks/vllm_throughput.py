"""Generation throughput: vLLM (navil_hf/vllm) vs our transformers `model.batch_chat`, on CPU.

    python benchmarks/vllm_throughput.py [--model FOLDER] [--prompts 32] [--max-tokens 32] [--quick]

32 chat prompts, each with one image (4 different sizes, multi-scale), greedy, a fixed number of new tokens
per prompt (no early stop on either side). vLLM runs in a subprocess (tests/vllm_worker.py: the engine
needs `if __name__ == "__main__"`); its time is `LLM.generate` for the whole batch, the second of two
passes (the first warms up; prefix caching is off so the second pass recomputes everything), engine
start-up excluded. transformers: one `batch_chat` call over the same 32 questions (left-padded batch),
after a warm-up call on 2 of them. Without `--model`, the tiny qwen3 folder of tests/vllm_tiny.py is built
(a tiny model: the numbers measure per-token overheads more than matmul speed).
Needs the vLLM venv (see .ci/run). `--quick`: 4 prompts, 8 tokens.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

QUESTIONS = ["Describe the image.", "What is in the picture?", "Which colour dominates?", "Count the objects."]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a converted NaViL folder (default: build the tiny qwen3 one)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="4 prompts, 8 new tokens")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens = 4, 8

    import torch
    from PIL import Image
    from transformers import AutoProcessor
    from vllm_tiny import build_folder, sample_images

    from modeling_navil import NaViLForConditionalGeneration

    work = tempfile.mkdtemp(prefix="navil_vllm_bench_")
    folder = args.model or build_folder("qwen3", os.path.join(work, "qwen3"))
    image_paths = []
    for i, image in enumerate(sample_images()):
        path = os.path.join(work, f"image{i}.png")
        image.save(path)
        image_paths.append(path)

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = NaViLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    paths = [image_paths[i % len(image_paths)] for i in range(args.prompts)]
    prompts = []
    for question in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    # vLLM
    spec = {
        "model": folder,
        "requests": [{"prompt": p, "images": [path]} for p, path in zip(prompts, paths)],
        "max_tokens": args.max_tokens,
        "logprobs": False,
        "repeat": 2,
        "engine": {"enable_prefix_caching": False, "max_num_seqs": max(args.prompts, 1)},
    }
    spec_path, out_path = os.path.join(work, "spec.json"), os.path.join(work, "out.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "vllm_worker.py"), spec_path, out_path], env=env, check=True
    )
    vllm_total = time.perf_counter() - start
    with open(out_path, encoding="utf-8") as f:
        out = json.load(f)
    vllm_tokens = sum(len(r["token_ids"]) for r in out["results"][-1])
    vllm_seconds = out["seconds"][-1]

    # transformers batch_chat
    images = [[Image.open(path).convert("RGB")] for path in paths]
    config = {"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens, "do_sample": False}
    with torch.no_grad():
        model.batch_chat(processor, questions[:2], images[:2], generation_config=config)
        start = time.perf_counter()
        model.batch_chat(processor, questions, images, generation_config=config)
        hf_seconds = time.perf_counter() - start
    hf_tokens = args.prompts * args.max_tokens

    result = {
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "vllm_tokens_per_s": vllm_tokens / vllm_seconds,
        "transformers_tokens_per_s": hf_tokens / hf_seconds,
        "vllm_seconds": vllm_seconds,
        "transformers_seconds": hf_seconds,
        "vllm_process_seconds": vllm_total,
    }
    result["ratio"] = result["vllm_tokens_per_s"] / result["transformers_tokens_per_s"]
    print(f"{'':14}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'vLLM':14}{vllm_seconds:10.2f}{result['vllm_tokens_per_s']:12.1f}")
    print(f"{'transformers':14}{hf_seconds:10.2f}{result['transformers_tokens_per_s']:12.1f}")
    print(f"vLLM / transformers: {result['ratio']:.2f}x  (vLLM process incl. start-up: {vllm_total:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
