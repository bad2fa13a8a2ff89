"""Tiny converted NaViL folders for the vLLM tests (tests/serving/test_vllm.py), one per LLM family.

The config is tests/tiny.py's with the fixtures' vocabulary and head_dim 64: vLLM's CPU attention takes head
sizes 64 and 128 only (tiny.py's models have 16). The tokenizer is the fixtures' byte-level BPE one (it carries
NaViL's 12 special tokens and the ChatML tokens); the folder is written by `write_hub_folder`, as `navil
convert` writes real checkpoints.

`build_folder(family, out_dir)`: family `qwen3` (per-head q/k RMSNorm, `o_proj_ve(x)`) or `internlm2`
(no q/k norm, chained `o_proj_ve(o_proj(x))`, SPEC §8.2); `visual_experts=False` builds either without visual
experts (every token through the text weights). The `<box>` row of the LM head is raised so that
greedy decoding emits `<box>` within a few tokens of most prompts: the generated `<box>` must then take the
plain embedding (SPEC §8.3), which the tests check against the transformers model.
"""

import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from conftest import checkpoint  # noqa: E402
from tiny import tiny_config  # noqa: E402

BOX_BIAS = 2.0


def tiny_navil_config(family, vocab, special_token_table="prompt", visual_experts=True):
    """tests/tiny.py's config with the fixtures' vocabulary and a larger text model of head_dim 64."""
    qwen3 = family == "qwen3"
    return tiny_config(
        vocab=vocab, template="qwen3-chat" if qwen3 else "internlm2-chat", special_token_table=special_token_table,
        qk_norm=qwen3, hidden_size=128, intermediate_size=192, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, rope_theta=1e6 if qwen3 else 1e4, max_position_embeddings=2048,
        chain_visual_output=not qwen3 and visual_experts, rms_norm_eps=1e-6, visual_experts=visual_experts,
    )  # fmt: skip


def build_folder(family, out_dir, seed=0, special_token_table="prompt", visual_experts=True):
    """Write a converted (Hub-layout) tiny NaViL folder of `family` to `out_dir`; returns `out_dir`."""
    from transformers import AutoTokenizer

    from modeling_navil import NaViLForConditionalGeneration
    from navil_hf.hub import write_hub_folder

    tokenizer = AutoTokenizer.from_pretrained(checkpoint(family))
    vocab = tokenizer.get_vocab()
    config = tiny_navil_config(family, vocab, special_token_table, visual_experts)
    torch.manual_seed(seed)
    model = NaViLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1", "ls2")) or "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:  # larger weights than the 0.02 init: logits far apart, a robust greedy path
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        # Special-token table rows far from the plain rows, so which one a token takes shows in the output.
        model.model.special_token_embedding.weight.copy_(torch.randn(12, 128, generator=g))
        box = vocab["<box>"]
        head = model.lm_head.weight
        head.mul_(5.0)  # logits a few units apart: greedy choices are not near-ties
        head[box] = head.mean(0) + BOX_BIAS * head[box] / head[box].norm() * head.norm(dim=1).mean()
    write_hub_folder(model, config, tokenizer, out_dir)
    return out_dir


def sample_images(seed=0):
    """A few RGB images of different sizes (numpy uint8 -> PIL)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (40, 40), (96, 56), (33, 70)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


if __name__ == "__main__":
    build_folder(sys.argv[1], sys.argv[2])
