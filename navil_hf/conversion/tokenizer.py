"""Tokenizers of the folders we read and write: loading one (its own code only with consent) and
checking a written tokenizer against the one it came from."""

from pathlib import Path

from ..errors import ConversionError, VerificationError, first_line
from ..folders import TOKENIZER_VOCAB_FILES, quiet_transformers

PROBE_TEXT = "Describe the image.\n<|im_start|>user\n<img><IMG_CONTEXT></img> 1+1=2, ünïcödé 中文"


def is_internlm2_sentencepiece(folder):
    """NaViL-2B's tokenizer layout (SPEC §9): a SentencePiece `tokenizer.model` and no `tokenizer.json`."""
    folder = Path(folder)
    return (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file()


def load_tokenizer(original_dir, trust_remote_code=False):
    """The tokenizer of a folder we read; its own code runs only with `trust_remote_code`. An InternLM2
    SentencePiece tokenizer is always read by our own class (`tokenization_navil`), which computes what
    the original slow tokenizer computes; the checkpoint's tokenizer code is never imported for it."""
    from transformers import AutoTokenizer

    if not any((Path(original_dir) / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise ConversionError(
            f"{original_dir} has no tokenizer files (one of {', '.join(TOKENIZER_VOCAB_FILES)}, with "
            "tokenizer_config.json)"
        )
    if is_internlm2_sentencepiece(original_dir):
        return _load_sentencepiece_tokenizer(original_dir)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(original_dir), trust_remote_code=trust_remote_code)
    except Exception as e:
        hint = "" if trust_remote_code else " (if it needs its own code, pass --trust-remote-code)"
        raise ConversionError(f"cannot load the tokenizer in {original_dir}: {first_line(e)}{hint}") from e


def _load_sentencepiece_tokenizer(folder):
    try:
        from tokenization_navil import NaViLInternLM2Tokenizer

        with quiet_transformers():
            return NaViLInternLM2Tokenizer.from_pretrained(str(folder))
    except ImportError as e:
        raise ConversionError(f"reading the SentencePiece tokenizer of {folder}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 -- a damaged tokenizer.model fails inside sentencepiece
        raise ConversionError(f"cannot read the SentencePiece tokenizer in {folder}: {first_line(e)}") from None


def check_tokenizer(folder, tokenizer):
    """The written tokenizer loads without code from the folder and encodes like the original. For an
    InternLM2 SentencePiece tokenizer, our class reads the written folder and is compared with the
    SentencePiece model itself on a probe corpus that covers SPEC §9's rules."""
    from transformers import AutoTokenizer

    if is_internlm2_sentencepiece(folder):
        from tokenization_navil import check_against_sentencepiece

        reloaded = _load_sentencepiece_tokenizer(folder)
        try:
            against = check_against_sentencepiece(reloaded, Path(folder) / "tokenizer.model")
        except ValueError as e:
            raise VerificationError(f"the written tokenizer does not follow SentencePiece: {first_line(e)}") from None
        if reloaded.get_vocab() != tokenizer.get_vocab():
            raise VerificationError("the written tokenizer has a different vocabulary from the original")
        return f"our InternLM2 SentencePiece tokenizer, {against}"

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
