"""Small InternLM2-style SentencePiece models and NaViL-2B-style tokenizer folders built from them, for the
tokenizer tests (no network, well under a second per model).

`train_model` trains a BPE model the way InternLM2's is configured (SPEC.md §9): byte fallback, digits split,
dummy prefix on, whitespace kept, `<unk>`/`<s>`/`</s>` at ids 0/1/2, the chat pieces as user-defined symbols inside
the vocabulary. `write_original_folder` lays it out as the original NaViL-2B folder does: `tokenizer.model`, a
`tokenizer_config.json` whose `auto_map` names the original remote class (`tokenization_internlm2.InternLM2Tokenizer`,
which must never be imported: the folder's `tokenization_internlm2.py` is a stub that raises) and NaViL's 12 tokens
as special added tokens right after the SentencePiece vocabulary, not listed as additional special tokens.
"""

import io
import json
import random
from pathlib import Path

from configuration_navil import SPECIAL_TOKENS

# InternLM2's chat/reserved pieces: user-defined symbols of the SentencePiece model.
CHAT_PIECES = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")

_WORDS = (
    "the quick brown fox jumps over lazy dog image picture describe what is in this there are two cats "
    "a b c Hello world User Assistant System The A I You It hello user assistant system helpful answer question "
    "line one two three four five box ref quad img context break frame ok yes no fine don't I'm we've they're"
).split()
_PUNCT = (".", ",", "?", "!", ":", ";", "'s", "(", ")", "[", "]", "-", "=", "+")
_CJK = "中文你好世界图片描述这是一个猫"

ORIGINAL_REMOTE_CLASS = "tokenization_internlm2.InternLM2Tokenizer"
ORIGINAL_STUB = """raise ImportError(
    "tokenization_internlm2 is the original checkpoint's code, which NaViL never imports (this file is a test stub)"
)
"""


def training_corpus(seed=0, lines=600):
    """Sentences of English words, punctuation, digits, CJK, chat pieces and odd whitespace -- but no newline, so
    that `"\\n"` comes out as the byte piece `<0x0A>`, as in InternLM2's model."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if i % 3 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(_PUNCT))
        if i % 4 == 0:
            words.append(str(rng.randint(0, 10**6)))
        if i % 9 == 0:
            words.append("".join(rng.choice(_CJK) for _ in range(rng.randint(2, 6))))
        text = " ".join(words)
        if i % 5 == 0:
            text = "  " + text.replace(" ", "   ", 1) + "\t"
        if i % 7 == 0:
            text = f"<|im_start|>{rng.choice(('user', 'assistant', 'system'))} {text}<|im_end|>"
        out.append(text)
    return out


def train_model(path, vocab_size=400, seed=0, normalization="identity", user_defined_symbols=CHAT_PIECES):
    """Train a SentencePiece BPE model into `path` (a `.model` file) and return the path."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name=normalization,
        user_defined_symbols=list(user_defined_symbols),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def _added(content):
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def added_tokens(piece_count, chat_tokens_added=True):
    """[(token, id)] of an original folder's added tokens: `<unk>` `<s>` `</s>`, the chat pieces at their
    SentencePiece ids when `chat_tokens_added` (InternLM2-chat folders list them), then NaViL's 12 from
    `piece_count` on (configuration_navil.SPECIAL_TOKENS order)."""
    tokens = [("<unk>", 0), ("<s>", 1), ("</s>", 2)]
    if chat_tokens_added:
        tokens += [(piece, 3 + i) for i, piece in enumerate(CHAT_PIECES)]
    return tokens + [(token, piece_count + i) for i, token in enumerate(SPECIAL_TOKENS)]


def write_original_folder(folder, model_path, chat_tokens_added=True, stub=True):
    """An original-style NaViL-2B tokenizer folder: `tokenizer.model`, `tokenizer_config.json` (InternLM2's keys,
    `auto_map` to the original class, the added tokens of `added_tokens`) and, with `stub`, a
    `tokenization_internlm2.py` that raises if anything imports it. Returns the folder."""
    import sentencepiece

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(model_path).read_bytes()
    (folder / "tokenizer.model").write_bytes(data)
    piece_count = sentencepiece.SentencePieceProcessor(model_proto=data).get_piece_size()
    config = {
        "added_tokens_decoder": {str(i): _added(t) for t, i in added_tokens(piece_count, chat_tokens_added)},
        "auto_map": {"AutoTokenizer": [ORIGINAL_REMOTE_CLASS, None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    if chat_tokens_added:
        config["additional_special_tokens"] = list(CHAT_PIECES)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if stub:
        (folder / "tokenization_internlm2.py").write_text(ORIGINAL_STUB)
    return folder


def folder_added_tokens(folder):
    """{token: id} of the added tokens a folder's tokenizer_config.json declares."""
    config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    return {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
