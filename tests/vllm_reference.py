"""What our transformers model computes for the vLLM tests' requests: greedy token ids and their logprobs.

`reference(folder, requests, max_tokens)`: each request `{"prompt": str, "images": [path, ...]}` through
`NaViLProcessor` and `NaViLForConditionalGeneration.generate` (float32, greedy, no stop token), one at a
time. Returns `[{"prompt_token_ids", "token_ids", "logprobs"}, ...]`.
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load(folder, special_token_table=None):
    from transformers import AutoProcessor

    from modeling_navil import NaViLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    kwargs = {} if special_token_table is None else {"special_token_table": special_token_table}
    model = NaViLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    model.generation_config.eos_token_id = None
    return processor, model


def reference(folder, requests, max_tokens, special_token_table=None, loaded=None):
    from PIL import Image

    processor, model = loaded or load(folder, special_token_table)
    results = []
    for request in requests:
        images = [Image.open(path).convert("RGB") for path in request.get("images") or []]
        inputs = processor(text=request["prompt"], images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        prompt_length = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, prompt_length:].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        results.append({"prompt_token_ids": inputs["input_ids"][0].tolist(), "token_ids": tokens, "logprobs": logprobs})
    return results
