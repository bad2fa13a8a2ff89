"""A NaViL-2B-like checkpoint whose tokenizer is a SentencePiece `tokenizer.model` with InternLM2's remote
code (SPEC §9) converts with our own tokenizer class, never the checkpoint's code; the converted folder
tokenizes by the rules, loads through AutoProcessor/AutoModel, chats, and converts back with the
original's tokenizer files."""

import json

import pytest
import torch

pytest.importorskip("sentencepiece")

from spm_fixtures import train_model, write_original_folder

from navil_hf.cli import main as navil
from navil_hf.conversion import convert_checkpoint, convert_to_original
from tokenization_navil import ids_by_the_rules, load_sentencepiece

from conftest import copy_checkpoint

VOCAB = 396  # the internlm2 fixture model's embedding rows


@pytest.fixture(scope="module")
def sentencepiece_checkpoint(tmp_path_factory):
    """The internlm2 fixture checkpoint with a trained SentencePiece tokenizer in the original layout:
    380 pieces, then NaViL's 12 tokens (ids 380..391, inside the model's 396 rows)."""
    root = tmp_path_factory.mktemp("spm")
    source = root / "NaViL-2B-like"
    copy_checkpoint("internlm2", source)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).unlink(missing_ok=True)
    model = train_model(root / "spm.model", vocab_size=380, seed=3)
    write_original_folder(source, model)  # with a tokenization_internlm2.py stub that raises if imported
    return source


def test_converts_with_our_tokenizer_and_tokenizes_by_the_rules(sentencepiece_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert navil(["convert", str(sentencepiece_checkpoint), str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "our InternLM2 SentencePiece tokenizer" in printed and "identical logits" in printed
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_navil.NaViLInternLM2Tokenizer"
    assert (out / "tokenization_navil.py").is_file() and not (out / "tokenization_internlm2.py").exists()

    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    tokenizer = processor.tokenizer
    assert type(tokenizer).__name__ == "NaViLInternLM2Tokenizer"
    sp = load_sentencepiece(str(out / "tokenizer.model"))
    added = dict(tokenizer.added_tokens_encoder)  # split on every added token, as the original
    for text in ("Hello world", "a<img>b", "\n", "<|im_start|>user\nWhat is 1+1?<|im_end|>"):
        assert tokenizer.encode(text) == ids_by_the_rules(text, sp, added, bos_id=1), text
    assert tokenizer.decode(tokenizer.encode("a<img>b"), skip_special_tokens=True) == "a <img> b"

    model = AutoModel.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    answer = model.chat(processor, "Hello, who are you?", generation_config={"max_new_tokens": 4, "do_sample": False})
    assert isinstance(answer, str)


def test_back_conversion_writes_the_original_tokenizer_files(sentencepiece_checkpoint, tmp_path):
    out, back = tmp_path / "out", tmp_path / "back"
    convert_checkpoint(sentencepiece_checkpoint, out)
    convert_to_original(out, back, progress=False)
    assert (back / "tokenizer.model").read_bytes() == (sentencepiece_checkpoint / "tokenizer.model").read_bytes()
    config = json.loads((back / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
    assert config.get("add_bos_token") is True
    assert not list(back.glob("*_navil.py"))
