"""The vision stage of the shapes curriculum (`navil_hf.tasks.vision_stage`): the dense per-token targets
(`shapes.token_targets`) say what lies under each merged token, they follow the order in which the connector
hands tokens over (window or raster), and training it changes the vision side and nothing else; through the
LLM (`through_llm`), the LLM's image states are those of each image alone, and it changes the LLM's visual
path too."""

import json
import shutil

import numpy as np
import pytest
import torch

from navil_hf.tasks.shapes import PALETTE, SHAPES, make_shapes_dataset, token_targets
from navil_hf.tasks.vision_stage import (
    HEADS,
    _llm_image_states,
    encode_images,
    place_loss,
    place_targets,
    train_vision_stage,
)
from navil_hf.training.parts import parameter_part
from navil_hf.training.train import (
    ConfigError,
    apply_image_settings,
    load_model,
    load_processor,
    parse_config,
    train,
)

RED, BLUE = 1 + list(PALETTE).index("red"), 1 + list(PALETTE).index("blue")
SQUARE, CIRCLE = 1 + SHAPES.index("square"), 1 + SHAPES.index("circle")


def _record():
    """A 128x96 image: a red 64-px square in the top left 2x2 tokens, a blue 64-px circle in the bottom right
    2x2 tokens of the 3x4 grid of 32-px tokens (each of those tokens pi/4 covered)."""
    square = {"shape": "square", "color": "red", "center": [32, 32], "size": 64, "bbox": [0, 0, 63, 63]}
    circle = {"shape": "circle", "color": "blue", "center": [96, 64], "size": 64, "bbox": [64, 32, 127, 95]}
    return {"image_size": [128, 96], "shapes": [square, circle]}


def test_token_targets_say_what_lies_under_each_token():
    targets = token_targets(_record(), 3, 4).reshape(3, 4, 4)
    shape = np.array([[SQUARE, SQUARE, 0, 0], [SQUARE, SQUARE, CIRCLE, CIRCLE], [0, 0, CIRCLE, CIRCLE]])
    np.testing.assert_array_equal(targets[..., 0], shape)
    np.testing.assert_array_equal(targets[..., 1], np.where(shape == SQUARE, RED, np.where(shape == CIRCLE, BLUE, 0)))
    np.testing.assert_array_equal(targets[..., 3], np.where(shape == SQUARE, 1, np.where(shape == CIRCLE, 2, 0)))
    centers = np.zeros((3, 4), dtype=int)
    centers[1, 1] = centers[2, 3] = 1  # (32, 32) and (96, 64)
    np.testing.assert_array_equal(targets[..., 2], centers)
    # a finer grid over the same image: each 32-px token's labels on its 2x2 16-px tokens
    fine = token_targets(_record(), 6, 8).reshape(6, 8, 4)
    for column in (0, 1, 3):
        coarse = np.kron(targets[..., column], np.ones((2, 2), dtype=int))
        # a circle's corner tokens (outside the circle) are background at 16 px
        inside = (coarse == fine[..., column]) | ((coarse > 0) & (fine[..., column] == 0))
        assert inside.all()
        assert (fine[..., column] == coarse).sum() >= 44  # only the circle's 4 corner tokens differ
    assert fine[..., 2].sum() == 2


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision-stage") / "data"
    make_shapes_dataset(out, train=8, test=4, seed=5)
    return out


def test_targets_follow_the_connector_order(tmp_path, qwen3_folder, shapes_data):
    """The same weights in window and raster token order emit the same tokens in two orders; the targets
    `encode_images` pairs with each order must pair every token with the same target."""
    raster = tmp_path / "raster"
    shutil.copytree(qwen3_folder, raster)
    config = json.loads((raster / "config.json").read_text())
    assert config["vision_config"].get("token_order", "window") == "window"
    config["vision_config"]["token_order"] = "raster"
    (raster / "config.json").write_text(json.dumps(config))
    pairs = {}
    for folder in (qwen3_folder, raster):
        model = load_model(folder).eval()
        # large enough that a merged grid spans several 4x4-token windows
        processor = apply_image_settings(load_processor(folder), {"min_pixels": 256 * 256, "max_pixels": 320 * 320})
        items = encode_images(processor, shapes_data, "test", model.config.vision_config)
        with torch.no_grad():
            features = [torch.cat(model.model.get_image_features(item[0], item[1], return_dict=True).pooler_output)
                        for item in items]  # fmt: skip
        pairs[folder.name] = [(f, item[2]) for f, item in zip(features, items)]
    moved = checked = 0
    for (window_features, window_targets), (raster_features, raster_targets) in zip(*pairs.values()):
        assert window_features.shape == raster_features.shape and window_targets.shape[0] == len(window_features)
        distance = torch.cdist(window_features, raster_features, compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distance.topk(2, largest=False)
        (best, second), match = nearest.values.T, nearest.indices[:, 0]
        assert (best < 1e-6).all()  # every window token is some raster token
        # tokens over uniform background can be near twins: pair only the unambiguous ones
        sure = second > 1e-2
        # the shape, color, center and the place (column, row) of the image region each token holds
        columns = [0, 1, 2, 4, 5]
        torch.testing.assert_close(window_targets[sure][:, columns], raster_targets[match[sure]][:, columns],
                                   rtol=0, atol=0)  # fmt: skip
        moved += int((match[sure] != torch.arange(len(match))[sure]).sum())
        checked += int(sure.sum())
    assert checked > 0.3 * sum(len(f) for f, _ in pairs[qwen3_folder.name])
    assert moved > 0  # the orders differ: the check above could fail


def test_vision_stage_trains_the_vision_side_only(tmp_path, qwen3_folder, shapes_data):
    messages = []
    summary = train_vision_stage(qwen3_folder, shapes_data, tmp_path / "out", steps=3, batch=2, lr=1e-3,
                                 eval_every=2, test=2, log=messages.append)  # fmt: skip
    assert [point["step"] for point in summary["curve"]] == [2, 3] and summary["images"] == 6
    assert set(summary["curve"][-1]) >= {"shape", "color", "background", "center", "object", "loss"}
    assert any(m.startswith("vision stage step 3:") for m in messages)
    before, after = load_model(qwen3_folder).state_dict(), load_model(summary["model_dir"]).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.vision_model.", "model.connector.")) for k in changed)
    assert any(k.startswith("model.connector.") for k in changed)
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        if (qwen3_folder / name).is_file():
            assert (tmp_path / "out" / name).read_bytes() == (qwen3_folder / name).read_bytes(), name
    with pytest.raises(ValueError, match="positive"):
        train_vision_stage(qwen3_folder, shapes_data, tmp_path / "bad", steps=0)
    assert sum(HEADS.values()) == 13


def test_vision_stage_through_the_llm(tmp_path, qwen3_folder, shapes_data):
    """`through_llm`: the LLM's states at the image slots of a right-padded batch are those of each image
    alone; the place targets count columns and rows of the raster grid; training changes the vision side and
    the LLM's visual path (experts, special-token rows) and nothing else; a model without experts is refused."""
    model = load_model(qwen3_folder).eval()
    processor = apply_image_settings(load_processor(qwen3_folder), {"min_pixels": 128 * 128, "max_pixels": 256 * 256})
    items = encode_images(processor, shapes_data, "test", model.config.vision_config)
    assert len({len(item[4]) for item in items}) > 1  # the batch pads
    with torch.no_grad():
        pixels, grid = torch.cat([item[0] for item in items]), torch.cat([item[1] for item in items])
        together, features = _llm_image_states(model, pixels, grid, items, 1)
        alone = torch.cat([_llm_image_states(model, item[0], item[1], [item], 1)[0] for item in items])
        connector = torch.cat(model.model.get_image_features(pixels, grid, return_dict=True).pooler_output)
    torch.testing.assert_close(features, connector, rtol=0, atol=0)
    assert together.shape == (sum(len(item[2]) for item in items), model.config.text_config.hidden_size)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    raster = load_model(qwen3_folder).config.vision_config
    raster.token_order = "raster"
    for item in encode_images(processor, shapes_data, "test", raster):
        merge, start = raster.spatial_merge_size, 0
        for _, h, w in item[1].tolist():
            index = torch.arange((h // merge) * (w // merge))
            width = w // merge
            column, row = index % width, index // width
            half = torch.where(2 * column + 1 < width, 0, torch.where(2 * column + 1 > width, 1, -100))
            half[row == 0] = -100  # the first row: the causal LLM has not seen a row's length yet
            place = item[2][start : start + len(index), 4:]
            torch.testing.assert_close(place, torch.stack([column.clamp(max=15), row.clamp(max=15), half], 1))
            start += len(index)
    summary = train_vision_stage(qwen3_folder, shapes_data, tmp_path / "out", steps=2, batch=2, lr=1e-3,
                                 eval_every=2, test=2, through_llm=1, log=lambda m: None)  # fmt: skip
    assert summary["through_llm"] and {"column", "row", "half", "llm_shape", "llm_object"} <= set(summary["curve"][-1])
    before, after = load_model(qwen3_folder).state_dict(), load_model(summary["model_dir"]).state_dict()
    changed = {parameter_part(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "connector", "visual_experts", "special_tokens"}
    plain = tmp_path / "plain"
    shutil.copytree(qwen3_folder, plain)
    config = json.loads((plain / "config.json").read_text())
    config["text_config"]["visual_experts"] = False
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has none"):
        train_vision_stage(plain, shapes_data, tmp_path / "bad", steps=1, through_llm=1)
    with pytest.raises(ValueError, match="count of decoder layers"):
        train_vision_stage(qwen3_folder, shapes_data, tmp_path / "bad", steps=1, through_llm=99)


def test_place_loss_in_the_llm_stage(tmp_path, qwen3_folder, shapes_data):
    """The place loss pairs every image slot of a training batch with the place of the region its token holds
    (the vision stage's targets, in the connector's order), its head trains along, at weight 0 the trained
    model is bit for bit the one trained without it, and the saved folder holds the model's weights only."""
    config = load_model(qwen3_folder).config
    processor = load_processor(qwen3_folder)
    items = encode_images(processor, shapes_data, "train", config.vision_config)
    grid = torch.cat([item[1] for item in items])
    module = place_loss(config, 1)
    torch.testing.assert_close(module.targets(grid), torch.cat([item[2][:, 4:] for item in items]), rtol=0, atol=0)
    assert place_targets(3, 4, config.vision_config).shape == (12, 3)

    def run(name, auxiliary):
        raw = {"model": str(qwen3_folder), "output_dir": str(tmp_path / name), "train": "full", "seed": 0,
               "data": {"train": str(shapes_data / "train.jsonl")},
               "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                            "save_steps": 3, "disable_tqdm": True}}  # fmt: skip
        return load_model(train(parse_config(raw), force=True, auxiliary_loss=auxiliary).model_dir).state_dict()

    plain = run("plain", None)
    zero = run("zero", place_loss(config, 1, weight=0.0))
    head = module.head.weight.detach().clone()
    placed = run("placed", module)
    assert plain.keys() == zero.keys() == placed.keys()
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=0, atol=0, msg=key)
    changed = {parameter_part(k) for k in plain if not torch.equal(plain[k], placed[k])}
    assert {"visual_experts", "text"} <= changed  # the place term reaches the LLM's first layer
    assert not torch.equal(head, module.head.weight)  # the head trained along
    with pytest.raises(ValueError, match="1 to"):
        place_loss(config, config.text_config.num_hidden_layers + 1)
    raw = {"model": str(qwen3_folder), "output_dir": str(tmp_path / "accumulated"),
           "data": {"train": str(shapes_data / "train.jsonl")},
           "training": {"max_steps": 1, "gradient_accumulation_steps": 2}}  # fmt: skip
    with pytest.raises(ConfigError, match="without gradient accumulation"):
        train(parse_config(raw), auxiliary_loss=module)
    with pytest.raises(ConfigError, match="resume"):
        train(parse_config(raw), resume=True, auxiliary_loss=module)
