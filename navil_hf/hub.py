"""Writing a Hub-ready NaViL folder (API.md "Loading"): config with `auto_map`, safetensors weights,
generation config, tokenizer + processor with `auto_map` and chat template, the code files and a
model card. Shared by `navil convert` and, later, `navil init-from-llm` / `navil push`."""

import json
import shutil
from pathlib import Path

import torch

from .folders import CONFIG_FILE, ShardWriter, progress_bar

CODE_MODULES = (
    "configuration_navil",
    "modeling_navil",
    "image_processing_navil",
    "processing_navil",
    "compat_navil",
    "chat_navil",
    "tokenization_navil",
)
MODEL_CLASS = "modeling_navil.NaViLForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_navil.NaViLConfig",
    "AutoModel": MODEL_CLASS,
    "AutoModelForCausalLM": MODEL_CLASS,
    "AutoModelForImageTextToText": MODEL_CLASS,
}
ARCHITECTURES = ["NaViLForConditionalGeneration"]
DEFAULT_MAX_NEW_TOKENS = 1024


def code_files():
    """Paths of the Hub code files (`CODE_MODULES`: the four of API.md, `compat_navil.py`, `chat_navil.py`
    and `tokenization_navil.py`), located through the imported modules."""
    import importlib

    return [Path(importlib.import_module(name).__file__) for name in CODE_MODULES]


def model_from_state_dict(state_dict, config):
    """Our model holding exactly these tensors (no copy, no random init): built on the meta device and
    filled with `load_state_dict(assign=True, strict=True)`, which lists missing/unexpected keys."""
    from modeling_navil import NaViLForConditionalGeneration

    with torch.device("meta"):
        model = NaViLForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def meta_model(config, dtype):
    """Our model for `config` with no memory behind its weights (the meta device), in `dtype`."""
    from modeling_navil import NaViLForConditionalGeneration

    with torch.device("meta"):
        model = NaViLForConditionalGeneration(config)
    return model.to(dtype).eval()


def tied_weight_keys(model):
    """Names of the weights `model` declares tied to another one (transformers' `all_tied_weights_keys`,
    filled at `post_init` and empty unless the config ties them, e.g. `lm_head.weight` with
    `tie_word_embeddings`): a saved folder leaves them out and loading ties them again."""
    return set(model.all_tied_weights_keys)


def write_weights(folder, weights, config, dtype, max_shard_size="5GB", verify=True, progress=False):
    """Write `weights` (our key layout, already in `dtype`; a lazy mapping is read one tensor at a time)
    as the model's safetensors shards in `folder`. The shard being filled is flushed before a tensor that
    would overflow it is read (sizes from the meta model), so one shard and one tensor are held; with
    `verify` each shard is read back bit for bit. A tied LM head is left out. Returns the tensor count."""
    model = meta_model(config, dtype)
    state, tied = model.state_dict(), tied_weight_keys(model)
    keys = [k for k in weights.keys() if k not in tied]
    writer = ShardWriter(folder, max_shard_size, verify=verify)
    with progress_bar(progress, total=len(keys), desc="writing weights", unit="tensor") as bar:
        for key in keys:
            writer.make_room(state[key].numel() * state[key].element_size())
            writer.add(key, weights[key])
            bar.update()
    return writer.close()


def build_processor(tokenizer, config):
    """`NaViLProcessor` for a config: image settings from the config, the original chat template by name."""
    from processing_navil import NaViLProcessor

    return NaViLProcessor.for_config(config, tokenizer)


def build_generation_config(tokenizer, eos_token_id=None, pad_token_id=None, bos_token_id=None):
    """Greedy chat defaults: stop at `eos_token_id` (default `<|im_end|>`, the original templates' end of
    turn; an id or a list), pad with `pad_token_id`, else the tokenizer's pad token, else the (first)
    stop token; `bos_token_id` defaults to the tokenizer's."""
    from transformers import GenerationConfig

    end = tokenizer.get_vocab()["<|im_end|>"] if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = end[0] if isinstance(end, list) else end
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if bos_token_id is None else bos_token_id,
        eos_token_id=end,
        pad_token_id=pad,
        do_sample=False,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    )


def write_hub_folder(
    model_or_state_dict,
    config,
    tokenizer,
    out_dir,
    *,
    processor=None,
    generation_config=None,
    model_card=None,
    extra_files=(),
    max_shard_size="5GB",
    progress=None,
    notices=None,
):
    """Write a folder that `AutoModel/AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)` load.

    Args:
        model_or_state_dict: a `NaViLForConditionalGeneration`, a state dict in our key layout, or `None`
            when the caller has written the weights into `out_dir` itself (streaming conversions).
        config: the `NaViLConfig` (gets `auto_map` and `architectures`).
        tokenizer: the tokenizer (saved through the processor).
        out_dir: target folder (created; existing files are overwritten -- callers write into a fresh
            temporary folder and move it into place).
        processor: defaults to `build_processor(tokenizer, config)`.
        generation_config: defaults to `build_generation_config(tokenizer)`.
        model_card: README.md text; none written when `None`.
        extra_files: paths copied into the folder first (e.g. the original tokenizer files); files the
            processor writes afterwards take precedence.
        max_shard_size: shard size of the safetensors weights.
        progress: optional callable `(description)` called after each step.
        notices: a list that gets one line per foreign code reference dropped (`only_our_code`).

    Returns the model that was saved. The folder carries only our code: whatever `auto_map` the source
    tokenizer had that points elsewhere is dropped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda description: None)

    for path in extra_files:
        shutil.copyfile(path, out_dir / Path(path).name)
        step(Path(path).name)

    config.auto_map = dict(AUTO_MAP)
    config.architectures = list(ARCHITECTURES)
    model = model_or_state_dict
    generation_config = generation_config or build_generation_config(tokenizer)
    if model is None:  # the weights are in `out_dir` already (written shard by shard)
        config.save_pretrained(out_dir)
        generation_config.save_pretrained(out_dir)
        step("config.json, generation_config.json")
    else:
        if isinstance(model_or_state_dict, dict):
            model = model_from_state_dict(model_or_state_dict, config)
        model.config.auto_map = dict(AUTO_MAP)
        model.config.architectures = list(ARCHITECTURES)
        model.generation_config = generation_config
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
        step("weights, config.json, generation_config.json")

    from processing_navil import save_processor

    save_processor(processor or build_processor(tokenizer, config), out_dir)
    step("processor and tokenizer")

    for path in code_files():
        shutil.copyfile(path, out_dir / path.name)
        step(path.name)

    if model_card is not None:
        (out_dir / "README.md").write_text(model_card, encoding="utf-8")
        step("README.md")
    dropped = only_our_code(out_dir)
    if notices is not None:
        notices.extend(dropped)
    _check_auto_map(out_dir)
    return model


def our_reference(reference):
    """Whether an `auto_map` value names only our code: `module.Class` with `module` a Hub file of ours (a
    tokenizer's value is a [slow, fast] pair, either may be null). `repo--module.Class` is someone else's."""
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    named = [r for r in refs if r is not None]
    return bool(named) and all(
        isinstance(r, str) and "--" not in r and r.rpartition(".")[0] in CODE_MODULES for r in named
    )


def auto_maps(folder):
    """(path, parsed JSON, its `auto_map`) for every JSON file of `folder` that has an `auto_map` dict;
    unreadable or invalid JSON files are skipped."""
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict):
            yield path, data, auto_map


def only_our_code(folder):
    """Make a folder we wrote carry only our code: drop every `auto_map` entry of its JSON files that
    points anywhere but our Hub files (e.g. a checkpoint tokenizer's own class, or a Hub repo's code), and
    every `.py` file that is not one of ours. Returns one notice per thing dropped."""
    folder = Path(folder)
    ours = {path.name for path in code_files()}
    notices = []
    for path, data, auto_map in auto_maps(folder):
        kept = {name: ref for name, ref in auto_map.items() if our_reference(ref)}
        if kept == auto_map:
            continue
        for name in sorted(set(auto_map) - set(kept)):
            notices.append(
                f"dropped {path.name} auto_map {name} -> {auto_map[name]!r}: converted folders carry only NaViL's code"
            )
        if kept:
            data["auto_map"] = kept
        else:
            del data["auto_map"]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in sorted(folder.glob("*.py")):
        if path.name not in ours:
            path.unlink()
            notices.append(f"dropped {path.name}: converted folders carry only NaViL's code")
    return notices


def _check_auto_map(out_dir):
    saved = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    if saved.get("auto_map") != AUTO_MAP:
        raise RuntimeError(f"config.json was written with auto_map {saved.get('auto_map')!r}, expected {AUTO_MAP!r}")


# ---------------------------------------------------------------------------------------------------
# Model card


def read_license(original_dir):
    """The license named in the original folder's README front matter or config.json, else None."""
    original_dir = Path(original_dir)
    readme = original_dir / "README.md"
    if readme.is_file():
        lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip().strip("'\"")
    config = original_dir / CONFIG_FILE
    if config.is_file():
        value = json.loads(config.read_text()).get("license")
        if value:
            return str(value)
    return None


def usage_section(stop="`<|im_end|>`"):
    """The model card's "Use" section: loading, chat, streaming, history, the command line."""
    return f"""## Use

```python
import torch
from transformers import AutoModel, AutoProcessor

path = "path/to/this/folder"  # or its Hub repo id
model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, attn_implementation="sdpa")
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)

print(model.chat(processor, "Describe the image.", images=["cat.jpg"]))
text, history = model.chat(processor, "Describe the image.", images=["cat.jpg"], return_history=True)
text, history = model.chat(processor, "And its color?", history=history, return_history=True)
for piece in model.chat(processor, "Describe.", images=["cat.jpg"], stream=True):
    print(piece, end="", flush=True)
answers = model.batch_chat(processor, ["What is this?", "Hi!"], images=[["cat.jpg"], []])
```

From the command line (`pip install navil-hf`): `navil chat --model path/to/this/folder --image cat.jpg "Describe the image."`

`attn_implementation` may be `"eager"`, `"sdpa"` or `"flash_attention_2"`. Generation defaults (greedy,
stop at {stop}, at most {DEFAULT_MAX_NEW_TOKENS} new tokens) are in `generation_config.json`.
"""


def card_front_matter(license=None):
    """The model card's YAML front matter lines (the Hub reads library, task, license and tags from it)."""
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if license:
        front.append(f"license: {license}")
    return front + ["tags:", "  - navil", "  - multimodal", "  - custom_code", "---", ""]


def model_card(config, *, source=None, license=None, dtype=None, verified=True):
    """README.md for a converted folder."""
    text = config.text_config
    llm = "Qwen3" if text.qk_norm else "InternLM2"
    front = card_front_matter(license)
    vision = config.vision_config
    params = [
        f"- vision encoder: {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.patch_size}-px patches, "
        f"{vision.spatial_merge_size}x{vision.spatial_merge_size} merge",
        f"- language model ({llm}-style, with visual experts): {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"{text.num_attention_heads} heads / {text.num_key_value_heads} KV heads, vocabulary {text.vocab_size}",
        f"- chat template: `{config.template}`; images: {config.min_dynamic_patch}-{config.max_dynamic_patch} patches, "
        f"scale ratio {config.scale_downsample_ratio}",
    ]
    if dtype is not None:
        params.append(f"- weights: {str(dtype).replace('torch.', '')}")
    origin = (
        f"the original OpenGVLab NaViL checkpoint `{source}`" if source else "an original OpenGVLab NaViL checkpoint"
    )
    checked = (
        " The conversion was checked tensor by tensor (converting back reproduces the original weights) and on\nthe model's logits."
        if verified
        else ""
    )
    fold = ""
    if not text.qk_norm and getattr(text, "chain_visual_output", False):
        fold = (
            "\nFor this InternLM2-based model the chained output projection of visual tokens, `wo_ve(wo(x))`, is\n"
            "kept as in the original (`o_proj_ve(o_proj(x))`), so `navil to-original` gives back the\n"
            "original weights bit for bit.\n"
        )
    elif not text.qk_norm:
        fold = (
            "\nFor this InternLM2-based model the chained output projection of visual tokens, `wo_ve(wo(x))`, is\n"
            "stored folded into one `o_proj_ve` (weight `W_ve @ W`), which computes the same.\n"
        )
    body = f"""# NaViL

NaViL (OpenGVLab, NeurIPS 2025) is a native multimodal large language model: a native-resolution vision
encoder (2D rotary positions, windowed attention, images fed at several scales at once) feeds a
decoder-only LLM whose every layer has separate attention projections and FFN for visual tokens
("modality experts"). NaViL-2B builds on InternLM2, NaViL-9B on Qwen3.

This folder was converted with `navil convert` from {origin} into the `transformers` remote-code
format (`trust_remote_code=True`).{checked} The original's behaviour that its weights depend on is kept.
{fold}
{chr(10).join(params)}

{usage_section()}"""
    if license:
        body += (
            f"\n## License\n\nThe original checkpoint is released under the `{license}` license; the weights keep it.\n"
        )
    return "\n".join(front) + body
