"""Configuration for NaViL (OpenGVLab, NeurIPS 2025): a native-resolution ViT, a 2x2-merge MLP
connector and a decoder-only LLM whose layers carry separate attention projections and FFN for
visual tokens ("modality experts").

Three configs, one per piece:

* `NaViLVisionConfig` -- the native-resolution ViT (16-px patches, 2D RoPE, windowed + full
  attention over packed image scales).
* `NaViLTextConfig` -- one text architecture for every LLM family we load (Qwen3 with per-head q/k
  RMSNorm, InternLM2 without, and plain Llama-style decoders): GQA, RoPE, SwiGLU, RMSNorm, plus a
  visual expert of every projection (or none: `visual_experts=False`).
* `NaViLConfig` -- the two above, the connector, the special-token ids and the image settings.
"""

from transformers import PretrainedConfig

try:  # importing it refuses a transformers older than the supported floor, with one clear line
    from .compat_navil import MIN_TRANSFORMERS
except ImportError:
    from compat_navil import MIN_TRANSFORMERS  # noqa: F401

# The 12 tokens whose *prompt* embeddings come from `special_token_embedding` (SPEC §3), in table order.
SPECIAL_TOKENS = (
    "</box>", "<box>", "<IMG_CONTEXT>", "</img>", "<img>", "</quad>",
    "<quad>", "</ref>", "<ref>", "<img_uncond>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>",
)  # fmt: skip
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_LINE_BREAK_TOKEN = "<IMG_LINE_BREAK>"
IMAGE_FRAME_BREAK_TOKEN = "<IMG_FRAME_BREAK>"
# Tokens routed to the visual experts (SPEC §3): every <IMG_CONTEXT> and every <img>.
VISUAL_EXPERT_TOKENS = (IMAGE_CONTEXT_TOKEN, IMAGE_START_TOKEN)
# Orders in which the vision encoder hands its patches to the connector (`NaViLVisionConfig.token_order`).
TOKEN_ORDERS = ("window", "raster")


def token_id_fields(token_ids) -> dict:
    """`NaViLConfig`'s token-id keywords (`special_token_ids`, `image_token_id`, `image_start_token_id`, ...)
    from a tokenizer's `{token: id}` map holding `SPECIAL_TOKENS`."""
    return dict(
        special_token_ids=[token_ids[t] for t in SPECIAL_TOKENS],
        image_token_id=token_ids[IMAGE_CONTEXT_TOKEN],
        image_start_token_id=token_ids[IMAGE_START_TOKEN],
        image_end_token_id=token_ids[IMAGE_END_TOKEN],
        image_line_break_token_id=token_ids[IMAGE_LINE_BREAK_TOKEN],
        image_frame_break_token_id=token_ids[IMAGE_FRAME_BREAK_TOKEN],
    )


def rope_parameters_from_legacy(rope_theta=None, rope_scaling=None) -> dict:
    """transformers 5's `rope_parameters` from the legacy pair the original configs (and InternLM2's)
    write: `rope_theta` and a `rope_scaling` dict naming its type as `type` or `rope_type`."""
    params = dict(rope_scaling or {})
    legacy_type = params.pop("type", None)
    rope_type = params.pop("rope_type", legacy_type) or "default"
    return {"rope_type": rope_type, "rope_theta": float(10000.0 if rope_theta is None else rope_theta), **params}


class NaViLVisionConfig(PretrainedConfig):
    r"""Native-resolution ViT.

    Args:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: encoder sizes.
        patch_size: side of a square patch in pixels (16).
        spatial_merge_size: side of the patch block merged into one LLM token (2).
        qkv_bias: bias on the fused qkv projection.
        qk_normalization: RMSNorm over the whole embed dim of q and of k (InternViT style).
        norm_type: `"rms_norm"` or `"layer_norm"` for the pre-norms.
        fullatt_block_indexes: layers attending over a whole image scale; the others attend within
            windows of `window_size x window_size` patches. `None` means every layer is full.
        window_size: window side in patches (a multiple of `spatial_merge_size`).
        rope_theta: base of the 2D rotary frequencies.
        token_order: the order of the encoder's output patches, hence of the connector's tokens. `"window"`
            (the original's, SPEC §8.1; what every converted checkpoint needs for parity): window by window,
            as the encoder layers compute them, so for a grid wider than one window the visual tokens
            do not follow the prompt's rows of `<IMG_CONTEXT>`. `"raster"` (for new models): put back
            into the order of `pixel_values` (merge blocks row by row, 2x2 patches of a block consecutive)
            after the last layer, so merged token `i` of a scale fills that scale's `i`-th `<IMG_CONTEXT>`
            slot in reading order. Absent from a config.json: `"window"` (only `"raster"` is written, so
            configs of converted checkpoints stay as they were).
    """

    model_type = "navil_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        qkv_bias=True,
        qk_normalization=False,
        norm_type="rms_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        fullatt_block_indexes=None,
        window_size=8,
        rope_theta=10000.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        token_order="window",
        **kwargs,
    ):
        if token_order not in TOKEN_ORDERS:
            raise ValueError(
                f"vision token_order must be one of {', '.join(repr(o) for o in TOKEN_ORDERS)}, got {token_order!r}"
            )
        if norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"vision norm_type must be 'rms_norm' or 'layer_norm', got {norm_type!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"vision hidden_size {hidden_size} is not divisible by {num_attention_heads} heads")
        if (hidden_size // num_attention_heads) % 4:
            raise ValueError("vision head_dim must be a multiple of 4 for the 2D rotary embedding")
        if window_size % spatial_merge_size:
            raise ValueError(f"window_size {window_size} must be a multiple of spatial_merge_size {spatial_merge_size}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.qkv_bias = qkv_bias
        self.qk_normalization = qk_normalization
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.fullatt_block_indexes = None if fullatt_block_indexes is None else list(fullatt_block_indexes)
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.token_order = token_order
        super().__init__(**kwargs)

    def to_dict(self):
        """As `PretrainedConfig.to_dict`, without `token_order` when it is the default `"window"`: config.json
        files of converted (original-order) checkpoints stay byte for byte what they were."""
        output = super().to_dict()
        if output.get("token_order") == "window":
            del output["token_order"]
        return output


class NaViLTextConfig(PretrainedConfig):
    r"""Decoder-only LLM with a visual expert of every attention projection and of the FFN.

    Covers Qwen3 (`qk_norm=True`), InternLM2 and Llama/Qwen2-style decoders (`qk_norm=False`).

    Args:
        visual_experts: every decoder layer has visual experts (`*_ve` q/k/v/o projections, q/k norms and
            FFN) that `<IMG_CONTEXT>` / `<img>` tokens are routed to (SPEC §3; NaViL, and every original
            checkpoint). False: no `*_ve` weights at all, every token (visual or text) goes through the
            text weights -- plain early fusion into the LLM, without modality experts. Absent from a
            config.json: True.
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3), one set per expert.
        attention_bias: bias on the q/k/v projections (Qwen2: True).
        attention_out_bias: bias on the output projection (Llama's `attention_bias` sets both).
        chain_visual_output: visual tokens' output projection is `o_proj_ve(o_proj(x))`, InternLM2's
            original layout (SPEC §8.2); o_proj_ve is then hidden->hidden. False: `o_proj_ve(x)` alone
            (Qwen3, or InternLM2 with the chain folded into one projection). Needs `visual_experts`.
        rope_parameters: `{"rope_type": "default", "rope_theta": ...}` or any rope type transformers
            knows (`llama3`, `yarn`, ...).
    """

    model_type = "navil_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters=None,
        qk_norm=False,
        attention_bias=False,
        attention_out_bias=False,
        chain_visual_output=False,
        visual_experts=True,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        rope_theta = kwargs.pop("rope_theta", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_parameters is None:
            rope_parameters = rope_parameters_from_legacy(rope_theta, rope_scaling)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters)
        self.qk_norm = qk_norm
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.chain_visual_output = chain_visual_output
        self.visual_experts = bool(visual_experts)
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Every layer attends over the whole sequence; the cache and mask helpers read these.
        self.layer_types = ["full_attention"] * num_hidden_layers
        self.sliding_window = None
        if chain_visual_output and not self.visual_experts:
            raise ValueError(
                "chain_visual_output=True chains the visual expert's output projection (o_proj_ve(o_proj(x))), "
                "but visual_experts=False: there is no o_proj_ve; set chain_visual_output=False"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class NaViLConfig(PretrainedConfig):
    r"""NaViL: vision encoder + connector + MoE-extended LLM.

    Args:
        vision_config, text_config: dicts or configs of the two sub-models.
        downsample_ratio: connector merge ratio (0.5 means 2x2 patches -> one token).
        special_token_ids: ids of `SPECIAL_TOKENS` in table order; their prompt embeddings come from
            `special_token_embedding`.
        image_token_id, image_start_token_id, image_end_token_id, image_line_break_token_id,
        image_frame_break_token_id: ids of `<IMG_CONTEXT>`, `<img>`, `</img>`, `<IMG_LINE_BREAK>`,
            `<IMG_FRAME_BREAK>`.
        template: chat template name of the original (`qwen3-chat`, `internlm2-chat`).
        min_dynamic_patch, max_dynamic_patch, scale_downsample_ratio: image settings (SPEC §2).
        special_token_table: where the 12 special tokens take their embedding from
            `special_token_embedding`: `"prompt"` (the original's behaviour, SPEC §8.3: prompt tokens only;
            generated ones use the plain embedding; what converted checkpoints need for parity) or
            `"everywhere"` (SPEC §10: generated tokens too, so a model trained with teacher forcing sees at
            generation what it saw in training).
        original_config_extras: keys of the original OpenGVLab config.json that this config does not
            represent (e.g. `force_image_size`, `ps_version`), kept verbatim by `navil convert` so that
            `navil to-original` writes them back; nested like the original (top-level keys,
            `vision_config`, `llm_config`). Not used by the model.
    """

    model_type = "navil"
    sub_configs = {"vision_config": NaViLVisionConfig, "text_config": NaViLTextConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        downsample_ratio=0.5,
        special_token_ids=None,
        image_token_id=None,
        image_start_token_id=None,
        image_end_token_id=None,
        image_line_break_token_id=None,
        image_frame_break_token_id=None,
        template="qwen3-chat",
        min_dynamic_patch=256,
        max_dynamic_patch=24576,
        scale_downsample_ratio=0.7071,
        original_config_extras=None,
        special_token_table="prompt",
        tie_word_embeddings=None,
        **kwargs,
    ):
        if special_token_table not in ("prompt", "everywhere"):
            raise ValueError(f"special_token_table must be 'prompt' or 'everywhere', got {special_token_table!r}")
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = NaViLVisionConfig(**(vision_config or {}))
        if isinstance(text_config, dict) or text_config is None:
            text_config = NaViLTextConfig(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        merge = round(1 / downsample_ratio)
        if merge != vision_config.spatial_merge_size:
            raise ValueError(
                f"downsample_ratio {downsample_ratio} implies a {merge}x{merge} merge but "
                f"vision_config.spatial_merge_size is {vision_config.spatial_merge_size}"
            )
        if special_token_ids is not None and len(special_token_ids) != len(SPECIAL_TOKENS):
            raise ValueError(
                f"special_token_ids must list {len(SPECIAL_TOKENS)} ids ({' '.join(SPECIAL_TOKENS)}), "
                f"got {len(special_token_ids)}"
            )
        named_ids = {
            "image_token_id": image_token_id,
            "image_start_token_id": image_start_token_id,
            "image_end_token_id": image_end_token_id,
            "image_line_break_token_id": image_line_break_token_id,
            "image_frame_break_token_id": image_frame_break_token_id,
            **{
                f"special_token_ids[{i}] ({t})": v
                for i, (t, v) in enumerate(zip(SPECIAL_TOKENS, special_token_ids or []))
            },
        }
        for name, value in named_ids.items():
            if value is not None and not 0 <= int(value) < text_config.vocab_size:
                raise ValueError(
                    f"{name} is {value}, outside the vocabulary (text_config.vocab_size {text_config.vocab_size}): "
                    "the tokenizer and the model disagree"
                )
        self.downsample_ratio = downsample_ratio
        self.special_token_ids = None if special_token_ids is None else [int(i) for i in special_token_ids]
        self.image_token_id = image_token_id
        self.image_start_token_id = image_start_token_id
        self.image_end_token_id = image_end_token_id
        self.image_line_break_token_id = image_line_break_token_id
        self.image_frame_break_token_id = image_frame_break_token_id
        self.template = template
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.scale_downsample_ratio = scale_downsample_ratio
        self.original_config_extras = original_config_extras
        self.special_token_table = special_token_table
        if tie_word_embeddings is None:
            tie_word_embeddings = text_config.tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    @property
    def vocab_size(self) -> int:
        """The language model's vocabulary (`text_config.vocab_size`), as generic code reads it."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int):
        self.text_config.vocab_size = value


__all__ = ["NaViLConfig", "NaViLTextConfig", "NaViLVisionConfig"]
