"""`tokenization_navil.NaViLInternLM2Tokenizer` against SPEC.md §9, on small InternLM2-style SentencePiece models
(tests/spm_fixtures.py): expected ids and texts come from the rules, run with `sentencepiece` directly on each
chunk (the references below), or are written out by hand -- never from the class under test.

Two trained models (vocabulary 400 and 600, different training corpora), each in two folder layouts: the chat
pieces also listed as added/extra special tokens (as InternLM2-chat folders have them) or only inside the
SentencePiece vocabulary.
"""

import importlib.util
import json
import pickle
import random
import shutil
import sys
from pathlib import Path

import pytest
from spm_fixtures import CHAT_PIECES, folder_added_tokens, train_model, write_original_folder

from configuration_navil import SPECIAL_TOKENS

# The NaViL-2B tokenizer runs on the sentencepiece package (setup.py's extras must carry it for these to run).
sentencepiece = pytest.importorskip("sentencepiece", reason="the NaViL-2B tokenizer needs sentencepiece")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = {"v400": (400, 0), "v600": (600, 1)}
LAYOUTS = {"chat-added": True, "chat-in-spm-only": False}

# transformers' clean-up of spaces before punctuation, as listed in SPEC §9 and 4.51's `clean_up_tokenization`.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    return {name: train_model(root / f"{name}.model", size, seed) for name, (size, seed) in MODELS.items()}


@pytest.fixture(scope="module")
def folders(model_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    return {
        (model, layout): write_original_folder(root / f"{model}-{layout}", path, chat_tokens_added=added)
        for model, path in model_paths.items()
        for layout, added in LAYOUTS.items()
    }


@pytest.fixture(params=[(m, lay) for m in MODELS for lay in LAYOUTS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, folders):
    """(folder, tokenizer loaded from it by our class, SentencePiece processor, the folder's added tokens)."""
    from tokenization_navil import NaViLInternLM2Tokenizer

    folder = folders[request.param]
    tokenizer = NaViLInternLM2Tokenizer.from_pretrained(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return folder, tokenizer, sp, folder_added_tokens(folder)


def _probe_corpus():
    from tokenization_navil import PROBE_CORPUS

    return PROBE_CORPUS


# ---------------------------------------------------------------------------------------------------------------
# The rules, with sentencepiece alone (independent of tokenization_navil's own helpers)


def rules_split(text, added):
    """Leftmost-longest cut at the added tokens, scanning one character at a time."""
    by_length = sorted(added, key=len, reverse=True)
    chunks, text_run, i = [], "", 0
    while i < len(text):
        hit = next((t for t in by_length if text.startswith(t, i)), None)
        if hit is None:
            text_run += text[i]
            i += 1
            continue
        if text_run:
            chunks.append((text_run, False))
            text_run = ""
        chunks.append((hit, True))
        i += len(hit)
    if text_run:
        chunks.append((text_run, False))
    return chunks


def rules_encode(text, sp, added, bos=True):
    ids = [1] if bos else []  # <s> is SentencePiece id 1
    for chunk, is_added in rules_split(text, added):
        ids += [added[chunk]] if is_added else sp.encode(chunk)
    return ids


def clean_up(text):
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


def rules_decode(ids, sp, added, specials, extra_specials=(), skip=False, spaces=True):
    """SPEC §9 decode: specials = bos/eos/unk/pad + the extra special tokens (named by the folder)."""
    by_id = {i: t for t, i in added.items()}
    tokens = [by_id[i] if i in by_id else sp.id_to_piece(i) for i in ids]
    if skip:
        tokens = [t for t in tokens if t not in specials]
    spaced = {t for t in added if t not in specials}
    spaced |= {t for t in extra_specials if added.get(t, -1) >= sp.get_piece_size()}

    def text_of(run):
        out, pieces, after_special = "", [], False
        for t in run:
            if t in specials:
                out += ("" if after_special else " ") + sp.decode(pieces) + t
                pieces, after_special = [], True
            else:
                pieces.append(t)
                after_special = False
        return clean_up(out + sp.decode(pieces))

    texts, run = [], []
    for t in tokens:
        if t in spaced:
            if run and text_of(run):
                texts.append(text_of(run))
            run = []
            texts.append(t)
        else:
            run.append(t)
    if run:
        texts.append(text_of(run))
    return (" " if spaces else "").join(texts)


def specials_of(folder):
    config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    extra = config.get("additional_special_tokens", [])
    return {"<s>", "</s>", "<unk>", *extra}, extra


# ---------------------------------------------------------------------------------------------------------------
# The fixture models are InternLM2-like


def test_fixture_models_have_internlm2_settings(model_paths):
    """byte fallback, digits split, dummy prefix, whitespace kept, ids 0/1/2, chat pieces as user-defined symbols."""
    pytest.importorskip("google.protobuf", reason="reading the model proto needs protobuf")
    from sentencepiece import sentencepiece_model_pb2

    for path in model_paths.values():
        proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
        assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
        assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
        assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
        user_defined = {p.piece for p in proto.pieces if p.type == p.USER_DEFINED}
        assert set(CHAT_PIECES) <= user_defined
    sizes = {sentencepiece.SentencePieceProcessor(model_file=str(p)).get_piece_size() for p in model_paths.values()}
    assert sizes == {400, 600}


def test_original_folder_layout(folders):
    """NaViL's 12 right after the SentencePiece vocabulary, special, not additional special tokens."""
    for (model, _), folder in folders.items():
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
        size = MODELS[model][0]
        entries = {entry["content"]: (int(i), entry["special"]) for i, entry in config["added_tokens_decoder"].items()}
        assert [entries[t] for t in SPECIAL_TOKENS] == [(size + k, True) for k in range(12)]
        assert not set(SPECIAL_TOKENS) & set(config.get("additional_special_tokens", []))


def test_navil_tokens_constant_is_configuration_navil_special_tokens():
    from tokenization_navil import NAVIL_TOKENS

    assert NAVIL_TOKENS == SPECIAL_TOKENS


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def test_encode_hand_written(case):
    """`"a<img>b"` -> `<s> ▁a <img> ▁b`; `"\\n"` -> `<s> ▁ <0x0A>`; no `<s>` without special tokens."""
    folder, tokenizer, sp, added = case
    assert sp.encode("a", out_type=str) == ["▁a"] and sp.encode("b", out_type=str) == ["▁b"]
    pid = sp.piece_to_id
    img = added["<img>"]
    assert tokenizer.encode("a<img>b") == [1, pid("▁a"), img, pid("▁b")]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a<img>b")) == ["<s>", "▁a", "<img>", "▁b"]
    assert tokenizer.encode("\n") == [1, pid("▁"), pid("<0x0A>")]
    assert tokenizer.encode("a<img>b", add_special_tokens=False) == [pid("▁a"), img, pid("▁b")]
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode("", add_special_tokens=False) == []
    # each chunk after an added token gets the dummy prefix again
    assert tokenizer.encode("<img>\n<img>", add_special_tokens=False) == [img, pid("▁"), pid("<0x0A>"), img]
    assert tokenizer.encode("a <img> b", add_special_tokens=False) == [*sp.encode("a "), img, *sp.encode(" b")]
    # a chat piece is one id whether the folder splits on it or SentencePiece emits it
    assert pid("<|im_start|>") in tokenizer.encode("x<|im_start|>y")
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) in ([3], [pid("▁"), 3])
    assert tokenizer("a<img>b")["input_ids"] == tokenizer.encode("a<img>b")
    assert "token_type_ids" not in tokenizer("a")


def test_encode_chat_markers_follow_the_folder(case):
    """Listed as added tokens, `<|im_start|>` splits the text (the next chunk gets `▁`); only inside the
    SentencePiece vocabulary, SentencePiece emits it within one chunk."""
    folder, tokenizer, sp, added = case
    ids = tokenizer.encode("<|im_start|>user\nhi", add_special_tokens=False)
    if "<|im_start|>" in added:
        assert ids == [3, *sp.encode("user\nhi")]
    else:
        assert ids == sp.encode("<|im_start|>user\nhi")


def test_encode_probe_corpus_by_the_rules(case):
    folder, tokenizer, sp, added = case
    corpus = _probe_corpus()
    assert len(corpus) > 100
    for text in corpus:
        assert tokenizer.encode(text) == rules_encode(text, sp, added), text
        assert tokenizer.encode(text, add_special_tokens=False) == rules_encode(text, sp, added, bos=False), text
    # and random strings built from the corpus's characters and the tokens
    rng = random.Random(0)
    alphabet = list(set("".join(corpus))) + list(added) * 3 + [" ", "  ", "\n"] * 5
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tokenizer.encode(text) == rules_encode(text, sp, added), text


def test_probe_corpus_covers_the_cases():
    corpus = _probe_corpus()
    joined = "".join(corpus)
    assert "" in corpus and "\n" in corpus and "\t" in joined and "   " in joined
    assert any(t.startswith(" ") for t in corpus) and any(t.endswith(" ") for t in corpus)
    assert any(c.isdigit() for c in joined) and "中" in joined and "🙂" in joined
    for token in SPECIAL_TOKENS:
        assert f"a{token}b" in corpus and f"a {token} b" in corpus
    assert any("<|im_start|>user\n" in t and "<|im_end|>" in t for t in corpus)
    assert all(p in joined for p in (" ,", " ?", " .", " !", " 's", " n't", " 'm", " 've", " 're"))


def test_user_added_tokens_split_too(case):
    folder, tokenizer, sp, added = case
    tokenizer.add_tokens(["<new_tok>"])
    new = tokenizer.convert_tokens_to_ids("<new_tok>")
    assert new == max(added.values()) + 1
    assert tokenizer.encode("x<new_tok>y", add_special_tokens=False) == [*sp.encode("x"), new, *sp.encode("y")]
    assert tokenizer.decode(tokenizer.encode("x<new_tok>y"), skip_special_tokens=True) == "x <new_tok> y"


def test_add_bos_token_false_and_add_eos_token(folders, tmp_path):
    from tokenization_navil import NaViLInternLM2Tokenizer

    folder = shutil.copytree(folders[("v400", "chat-added")], tmp_path / "f")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = NaViLInternLM2Tokenizer.from_pretrained(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tokenizer.encode("a") == [*sp.encode("a"), 2]
    assert tokenizer.get_special_tokens_mask(sp.encode("a b")) == [0] * len(sp.encode("a b")) + [1]
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = NaViLInternLM2Tokenizer.from_pretrained(tmp_path / "saved")
    assert (reloaded.add_bos_token, reloaded.add_eos_token) == (False, True)
    assert reloaded.encode("a") == [*sp.encode("a"), 2]


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_hand_written(case):
    """The texts SPEC §9 gives, written out."""
    folder, tokenizer, sp, added = case
    chat_special = "<|im_start|>" in added

    def both(text):
        ids = tokenizer.encode(text)
        return tokenizer.decode(ids, skip_special_tokens=False), tokenizer.decode(ids, skip_special_tokens=True)

    assert both("a<img>b") == (" <s>a <img> b", "a <img> b")
    assert tokenizer.decode(tokenizer.encode("a<img>b", add_special_tokens=False)) == "a <img> b"
    assert both("a<img><IMG_CONTEXT></img>b") == (
        " <s>a <img> <IMG_CONTEXT> </img> b",
        "a <img> <IMG_CONTEXT> </img> b",
    )
    assert both("<img>") == (" <s> <img>", "<img>")
    assert both("\n") == (" <s>\n", "\n")
    assert both("Hello , world ? it 's ok .") == (" <s>Hello, world? it's ok.", "Hello, world? it's ok.")
    assert both("do n't , I 'm , we 've , they 're !") == (
        " <s>don't, I'm, we've, they're!",
        "don't, I'm, we've, they're!",
    )
    assert both("a ' b don 't") == (" <s>a'b don 't", "a'b don 't")  # " ' " goes, " 't" is not in the list
    # the clean-up runs on SentencePiece text only, not across the spaces that join added tokens
    assert both("x<box> , y</box>") == (" <s>x <box> , y </box>", "x <box> , y </box>")
    # a space goes before the text that precedes a special token (unless a special token came just before)
    assert both("hi</s>") == (" <s> hi</s>", "hi")
    assert both("<s></s>") == (" <s><s></s>", "")
    if chat_special:
        assert both("<|im_start|>user\nhi<|im_end|>") == (" <s><|im_start|> user\nhi<|im_end|>", "user\nhi")
    else:
        assert both("<|im_start|>user\nhi<|im_end|>") == (
            " <s><|im_start|>user\nhi<|im_end|>",
            "<|im_start|>user\nhi<|im_end|>",
        )
    # a run of pieces whose text is empty (a lone `▁`) is dropped between added tokens, kept at the end
    img, blank = added["<img>"], sp.piece_to_id("▁")
    assert sp.decode(["▁"]) == ""
    assert tokenizer.decode([img, blank, img]) == "<img> <img>"
    assert tokenizer.decode([sp.piece_to_id("▁a"), img, blank]) == "a <img> "
    assert tokenizer.decode([]) == ""
    assert tokenizer.decode(added["<img>"]) == "<img>"
    assert tokenizer.decode(1) == " <s>" and tokenizer.decode(1, skip_special_tokens=True) == ""
    ids = tokenizer.encode("a<img>b , c")
    assert tokenizer.decode(ids, skip_special_tokens=True, spaces_between_special_tokens=False) == "a<img>b, c"
    assert tokenizer.decode(tokenizer.encode("a<img> , b"), skip_special_tokens=True) == "a <img> , b"
    assert tokenizer.decode(
        tokenizer.encode("a<img> , b"), skip_special_tokens=True, clean_up_tokenization_spaces=True
    ) == ("a <img>, b")
    assert tokenizer.batch_decode([tokenizer.encode("a<img>b")] * 2, skip_special_tokens=True) == ["a <img> b"] * 2


def test_navil_tokens_survive_skip_special_tokens(case):
    folder, tokenizer, sp, added = case
    assert not set(SPECIAL_TOKENS) & set(tokenizer.all_special_tokens)
    assert all(added[t] >= tokenizer.vocab_size for t in SPECIAL_TOKENS)
    ids = [added[t] for t in SPECIAL_TOKENS]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(SPECIAL_TOKENS)


def test_decode_by_the_rules(case):
    """Every probe text, and random id sequences over the whole vocabulary, in both skip modes and both joins."""
    folder, tokenizer, sp, added = case
    specials, extra = specials_of(folder)
    assert set(tokenizer.all_special_tokens) == specials | {"</s>"}
    sequences = [rules_encode(text, sp, added) for text in _probe_corpus()]
    rng = random.Random(1)
    size = len(tokenizer)
    sequences += [[rng.randrange(size) for _ in range(rng.randint(1, 25))] for _ in range(300)]
    for ids in sequences:
        for skip in (False, True):
            for spaces in (True, False):
                expected = rules_decode(ids, sp, added, specials, extra, skip=skip, spaces=spaces)
                got = tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
                assert got == expected, (ids, skip, spaces)


def test_extra_special_tokens_beyond_the_vocabulary(folders, tmp_path):
    """A folder that lists NaViL's tokens as additional special tokens (InternVL-style): skipped with
    skip_special_tokens, otherwise joined with spaces like added tokens (4.51's rule for special tokens whose id
    is past the SentencePiece vocabulary)."""
    from tokenization_navil import NaViLInternLM2Tokenizer

    folder = shutil.copytree(folders[("v600", "chat-added")], tmp_path / "f")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [*CHAT_PIECES, "<img>", "</img>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = NaViLInternLM2Tokenizer.from_pretrained(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = folder_added_tokens(folder)
    ids = tokenizer.encode("a<img><IMG_CONTEXT></img>b")
    assert ids == rules_encode("a<img><IMG_CONTEXT></img>b", sp, added)
    assert tokenizer.decode(ids) == " <s>a <img> <IMG_CONTEXT> </img> b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a <IMG_CONTEXT> b"
    specials = {"<s>", "</s>", "<unk>", *config["additional_special_tokens"]}
    for text in _probe_corpus():
        ids = tokenizer.encode(text)
        for skip in (False, True):
            expected = rules_decode(ids, sp, added, specials, config["additional_special_tokens"], skip=skip)
            assert tokenizer.decode(ids, skip_special_tokens=skip) == expected, text


def test_clean_up_is_transformers_clean_up_tokenization(case):
    from tokenization_navil import clean_up_spaces

    folder, tokenizer, sp, added = case
    text = "a , b . c ? d ! e ' f it 's do n't I 'm we 've they 're don 't"
    assert clean_up_spaces(text) == tokenizer.clean_up_tokenization(text) == clean_up(text)
    assert tokenizer.clean_up_tokenization_spaces is False


# ---------------------------------------------------------------------------------------------------------------
# The converter's check


def test_check_against_sentencepiece_passes(case):
    from tokenization_navil import PROBE_CORPUS, check_against_sentencepiece

    folder, tokenizer, sp, added = case
    summary = check_against_sentencepiece(tokenizer, folder / "tokenizer.model", added_tokens=added)
    assert f"{len(PROBE_CORPUS)} probe texts" in summary
    assert check_against_sentencepiece(tokenizer)  # its own vocab_file and added tokens


def test_check_against_sentencepiece_names_the_first_mismatch(case):
    from tokenization_navil import check_against_sentencepiece

    folder, tokenizer, sp, added = case
    # a tokenizer that does not re-add the dummy prefix after an added token
    tokenizer._tokenize = lambda text, **kw: sp.encode("\n" + text, out_type=str)[2:]
    with pytest.raises(ValueError, match=r"probe text 1 'Hello world'"):
        check_against_sentencepiece(tokenizer, corpus=["", "Hello world"])
    # a folder whose added tokens differ from the tokenizer's
    fresh = type(tokenizer).from_pretrained(folder)
    with pytest.raises(ValueError, match="<img>"):
        check_against_sentencepiece(fresh, added_tokens={**added, "<img>": added["<img>"] + 100})
    other = {k: v for k, v in added.items() if k != "<box>"}
    with pytest.raises(ValueError, match=r"<box>"):
        check_against_sentencepiece(fresh, corpus=["x<box>y"], added_tokens=other)


def test_check_refuses_stripping_added_tokens(case):
    from transformers import AddedToken

    from tokenization_navil import check_against_sentencepiece

    folder, tokenizer, sp, added = case
    tokenizer.add_tokens([AddedToken("<strip>", lstrip=True)])
    with pytest.raises(ValueError, match="<strip> strip whitespace"):
        check_against_sentencepiece(tokenizer)


def test_check_against_another_model_fails(model_paths, folders):
    from tokenization_navil import NaViLInternLM2Tokenizer, check_against_sentencepiece

    tokenizer = NaViLInternLM2Tokenizer.from_pretrained(folders[("v400", "chat-added")])
    with pytest.raises(ValueError, match="400 SentencePiece pieces, the model 600"):
        check_against_sentencepiece(tokenizer, model_paths["v600"])


# ---------------------------------------------------------------------------------------------------------------
# Saving, reloading, remote code


def _same_behaviour(a, b):
    assert a.get_vocab() == b.get_vocab() and len(a) == len(b) and a.vocab_size == b.vocab_size
    assert a.all_special_tokens == b.all_special_tokens
    assert (a.add_bos_token, a.add_eos_token) == (b.add_bos_token, b.add_eos_token)
    for text in _probe_corpus():
        ids = a.encode(text)
        assert b.encode(text) == ids, text
        for skip in (False, True):
            assert b.decode(ids, skip_special_tokens=skip) == a.decode(ids, skip_special_tokens=skip), text


def test_save_and_reload_round_trip(case, tmp_path):
    from tokenization_navil import NaViLInternLM2Tokenizer

    folder, tokenizer, sp, added = case
    tokenizer.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "NaViLInternLM2Tokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_navil.NaViLInternLM2Tokenizer", None]}
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert "is_local" not in config and "local_files_only" not in config
    assert {t: int(i) for i, t in ((i, e["content"]) for i, e in config["added_tokens_decoder"].items())} == added
    reloaded = NaViLInternLM2Tokenizer.from_pretrained(tmp_path / "a")
    _same_behaviour(tokenizer, reloaded)
    reloaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer_config.json").read_text() == (
        tmp_path / "a" / "tokenizer_config.json"
    ).read_text()


def test_autotokenizer_remote_code_loads_a_converted_folder(case, tmp_path):
    """A folder as a converter writes it by hand (exact tokenizer_config.json keys) with tokenization_navil.py."""
    from transformers import AutoTokenizer

    folder, tokenizer, sp, added = case
    out = tmp_path / "converted"
    out.mkdir()
    shutil.copyfile(folder / "tokenizer.model", out / "tokenizer.model")
    shutil.copyfile(REPO_ROOT / "tokenization_navil.py", out / "tokenization_navil.py")
    original = json.loads((folder / "tokenizer_config.json").read_text())
    config = {
        "tokenizer_class": "NaViLInternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_navil.NaViLInternLM2Tokenizer", None]},
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": original.get("additional_special_tokens", []),
        "added_tokens_decoder": original["added_tokens_decoder"],
        "model_max_length": original["model_max_length"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    loaded = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "NaViLInternLM2Tokenizer" and type(loaded) is not type(tokenizer)
    assert type(loaded).__module__.startswith("transformers_modules.")
    _same_behaviour(tokenizer, loaded)
    for text in _probe_corpus():
        assert loaded.encode(text) == rules_encode(text, sp, added), text
    # saved again by the remote class: the same files, and it loads again
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "tokenization_navil.py").read_bytes() == (
        REPO_ROOT / "tokenization_navil.py"
    ).read_bytes()
    again = AutoTokenizer.from_pretrained(tmp_path / "again", trust_remote_code=True)
    _same_behaviour(tokenizer, again)


def test_reads_an_original_folder_without_its_code(folders):
    """Our class reads the original folder (auto_map naming tokenization_internlm2) and never imports its code;
    the stub shows what importing it would do."""
    from tokenization_navil import NaViLInternLM2Tokenizer

    folder = folders[("v400", "chat-added")]
    tokenizer = NaViLInternLM2Tokenizer.from_pretrained(folder)
    assert tokenizer.encode("a<img>b")[2] == 400 + SPECIAL_TOKENS.index("<img>")
    assert not any("tokenization_internlm2" in name for name in sys.modules)
    with pytest.raises(ImportError, match="never imports"):
        exec(compile((folder / "tokenization_internlm2.py").read_text(), "stub", "exec"), {})


def test_pickle_and_deepcopy(case):
    import copy

    folder, tokenizer, sp, added = case
    for clone in (pickle.loads(pickle.dumps(tokenizer)), copy.deepcopy(tokenizer)):
        for text in _probe_corpus()[:40]:
            ids = tokenizer.encode(text)
            assert clone.encode(text) == ids and clone.decode(ids) == tokenizer.decode(ids)


def test_module_imports_without_sentencepiece(monkeypatch, folders):
    """The module imports without sentencepiece; building a tokenizer then says what to install."""
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    spec = importlib.util.spec_from_file_location("tokenization_navil_no_spm", REPO_ROOT / "tokenization_navil.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        module.NaViLInternLM2Tokenizer(vocab_file=str(folders[("v400", "chat-added")] / "tokenizer.model"))


def test_remote_code_import_check_does_not_require_sentencepiece():
    """transformers' get_imports (what trust_remote_code checks before running a file) finds only transformers."""
    from transformers.dynamic_module_utils import get_imports

    assert set(get_imports(REPO_ROOT / "tokenization_navil.py")) <= {"transformers", "os", "re", "shutil", "json"}
