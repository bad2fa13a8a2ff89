"""The one tiny-config factory every model test uses (STYLE.md): hidden 32-64, 2 layers, 4 heads."""

import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configuration_navil import SPECIAL_TOKENS, NaViLConfig, token_id_fields  # noqa: E402
from image_processing_navil import image_tokens  # noqa: E402
from modeling_navil import NaViLForConditionalGeneration  # noqa: E402
from navil_hf.hub import AUTO_MAP, code_files  # noqa: E402

# Token ids of the tiny vocabulary (mirrors the fixtures' tokenizer layout).
IMG_START, IMG_END, IMG_CONTEXT, LINE_BREAK, FRAME_BREAK = 5, 6, 7, 8, 9
SPECIAL_IDS = [15, 14, 7, 6, 5, 11, 10, 13, 12, 16, 8, 9]  # SPECIAL_TOKENS order
VOCAB = 128


def tiny_config(
    qk_norm=True,
    window_size=4,
    fullatt=(1,),
    norm_type="rms_norm",
    qk_normalization=False,
    special_token_table="prompt",
    vocab=None,
    template="qwen3-chat",
    **text,
):
    """The tiny NaViLConfig; keywords not named here override `text_config` entries. `vocab` (a tokenizer's
    token -> id map) gives the vocabulary size and the special and image token ids; without it, those of the
    tiny vocabulary above."""
    ids = dict(zip(SPECIAL_TOKENS, SPECIAL_IDS)) if vocab is None else vocab
    vocab_size = VOCAB if vocab is None else len(vocab)
    text_config = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512, qk_norm=qk_norm,
    )  # fmt: skip
    text_config.update(text)
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        fullatt_block_indexes=list(fullatt) if fullatt is not None else None, window_size=window_size,
        norm_type=norm_type, qk_normalization=qk_normalization,
    )  # fmt: skip
    return NaViLConfig(
        vision_config=vision_config,
        text_config=text_config,
        **token_id_fields(ids),
        template=template,
        min_dynamic_patch=4,
        max_dynamic_patch=64,
        special_token_table=special_token_table,
    )


def build_tiny(config, seed=0):
    """A randomly initialised NaViL of `config` in float32, eval mode; layer scales, norms and biases
    randomised too so no parameter is a trivial 1 or 0."""
    torch.manual_seed(seed)
    model = NaViLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1", "ls2")) or "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model


def tiny_model(seed=0, attn="eager", **config_kwargs):
    """`build_tiny` of `tiny_config(**config_kwargs)` with attention implementation `attn`."""
    model = build_tiny(tiny_config(**config_kwargs), seed)
    model.set_attn_implementation(attn)
    return model


LAYOUT_IDS = (IMG_START, IMG_CONTEXT, LINE_BREAK, FRAME_BREAK, IMG_END)  # image_processing_navil.IMAGE_LAYOUT_TOKENS


def image_ids(grids, merge=2):
    """Token ids of one image with scales `grids` (`(grid_h, grid_w)`, smallest first): `image_tokens`."""
    return image_tokens([(1, h, w) for h, w in grids], merge, tokens=LAYOUT_IDS)


def image_block(grid_h, grid_w, merge=2):
    """Token ids of one image scale (SPEC §3): rows of <IMG_CONTEXT> x w/2 then a line break."""
    return image_ids([(grid_h, grid_w)], merge)[1:-1]  # without <img> and </img>


def multimodal_inputs(grids, text_before=(20, 21, 22), text_after=(30, 31, 32, 33), seed=0):
    """input_ids, pixel_values, image_grid_thw and mm_token_type_ids for one image with `grids` scales."""
    g = torch.Generator().manual_seed(seed)
    ids = list(text_before) + image_ids(grids) + list(text_after)
    input_ids = torch.tensor([ids])
    grid = torch.tensor([[1, h, w] for h, w in grids])
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3, 16, 16, generator=g)
    mm = ((input_ids == IMG_CONTEXT) | (input_ids == IMG_START)).long()
    return dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm)


def write_hub_folder(model, out_dir):
    """save_pretrained + the seven code files (`navil_hf.hub.CODE_MODULES`) + auto_map: what a Hub folder carries
    (no tokenizer)."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(out_dir)
    for path in code_files():
        shutil.copy(path, out_dir)
    return out_dir


def full_size_original_config(llm, **llm_overrides):
    """A full-size original config: NaViL-2B-like (InternLM2-1.8B LLM) or NaViL-9B-like (Qwen3-8B LLM).
    The vision sizes are representative, not the released ones."""
    vision = dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=24, num_attention_heads=16, num_channels=3,
        patch_size=16, qkv_bias=True, qk_normalization=False, norm_type="rms_norm", layer_norm_eps=1e-6,
        hidden_act="gelu", fullatt_block_indexes=[5, 11, 17, 23], window_size=8,
    )  # fmt: skip
    if llm == "internlm2":
        text = dict(
            architectures=["InternLM2VEForCausalLM"], vocab_size=92553, hidden_size=2048, intermediate_size=8192,
            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, bias=False,
        )  # fmt: skip
    else:
        text = dict(
            architectures=["Qwen3VEForCausalLM"], vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, attention_bias=False,
        )  # fmt: skip
    text.update(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False)
    text.update(llm_overrides)
    return dict(
        model_type="navil_chat", vision_config=vision, llm_config=text, downsample_ratio=0.5,
        template="internlm2-chat" if llm == "internlm2" else "qwen3-chat",
        min_dynamic_patch=256, max_dynamic_patch=24576, scale_downsample_ratio=0.7071,
    )  # fmt: skip


# Two computations of the same float32 quantity that differ only in summation order (cache vs none,
# packed vs unpacked, batched vs single, backend vs backend) agree to a few units of the last place of the
# largest magnitude involved; how many depends on the CPU's kernels and on threading. A fixed absolute
# tolerance near 1e-5 is a few ulps at a magnitude of ~100 and flips by machine (issue 24). FP_ULPS units
# of the dtype's epsilon times the magnitude is ~10x above what any CPU gave here and still orders of
# magnitude below what a wrong computation gives (every use prints both).
FP_ULPS = 64


def fp_tolerance(expected, ulps=FP_ULPS):
    """Max-abs tolerance for `expected` recomputed in another order: `ulps` epsilons of its dtype times
    its largest magnitude (at least 1)."""
    expected = torch.as_tensor(expected)
    return ulps * torch.finfo(expected.dtype).eps * max(1.0, expected.detach().abs().max().item())


def assert_fp_close(name, actual, expected, ulps=FP_ULPS):
    """Assert max|actual - expected| <= fp_tolerance(expected, ulps); print both; return the difference."""
    diff = (actual.detach() - expected.detach()).abs().max().item()
    tol = fp_tolerance(expected, ulps)
    print(f"{name}: max {diff:.3g} (tolerance {tol:.3g})")
    assert diff <= tol, f"{name}: max-abs difference {diff:.3g} > {tol:.3g} ({ulps} eps x magnitude)"
    return diff


def relative_fp_tolerance(dtype=torch.float32, ulps=FP_ULPS):
    """The norm-relative counterpart: ||a - b|| / ||b|| of a recomputation in another order."""
    return ulps * torch.finfo(dtype).eps
