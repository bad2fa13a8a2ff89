"""`navil train CONFIG.yaml`: fine-tune or pre-train a NaViL on conversations, on transformers' `Trainer`.

The config file (YAML; relative paths are relative to it)::

    model: ./navil-2b                # a Hub folder: converted, `navil init-from-llm` output, or trained here
    output_dir: ./runs/my-run        # gets checkpoints/ (resumable) and model/ (the trained Hub folder)
    data:
      train: train.jsonl             # one file or a list; chat or LLaVA format (navil_hf.training.data)
      eval: test.jsonl               # optional: evaluated at the end (and as `training` says)
      format: auto                   # auto | chat | llava
      train_on: assistant            # assistant | all
      max_length: 4096               # longer samples are skipped with a warning
      streaming: false               # true: read the files as a stream (needs training.max_steps)
      images: {max_pixels: 1048576}  # image processor settings: training uses them, the trained folder's
                                     # processor is saved with them (NaViLImagesKwargs keys)
    train: stage1                    # parts or presets (navil_hf.training.parts): vision, connector, ...
    learning_rates: {vision: 1.0e-3, connector: 1.0e-3}   # optional: per part or preset; others get
                                     # training.learning_rate (a fresh encoder wants more than a pretrained LLM)
    lora: {r: 16, alpha: 32, dropout: 0.05, parts: [text, visual_experts]}   # optional, PEFT
    packing: true                    # padding-free rows (false: padded batches)
    special_token_table: everywhere  # SPEC §10; the original checkpoints' "prompt" is kept on request
    attn_implementation: sdpa
    dtype: float32                   # the weights' dtype while training (bf16 mixed precision: training.bf16)
    seed: 0
    training:                        # transformers.TrainingArguments, as they are
      learning_rate: 1.0e-4
      per_device_train_batch_size: 8 # samples per packed row
      num_train_epochs: 1
      gradient_checkpointing: true
      save_steps: 500

Several processes (`torchrun --nproc-per-node N -m navil_hf train CONFIG` or `accelerate launch`) train
data-parallel (DDP; gloo on CPU); `training: {fsdp: true, fsdp_config: {version: 2}}` shards with FSDP2
on GPUs (the decoder layers and vision blocks are the wrapped units; accelerate runs CPU processes as DDP
whatever `fsdp` says). Every parameter takes part in every step, also without images in the batch
(`ModalityRouting(both=True)`, `NaViLModel._idle_vision`), so DDP needs no unused-parameter search.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import Trainer
from transformers.utils import logging

from ..errors import UsageError

logger = logging.get_logger("navil_hf.training")

TRAIN_KEYS = {
    "model", "output_dir", "data", "train", "learning_rates", "lora", "packing", "special_token_table", "attn_implementation",
    "dtype", "seed", "training",
}  # fmt: skip
DATA_KEYS = {"train", "eval", "format", "train_on", "max_length", "streaming", "images"}
LORA_KEYS = {"r", "alpha", "dropout", "parts"}
DTYPES = ("float32", "bfloat16", "float16")
MODEL_DIR, CHECKPOINTS_DIR, CONFIG_COPY = "model", "checkpoints", "train_config.yaml"

# What `navil train` sets unless the config's `training` says otherwise.
TRAINING_DEFAULTS = dict(
    per_device_train_batch_size=8,
    logging_steps=10,
    save_steps=500,
    save_total_limit=2,
    report_to="none",
    remove_unused_columns=False,
    dataloader_num_workers=0,
    ddp_find_unused_parameters=False,  # every parameter takes part in every step (see the module docstring)
)


class ConfigError(UsageError):
    """A training config the user must fix (one line, exit 2)."""


@dataclass
class DataConfig:
    train: list[str]
    eval: list[str] = field(default_factory=list)
    format: str = "auto"
    train_on: str = "assistant"
    max_length: int | None = None
    streaming: bool = False
    images: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    model: str
    output_dir: str
    data: DataConfig
    train: tuple = ("full",)
    learning_rates: dict = field(default_factory=dict)  # part -> learning rate (presets resolved)
    lora: dict | None = None
    packing: bool = True
    special_token_table: str = "everywhere"
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    seed: int = 0
    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data"] = {f.name: getattr(self.data, f.name) for f in fields(self.data)}
        out["train"] = list(self.train)
        return out


def _paths(value, base: Path, key: str) -> list[str]:
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(items, list) or not all(isinstance(v, (str, os.PathLike)) for v in items):
        raise ConfigError(f"{key} must be a path or a list of paths")
    return [str(Path(v).expanduser() if Path(v).expanduser().is_absolute() else base / v) for v in items]


def _unknown(given: dict, allowed: set, where: str):
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown {where} key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )


def parse_config(raw, base_dir=".") -> TrainConfig:
    """A `TrainConfig` from the YAML's mapping; relative paths are taken against `base_dir`."""
    from .data import FORMATS, TRAIN_ON
    from .parts import resolve_parts

    base = Path(base_dir)
    if not isinstance(raw, dict):
        raise ConfigError("the training config must be a mapping (YAML keys: model, output_dir, data, ...)")
    _unknown(raw, TRAIN_KEYS, "config")
    for key in ("model", "output_dir", "data"):
        if key not in raw:
            raise ConfigError(f"the training config needs {key!r}")
    data = raw["data"]
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError("data must be a mapping with at least 'train'")
    _unknown(data, DATA_KEYS, "data")
    images = data.get("images") or {}
    if not isinstance(images, dict):
        raise ConfigError(f"data.images must be a mapping of image processor settings, got {images!r}")
    _unknown(images, image_setting_keys(), "data.images")
    data_config = DataConfig(
        train=_paths(data["train"], base, "data.train"),
        eval=_paths(data.get("eval") or [], base, "data.eval"),
        format=data.get("format", "auto"),
        train_on=data.get("train_on", "assistant"),
        max_length=data.get("max_length"),
        streaming=bool(data.get("streaming", False)),
        images=dict(images),
    )
    if data_config.format not in FORMATS:
        raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got {data_config.format!r}")
    if data_config.train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on must be one of {', '.join(TRAIN_ON)}, got {data_config.train_on!r}")
    if data_config.max_length is not None and (
        not isinstance(data_config.max_length, int) or data_config.max_length < 2
    ):
        raise ConfigError(f"data.max_length must be an integer >= 2, got {data_config.max_length!r}")
    model = str(raw["model"])
    model_path = Path(model).expanduser()
    config = TrainConfig(
        model=str(model_path if model_path.is_absolute() else base / model_path),
        output_dir=_paths(raw["output_dir"], base, "output_dir")[0],
        data=data_config,
        train=tuple([raw["train"]] if isinstance(raw.get("train", "full"), str) else raw["train"])
        if "train" in raw
        else ("full",),
        learning_rates=_learning_rates(raw.get("learning_rates")),
        lora=raw.get("lora"),
        packing=bool(raw.get("packing", True)),
        special_token_table=raw.get("special_token_table", "everywhere"),
        attn_implementation=raw.get("attn_implementation", "sdpa"),
        dtype=raw.get("dtype", "float32"),
        seed=int(raw.get("seed", 0)),
        training=dict(raw.get("training") or {}),
    )
    try:
        resolve_parts(config.train)
    except ValueError as e:
        raise ConfigError(f"train: {e}") from None
    if config.lora is not None:
        if not isinstance(config.lora, dict):
            raise ConfigError("lora must be a mapping (r, alpha, dropout, parts)")
        _unknown(config.lora, LORA_KEYS, "lora")
        try:
            resolve_parts(config.lora.get("parts", ("text", "visual_experts")))
        except ValueError as e:
            raise ConfigError(f"lora.parts: {e}") from None
    if config.special_token_table not in ("prompt", "everywhere"):
        raise ConfigError(f"special_token_table must be 'prompt' or 'everywhere', got {config.special_token_table!r}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if "output_dir" in config.training:
        raise ConfigError("set output_dir at the top level, not under training")
    if data_config.streaming and "max_steps" not in config.training:
        raise ConfigError("data.streaming needs training.max_steps (a stream has no length)")
    return config


def image_setting_keys() -> set:
    """The keys `data.images` may set: the image processor's settings a call may override (`patch_size`
    and `merge_size` must match the model and are not among them)."""
    from image_processing_navil import _CALL_SETTINGS

    return set(_CALL_SETTINGS)


def _learning_rates(raw) -> dict:
    """`learning_rates: {part or preset: lr}` -> {part: lr}; a part named twice (directly or through a preset)
    with different rates is a mistake."""
    from .parts import resolve_parts

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("learning_rates must be a mapping of parts or presets to learning rates")
    rates = {}
    for name, rate in raw.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise ConfigError(f"learning_rates.{name} must be a number >= 0, got {rate!r}")
        try:
            parts = resolve_parts(name)
        except ValueError as e:
            raise ConfigError(f"learning_rates: {e}") from None
        for part in parts:
            if rates.setdefault(part, float(rate)) != float(rate):
                raise ConfigError(f"learning_rates gives the part {part!r} two rates ({rates[part]} and {rate})")
    return rates


def load_config(path, overrides=()) -> TrainConfig:
    """Read a YAML training config; `overrides` are `dotted.key=value` strings (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    raw = raw if raw is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        target = raw
        *parents, last = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {parent} is not a mapping")
        target[last] = yaml.safe_load(value)
    return parse_config(raw, path.parent)


# ------------------------------------------------------------------------------------------------ loading


def check_navil_folder(path) -> Path:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model {path} is not a folder with config.json (a NaViL Hub folder)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{config_file} is not a JSON object: {e}") from None
    if model_type == "navil_chat":
        raise ConfigError(
            f"model {path} is an original NaViL checkpoint: convert it first (`navil convert {path} OUT_DIR`)"
        )
    if model_type != "navil":
        raise ConfigError(f"model {path} holds a {model_type!r} model, not a NaViL Hub folder")
    return path


def load_processor(path):
    """The folder's processor, built from our installed classes (no code from the folder runs)."""
    from image_processing_navil import NaViLImageProcessor
    from processing_navil import NaViLProcessor

    from ..conversion.tokenizer import load_tokenizer
    from ..folders import quiet_transformers

    path = Path(path)
    tokenizer = load_tokenizer(path)
    with quiet_transformers():
        image_processor = NaViLImageProcessor.from_pretrained(path)
    template_file = path / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    return NaViLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def apply_image_settings(processor, settings: dict):
    """Make `settings` (`data.images`) the image processor's own: the samples are encoded with them and
    the trained folder's processor is saved with them (its `min_pixels`, `max_pixels`, ... in
    processor_config.json), so the trained model chats at the resolution it was trained at. The keys mean
    what they mean for one call (`max_dynamic_patch` alone sets `max_pixels`, ...)."""
    if not settings:
        return processor
    image_processor = processor.image_processor
    try:
        resolved = image_processor.resolve_settings(settings)  # checked as for one call
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.images: {' '.join(str(e).split())}") from None
    for key in image_setting_keys():
        setattr(image_processor, key, resolved[key])
    return processor


def load_model(path, dtype="float32", attn_implementation="sdpa"):
    """The folder's model with our installed classes, from safetensors only."""
    import torch

    from modeling_navil import NaViLForConditionalGeneration

    from ..folders import quiet_transformers, safetensors_files

    safetensors_files(path, error=ConfigError)  # refuses pickle-only folders
    with quiet_transformers():
        return NaViLForConditionalGeneration.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, use_safetensors=True
        )


def datasets_for(config: TrainConfig, processor):
    """The train and eval datasets; `processor` has `data.images` applied (`apply_image_settings`), so the
    samples are encoded exactly as the saved processor will encode."""
    from .data import ConversationDataset, SampleEncoder, StreamingConversationDataset

    encoder = SampleEncoder(processor, train_on=config.data.train_on, max_length=config.data.max_length)
    kind = StreamingConversationDataset if config.data.streaming else ConversationDataset
    train = kind(config.data.train, encoder, config.data.format)
    evaluation = ConversationDataset(config.data.eval, encoder, config.data.format) if config.data.eval else None
    return train, evaluation


def apply_lora(model, lora: dict, full_parts):
    """Wrap `model` with PEFT LoRA adapters on the linear layers of `lora["parts"]`; the parts in
    `full_parts` train in full beside them."""
    from peft import LoraConfig, get_peft_model

    from .parts import linear_modules, parameter_part, resolve_parts

    targets = linear_modules(model, lora.get("parts", ("text", "visual_experts")))
    if not targets:
        raise ConfigError("lora.parts has no linear layers to adapt")
    peft_config = LoraConfig(
        r=int(lora.get("r", 16)),
        lora_alpha=float(lora.get("alpha", 2 * int(lora.get("r", 16)))),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets,
    )
    model = get_peft_model(model, peft_config)
    full = set(resolve_parts(full_parts))
    for name, param in model.named_parameters():
        if "lora_" not in name and parameter_part(name) in full:
            param.requires_grad_(True)
    return model, peft_config


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def training_arguments(config: TrainConfig):
    import torch
    from transformers import TrainingArguments

    kwargs = {**TRAINING_DEFAULTS, "seed": config.seed, "dataloader_pin_memory": torch.cuda.is_available()}
    kwargs.update(config.training)
    kwargs["output_dir"] = str(Path(config.output_dir) / CHECKPOINTS_DIR)
    if "use_cpu" not in config.training and not _has_accelerator():
        # No accelerator: say so. Several processes then form one data-parallel group (gloo; else each would
        # train alone and all of them write the output), and bf16 runs as CPU autocast instead of failing
        # with "Your setup doesn't support bf16/gpu".
        kwargs["use_cpu"] = True
    if config.training.get("fsdp") and not _has_accelerator():
        logger.warning(
            "training.fsdp is set but there is no GPU: accelerate trains CPU processes data-parallel (DDP), "
            "every process holding the whole model; FSDP sharding applies on GPUs"
        )
    if config.data.eval and "eval_strategy" not in config.training:
        kwargs["eval_strategy"] = "no"  # evaluated once at the end (below) unless asked for
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"training: {' '.join(str(e).split())}") from None


# ------------------------------------------------------------------------------------------------ training


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict
    trainable: dict


def prepare_output(config: TrainConfig, resume: bool, force: bool):
    out = Path(config.output_dir)
    checkpoints = out / CHECKPOINTS_DIR
    existing = sorted(checkpoints.glob("checkpoint-*")) if checkpoints.is_dir() else []
    if resume and not existing:
        raise ConfigError(f"--resume: no checkpoint in {checkpoints}")
    if not resume and (existing or (out / MODEL_DIR).exists()):
        if not force:
            raise ConfigError(f"{out} has a run already: pass --resume to continue it or --force to start over")
        shutil.rmtree(checkpoints, ignore_errors=True)  # ours: checkpoint-* folders of an earlier run
    out.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig, *, resume: bool = False, force: bool = False, callbacks=(), auxiliary_loss=None
) -> TrainResult:
    """Train as `config` says and write the trained Hub folder to `output_dir/model`. `auxiliary_loss`: a
    torch module called as `auxiliary_loss(inputs, outputs)` on every training batch (the forward then returns
    every layer's hidden states), whose result is added to the loss; its own parameters (e.g. a probe head)
    train with the model at the base learning rate and are not saved with it. Not with `resume` (the module's
    weights are not in the checkpoints), nor with gradient accumulation or several processes."""
    import yaml
    from transformers import set_seed

    from .collate import PackedCollator, PaddedCollator
    from .parts import set_trainable

    check_navil_folder(config.model)
    if resume and auxiliary_loss is not None:
        raise ConfigError("--resume with an auxiliary loss: its weights are not in the checkpoints")
    args = training_arguments(config)
    if auxiliary_loss is not None and (args.gradient_accumulation_steps > 1 or args.world_size > 1):
        # the Trainer scales the model's loss for these, and would not scale the added term alike
        raise ConfigError("an auxiliary loss trains in one process without gradient accumulation")
    if args.process_index == 0:
        prepare_output(config, resume, force)
    set_seed(config.seed)
    processor = apply_image_settings(load_processor(config.model), config.data.images)
    model = load_model(config.model, config.dtype, config.attn_implementation)
    model.config.special_token_table = config.special_token_table
    model.config.use_cache = False
    trainable = set_trainable(model, () if config.lora else config.train)
    if config.lora:
        model, _ = apply_lora(model, config.lora, config.train)
        trainable = {"lora+full": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing to train: the chosen parts have no parameters")
    train_set, eval_set = datasets_for(config, processor)
    pad = processor.tokenizer.pad_token_id
    if config.packing:
        collator = PackedCollator(labelled_logits=True)
    else:
        collator = PaddedCollator(pad if pad is not None else 0, labelled_logits=True)
    trainer = NaViLTrainer(
        model=model,
        learning_rates=config.learning_rates,
        auxiliary_loss=auxiliary_loss,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=list(callbacks),
    )
    if trainer.is_world_process_zero():
        (Path(config.output_dir) / CONFIG_COPY).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = dict(output.metrics)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    model_dir = save_trained(trainer, config, processor)
    return TrainResult(model_dir, metrics, trainable)


def part_param_groups(param_groups, named_parameters, learning_rates: dict) -> list[dict]:
    """Splits an optimizer's param groups by part (`parts.parameter_part`), each part at its rate in
    `learning_rates` (the others keep their group's rate)."""
    from .parts import parameter_part

    names = {id(p): name for name, p in named_parameters}
    groups = []
    for group in param_groups:
        by_rate = {}
        for param in group["params"]:
            rate = learning_rates.get(parameter_part(names.get(id(param), "")), group["lr"])
            by_rate.setdefault(rate, []).append(param)
        groups += [{**group, "params": params, "lr": rate} for rate, params in by_rate.items()]
    return groups


class NaViLTrainer(Trainer):
    """transformers' Trainer; `learning_rates` sets a learning rate per part: the optimizer's param groups
    are split by part, and the schedule scales each group from its own rate. `auxiliary_loss` (see `train`)
    adds a term to each training batch's loss; its parameters form one more group at the base rate."""

    def __init__(self, *args, learning_rates=None, auxiliary_loss=None, **kwargs):
        self.part_learning_rates = dict(learning_rates or {})
        self.auxiliary_loss = auxiliary_loss
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if fresh and self.part_learning_rates:
            model = (args[0] if args else kwargs.get("model")) or self.model
            optimizer.param_groups = part_param_groups(
                optimizer.param_groups, model.named_parameters(), self.part_learning_rates
            )
            for group in optimizer.param_groups:
                logger.info("learning rate %g for %d tensors", group["lr"], len(group["params"]))
        extra = [p for p in self.auxiliary_loss.parameters() if p.requires_grad] if self.auxiliary_loss else []
        if fresh and extra:
            optimizer.add_param_group({**optimizer.defaults, "params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if self.auxiliary_loss is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + self.auxiliary_loss(inputs, outputs)
        return (loss, outputs) if return_outputs else loss


def save_trained(trainer, config: TrainConfig, processor) -> Path:
    """The trained weights as a Hub folder (`output_dir/model`), LoRA merged, written atomically by the
    main process (under FSDP the full state dict is gathered first)."""
    from transformers import GenerationConfig

    from ..folders import staged_folder
    from ..hub import build_generation_config, usage_section, write_hub_folder

    accelerator = trainer.accelerator
    sharded = getattr(accelerator, "is_fsdp2", False) or accelerator.distributed_type.name == "FSDP"
    state = accelerator.get_state_dict(trainer.model) if sharded else None
    out = Path(config.output_dir) / MODEL_DIR
    if not trainer.is_world_process_zero():
        accelerator.wait_for_everyone()
        return out
    model = accelerator.unwrap_model(trainer.model)
    if sharded:
        model = _model_from_full_state(config, state, model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    try:
        generation_config = GenerationConfig.from_pretrained(config.model)
    except OSError:
        generation_config = build_generation_config(processor.tokenizer)
    card = (
        f"# NaViL fine-tuned with navil-hf\n\nTrained from `{Path(config.model).name}` with `navil train` "
        f"(parts: {', '.join(config.train)}{', LoRA merged' if config.lora else ''}; special-token table "
        f"{config.special_token_table}).\n\n{usage_section()}"
    )
    with staged_folder(out, force=True) as tmp:
        write_hub_folder(model, model.config, processor.tokenizer, tmp, processor=processor,
                         generation_config=generation_config, model_card=card)  # fmt: skip
    accelerator.wait_for_everyone()
    return out


def _model_from_full_state(config: TrainConfig, state: dict, wrapped):
    """A CPU model holding a gathered (FSDP) state dict, LoRA wrapped again when the run used it."""
    model = load_model(config.model, config.dtype, config.attn_implementation)
    model.config.special_token_table = config.special_token_table
    if config.lora:
        model, _ = apply_lora(model, config.lora, config.train)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or not k.endswith("lm_head.weight")]:
        raise RuntimeError(
            f"gathered state dict does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model
