"""Helpers shared by the benchmark scripts: repo-root import path, interleaved timing, tables.

The machine these run on is usually shared, so every comparison interleaves its candidates
(A, B, A, B, ...) after warm-up and reports medians and the ratio of medians from that one run.
"""

import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def interleaved(candidates: dict, repeats: int, warmup: int = 1, setup=None) -> dict:
    """Times every callable of `candidates` in turns (A, B, A, B, ...) after `warmup` untimed turns.

    `setup(name)` (optional, untimed) runs before each call, e.g. to reset a KV cache.
    Returns {name: [seconds, ...]}.
    """
    times = {name: [] for name in candidates}
    for turn in range(warmup + repeats):
        for name, fn in candidates.items():
            if setup is not None:
                setup(name)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if turn >= warmup:
                times[name].append(elapsed)
    return times


def median(values) -> float:
    return statistics.median(values)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A small GitHub-markdown table (paste-able into RESULTS.md)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(cell) for cell in row) + " |")


def _fmt(cell) -> str:
    if isinstance(cell, float):
        return f"{cell:.3g}" if abs(cell) < 100 else f"{cell:.0f}"
    return str(cell)


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}"
    )


def verdict(ratio: float, target: float, higher_is_better: bool = False) -> str:
    met = ratio >= target if higher_is_better else ratio <= target
    return "met" if met else "NOT met"


# ----------------------------------------------------------------------------------------------
# Same-dims pairs: our routed text stack and transformers' dense Qwen3
# ----------------------------------------------------------------------------------------------


def text_dims(quick: bool) -> dict:
    """Decoder dims of the issue's comparison (Qwen3-style, qk norm); tiny ones for --quick."""
    if quick:
        return dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=8, num_key_value_heads=4, head_dim=128)


def qwen3_config(dims: dict, num_layers: int, vocab_size: int, max_positions: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        **dims, num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="sdpa",
        tie_word_embeddings=False,
    )  # fmt: skip


def navil_text_config(dims: dict, num_layers: int, vocab_size: int, max_positions: int):
    from configuration_navil import NaViLTextConfig

    config = NaViLTextConfig(
        **dims, num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=max_positions,
        rope_theta=1e6, qk_norm=True,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def expert_state_dict(dense_state: dict, prefix_map: tuple[str, str] = ("", "")) -> dict:
    """A dense Qwen3 state dict as ours, the visual experts getting the same weights as the text
    ones: the routed model must then compute exactly the dense function, whatever the routing."""
    src, dst = prefix_map
    state = {}
    for key, value in dense_state.items():
        key = dst + key[len(src) :] if key.startswith(src) else key
        state[key] = value
        parts = key.split(".")
        if "mlp" in parts:
            parts[parts.index("mlp")] = "mlp_ve"
        elif "self_attn" in parts:
            parts[-2] += "_ve"
        else:
            continue
        state[".".join(parts)] = value
    return state


def visual_mask(length: int, share: float, images: int) -> "torch.Tensor":  # noqa: F821 -- torch imported below
    """[1, L] bool: `share` of the tokens visual, in `images` equal blocks with text around them."""
    import torch

    mask = torch.zeros(1, length, dtype=torch.bool)
    n_visual = round(share * length)
    if n_visual == 0:
        return mask
    per_image = n_visual // images
    gap = (length - per_image * images) // (images + 1)
    start = gap
    for i in range(images):
        size = per_image if i < images - 1 else n_visual - per_image * (images - 1)
        mask[0, start : start + size] = True
        start += size + gap
    assert int(mask.sum()) == n_visual
    return mask


def text_model_pair(dims: dict, num_layers: int, vocab_size: int, max_positions: int, seed: int = 0):
    """(ours, dense): a text-only `NaViLForConditionalGeneration` (tiny unused vision encoder) and
    transformers' `Qwen3ForCausalLM` with the same dims and weights (visual experts = text ones,
    special-token table = the matching embedding rows), so their logits must agree."""
    import torch
    from transformers import Qwen3ForCausalLM

    from configuration_navil import NaViLConfig
    from modeling_navil import NaViLForConditionalGeneration

    torch.manual_seed(seed)
    dense = Qwen3ForCausalLM(qwen3_config(dims, num_layers, vocab_size, max_positions)).eval()
    special_ids = list(range(vocab_size - 12, vocab_size))
    text = navil_text_config(dims, num_layers, vocab_size, max_positions).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = NaViLConfig(
        vision_config=vision, text_config=text, special_token_ids=special_ids, image_token_id=special_ids[2],
        image_start_token_id=special_ids[4], image_end_token_id=special_ids[3],
        image_line_break_token_id=special_ids[10], image_frame_break_token_id=special_ids[11],
    )  # fmt: skip
    ours = NaViLForConditionalGeneration(config).eval()
    ours.set_attn_implementation("sdpa")
    dense_state = dense.state_dict()
    state = expert_state_dict(dense_state, ("model.", "model.language_model."))
    state["model.special_token_embedding.weight"] = dense_state["model.embed_tokens.weight"][special_ids]
    missing, unexpected = ours.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("model.vision_model.", "model.connector."))]
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return ours, dense
