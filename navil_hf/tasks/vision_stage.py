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
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .shapes import PALETTE, SHAPES, read_jsonl, token_targets

HEADS = {"shape": 1 + len(SHAPES), "color": 1 + len(PALETTE), "center": 2}  # classes per target column


def connector_order(merged_h: int, merged_w: int, vision_config) -> np.ndarray:
    """For each token the connector emits for one image scale, its index in raster order."""
    if vision_config.token_order == "raster":
        return np.arange(merged_h * merged_w)
    from modeling_navil import window_block_order

    merge = vision_config.spatial_merge_size
    return window_block_order(merged_h, merged_w, vision_config.window_size // merge)[0]


def encode_images(processor, data_dir, split: str, vision_config, count: int | None = None) -> list[tuple]:
    """The first `count` images of `data_dir/split.jsonl` as (pixel_values, image_grid_thw, targets [tokens, 4]
    in the connector's order, all scales; the last column numbers the objects (a shape at one scale) from 1,
    0 for none), the shape class (index in `SHAPES`) of each object)."""
    import torch
    from PIL import Image

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
            scale = token_targets(record, mh, mw)[connector_order(mh, mw, vision_config)]
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
            )
        )
    return out


def _forward(model, heads, items):
    """(token logits [T, sum(HEADS)], object logits [objects, len(SHAPES)], token targets [T, 4], object
    targets): the object logits from the mean of the connector's output over each object's tokens."""
    import torch

    pixel_values = torch.cat([item[0] for item in items])
    grid = torch.cat([item[1] for item in items])
    # the connector's output, as the LLM would receive it (`get_image_features`), all scales in one tensor
    features = torch.cat(model.get_image_features(pixel_values, grid, return_dict=True).pooler_output)
    targets, offset = [], 0
    for item in items:  # object numbers unique over the batch
        t = item[2].clone()
        t[:, 3] = torch.where(t[:, 3] > 0, t[:, 3] + offset, 0)
        targets.append(t)
        offset += len(item[3])
    targets = torch.cat(targets)
    on = targets[:, 3] > 0
    ids = targets[on, 3] - 1
    sums = features.new_zeros(offset, features.shape[-1]).index_add(0, ids, features[on])
    counts = torch.bincount(ids, minlength=offset).clamp(min=1).unsqueeze(-1)
    token_head, object_head = heads
    return token_head(features), object_head(sums / counts), targets, torch.cat([item[3] for item in items])


def _loss(token_logits, object_logits, targets, object_targets):
    import torch.nn.functional as F

    total = F.cross_entropy(object_logits, object_targets)
    for column, logits in enumerate(token_logits.split(tuple(HEADS.values()), dim=-1)):
        total = total + F.cross_entropy(logits, targets[:, column])
    return total


def token_accuracy(model, heads, items, batch: int = 32) -> dict:
    """Held-out accuracy of the heads: `shape` and `color` over the tokens a shape covers, `background` over
    the others (shape column 0 predicted), `center` over the tokens holding a shape's center, `object` the
    object head's shape over the objects."""
    import torch

    hits = {"shape": [0, 0], "color": [0, 0], "background": [0, 0], "center": [0, 0], "object": [0, 0]}
    with torch.no_grad():
        for start in range(0, len(items), batch):
            token_logits, object_logits, targets, object_targets = _forward(model, heads, items[start : start + batch])
            shape, color, center = (logits.argmax(-1) for logits in token_logits.split(tuple(HEADS.values()), dim=-1))
            on = targets[:, 0] > 0
            for name, mask, right in (
                ("shape", on, shape == targets[:, 0]),
                ("color", on, color == targets[:, 1]),
                ("background", ~on, shape == 0),
                ("center", targets[:, 2] == 1, center == 1),
                (
                    "object",
                    torch.ones_like(object_targets, dtype=torch.bool),
                    object_logits.argmax(-1) == object_targets,
                ),
            ):
                hits[name][0] += int((right & mask).sum())
                hits[name][1] += int(mask.sum())
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
    log=print,
) -> dict:
    """Train the encoder and connector of the NaViL Hub folder `model_dir` for `steps` steps of `batch`
    images of the shapes dataset `data_dir` (its train split; `steps * batch` images at most, drawn at
    random) on the dense targets above, AdamW at `lr` with a linear warm-up and a cosine decay, and write
    the folder with the trained weights (everything else as it was) to `out_dir`. Returns a summary: the
    held-out token accuracy (`token_accuracy`, `test` images of the test split) every `eval_every` steps
    and at the end, the seconds, the output folder. The images are encoded once and held in memory (about
    250 KB each at the demo's image settings: 5 GB for 20000)."""
    import torch
    from transformers import GenerationConfig

    from ..folders import staged_folder
    from ..hub import write_hub_folder
    from ..training.train import load_model, load_processor

    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be positive, got {steps} and {batch}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = load_model(model_dir)
    processor = load_processor(model_dir)
    vision_config = model.config.vision_config
    train_items = encode_images(processor, data_dir, "train", vision_config, count=steps * batch)
    test_items = encode_images(processor, data_dir, "test", vision_config, count=test)
    log(f"vision stage: {len(train_items)} training and {len(test_items)} held-out images encoded "
        f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    inner = model.model
    hidden = model.config.text_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, sum(HEADS.values())), torch.nn.Linear(hidden, len(SHAPES))])
    params = [*inner.vision_model.parameters(), *inner.connector.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def rate(step):  # step counts from 0
        return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    model.train()
    for step in range(1, steps + 1):
        picks = torch.randint(len(train_items), (batch,), generator=generator).tolist()
        loss = _loss(*_forward(model, heads, [train_items[i] for i in picks]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            accuracy = token_accuracy(model, heads, test_items)
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
        f"# NaViL with a pretrained vision side\n\n`{Path(model_dir).name}` with its encoder and connector trained "
        f"alone for {steps} steps on dense shapes-task targets (`navil_hf.tasks.vision_stage`).\n"
    )
    out = Path(out_dir)
    with staged_folder(out, force=True) as tmp:
        write_hub_folder(model, model.config, processor.tokenizer, tmp, processor=processor,
                         generation_config=generation_config, model_card=card)  # fmt: skip
    return {"steps": steps, "batch": batch, "lr": lr, "images": len(train_items), "curve": curve,
            "seconds": round(time.perf_counter() - started, 1), "model_dir": str(out)}  # fmt: skip
