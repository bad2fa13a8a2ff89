"""The NaViL-2B tokenizer: InternLM2's SentencePiece BPE model behind transformers' slow tokenizer API, written from
SPEC.md §9 (no InternLM2 code).

What it computes is what the original computed (transformers 4.51's slow path of the checkpoint's own tokenizer):

* encode -- the text is split on the added tokens (NaViL's 12 special tokens, added after the SentencePiece
  vocabulary, and whatever else the folder adds); every remaining chunk is encoded by SentencePiece on its own,
  so every chunk gets the dummy-prefix `▁` (`"a<img>b"` -> `<s> ▁a <img> ▁b`, `"\\n"` -> `<s> ▁ <0x0A>`); `<s>`
  is prepended (`add_bos_token`, on by default; `</s>` appended only with `add_eos_token`). Chat pieces such as
  `<|im_start|>` are user-defined symbols inside the SentencePiece vocabulary: SentencePiece itself emits them
  whole, and a folder that also lists them as added tokens splits on them like on any added token.
* decode (`_decode`, `convert_tokens_to_string`) -- see `NaViLInternLM2Tokenizer._decode`: pieces between
  special/added tokens are decoded by SentencePiece, a space goes before the text that precedes a special token,
  added tokens that are not special (NaViL's 12) are joined to their neighbours with spaces in both
  `skip_special_tokens` modes, and the clean-up of spaces before punctuation always runs on the SentencePiece
  text, although `clean_up_tokenization_spaces` is false.

`check_against_sentencepiece` re-derives the ids from those rules with `sentencepiece` alone (its own
added-token splitter, no transformers machinery) on `PROBE_CORPUS` and says where a tokenizer differs: the
converter's check that a folder written with this class encodes as the original did.
"""

import os
import re
import shutil

from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
# How a folder names this class (tokenizer_config.json `tokenizer_class` and `auto_map`).
TOKENIZER_CLASS = "NaViLInternLM2Tokenizer"
AUTO_MAP = {"AutoTokenizer": [f"tokenization_navil.{TOKENIZER_CLASS}", None]}
# Keys transformers' from_pretrained adds to a tokenizer's init kwargs (and so to the config it saves) that say how
# that copy was loaded, not what it computes.
_LOAD_CONTEXT_KEYS = ("is_local", "local_files_only")

# NaViL's 12 special tokens (configuration_navil.SPECIAL_TOKENS, repeated so this file needs no sibling) and the
# chat pieces of InternLM2's SentencePiece vocabulary: what the probe corpus puts next to text.
NAVIL_TOKENS = (
    "</box>", "<box>", "<IMG_CONTEXT>", "</img>", "<img>", "</quad>",
    "<quad>", "</ref>", "<ref>", "<img_uncond>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>",
)  # fmt: skip
CHAT_PIECES = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")

# transformers' `clean_up_tokenization` as 4.51 had it (5.24's is the same), frozen here: the original ran it on
# every decoded piece of SentencePiece text whatever `clean_up_tokenization_spaces` said.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def clean_up_spaces(text: str) -> str:
    """Remove the space before punctuation and English contractions (`"a , b ?"` -> `"a, b?"`)."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(
            "the NaViL-2B tokenizer (InternLM2 SentencePiece) needs the sentencepiece package: pip install sentencepiece"
        ) from e
    return sentencepiece


def load_sentencepiece(vocab_file=None, model_proto=None, sp_model_kwargs=None):
    """A `sentencepiece.SentencePieceProcessor` for a `tokenizer.model` file (or its serialized proto)."""
    processor = _sentencepiece().SentencePieceProcessor(**(sp_model_kwargs or {}))
    if model_proto is not None:
        processor.LoadFromSerializedProto(model_proto)
    else:
        processor.Load(str(vocab_file))
    return processor


class NaViLInternLM2Tokenizer(PreTrainedTokenizer):
    """InternLM2's SentencePiece tokenizer as NaViL-2B was run with it (SPEC.md §9).

    Args:
        vocab_file: the SentencePiece model (`tokenizer.model`).
        unk_token, bos_token, eos_token, pad_token: `<unk>`, `<s>`, `</s>`, `</s>` as in InternLM2's folders.
        sp_model_kwargs: passed to `sentencepiece.SentencePieceProcessor` (sampling options, ...).
        add_bos_token: prepend `<s>` when special tokens are added (default true).
        add_eos_token: append `</s>` when special tokens are added (default false).
        decode_with_prefix_space: accepted and saved for the folders that carry it (InternLM2's do); decoding does
            not depend on it.
        clean_up_tokenization_spaces: the *extra* clean-up of the whole decoded text (false in NaViL-2B's
            folder); the clean-up inside each SentencePiece piece of text always runs.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    # save_pretrained writes `auto_map` (this module, no fast class) and copies this file next to the vocabulary,
    # so a saved folder reloads with AutoTokenizer.from_pretrained(folder, trust_remote_code=True).
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        sp_model_kwargs=None,
        add_bos_token=True,
        add_eos_token=False,
        decode_with_prefix_space=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        # A folder's auto_map names the code it was saved with (maybe the original's); ours is written on save.
        kwargs.pop("auto_map", None)
        self.vocab_file = vocab_file
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        # Loaded before the base class's __init__, which asks for the vocabulary.
        self.sp_model = load_sentencepiece(vocab_file, sp_model_kwargs=self.sp_model_kwargs)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=self.sp_model_kwargs,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            decode_with_prefix_space=decode_with_prefix_space,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # --- pickling (the SentencePiece processor is a C++ object): carry the model proto instead --------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.__dict__["sp_model"] = load_sentencepiece(model_proto=proto, sp_model_kwargs=self.sp_model_kwargs)

    # --- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Pieces in the SentencePiece model (added tokens come after them)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        """One chunk of text between added tokens, by SentencePiece alone (dummy prefix included)."""
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    # --- special tokens around a sequence -----------------------------------------------------------------------

    def _bos(self):
        return [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []

    def _eos(self):
        return [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """`<s> A` (`<s> A B` for a pair), then `</s>` if `add_eos_token`."""
        return self._bos() + list(token_ids_0) + list(token_ids_1 or []) + self._eos()

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = len(token_ids_0) + len(token_ids_1 or [])
        return [1] * len(self._bos()) + [0] * body + [1] * len(self._eos())

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- decoding -----------------------------------------------------------------------------------------------

    def _spaced_added_tokens(self) -> set[str]:
        """Tokens that `_decode` keeps out of SentencePiece text and joins to their neighbours with spaces: the added
        tokens that are not special (NaViL's 12), and special tokens listed as extra special tokens whose id lies
        beyond the SentencePiece vocabulary (4.51's "legacy added tokens")."""
        special = set(self.all_special_tokens)
        tokens = {token for token in self._added_tokens_encoder if token not in special}
        extra = [str(t) for t in self.__dict__.get("_extra_special_tokens", [])]
        tokens.update(t for t in extra if self.convert_tokens_to_ids(t) >= self.vocab_size)
        return tokens

    def convert_tokens_to_string(self, tokens):
        """SentencePiece text with the special tokens kept verbatim: each run of pieces is decoded by SentencePiece
        (which drops the dummy-prefix space at the start of a run); a run followed by a special token gets a space
        in front of it unless the token before the run was special too (also at the very start); then the clean-up
        of spaces before punctuation; then, as the original did, a space is put in front and the first character
        dropped (which leaves the text as it was)."""
        special = set(self.all_special_tokens)
        parts, run, previous_special = [], [], False
        for token in tokens:
            if token in special:
                if not previous_special:
                    parts.append(" ")
                parts += [self.sp_model.decode(run), token]
                run, previous_special = [], True
            else:
                run.append(token)
                previous_special = False
        parts.append(self.sp_model.decode(run))
        text = clean_up_spaces("".join(parts))
        if tokens:
            text = " " + text
        return text[1:]

    def _decode(
        self,
        token_ids,
        skip_special_tokens=False,
        clean_up_tokenization_spaces=None,
        spaces_between_special_tokens=True,
        **kwargs,
    ) -> str:
        """transformers 4.51's slow `_decode` with this class's `convert_tokens_to_string`:

        1. ids -> tokens; with `skip_special_tokens`, the special tokens (`<s>`, `</s>`, `<unk>`, the pad token and
           the extra special tokens, e.g. the chat pieces) are dropped -- NaViL's 12 are not special tokens in that
           sense and stay;
        2. the tokens are cut at every spaced added token (`_spaced_added_tokens`); each run in between becomes text
           through `convert_tokens_to_string` (a run whose text is empty is dropped, except the last one);
        3. the texts and the spaced tokens are joined with " " (`spaces_between_special_tokens`, default true) or "";
        4. only if `clean_up_tokenization_spaces` (default: the tokenizer's, false for NaViL-2B), the clean-up runs
           once more over the whole text.
        """
        kwargs.pop("use_source_tokenizer", None)
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        special = set(self.all_special_tokens)
        if skip_special_tokens:
            skipped = set(self.all_special_ids)
            ids = [i for i in ids if i not in skipped]
        tokens = [
            self._added_tokens_decoder[i].content if i in self._added_tokens_decoder else self._convert_id_to_token(i)
            for i in ids
        ]
        spaced = self._spaced_added_tokens()
        texts, run = [], []
        for token in tokens:
            if skip_special_tokens and token in special:
                continue
            if token in spaced:
                if run:
                    text = self.convert_tokens_to_string(run)
                    if text:
                        texts.append(text)
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(texts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text

    # --- saving -------------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"{save_directory} is not a directory to save the SentencePiece model in")
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name)
        if self.vocab_file and os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                shutil.copyfile(self.vocab_file, out)
        else:
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out,)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        """After transformers has written tokenizer_config.json (`file_names[0]`) and before it uploads anything: put
        back `add_bos_token`/`add_eos_token` (transformers 5 leaves them out), set `auto_map` to this class only and
        drop what only described how this instance was loaded (`is_local`, `local_files_only`)."""
        import json

        config_file = file_names[0]
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = self.add_eos_token
        config["auto_map"] = AUTO_MAP
        for key in _LOAD_CONTEXT_KEYS:
            config.pop(key, None)
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)


# ---------------------------------------------------------------------------------------------------------------
# The rules, with sentencepiece alone: what the converter checks a written tokenizer against.


def _probe_corpus():
    texts = [
        "",
        "Hello world",
        "hello",
        "The quick brown fox jumps over the lazy dog.",
        " leading space",
        "trailing space ",
        "  two leading spaces",
        "multiple   spaces   inside",
        " ",
        "   ",
        "\n",
        "line one\nline two",
        "\n\nblank lines\n\n",
        "tab\tseparated\tvalues\t",
        "\t",
        " \n \t ",
        "12345",
        "version 3.14 in 2025: 1+1=2",
        "ünïcödé naïve café",
        "中文 你好世界",
        "日本語のテキスト",
        "emoji 🙂🚀 and ✓",
        "Hello , world ! Is it ? Yes . it 's fine , do n't , I 'm , we 've , they 're",
        "a ' b",
        "<image>\nWhat is in this picture?",
        "<s>literal bos</s> and <unk>",
        "<img",
        "img>",
        "<IMG_CONTEXT",
        "< img >",
        "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_LINE_BREAK><IMG_CONTEXT><IMG_CONTEXT><IMG_LINE_BREAK><IMG_FRAME_BREAK></img>",
        "<ref>the cat</ref><box>[[10, 20, 300, 400]]</box>",
        "<quad>1,2,3,4</quad>",
        "<img_uncond>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|><|im_start|>user\n"
        "<img><IMG_CONTEXT></img>\nDescribe the image.<|im_end|><|im_start|>assistant\n",
        "<|im_start|>user\nhi<|im_end|>\n",
        "<|im_start|> user <|im_end|>",
        "<|action_start|><|plugin|>\n{}<|action_end|>",
        "<|interpreter|>print(1)",
        "<think>\n\n</think>\n\n",
    ]
    for token in NAVIL_TOKENS:
        texts += [f"a{token}b", f"a {token} b", token, token + token, f"\n{token}\n", f"{token}, ok ?"]
    for token in CHAT_PIECES:
        texts += [f"a{token}b", f" {token} "]
    return tuple(texts)


# Texts the checks encode: plain words, leading/trailing/multiple spaces, newlines, tabs, digits, Unicode and CJK
# and emoji (byte fallback), each of NaViL's 12 tokens next to text with and without spaces, chat markers, the
# punctuation of the clean-up rule, look-alikes of the tokens, and the empty string.
PROBE_CORPUS = _probe_corpus()


def split_on_added_tokens(text, added_tokens):
    """`text` cut into chunks at the added tokens: at each position the longest added token starting there, the
    earliest position first. Returns (chunk, is_added_token) pairs, without empty chunks."""
    if not added_tokens:
        return [(text, False)] if text else []
    pattern = re.compile("|".join(re.escape(t) for t in sorted(set(added_tokens), key=len, reverse=True)))
    out, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            out.append((text[start : match.start()], False))
        out.append((match.group(), True))
        start = match.end()
    if start < len(text):
        out.append((text[start:], False))
    return out


def ids_by_the_rules(text, sp_model, added_tokens, bos_id=None, eos_id=None):
    """The ids SPEC §9 says the original gives `text`: split on `added_tokens` ({token: id}); every other chunk
    encoded by SentencePiece on its own; `bos_id` in front and `eos_id` at the end when given."""
    ids = [] if bos_id is None else [bos_id]
    for chunk, is_added in split_on_added_tokens(text, added_tokens):
        ids += [added_tokens[chunk]] if is_added else sp_model.encode(chunk)
    return ids + ([] if eos_id is None else [eos_id])


def check_against_sentencepiece(tokenizer, sp_model_path=None, corpus=PROBE_CORPUS, added_tokens=None):
    """Check that `tokenizer` encodes `corpus` as the rules do with `sentencepiece` alone.

    `sp_model_path`: the SentencePiece model to run (default: the tokenizer's own `vocab_file`); `added_tokens`:
    {token: id} to split on (default: the tokenizer's added tokens; pass the original folder's to check against
    it). Every text is encoded with and without special tokens (`<s>` in front when `add_bos_token`). Also checks
    that the tokenizer's vocabulary is the SentencePiece model's followed by the added tokens.

    The rules split on added tokens exactly as written: a tokenizer whose added tokens strip whitespace around
    them or match whole words only (`lstrip`, `rstrip`, `single_word`; NaViL-2B's have none) is refused.

    Returns a one-line summary; raises ValueError naming the first text that differs, where, and both id lists.
    """
    flagged = [
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.lstrip or token.rstrip or token.single_word
    ]
    if flagged:
        raise ValueError(
            f"added token(s) {', '.join(flagged)} strip whitespace or match single words only; the SentencePiece "
            "rules of SPEC §9 split on added tokens as written"
        )
    sp_model = load_sentencepiece(sp_model_path or tokenizer.vocab_file)
    if added_tokens is None:
        added_tokens = dict(tokenizer.added_tokens_encoder)
    if tokenizer.vocab_size != sp_model.get_piece_size():
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} SentencePiece pieces, the model {sp_model.get_piece_size()}"
        )
    vocab = tokenizer.get_vocab()
    for i in range(sp_model.get_piece_size()):
        piece = sp_model.id_to_piece(i)
        if vocab.get(piece) != i and added_tokens.get(piece, i) == i:
            raise ValueError(f"SentencePiece piece {i} {piece!r} has id {vocab.get(piece)} in the tokenizer")
    for token, i in added_tokens.items():
        if vocab.get(token) != i:
            raise ValueError(f"added token {token!r} has id {vocab.get(token)} in the tokenizer, {i} in the rules")
    bos_id = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", True) else None
    eos_id = tokenizer.eos_token_id if getattr(tokenizer, "add_eos_token", False) else None
    count = 0
    for n, text in enumerate(corpus):
        for with_special in (True, False):
            expected = ids_by_the_rules(text, sp_model, added_tokens, *((bos_id, eos_id) if with_special else ()))
            got = tokenizer.encode(text, add_special_tokens=with_special)
            if got != expected:
                at = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
                raise ValueError(
                    f"probe text {n} {text!r} (add_special_tokens={with_special}) encodes differently from "
                    f"SentencePiece by the rules, from position {at}: expected {expected}, got {got}"
                )
            count += len(got)
    return f"{len(corpus)} probe texts ({count} tokens) encode as SentencePiece does by the rules"
