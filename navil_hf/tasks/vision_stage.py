"""The vision stage of the shapes curriculum: a NaViL's encoder and connector trained on their own.

Behind a language model that does not yet read its visual tokens, a fresh encoder gets little signal: on the
shapes task the same encoder that tells circles from squares on its own within a minute stays near one
answer for thousands of steps when it learns only through the LLM (`benchmarks/RESULTS.md` §9). This stage
trains the vision side first, without the LLM: every merged token of every image scale predicts, through a
linear head on the connector's output, what the image holds under it (`shapes.token_targets`: the shape
there or background, its color, whether the token holds a shape's center). These are dense labels the task's
generator knows exactly, like the detection and segmentation data vision encoders are pretrained on. The
head is dropped afterwards; the encoder and connector weights are saved into a copy of the Hub folder, which
the LLM stages then train from (`benchmarks/learn_shapes.py --vision-steps`).

The images are encoded by the folder's own processor, and the targets follow the order in which the
connector hands tokens to the LLM (`vision_config.token_order`: raster, or the original's window order).

`through_llm=LAYERS` (`--vision-through-llm`) trains the LLM's visual path as well: more heads read the LLM's
hidden state at each image slot after LAYERS decoder layers and also predict where the token lies (its column,
row and half of its row), which no visual token holds on its own (the encoder's 2D RoPE is relative).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .shapes import PALETTE, SHAPES, read_jsonl, token_targets

HEADS = {"shape": 1 + len(SHAPES), "color": 1 + len(PALETTE), "center": 2}  # classes per target column
# With `through_llm`, also each token's column and row in its scale's grid (capped at MAX_GRID - 1), read
# from the LLM's hidden state at the token's slot: the token's absolute place, which its own features do not hold
# (the encoder's 2D RoPE is relative) but the LLM can find from the layout tokens before it.
# And which half of its row the token lies in (0 left, 1 right; IGNORE in the middle column of an odd row and
# in the first row, where the causal LLM has not yet seen how long a row is).
MAX_GRID = 16
PLACE_HEADS = {"column": MAX_GRID, "row": MAX_GRID, "half": 2}
IGNORE = -100


def connector_order(merged_h: int, merged_w: int, vision_config) -> np.ndarray:
    """For each token the connector emits for one image scale, its index in raster order."""
    if vision_config.token_order == "raster":
        return np.arange(merged_h * merged_w)
    from modeling_navil import window_block_order

    merge = vision_config.spatial_merge_size
    return window_block_order(merged_h, merged_w, vision_config.window_size // merge)[0]


def place_targets(merged_h: int, merged_w: int, vision_config) -> np.ndarray:
    """[tokens, 3] in the connector's order for one image scale of `merged_h` x `merged_w` tokens: each token's
    column and row (clipped to `MAX_GRID` - 1) and the half of its row (0 left, 1 right; `IGNORE` in the
    middle column of an odd row and in the first row, where a causal LLM has not yet seen a row's length)."""
    order = connector_order(merged_h, merged_w, vision_config)
    column, row = order % merged_w, order // merged_w
    half = np.where(2 * column + 1 < merged_w, 0, np.where(2 * column + 1 > merged_w, 1, IGNORE))
    half = np.where(row == 0, IGNORE, half)
    return np.stack([column.clip(max=MAX_GRID - 1), row.clip(max=MAX_GRID - 1), half], axis=1)


def place_loss(config, layers: int, weight: float = 1.0):
    """An auxiliary loss for `train(auxiliary_loss=...)` that keeps the visual tokens knowing where they are
    through the LLM stages: a linear head (trained along) reads the LLM's hidden state after `layers` decoder
    layers at every `<IMG_CONTEXT>` slot of the training batch and predicts the token's column, row and half
    (`place_targets`, from `image_grid_thw` alone); the loss is `weight` x the sum of the three cross
    entropies. `config`: the model's NaViLConfig. The through-LLM vision stage teaches the same targets at
    the same layer; without this term the LLM stage's updates to the shared text path (the line-break tokens
    a row's tokens count from are text tokens) wash out the column while the row survives."""
    import torch

    layer_count = config.text_config.num_hidden_layers
    if not 1 <= layers <= layer_count:
        raise ValueError(f"the place loss reads the state after 1 to {layer_count} decoder layers, got {layers!r}")
    vision_config, image_token = config.vision_config, config.image_token_id
    merge = vision_config.spatial_merge_size

    class PlaceLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(config.text_config.hidden_size, sum(PLACE_HEADS.values()))

        def targets(self, grid) -> torch.Tensor:
            return torch.from_numpy(
                np.concatenate([place_targets(h // merge, w // merge, vision_config) for _, h, w in grid.tolist()])
            )

        def forward(self, inputs, outputs):
            slots = inputs["input_ids"] == image_token
            states = outputs.hidden_states[layers][slots]
            targets = self.targets(inputs["image_grid_thw"]).to(states.device)
            if len(targets) != len(states):
                raise ValueError(f"{len(states)} image slots for {len(targets)} place targets")
            logits = self.head(states.to(self.head.weight.dtype)).split(tuple(PLACE_HEADS.values()), dim=-1)
            return weight * _column_losses(logits, targets, range(len(PLACE_HEADS)))

    return PlaceLoss()


def encode_images(processor, data_dir, split: str, vision_config, count: int | None = None) -> list[tuple]:
    """The first `count` images of `data_dir/split.jsonl` as (pixel_values, image_grid_thw, targets [tokens, 7]
    in the connector's order, all scales (`token_targets`' 4 columns, the fourth numbering the objects (a shape
    at one scale) from 1, 0 for none; then, of the image region the token holds, its column, its row and the
    half of its row: `PLACE_HEADS`), the shape class (index in `SHAPES`) of each object, the image's token ids
    as the prompt lays them out)."""
    import torch
    from PIL import Image

    from image_processing_navil import IMAGE_LAYOUT_TOKENS, image_tokens

    layout_ids = processor.tokenizer.convert_tokens_to_ids(list(IMAGE_LAYOUT_TOKENS))

    data_dir = Path(data_dir)
    records = read_jsonl(data_dir / f"{split}.jsonl")[:count]
    merge = vision_config.spatial_merge_size
    out = []
    for record in records:
        with Image.open(data_dir / record["messages"][0]["content"][0]["path"]) as image:
            encoded = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = encoded["image_grid_thw"]
        targets, objects = [], []
        for _, h, w in grid.tolist():
            mh, mw = h // merge, w // merge
            order = connector_order(mh, mw, vision_config)
            scale = np.concatenate([token_targets(record, mh, mw)[order], place_targets(mh, mw, vision_config)], axis=1)
            present = sorted(set(scale[:, 3].tolist()) - {0})
            renumber = np.zeros(len(record["shapes"]) + 1, dtype=np.int64)
            for index in present:
                objects.append(SHAPES.index(record["shapes"][index - 1]["shape"]))
                renumber[index] = len(objects)
            scale[:, 3] = renumber[scale[:, 3]]
            targets.append(scale)
        out.append(
            (
                encoded["pixel_values"],
                grid,
                torch.from_numpy(np.concatenate(targets)),
                torch.tensor(objects, dtype=torch.long),
                torch.tensor(image_tokens(grid.tolist(), merge, tokens=layout_ids)),
            )
        )
    return out


def _object_means(features, object_ids, count):
    """The mean of `features` over each object's tokens (`object_ids`: 1-based per token, 0 for none)."""
    import torch

    on = object_ids > 0
    ids = object_ids[on] - 1
    sums = features.new_zeros(count, features.shape[-1]).index_add(0, ids, features[on])
    return sums / torch.bincount(ids, minlength=count).clamp(min=1).unsqueeze(-1)


def _llm_image_states(model, pixel_values, grid, items, layers: int):
    """(The LLM's hidden state after `layers` decoder layers at every `<IMG_CONTEXT>` slot, the connector's
    output it was given, all scales in one tensor) of the images alone (each as the prompt lays it out,
    right-padded into one batch), both in the connector's token order."""
    import torch

    ids = torch.nn.utils.rnn.pad_sequence([item[4] for item in items], batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(item[4]) for item in items], batch_first=True)
    num_scales = torch.tensor([len(item[1]) for item in items])
    out = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                      num_scales=num_scales, use_cache=False, output_hidden_states=True, return_dict=True)  # fmt: skip
    states = out.hidden_states[layers][(ids == model.config.image_token_id) & mask.bool()]
    return states, torch.cat(out.image_outputs.pooler_output)


def _forward(model, heads, items, llm_layers=None):
    """Logits and targets of a batch: `token` [T, sum(HEADS)] and `object` [objects, len(SHAPES)] from the
    connector's output (the object logits from the mean over each object's tokens), and with `llm` heads
    (`through_llm`) `llm_token` [T, sum(HEADS) + sum(PLACE_HEADS)] and `llm_object` from the LLM's hidden
    state after `llm_layers` decoder layers at the image slots; `targets` [T, 7], `object_targets`."""
    import torch

    pixel_values = torch.cat([item[0] for item in items])
    grid = torch.cat([item[1] for item in items])
    targets, offset = [], 0
    for item in items:  # object numbers unique over the batch
        t = item[2].clone()
        t[:, 3] = torch.where(t[:, 3] > 0, t[:, 3] + offset, 0)
        targets.append(t)
        offset += len(item[3])
    targets = torch.cat(targets)
    out = {"targets": targets, "object_targets": torch.cat([item[3] for item in items])}
    if "llm_token" in heads:
        states, features = _llm_image_states(model, pixel_values, grid, items, llm_layers)
        out["llm_token"] = heads["llm_token"](states)
        out["llm_object"] = heads["llm_object"](_object_means(states, targets[:, 3], offset))
    else:  # the connector's output, as the LLM would receive it, all scales in one tensor
        features = torch.cat(model.get_image_features(pixel_values, grid, return_dict=True).pooler_output)
    out["token"] = heads["token"](features)
    out["object"] = heads["object"](_object_means(features, targets[:, 3], offset))
    return out


def _split_token_logits(logits):
    """Per target column (`HEADS`, then `PLACE_HEADS` where the logits hold them), its logits."""
    sizes = tuple(HEADS.values())
    if logits.shape[-1] > sum(sizes):
        sizes += tuple(PLACE_HEADS.values())
    return logits.split(sizes, dim=-1)


def _loss(out):
    import torch.nn.functional as F

    targets = out["targets"]
    total = 0
    for prefix in ("", "llm_"):
        if prefix + "token" not in out:
            continue
        total = total + F.cross_entropy(out[prefix + "object"], out["object_targets"])
        total = total + _column_losses(_split_token_logits(out[prefix + "token"]), targets, [0, 1, 2, 4, 5, 6])
    return total


def _column_losses(logits, targets, columns):
    """The sum over `columns` of the cross entropy of each logits tensor against that target column, in
    float32, `IGNORE` left out; a column with no target at all adds nothing (a batch of first rows only has no
    `half` to learn)."""
    import torch.nn.functional as F

    total = 0
    for column, part in zip(columns, logits):
        if (targets[:, column] != IGNORE).any():
            total = total + F.cross_entropy(part.float(), targets[:, column], ignore_index=IGNORE)
    return total


def token_accuracy(model, heads, items, batch: int = 32, llm_layers=None) -> dict:
    """Held-out accuracy of the heads: `shape` and `color` over the tokens a shape covers, `background` over
    the others (shape column 0 predicted), `center` over the tokens holding a shape's center, `object` the
    object head's shape over the objects; with LLM heads (`through_llm`) also, read from the LLM's output,
    `llm_shape`, `llm_object`, and `column` and `row` over all tokens."""
    import torch

    hits = {}

    def count(name, mask, right):
        total = hits.setdefault(name, [0, 0])
        total[0] += int((right & mask).sum())
        total[1] += int(mask.sum())

    with torch.no_grad():
        for start in range(0, len(items), batch):
            out = _forward(model, heads, items[start : start + batch], llm_layers)
            targets, objects = out["targets"], out["object_targets"]
            on, every = targets[:, 0] > 0, torch.ones_like(targets[:, 0], dtype=torch.bool)
            shape, color, center = (logits.argmax(-1) for logits in _split_token_logits(out["token"]))
            count("shape", on, shape == targets[:, 0])
            count("color", on, color == targets[:, 1])
            count("background", ~on, shape == 0)
            count("center", targets[:, 2] == 1, center == 1)
            count("object", torch.ones_like(objects, dtype=torch.bool), out["object"].argmax(-1) == objects)
            if "llm_token" in out:
                shape, _, _, column, row, half = (logits.argmax(-1) for logits in _split_token_logits(out["llm_token"]))
                count("llm_shape", on, shape == targets[:, 0])
                count("half", targets[:, 6] != IGNORE, half == targets[:, 6])
                count("llm_object", torch.ones_like(objects, dtype=torch.bool), out["llm_object"].argmax(-1) == objects)
                count("column", every, column == targets[:, 4])
                count("row", every, row == targets[:, 5])
    return {name: round(right / max(total, 1), 4) for name, (right, total) in hits.items()}


def train_vision_stage(
    model_dir,
    data_dir,
    out_dir,
    *,
    steps: int,
    batch: int = 16,
    lr: float = 2e-3,
    warmup: int = 20,
    seed: int = 0,
    eval_every: int = 200,
    test: int = 200,
    through_llm: int | None = None,
    log=print,
) -> dict:
    """Train the encoder and connector of the NaViL Hub folder `model_dir` for `steps` steps of `batch`
    images of the shapes dataset `data_dir` (its train split; `steps * batch` images at most, drawn at
    random) on the dense targets above, AdamW at `lr` with a linear warm-up and a cosine decay, and write
    the folder with the trained weights (everything else as it was) to `out_dir`. With `through_llm` (a
    count of decoder layers) the LLM's visual path trains too (its visual experts and special-token rows,
    `navil_hf.training.parts`; the model must have experts): a second set of heads reads the LLM's hidden
    state after that many layers at each image slot, the image alone in the prompt's layout, and also
    predicts where the token lies (`PLACE_HEADS`), so that the visual tokens enter the LLM stages knowing
    where they are. An early layer (1) leaves the layers after it to carry that to a question's answer: the
    answer attends to the image tokens' states before the last layer, never after it. Returns a summary: the
    held-out token accuracy (`token_accuracy`, `test` images of the test split) every `eval_every` steps
    and at the end, the seconds, the output folder. The images are encoded once and held in memory (about
    250 KB each at the demo's image settings: 5 GB for 20000)."""
    import torch
    from transformers import GenerationConfig

    from ..folders import staged_folder
    from ..hub import write_hub_folder
    from ..training.parts import set_trainable
    from ..training.train import load_model, load_processor

    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be positive, got {steps} and {batch}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = load_model(model_dir)
    layers = model.config.text_config.num_hidden_layers
    if through_llm is not None and not 1 <= through_llm <= layers:
        raise ValueError(f"through_llm must be a count of decoder layers, 1 to {layers}, got {through_llm!r}")
    if through_llm and not model.config.text_config.visual_experts:
        raise ValueError("through_llm trains the LLM's visual experts, and this model has none")
    processor = load_processor(model_dir)
    vision_config = model.config.vision_config
    train_items = encode_images(processor, data_dir, "train", vision_config, count=steps * batch)
    test_items = encode_images(processor, data_dir, "test", vision_config, count=test)
    log(f"vision stage: {len(train_items)} training and {len(test_items)} held-out images encoded "
        f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    hidden = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({"token": torch.nn.Linear(hidden, sum(HEADS.values())),
                                 "object": torch.nn.Linear(hidden, len(SHAPES))})  # fmt: skip
    parts = ("vision", "connector")
    if through_llm:
        parts += ("special_tokens", "visual_experts")
        heads["llm_token"] = torch.nn.Linear(hidden, sum(HEADS.values()) + sum(PLACE_HEADS.values()))
        heads["llm_object"] = torch.nn.Linear(hidden, len(SHAPES))
    set_trainable(model, parts)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def rate(step):  # step counts from 0
        return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    model.train()
    for step in range(1, steps + 1):
        picks = torch.randint(len(train_items), (batch,), generator=generator).tolist()
        loss = _loss(_forward(model, heads, [train_items[i] for i in picks], through_llm))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            accuracy = token_accuracy(model, heads, test_items, llm_layers=through_llm)
            model.train()
            curve.append({"step": step, "loss": round(loss.item(), 4), **accuracy,
                          "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
            log(f"vision stage step {step}: loss {loss.item():.3f}, held-out token accuracy "
                + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()) + f" ({curve[-1]['seconds']:.0f} s)")  # fmt: skip
    model.eval()
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = None
    card = (
        f"# NaViL with a pretrained vision side\n\n`{Path(model_dir).name}` with its encoder and connector"
        + (" and the LLM's visual path" if through_llm else "")
        + f" trained alone for {steps} steps on dense shapes-task targets (`navil_hf.tasks.vision_stage`).\n"
    )
    out = Path(out_dir)
    with staged_folder(out, force=True) as tmp:
        write_hub_folder(model, model.config, processor.tokenizer, tmp, processor=processor,
                         generation_config=generation_config, model_card=card)  # fmt: skip
    return {"steps": steps, "batch": batch, "lr": lr, "through_llm": through_llm, "images": len(train_items), "curve": curve,
            "seconds": round(time.perf_counter() - started, 1), "model_dir": str(out)}  # fmt: skip
