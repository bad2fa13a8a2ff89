"""Tokenizers of the folders we read and write: loading one (its own code only with consent) and
checking a written tokenizer against the one it came from."""

from pathlib import Path

from .errors import ConversionError, VerificationError, first_line
from .folders import TOKENIZER_VOCAB_FILES, quiet_transformers

PROBE_TEXT = "Describe the image.\n<|im_start|>user\n<img><IMG_CONTEXT></img> 1+1=2, ünïcödé 中文"


def load_tokenizer(original_dir, trust_remote_code=False):
    """The tokenizer of a folder we read; its own code runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    if not any((Path(original_dir) / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise ConversionError(
            f"{original_dir} has no tokenizer files (one of {', '.join(TOKENIZER_VOCAB_FILES)}, with "
            "tokenizer_config.json)"
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(original_dir), trust_remote_code=trust_remote_code)
    except Exception as e:
        hint = "" if trust_remote_code else " (if it needs its own code, pass --trust-remote-code)"
        raise ConversionError(f"cannot load the tokenizer in {original_dir}: {first_line(e)}{hint}") from e


def check_tokenizer(folder, tokenizer):
    from transformers import AutoTokenizer

    # A written tokenizer needs no code: whatever it loads with must come from transformers itself.
    try:
        with quiet_transformers():
            reloaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise VerificationError(
            f"the written tokenizer does not load without code of its own ({first_line(e)}); converted folders "
            "carry only NaViL's code"
        ) from None
    a, b = tokenizer.encode(PROBE_TEXT, add_special_tokens=False), reloaded.encode(PROBE_TEXT, add_special_tokens=False)
    if a != b:
        raise VerificationError(f"the written tokenizer encodes a probe text differently: {a} vs {b}")
    if reloaded.get_vocab() != tokenizer.get_vocab():
        raise VerificationError("the written tokenizer has a different vocabulary from the original")
    return f"same vocabulary ({len(a)} probe tokens identical)"
