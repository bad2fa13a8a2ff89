"""Files and folders every conversion reads and writes, in one place: the file names, the
safetensors-only rule (pickles are never loaded), lazy reading of written weights, progress bars, and
building a folder beside its destination and publishing it by renames."""

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

from .errors import ConversionError, first_line

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


def _plain_shard_name(name):
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and name == Path(name).name
        and "\\" not in name
        and not name.startswith(".")
    )


def shard_index(folder, error=ConversionError):
    """The `weight_map` of `folder`'s safetensors index, validated before anything is opened: a JSON
    object mapping tensor names to shard files that are plain names inside the folder (a path such as
    `../x.safetensors` or `/etc/passwd` is refused)."""
    path = Path(folder) / SAFETENSORS_INDEX
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path} is not valid JSON: {first_line(e)}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(k, str) for k in weight_map):
        raise error(f"{path} must hold a non-empty weight_map object mapping tensor names to shard files")
    for shard in weight_map.values():
        if not _plain_shard_name(shard):
            raise error(
                f"{path} names the shard {shard!r}: shards must be files inside the folder (a plain name "
                "ending in .safetensors)"
            )
    return weight_map


def read_safetensors(path, error=ConversionError, keys=None):
    """Yield `(name, tensor)` from one safetensors file (all of it, or `keys`), refusing what is not a
    readable safetensors file and tensors holding NaN or infinite values, with `error` naming the file."""
    weights = SafetensorsFolder.from_files([path], error, check_finite=True)
    for key in list(weights.keys()) if keys is None else keys:
        yield key, weights[key]


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


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings that are noise to a conversion: AutoTokenizer reading config.json (model_type
    navil_chat or navil, InternLM2's legacy rope_scaling key), "parameters on the meta device" when a
    check offloads on purpose."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            yield
    finally:
        logging.set_verbosity(verbosity)


def progress_bar(enabled, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kwargs)


# Our temporary folders are named `.{OUT_DIR name}.tmp-{pid}-{random}`: a later run can tell a folder of a
# run that died (its process is gone) from one still being written.
_TMP_INFIX = ".tmp-"


def _contains(outer, inner):
    return inner == outer or outer in inner.parents


def check_output_dir(out_dir, force, sources=(), replaces=("navil",)):
    """Check that `out_dir` can be written (before any work), and clean up after interrupted runs.

    `out_dir` may not exist yet (its parent must, writable); an existing one is replaced only with `force`,
    only when it is empty or a NaViL folder whose config.json `model_type` is in `replaces`, and never when
    it is, contains or lies inside one of `sources` (the folders being read)."""
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    for source in sources:
        source = Path(source).resolve()
        if _contains(target, source) or _contains(source, target):
            where = "is" if target == source else ("contains" if _contains(target, source) else "lies inside")
            raise ConversionError(f"{out_dir} {where} the source {source}; choose an OUT_DIR outside it")
    parent = out_dir.parent
    if not parent.is_dir():
        raise ConversionError(f"the parent folder of {out_dir} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write in {parent} (permission denied): choose an OUT_DIR elsewhere")
    clean_stale_temporaries(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if out_dir.is_symlink() or not out_dir.is_dir():
            raise ConversionError(f"{out_dir} exists and is not a directory")
        if not force:
            raise ConversionError(f"{out_dir} already exists; pass --force to replace it (everything in it is deleted)")
        _check_replaceable(out_dir, replaces)
    return out_dir


def _check_replaceable(out_dir, replaces):
    """`--force` deletes what is in `out_dir`: only an empty folder or one of the kinds we write."""
    if not any(out_dir.iterdir()):
        return
    try:
        model_type = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type not in replaces:
        raise ConversionError(
            f"{out_dir} is not empty and not a folder this command writes (no config.json with model_type "
            f"{' or '.join(replaces)}); --force will not delete it: remove it yourself or choose another OUT_DIR"
        )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(out_dir, report=None):
    """Remove the temporary folders that interrupted runs for `out_dir` left beside it (their process is
    gone); folders of live runs are left alone. `report` (default: stderr) gets one line per removal."""
    out_dir = Path(out_dir)
    prefix = f".{out_dir.name}{_TMP_INFIX}"
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        pid, _, rest = entry.name[len(prefix) :].partition("-")
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if rest.startswith("old-") and not (out_dir.exists() or out_dir.is_symlink()):
            # killed between the two renames of a --force publish (where no atomic swap exists)
            os.rename(entry, out_dir)
            print(f"restored {out_dir} from {entry.name}, left by an interrupted run", file=report or sys.stderr)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        print(f"removed {entry}, left by an interrupted run (process {pid})", file=report or sys.stderr)
    return removed


def temporary_folder(beside):
    """A new empty folder next to `beside`, named as our temporary folders are (`clean_stale_temporaries`
    removes it once its process is gone)."""
    beside = Path(beside)
    return Path(tempfile.mkdtemp(prefix=f".{beside.name}{_TMP_INFIX}{os.getpid()}-", dir=beside.parent))


@contextlib.contextmanager
def staged_folder(out_dir, force):
    """A temporary folder beside `out_dir` to build in. When the block finishes it gets the usual
    permissions and is published under `out_dir`'s name (`publish`); on any failure it is removed, so
    nothing half-written is ever left (a killed run's folder is removed by the next run for `out_dir`).
    The copy of code files transformers caches for it is forgotten either way. A full disk or a
    permission error while writing is reported as a `ConversionError` naming the file."""
    out_dir = Path(out_dir)
    tmp = temporary_folder(out_dir)
    try:
        try:
            yield tmp
            _normalize_permissions(tmp)
            publish(tmp, out_dir, force)
        except OSError as e:
            if e.errno in _USER_ERRNOS:
                raise ConversionError(f"cannot write {e.filename or out_dir}: {e.strerror}") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        forget_remote_module(tmp)


_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _exchange(a, b):
    """Atomically swap two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(tmp, out_dir, force):
    """Put the finished folder `tmp` under `out_dir`'s name, atomically: whenever the process dies,
    `out_dir` is either the old complete folder or the new one. An existing `out_dir` is replaced only
    with `force`: the two are swapped in one `renameat2(RENAME_EXCHANGE)` and the old one (now under the
    temporary name) is deleted; where the kernel or filesystem cannot swap, two renames are used and a
    failure between them restores the old folder."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    try:
        os.rename(tmp, out_dir)  # fails if out_dir exists and is not empty
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
    if not force:
        raise ConversionError(
            f"{out_dir} already exists (written meanwhile by someone else); pass --force to replace it"
        )
    if _exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, under the temporary name
        return
    backup = out_dir.with_name(f".{out_dir.name}{_TMP_INFIX}{os.getpid()}-old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


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
    """Read-only mapping over safetensors weights; a tensor is read only when it is looked up, so
    conversions and checks stream tensor by tensor whatever the checkpoint's size.

    `SafetensorsFolder(folder)` reads a folder (its index, or `model.safetensors`); `from_files` takes
    the files themselves (an original checkpoint's shards). With `check_finite`, a tensor holding NaN
    or infinite values is refused when read. Errors are `error`, naming the file."""

    def __init__(self, folder, error=ConversionError, check_finite=False):
        folder = Path(folder)
        if (folder / SAFETENSORS_INDEX).is_file():
            weight_map = {k: folder / v for k, v in shard_index(folder, error).items()}
            files = sorted(set(weight_map.values()))
        else:
            files = [folder / SINGLE_SAFETENSORS]
            weight_map = None
        self._init(files, weight_map, error, check_finite)

    @classmethod
    def from_files(cls, files, error=ConversionError, check_finite=False):
        self = cls.__new__(cls)
        self._init([Path(f) for f in files], None, error, check_finite)
        return self

    def _init(self, files, weight_map, error, check_finite):
        self._error, self.check_finite = error, check_finite
        self._headers, self._weight_map = {}, {}
        for path in files:
            self._headers[path] = header = read_safetensors_header(path, error)
            for name in header:
                if weight_map is None and name in self._weight_map:
                    raise error(f"tensor {name} appears in more than one shard (again in {path.name})")
                if weight_map is None or weight_map.get(name) == path:
                    self._weight_map[name] = path
        if weight_map is not None and set(weight_map) != set(self._weight_map):
            listed, present = set(weight_map), set(self._weight_map)
            raise error(
                f"{SAFETENSORS_INDEX} does not match the shards: listed but absent: {sorted(listed - present)[:10]}, "
                f"present but unlisted: {sorted(present - listed)[:10]}"
            )

    @property
    def files(self):
        return list(self._headers)

    def keys(self):
        return self._weight_map.keys()

    def __iter__(self):
        return iter(self._weight_map)

    def __len__(self):
        return len(self._weight_map)

    def __contains__(self, key):
        return key in self._weight_map

    def file_of(self, key):
        return self._weight_map[key]

    def _entry(self, key):
        return self._headers[self._weight_map[key]][key]

    def shape(self, key):
        return tuple(self._entry(key)["shape"])

    def shapes(self):
        """{name: shape} from the headers (no tensor data is read)."""
        return {key: self.shape(key) for key in self._weight_map}

    def dtype(self, key):
        """The torch dtype of a tensor, from the header."""
        return _torch_dtypes()[self._entry(key)["dtype"]]

    def __getitem__(self, key):
        """The tensor, read into memory of its own (no memory map: what is not referenced is freed)."""
        import torch

        path, entry = self._weight_map[key], self._entry(key)
        start, end = entry["data_offsets"]
        data = bytearray(end - start)
        try:
            with open(path, "rb") as f:
                f.seek(entry["data_start"] + start)
                if f.readinto(data) != len(data):
                    raise OSError("the file ends early (truncated?)")
        except OSError as e:
            raise self._error(f"{path}: cannot read tensor {key}: {first_line(e)}") from None
        dtype = _torch_dtypes()[entry["dtype"]]
        tensor = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(entry["shape"])
        if self.check_finite and tensor.is_floating_point() and not all_finite(tensor):
            raise self._error(f"{path}: tensor {key} holds NaN or infinite values")
        return tensor


SAFETENSORS_TORCH_DTYPES = {}  # filled on first use (importing torch here would slow the command line)
_SAFETENSORS_ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def release_freed_memory():
    """Give freed heap memory back to the system (glibc keeps freed small blocks otherwise, so a streamed
    conversion's resident memory would grow with every shard); a no-op elsewhere."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def all_finite(tensor, chunk=1 << 24):
    """Whether a floating tensor holds no NaN or infinity, checked in chunks (no tensor-sized temporary)."""
    import torch

    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def write_safetensors(path, tensors, metadata=None):
    """Write `tensors` ({name: tensor}, contiguous) as one safetensors file, each tensor's bytes written
    straight from its memory (`safetensors.torch.save_file` copies every tensor to `bytes` first)."""
    import torch

    names = {dtype: name for name, dtype in _torch_dtypes().items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)


def _torch_dtypes():
    import torch

    if not SAFETENSORS_TORCH_DTYPES:
        SAFETENSORS_TORCH_DTYPES.update(
            F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, I64=torch.int64,
            I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8, BOOL=torch.bool,
        )  # fmt: skip
    return SAFETENSORS_TORCH_DTYPES


def read_safetensors_header(path, error=ConversionError):
    """{name: {"dtype", "shape", "data_offsets", "data_start"}} of a safetensors file, validated (a header
    that is not JSON, offsets outside the file or overlapping, sizes that do not match the shape) before
    any tensor is read."""
    _torch_dtypes()
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError("shorter than a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"header length {length} does not fit in the file ({size} bytes)")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise error(f"{path} is not a readable safetensors file: {first_line(e)}") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a readable safetensors file: its header is not an object")
    header.pop("__metadata__", None)
    data_start, data_size, spans = 8 + length, size - 8 - length, []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            count = 1
            for dim in shape:
                if not isinstance(dim, int) or dim < 0:
                    raise ValueError(f"bad shape {shape}")
                count *= dim
            if dtype not in _SAFETENSORS_ITEM_SIZES:
                raise ValueError(f"unsupported dtype {dtype!r}")
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
                raise ValueError(f"offsets {start}..{end} outside the data ({data_size} bytes)")
            if end - start != count * _SAFETENSORS_ITEM_SIZES[dtype]:
                raise ValueError(f"{end - start} bytes for shape {shape} of {dtype}")
        except (KeyError, TypeError, ValueError) as e:
            raise error(f"{path} is not a readable safetensors file: tensor {name}: {first_line(e)}") from None
        entry["data_start"] = data_start
        spans.append((start, end, name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise error(f"{path} is not a readable safetensors file: tensors {name} and {other} overlap")
    return header


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size` as they come (named and indexed
    as `save_pretrained` names them), so a conversion holds one shard at a time. Each shard is read back
    after writing and compared bit for bit with what was given (`verify`)."""

    def __init__(self, folder, max_shard_size="5GB", verify=True, metadata=None):
        from transformers.utils.hub import convert_file_size_to_int

        self.folder, self.verify = Path(folder), verify
        self.limit = convert_file_size_to_int(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending, self._pending_bytes, self._shards, self._total = {}, 0, [], 0
        self.names = []

    def make_room(self, nbytes):
        """Write the pending shard now if a tensor of `nbytes` would overflow it: called before that
        tensor is read, so the shard and the new tensor are never held together with the read-back."""
        if self._pending and self._pending_bytes + nbytes > self.limit:
            self._flush()

    def add(self, name, tensor):
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.limit:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size
        self.names.append(name)

    def _flush(self):
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        write_safetensors(path, self._pending, self.metadata)
        if self.verify:  # read back one tensor at a time: the shard is not held twice
            from .errors import VerificationError

            written = SafetensorsFolder.from_files([path], VerificationError)
            for name, tensor in self._pending.items():
                got = written[name]
                if got.dtype != tensor.dtype or got.shape != tensor.shape or not got.equal(tensor):
                    raise VerificationError(f"written weights: {name} differs from the converted tensor")
                del got
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0
        release_freed_memory()

    def close(self):
        """Write the last shard and name the shards; returns the number of tensors written."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.rename(self._shards[0][0], self.folder / SINGLE_SAFETENSORS)
            return len(self.names)
        weight_map = {}
        for number, (path, names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.rename(path, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return len(self.names)
