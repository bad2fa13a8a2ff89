"""NaViL on vLLM's layers (vLLM 0.32): the model, its multimodal processor and its weight loader.

What runs where:

* **Vision encoder + connector**: ours (`NaViLVisionModel`, `NaViLConnector` from modeling_navil), unsharded,
  in `embed_multimodal`: one packed forward over every scale of every image of the step, exactly the
  transformers code path (`vision_config.token_order` included), so image features are bit-identical to the
  transformers model's.
* **Language model**: vLLM layers. Per decoder layer one paged `Attention` (text and visual tokens share the
  sequence and the KV cache), and two sets of `QKVParallelLinear` / `RowParallelLinear` / SwiGLU
  `MergedColumnParallelLinear` + `RowParallelLinear` (text, and the `_ve` visual experts), tensor-parallel
  sharded like vLLM's Qwen3 / InternLM2; Qwen3-like checkpoints add per-head q/k `RMSNorm` (one pair per
  expert); InternLM2-like ones (`chain_visual_output`) give visual tokens `o_proj_ve(o_proj(x))`
  (SPEC §8.2; `o_proj_ve` is then a hidden -> hidden `RowParallelLinear` on the all-reduced output).
  A config without visual experts (`text_config.visual_experts=False`) builds the text set only, and every
  token takes it (no routing at all).

Routing and the special-token table (SPEC §3, §8.3, §10), decided per token inside `forward` from the token
ids (`requires_raw_input_tokens`: vLLM passes `input_ids` along with the merged `inputs_embeds`) and whether
the token is a *prompt* token:

* visual expert: `<IMG_CONTEXT>` or `<img>`, and a prompt token (a generated token is text, as in the
  transformers model's `generate`);
* special-token table: one of the 12 `special_token_ids`, no image feature in its slot, and a prompt token
  (`special_token_table: "prompt"`, the original's rule) or any token (`"everywhere"`).

"Prompt token" is `position < num_prompt_tokens` of the token's request. vLLM's model interface does not
carry prompt lengths, so `install_prompt_length_hook` wraps `GPUModelRunner._init_model_kwargs` (the CPU
runner inherits it) to pass one more forward kwarg, `navil_prompt_lengths` (per scheduled token, its
request's prompt length, from `input_batch.num_prompt_tokens` and `req_indices`). Positions are the true
sequence positions under chunked prefill, prefix caching (cached tokens are not scheduled; the first
scheduled token has position = cached length) and preemption (a recomputed request re-feeds its generated
tokens at positions >= its prompt length), so the rule holds in all three. Without the kwarg (the engine's
dummy/profile runs, or a vLLM whose runner changed: `install_prompt_length_hook` then warns) every token counts
as prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from image_processing_navil import NaViLImageProcessor, image_tokens
from modeling_navil import NaViLConnector, NaViLVisionModel, tokens_per_image
from processing_navil import IMAGE_PLACEHOLDER

from . import register_transformers_classes

logger = init_logger(__name__)

PROMPT_LENGTHS_KWARG = "navil_prompt_lengths"


# --------------------------------------------------------------------------------------------------
# Prompt lengths: the one vLLM internal the prompt-only rule relies on
# --------------------------------------------------------------------------------------------------


def install_prompt_length_hook() -> bool:
    """Make vLLM's model runner pass `navil_prompt_lengths` (per scheduled token, the prompt length of its
    request) to NaViL's `forward`. Idempotent; False (and a warning) when the runner lacks what it needs."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as error:  # noqa: BLE001
        logger.warning("NaViL: no GPUModelRunner (%s); generated special tokens count as prompt tokens", error)
        return False
    original = GPUModelRunner._init_model_kwargs
    if getattr(original, "_navil_hook", False):
        return True

    @functools.wraps(original)
    def _init_model_kwargs(self, num_reqs=None):
        kwargs = original(self, num_reqs)
        if num_reqs is not None:  # dummy / profile runs: no requests
            return kwargs
        try:
            model = self.get_model()
        except Exception:  # noqa: BLE001 -- not loaded yet
            return kwargs
        if not getattr(model, "navil_wants_prompt_lengths", False):
            return kwargs
        batch = self.input_batch
        count = batch.num_reqs
        total = int(self.query_start_loc.np[count])
        requests = self.req_indices.np[:total]
        lengths = np.asarray(batch.num_prompt_tokens[:count], dtype=np.int64)[requests]
        kwargs[PROMPT_LENGTHS_KWARG] = torch.from_numpy(lengths).to(self.device, non_blocking=True)
        return kwargs

    _init_model_kwargs._navil_hook = True
    GPUModelRunner._init_model_kwargs = _init_model_kwargs
    return True


# --------------------------------------------------------------------------------------------------
# Multimodal processing: the same pyramid and prompt as NaViLProcessor
# --------------------------------------------------------------------------------------------------


def image_expansion_ids(grids, ids: Mapping[str, int], merge: int) -> list[int]:
    """Token ids one `<image>` becomes: `image_tokens` (SPEC §3) with the config's ids."""
    return image_tokens(grids, merge, tokens=(ids["start"], ids["context"], ids["line"], ids["frame"], ids["end"]))


class NaViLProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self):
        return self.ctx.get_hf_config()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @functools.cached_property
    def image_processor(self) -> NaViLImageProcessor:
        """The folder's image processor settings (`processor_config.json`), else the config's."""
        config = self.get_hf_config()
        try:
            return NaViLImageProcessor.from_pretrained(self.ctx.model_config.model)
        except Exception:  # noqa: BLE001 -- a folder without processor files
            return NaViLImageProcessor(
                patch_size=config.vision_config.patch_size,
                merge_size=config.vision_config.spatial_merge_size,
                min_dynamic_patch=config.min_dynamic_patch,
                max_dynamic_patch=config.max_dynamic_patch,
                scale_downsample_ratio=config.scale_downsample_ratio,
            )

    def get_image_processor(self, **kwargs) -> NaViLImageProcessor:
        return self.image_processor

    def get_hf_processor(self, **kwargs):
        from processing_navil import NaViLProcessor

        return NaViLProcessor(image_processor=self.image_processor, tokenizer=self.get_tokenizer())

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"images_kwargs": set(NaViLImageProcessor.valid_kwargs.__annotations__)}

    @functools.cached_property
    def token_ids(self) -> dict[str, int]:
        config = self.get_hf_config()
        return {
            "start": config.image_start_token_id,
            "end": config.image_end_token_id,
            "context": config.image_token_id,
            "line": config.image_line_break_token_id,
            "frame": config.image_frame_break_token_id,
        }

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.image_processor.num_image_tokens(image_height, image_width)

    def get_image_size_with_most_features(self) -> ImageSize:
        side = int(self.image_processor.max_pixels**0.5)
        return ImageSize(width=side, height=side)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()
        return {"image": self.get_num_image_tokens(image_width=size.width, image_height=size.height)}


class NaViLDummyInputsBuilder(BaseDummyInputsBuilder[NaViLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        return {
            "image": self._get_dummy_images(
                width=size.width, height=size.height, num_images=mm_counts.get("image", 0), overrides=overrides
            )
        }


def _image_fields(hf_inputs: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
    """One image item = its scales: `pixel_values` rows of all its scales, `image_grid_thw` one row per
    scale, `num_scales` one number."""
    num_scales = hf_inputs.get("num_scales", torch.empty(0, dtype=torch.long))
    grid = hf_inputs.get("image_grid_thw", torch.empty((0, 3), dtype=torch.long))
    rows = torch.cumsum(torch.as_tensor(num_scales), 0)
    patches = torch.as_tensor(grid).prod(-1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), rows[:-1]])
    per_image = torch.stack([patches[s:e].sum() for s, e in zip(starts.tolist(), rows.tolist())]) if len(rows) else rows
    return dict(
        pixel_values=MultiModalFieldConfig.flat_from_sizes("image", per_image),
        image_grid_thw=MultiModalFieldConfig.flat_from_sizes("image", torch.as_tensor(num_scales), keep_on_cpu=True),
        num_scales=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    )


class NaViLMultiModalProcessor(BaseMultiModalProcessor[NaViLProcessingInfo]):
    """`<image>` in the prompt -> the image's whole token block; its `<IMG_CONTEXT>` slots take the features."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images")
        kwargs = {k: v for k, v in hf_kwargs.items() if k in NaViLImageProcessor.valid_kwargs.__annotations__}
        return self.info.get_image_processor()(images, return_tensors="pt", **kwargs)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return _image_fields(hf_inputs)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        tokenizer = self.info.get_tokenizer()
        ids = self.info.token_ids
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def replacement(item_idx: int):
            grids = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return PromptUpdateDetails.select_token_id(image_expansion_ids(grids, ids, merge), ids["context"])

        return [
            PromptReplacement(
                modality="image",
                target=tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False),
                replacement=replacement,
            )
        ]


# --------------------------------------------------------------------------------------------------
# Language model with visual experts
# --------------------------------------------------------------------------------------------------


class Routing:
    """Which rows of a step's tokens go to the visual experts (computed once per forward)."""

    def __init__(self, visual: torch.Tensor | None):
        if visual is None or not bool(visual.any()):
            self.text = self.visual = None
            self.all_visual = False
        elif bool(visual.all()):
            self.text = self.visual = None
            self.all_visual = True
        else:
            self.visual = visual.nonzero().squeeze(-1)
            self.text = (~visual).nonzero().squeeze(-1)
            self.all_visual = False

    @property
    def mixed(self) -> bool:
        return self.visual is not None

    def apply(self, x: torch.Tensor, text_fn, visual_fn) -> torch.Tensor:
        if not self.mixed:
            return visual_fn(x) if self.all_visual else text_fn(x)
        text_out = text_fn(x.index_select(0, self.text))
        visual_out = visual_fn(x.index_select(0, self.visual))
        out = text_out.new_empty((x.shape[0], *text_out.shape[1:]))
        out.index_copy_(0, self.text, text_out)
        out.index_copy_(0, self.visual, visual_out)
        return out


class NaViLMLP(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, prefix=f"{prefix}.down_proj"
        )
        if config.hidden_act != "silu":
            raise ValueError(f"NaViL on vLLM supports the silu FFN only, got {config.hidden_act!r}")
        self.act_fn = SiluAndMul()

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class NaViLAttention(nn.Module):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        if self.total_num_heads % tp:
            raise ValueError(f"{self.total_num_heads} attention heads do not split over tensor parallel size {tp}")
        if (self.total_num_kv_heads % tp) if self.total_num_kv_heads >= tp else (tp % self.total_num_kv_heads):
            raise ValueError(f"{self.total_num_kv_heads} KV heads do not split over tensor parallel size {tp}")
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qk_norm = config.qk_norm
        self.chain = config.chain_visual_output
        self.experts = getattr(config, "visual_experts", True)
        h, q_dim = config.hidden_size, self.total_num_heads * self.head_dim
        for suffix in ("", "_ve") if self.experts else ("",):
            qkv = QKVParallelLinear(
                h,
                self.head_dim,
                self.total_num_heads,
                self.total_num_kv_heads,
                bias=config.attention_bias,
                quant_config=quant_config,
                prefix=f"{prefix}.qkv_proj{suffix}",
            )
            setattr(self, f"qkv_proj{suffix}", qkv)
            if config.qk_norm:
                setattr(self, f"q_norm{suffix}", RMSNorm(self.head_dim, eps=config.rms_norm_eps))
                setattr(self, f"k_norm{suffix}", RMSNorm(self.head_dim, eps=config.rms_norm_eps))
        self.o_proj = RowParallelLinear(
            q_dim, h, bias=config.attention_out_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        if self.experts:
            # chained (InternLM2): hidden -> hidden on o_proj's all-reduced output, split again over the ranks
            self.o_proj_ve = RowParallelLinear(
                h if self.chain else q_dim,
                h,
                bias=config.attention_out_bias,
                input_is_parallel=not self.chain,
                quant_config=quant_config,
                prefix=f"{prefix}.o_proj_ve",
            )
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def _qkv(self, x, suffix: str):
        qkv, _ = getattr(self, f"qkv_proj{suffix}")(x)
        if not self.qk_norm:
            return qkv
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = getattr(self, f"q_norm{suffix}")(q.reshape(-1, self.num_heads, self.head_dim)).reshape(q.shape)
        k = getattr(self, f"k_norm{suffix}")(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(k.shape)
        return torch.cat([q, k, v], dim=-1)

    def _text_out(self, x):
        return self.o_proj(x)[0]

    def _visual_out(self, x):
        if self.chain:
            return self.o_proj_ve(self.o_proj(x)[0])[0]
        return self.o_proj_ve(x)[0]

    def forward(self, positions, hidden_states, routing: Routing):
        qkv = routing.apply(hidden_states, lambda x: self._qkv(x, ""), lambda x: self._qkv(x, "_ve"))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        return routing.apply(out, self._text_out, self._visual_out)


class NaViLDecoderLayer(nn.Module):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        self.self_attn = NaViLAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = NaViLMLP(config, prefix=f"{prefix}.mlp")
        self.experts = getattr(config, "visual_experts", True)
        if self.experts:
            self.mlp_ve = NaViLMLP(config, prefix=f"{prefix}.mlp_ve")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, routing: Routing):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, routing)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return routing.apply(hidden_states, self.mlp, self.mlp_ve if self.experts else self.mlp), residual


class NaViLLanguageModel(nn.Module):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            NaViLDecoderLayer(config, cache_config, quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids):
        return self.embed_tokens(input_ids)

    def forward(self, positions, inputs_embeds, routing: Routing):
        hidden, residual = inputs_embeds, None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, routing)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


# Our safetensors names -> this module's, for the stacked (fused) parameters: (ours, fused, shard id).
_STACKED = [
    (f".{proj}{suffix}.", f".qkv_proj{suffix}.", shard)
    for suffix in ("_ve", "")
    for proj, shard in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"))
] + [
    (f".{mlp}.{proj}.", f".{mlp}.gate_up_proj.", shard)
    for mlp in ("mlp_ve", "mlp")
    for proj, shard in (("gate_proj", 0), ("up_proj", 1))
]


@MULTIMODAL_REGISTRY.register_processor(
    NaViLMultiModalProcessor, info=NaViLProcessingInfo, dummy_inputs=NaViLDummyInputsBuilder
)
class NaViLForConditionalGeneration(nn.Module, SupportsMultiModal):
    requires_raw_input_tokens = True  # routing and the special-token table read the token ids
    navil_wants_prompt_lengths = True  # install_prompt_length_hook passes navil_prompt_lengths

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "qkv_proj_ve": ["q_proj_ve", "k_proj_ve", "v_proj_ve"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError("NaViL takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        register_transformers_classes()
        install_prompt_length_hook()
        config = vllm_config.model_config.hf_config
        text_config = config.text_config
        self.config = config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        if config.special_token_ids is None:
            raise ValueError("config.special_token_ids is missing: convert the checkpoint with `navil convert`")
        with self._mark_tower_model(vllm_config, "image"):
            config.vision_config._attn_implementation = "sdpa"
            self.vision_model = NaViLVisionModel(config.vision_config)
            self.connector = NaViLConnector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = NaViLLanguageModel(text_config, cache_config, quant_config, prefix="language_model")
        self.special_token_embedding = nn.Embedding(12, text_config.hidden_size)
        self.lm_head = ParallelLMHead(text_config.vocab_size, text_config.hidden_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text_config.vocab_size)
        self.register_buffer("special_ids", torch.tensor(config.special_token_ids, dtype=torch.long), persistent=False)
        visual = [config.image_token_id, config.image_start_token_id]
        self.register_buffer("visual_ids", torch.tensor(visual, dtype=torch.long), persistent=False)
        self.everywhere = config.special_token_table == "everywhere"
        self.experts = getattr(text_config, "visual_experts", True)
        self._mm_mask: torch.Tensor | None = None

    def get_language_model(self) -> nn.Module:
        return self.language_model

    # ------------------------------------------------------------------ images

    def embed_multimodal(self, **kwargs) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        grid, num_scales = kwargs["image_grid_thw"], kwargs["num_scales"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        if isinstance(grid, (list, tuple)):
            grid = torch.cat([torch.as_tensor(g).reshape(-1, 3) for g in grid])
        num_scales = torch.as_tensor(
            [int(n) for n in (num_scales.tolist() if torch.is_tensor(num_scales) else num_scales)]
        ).reshape(-1)
        grid = grid.reshape(-1, 3).cpu()
        dtype = next(self.vision_model.parameters()).dtype
        vision = self.vision_model(pixel_values.to(dtype), grid, return_dict=True)
        features = self.connector(vision.last_hidden_state)
        merge = self.config.vision_config.spatial_merge_size
        return tuple(features.split(tokens_per_image(grid, num_scales, merge)))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plain token embeddings with the image features in their `<IMG_CONTEXT>` slots. The special-token
        table is applied in `forward`, which knows which tokens are prompt tokens; `is_multimodal` is kept
        for it (the runner calls this right before `forward`, on the same scheduled tokens)."""
        embeds = self.language_model.embed_input_ids(input_ids)
        self._mm_mask = None
        if multimodal_embeddings is not None and is_multimodal is not None and len(multimodal_embeddings) > 0:
            mask = is_multimodal.to(embeds.device)
            features = torch.cat(list(multimodal_embeddings)).to(embeds.dtype)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(mask.sum())} image slots but {features.shape[0]} image features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features)
            self._mm_mask = mask
        return embeds

    # ------------------------------------------------------------------ forward

    def _prompt_mask(self, positions, num_tokens, kwargs) -> torch.Tensor:
        lengths = kwargs.get(PROMPT_LENGTHS_KWARG)
        prompt = torch.ones(num_tokens, dtype=torch.bool, device=positions.device)
        if lengths is None:
            return prompt
        n = min(lengths.shape[0], num_tokens)
        prompt[:n] = positions[:n] < lengths[:n].to(positions.device)
        return prompt

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("NaViL needs the token ids (requires_raw_input_tokens)")
        mm_mask, self._mm_mask = self._mm_mask, None
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_input_ids(input_ids)
        num_tokens = inputs_embeds.shape[0]
        input_ids = input_ids[:num_tokens]
        prompt = self._prompt_mask(positions, num_tokens, kwargs)
        # The special-token table: prompt tokens (or all), never a slot that holds an image feature.
        match = input_ids.unsqueeze(-1) == self.special_ids
        table = match.any(-1) if self.everywhere else match.any(-1) & prompt
        if mm_mask is not None:  # over the scheduled tokens; padding rows (if any) come after them
            n = min(mm_mask.shape[0], num_tokens)
            table[:n] &= ~mm_mask[:n].to(table.device)
        if bool(table.any()):
            rows = self.special_token_embedding(match.to(torch.int64).argmax(-1)).to(inputs_embeds.dtype)
            inputs_embeds = torch.where(table.unsqueeze(-1), rows, inputs_embeds)
        visual = torch.isin(input_ids, self.visual_ids) & prompt if self.experts else None  # None: all text
        return self.language_model(positions[:num_tokens], inputs_embeds, Routing(visual))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our safetensors names (`model.language_model.layers.N.self_attn.q_proj(_ve).weight`,
        `model.vision_model.*`, `model.connector.*`, `model.special_token_embedding.weight`, `lm_head.weight`)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model."):
                name = name[len("model.") :]
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for ours, fused, shard in _STACKED:
                if ours in name and name.startswith("language_model."):
                    target = name.replace(ours, fused)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r} in the checkpoint")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


__all__ = [
    "NaViLForConditionalGeneration",
    "NaViLMultiModalProcessor",
    "NaViLProcessingInfo",
    "image_expansion_ids",
    "install_prompt_length_hook",
]
