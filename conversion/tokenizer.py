"""Tokenizers of the folders we read and write: loading one (its own code only with consent) and
checking a written tokenizer against the one it came from."""

import warnings

from .errors import ConversionError, VerificationError

PROBE_TEXT = "Describe the image.\n<|im_start|>user\n<img><IMG_CONTEXT></img> 1+1=2, ünïcödé 中文"


def load_tokenizer(original_dir, trust_remote_code=False):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    # AutoTokenizer reads config.json too and warns about it (model_type navil_chat; InternLM2's legacy
    # rope_scaling key): noise about a file the tokenizer does not use.
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            return AutoTokenizer.from_pretrained(str(original_dir), trust_remote_code=trust_remote_code)
    except Exception as e:
        hint = "" if trust_remote_code else " (if it needs its own code, pass --trust-remote-code)"
        raise ConversionError(f"cannot load the tokenizer in {original_dir}: {e}{hint}") from e
    finally:
        logging.set_verbosity(verbosity)


def check_tokenizer(folder, tokenizer):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    a, b = tokenizer.encode(PROBE_TEXT, add_special_tokens=False), reloaded.encode(PROBE_TEXT, add_special_tokens=False)
    if a != b:
        raise VerificationError(f"the written tokenizer encodes a probe text differently: {a} vs {b}")
    if reloaded.get_vocab() != tokenizer.get_vocab():
        raise VerificationError("the written tokenizer has a different vocabulary from the original")
    return f"same vocabulary ({len(a)} probe tokens identical)"
