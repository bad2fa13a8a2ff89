"""Files and folders every conversion reads and writes, in one place: the file names, the
safetensors-only rule (pickles are never loaded), lazy reading of written weights, progress bars, and
building a folder beside its destination and publishing it by renames."""

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import ConversionError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
WEIGHT_FILES = (SINGLE_SAFETENSORS, SAFETENSORS_INDEX)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of these + tokenizer_config.json
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Weight formats that unpickle (and so can run code) when loaded: refused everywhere, never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickled_files(names):
    """The names (sorted) that are pickled weight files."""
    return sorted(str(n) for n in names if str(n).endswith(PICKLE_SUFFIXES))


def pickle_refusal(names):
    """The one message for pickled weights, wherever they are met."""
    return (
        f"pickled weight files are refused ({', '.join(names)}): loading a pickle can run arbitrary code; "
        "re-save the weights as safetensors"
    )


def safetensors_files(folder, error=ConversionError):
    """The `*.safetensors` files of `folder` (sorted); `error` when there are none, naming any pickles."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = pickled_files(p.name for p in folder.iterdir())
        raise error(f"{folder} has no safetensors weights" + (f"; {pickle_refusal(pickles)}" if pickles else ""))
    return files


TOKENIZER_FILES = (
    "tokenizer.json", TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
)  # fmt: skip


LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


@contextlib.contextmanager
def transformers_progress_bars(enabled):
    """transformers' own bars (GGUF dequantization, weight loading, saving) follow ours: off when
    `enabled` is false, restored afterwards; left as the user set them otherwise."""
    from transformers.utils import logging as hf_logging

    bars_were_disabled = not hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and not bars_were_disabled:
            hf_logging.enable_progress_bar()


def progress_bar(enabled, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kwargs)


def check_output_dir(out_dir, force):
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir} exists and is not a directory")
        if not force:
            raise ConversionError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise ConversionError(f"the parent folder of {out_dir} does not exist")
    return out_dir


@contextlib.contextmanager
def staged_folder(out_dir, force):
    """A temporary folder beside `out_dir` to build in. When the block finishes it gets the usual
    permissions and is renamed into `out_dir` (`publish`); on any failure it is removed, so nothing
    half-written is ever left. The copy of code files transformers caches for it is forgotten either way."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _normalize_permissions(tmp)
        publish(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        forget_remote_module(tmp)


def publish(tmp, out_dir, force):
    """Move the finished folder `tmp` to `out_dir` (renames only; an existing `out_dir` is replaced
    only with `force`, and restored if the move fails)."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    if not force:
        raise ConversionError(f"{out_dir} already exists; pass --force to replace it")
    backup = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(backup, out_dir)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()


def _normalize_permissions(folder):
    """`mkdtemp` makes a private folder and some writers private files; give them the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def forget_remote_module(folder):
    """Remove the copy of the code files transformers caches for a (temporary) local folder."""
    try:
        from transformers.dynamic_module_utils import (
            HF_MODULES_CACHE,
            TRANSFORMERS_DYNAMIC_MODULE_NAME,
            _sanitize_module_name,
        )

        name = _sanitize_module_name(Path(folder).name)
        cached = Path(HF_MODULES_CACHE) / TRANSFORMERS_DYNAMIC_MODULE_NAME / name
        if name and cached.is_dir():
            shutil.rmtree(cached, ignore_errors=True)
    except Exception:  # noqa: BLE001 -- best effort: a stale cache entry is harmless
        pass


class SafetensorsFolder:
    """Read-only mapping over the safetensors weights of a folder; tensors are read on access."""

    def __init__(self, folder):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(folder / SINGLE_SAFETENSORS), framework="pt") as f:
                weight_map = {k: SINGLE_SAFETENSORS for k in f.keys()}
        self._weight_map = weight_map
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in set(weight_map.values())}

    def keys(self):
        return self._weight_map.keys()

    def __iter__(self):
        return iter(self._weight_map)

    def __len__(self):
        return len(self._weight_map)

    def __contains__(self, key):
        return key in self._weight_map

    def __getitem__(self, key):
        return self._handles[self._weight_map[key]].get_tensor(key)


def count_tensors(files):
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    return total
