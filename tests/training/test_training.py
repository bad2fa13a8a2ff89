"""`navil train` and its data: the samples are the prompts `chat` builds with labels on the assistant turns;
training runs end to end on Trainer (packed), resumes to the weights of an uninterrupted run, freezes what
the presets say, merges LoRA, writes a Hub folder that loads and chats; user mistakes are one line, exit 2."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from navil_hf.cli import main
from navil_hf.training.data import ConversationDataset, DataError, SampleEncoder, parse_record
from navil_hf.training.parts import PARTS, parameter_part, resolve_parts
from navil_hf.training.train import ConfigError, load_config, load_processor, parse_config, train

from conftest import fixtures_dir

RECORDS = [
    {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/a.png"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A red <image> thing."}]},
    {"image": "img/b.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Blue."},
                                             {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]},
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Two?"}, {"type": "image", "path": "img/a.png"}, {"type": "image", "path": "img/b.png"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Both squares."}]}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, qwen3_folder):
    root = tmp_path_factory.mktemp("train")
    source = fixtures_dir() / "original-qwen3-tiny"
    shutil.copytree(qwen3_folder, root / "hub")
    (root / "data" / "img").mkdir(parents=True)
    Image.open(source / "image0.png").convert("RGB").resize((48, 32)).save(root / "data" / "img" / "a.png")
    Image.open(source / "image1.png").convert("RGB").resize((32, 64)).save(root / "data" / "img" / "b.png")
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


@pytest.fixture(scope="module")
def processor(workdir):
    return load_processor(workdir / "hub")


def _dataset(workdir, processor, **kwargs):
    return ConversationDataset(workdir / "data" / "train.jsonl", SampleEncoder(processor, **kwargs))


def _labelled_text(processor, sample):
    return processor.tokenizer.decode(sample["input_ids"][sample["labels"] != -100])


def test_labels_are_the_assistant_turns(workdir, processor):
    data = _dataset(workdir, processor)
    assert _labelled_text(processor, data[0]) == "A red <image> thing.<|im_end|>"
    assert _labelled_text(processor, data[1]) == "Blue.<|im_end|>No.<|im_end|>"
    assert _labelled_text(processor, data[2]) == "Hi there.<|im_end|>"
    assert _labelled_text(processor, data[3]) == "Both squares.<|im_end|>"
    # The assistant's typed `<image>` is text, not a second image.
    image_context = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((data[0]["input_ids"] == image_context).sum()) == int(data[0]["image_grid_thw"].prod(-1).sum()) // 4


@pytest.mark.parametrize("index", [0, 3])
def test_prompt_is_what_chat_builds(workdir, processor, index):
    """The tokens before the answer are the prompt of `model.chat`'s path: the template on the conversation
    with image items, then the processor on the prompt and images (test_chat checks chat equals this)."""
    sample = _dataset(workdir, processor)[index]
    record = RECORDS[index]
    images = [Image.open(workdir / "data" / item["path"]) for m in record["messages"] if isinstance(m["content"], list)
              for item in m["content"] if item["type"] == "image"]  # fmt: skip
    prompt = processor.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=False)
    expected = processor(text=[prompt], images=[images], return_tensors="pt")
    start = int((sample["labels"] != -100).nonzero()[0])
    assert sample["input_ids"][:start].tolist() == expected["input_ids"][0].tolist()
    assert sample["mm_token_type_ids"][:start].tolist() == expected["mm_token_type_ids"][0].tolist()
    torch.testing.assert_close(sample["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert sample["num_scales"].tolist() == expected["num_scales"].tolist()


def test_train_on_all_labels_everything_but_the_image_layout(workdir, processor):
    sample = _dataset(workdir, processor, train_on="all")[0]
    layout = processor.tokenizer.convert_tokens_to_ids(
        ["<img>", "</img>", "<IMG_CONTEXT>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>"]
    )
    is_layout = torch.isin(sample["input_ids"], torch.tensor(layout))
    assert (sample["labels"][is_layout] == -100).all()
    assert (sample["labels"][~is_layout] == sample["input_ids"][~is_layout]).all()


def test_too_long_samples_are_skipped_with_a_warning(workdir, processor, caplog):
    data = _dataset(workdir, processor, max_length=200)
    lengths = [len(data.encoder(data.conversation(i))["input_ids"]) for i in (2,)]
    assert lengths[0] <= 200
    with caplog.at_level(logging.WARNING, logger="navil_hf.training"):
        sample = data[0]  # too long (its image): the next record that fits is taken
    assert len(sample["input_ids"]) <= 200
    assert "train.jsonl:1: skipped" in caplog.text


def test_llava_images_without_placeholders_go_first(workdir):
    record = {"image": ["img/a.png", "img/b.png"], "conversations": [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]}  # fmt: skip
    conversation = parse_record(record, workdir / "data")
    assert [len(m["images"]) for m in conversation.messages] == [2, 0]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "path": "img/none.png"}]}, {"role": "assistant", "content": "x"}]}, "image not found"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]}, {"role": "assistant", "content": "x"}]}, "is a URL"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "image", "path": "img/a.png"}]}]}, "user messages only"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "needs a role"),
        ({"image": "img/a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]}, "1 images but 2"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}, "needs 'from'"),
        ({"text": "hi"}, "needs 'messages'"),
    ],
)  # fmt: skip
def test_bad_records_name_their_line(tmp_path, workdir, record, message):
    (tmp_path / "img").symlink_to(workdir / "data" / "img")
    (tmp_path / "d.jsonl").write_text("\n" + json.dumps(record) + "\n")
    data = ConversationDataset(tmp_path / "d.jsonl", encoder=None)
    with pytest.raises(DataError, match=message) as error:
        data.conversation(0)
    assert f"{tmp_path / 'd.jsonl'}:2:" in str(error.value)


def test_parts_cover_every_parameter(workdir):
    from modeling_navil import NaViLForConditionalGeneration

    model = NaViLForConditionalGeneration.from_pretrained(workdir / "hub")
    parts = {parameter_part(name) for name, _ in model.named_parameters()}
    assert parts == set(PARTS)
    assert (
        parameter_part("base_model.model.model.language_model.layers.0.mlp_ve.up_proj.lora_A.default.weight")
        == "visual_experts"
    )
    assert parameter_part("model.language_model.layers.3.self_attn.o_proj.weight") == "text"
    assert resolve_parts("stage1") == ("vision", "connector", "special_tokens", "visual_experts")
    with pytest.raises(ValueError, match="unknown part or preset 'ffn'"):
        resolve_parts(["ffn"])


# ------------------------------------------------------------------------------------------------ runs


def _config(workdir, name, **overrides):
    raw = {
        "model": str(workdir / "hub"),
        "output_dir": str(workdir / name),
        "data": {"train": str(workdir / "data" / "train.jsonl")},
        "training": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 2e-3, "logging_steps": 1,
                     "save_steps": 2, "disable_tqdm": True},
    }  # fmt: skip
    for key, value in overrides.items():
        if key == "training":
            raw["training"].update(value)
        else:
            raw[key] = value
    return raw


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.slow
def test_cli_trains_a_hub_folder_that_chats(workdir, capsys):
    config = workdir / "cli.yaml"
    config.write_text(yaml.safe_dump(_config(workdir, "cli-run")))
    assert main(["train", str(config), "--set", "training.max_steps=3"]) == 0
    out = workdir / "cli-run" / "model"
    assert f"trained model: {out}" in capsys.readouterr().out
    assert (
        json.loads((workdir / "cli-run" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())[
            "global_step"
        ]
        == 3
    )
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert model.config.special_token_table == "everywhere"
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    answer = model.chat(processor, "What is it?", images=[Image.open(workdir / "data" / "img" / "a.png")],
                        generation_config=dict(max_new_tokens=3, do_sample=False))  # fmt: skip
    assert isinstance(answer, str)
    before, after = _weights(workdir / "hub"), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # A second run into the same folder needs --resume or --force.
    assert main(["train", str(config)]) == 2
    assert "pass --resume to continue it or --force" in capsys.readouterr().err


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_equals_uninterrupted(workdir):
    straight = train(parse_config(_config(workdir, "straight")), force=True)
    with pytest.raises(_Killed):
        train(parse_config(_config(workdir, "resumed")), force=True, callbacks=[_StopAt(2), _Die()])
    assert (workdir / "resumed" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (workdir / "resumed" / "model").exists()
    resumed = train(parse_config(_config(workdir, "resumed")), resume=True)
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(a[k], _weights(workdir / "hub")[k]) for k in a)


class _Killed(Exception):
    pass


class _Die(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise _Killed("killed after the first checkpoint")


@pytest.mark.slow
def test_stage1_trains_only_the_vision_side(workdir):
    raw = _config(workdir, "stage1", train="stage1", training={"gradient_checkpointing": True})
    result = train(parse_config(raw), force=True)
    before, after = _weights(workdir / "hub"), _weights(result.model_dir)
    changed = {parameter_part(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "connector", "visual_experts"} | ({"special_tokens"} & changed)
    assert result.trainable["text"] == 0 and result.trainable["visual_experts"] > 0


@pytest.mark.slow
def test_learning_rates_per_part(workdir):
    """`learning_rates` gives parts their own rate: a part at 0 does not move while the others (at
    training.learning_rate) do, and the optimizer's groups carry the rates, split by part."""
    seen = {}

    class Groups(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.setdefault("rates", sorted({g["initial_lr"] for g in optimizer.param_groups}))

    raw = _config(
        workdir, "rates", train="full", learning_rates={"connector": 5e-3, "visual_experts": 5e-3, "vision": 0.0}
    )
    result = train(parse_config(raw), force=True, callbacks=[Groups()])
    before, after = _weights(workdir / "hub"), _weights(result.model_dir)
    changed = {parameter_part(k) for k in before if not torch.equal(before[k], after[k])}
    assert "vision" not in changed and {"connector", "visual_experts", "text"} <= changed
    assert seen["rates"] == [0.0, raw["training"]["learning_rate"], 5e-3]


@pytest.mark.slow
def test_bf16_trains_on_cpu(workdir):
    """`training.bf16` without a GPU is CPU autocast (transformers refuses it unless told use_cpu)."""
    result = train(parse_config(_config(workdir, "bf16", training={"bf16": True, "max_steps": 2})), force=True)
    before, after = _weights(workdir / "hub"), _weights(result.model_dir)
    assert all(after[k].dtype == before[k].dtype for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_image_settings_are_trained_with_and_saved(workdir):
    """`data.images` is what the samples were encoded with and what the trained folder's processor
    keeps: loaded back (ours and through AutoProcessor), it encodes an image as training did, not as the
    source folder's processor does."""
    from transformers import AutoProcessor

    seen = {}

    class FirstSample(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen["sample"] = train_dataloader.dataset[0]  # record 0: one image (48x32)

    images = {"min_pixels": 4096, "max_pixels": 8192}
    raw = _config(workdir, "images", training={"max_steps": 2})
    raw["data"]["images"] = images
    result = train(parse_config(raw), force=True, callbacks=[FirstSample()])
    trained = seen["sample"]
    source = _dataset(workdir, load_processor(workdir / "hub"))[0]
    assert source["pixel_values"].shape != trained["pixel_values"].shape  # the settings change the encoding
    assert len(source["input_ids"]) != len(trained["input_ids"])
    saved = json.loads((result.model_dir / "processor_config.json").read_text())["image_processor"]
    assert {key: saved[key] for key in images} == images
    for loaded in (
        load_processor(result.model_dir),
        AutoProcessor.from_pretrained(result.model_dir, trust_remote_code=True),
    ):
        assert {key: getattr(loaded.image_processor, key) for key in images} == images
        sample = _dataset(workdir, loaded)[0]
        assert sample["input_ids"].tolist() == trained["input_ids"].tolist()
        torch.testing.assert_close(sample["pixel_values"], trained["pixel_values"], rtol=0, atol=0)
        assert sample["image_grid_thw"].tolist() == trained["image_grid_thw"].tolist()


@pytest.mark.slow
def test_lora_is_merged_into_the_hub_folder(workdir):
    lora = {"r": 4, "alpha": 8, "parts": ["text"]}
    result = train(parse_config(_config(workdir, "lora", train=["connector"], lora=lora)), force=True)
    before, after = _weights(workdir / "hub"), _weights(result.model_dir)
    assert before.keys() == after.keys()  # merged: no adapter tensors, the same names
    changed = {parameter_part(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"text", "connector"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(modle="x"), "unknown config key modle"),
        (lambda c: c.pop("model"), "needs 'model'"),
        (lambda c: c["data"].update(format="csv"), "data.format must be one of"),
        (lambda c: c["data"].update(images={"max_pixel": 4096}), "unknown data.images key max_pixel (known: "),
        (lambda c: c["data"].update(images=[4096]), "data.images must be a mapping"),
        (
            lambda c: c["data"].update(images={"min_pixels": 8192, "max_pixels": 4096}),
            "data.images: need 0 < min_pixels",
        ),
        (lambda c: c.update(train="vision_tower"), "unknown part or preset 'vision_tower'"),
        (lambda c: c.update(lora={"rank": 4}), "unknown lora key rank"),
        (lambda c: c.update(learning_rates={"vision": "fast"}), "learning_rates.vision must be a number"),
        (lambda c: c.update(learning_rates={"stage1": 1e-3, "vision": 2e-3}), "two rates"),
        (lambda c: c.update(learning_rates={"vit": 1e-3}), "unknown part or preset 'vit'"),
        (lambda c: c["training"].update(learning_rat=1), "training: "),
        (lambda c: c["data"].update(streaming=True) or c["training"].pop("max_steps"), "needs training.max_steps"),
    ],
)
def test_config_mistakes_are_one_line(workdir, capsys, edit, message):
    raw = _config(workdir, "bad")
    edit(raw)
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_data_and_model_are_one_line(workdir, capsys, tmp_path):
    raw = _config(workdir, "bad2")
    raw["data"]["train"] = str(tmp_path / "none.jsonl")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "no such data file" in capsys.readouterr().err
    raw = _config(workdir, "bad3", model=str(fixtures_dir() / "original-qwen3-tiny" / "checkpoint"))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "d.yaml")]) == 2
    assert "original NaViL checkpoint: convert it first" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert main(["train", str(tmp_path / "d.yaml"), "--resume", "--force"]) == 2


def test_load_config_overrides_and_relative_paths(tmp_path):
    (tmp_path / "c.yaml").write_text("model: hub\noutput_dir: out\ndata: {train: d.jsonl}\n")
    config = load_config(tmp_path / "c.yaml", ["training.max_steps=7", "packing=false"])
    assert config.model == str(tmp_path / "hub") and config.data.train == [str(tmp_path / "d.jsonl")]
    assert config.training == {"max_steps": 7} and config.packing is False
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(tmp_path / "c.yaml", ["nothing"])
