"""`navil refresh`: give an existing converted NaViL folder (local or on the Hub) this package's code files.

Every converted folder carries the remote code of the day it was converted (`hub.CODE_MODULES`). When a
transformers release breaks that frozen code, refreshing replaces only those files; weights, config.json
(its `auto_map` names the same modules and classes, so it is never edited), tokenizer, processor config,
model card and every other file stay byte for byte as they were.

Before anything is written or pushed, the folder's current code and the refreshed folder are each run in a
subprocess of their own (transformers' dynamic-module cache must not mix two folders' modules in one
process; each gets a private module cache and runs offline), through `AutoProcessor`/`AutoModel` with
`trust_remote_code=True`, on a prompt with an image and a text-only prompt: the input ids must be equal,
pixel values and logits equal within `ULPS` epsilons of the compute dtype times the largest magnitude, and
greedy continuations (`NEW_TOKENS` tokens) identical. Running the current code executes a folder someone
else may have made, so it needs explicit consent (`trust_remote_code=True`, `--trust-remote-code`). When
that code cannot run on the installed transformers, the check cannot be made here: the error names the
transformers range the folder's `compat_navil.py` says it was tested with (read as text, never imported).

A local folder is refreshed in place: the new code files are written into a temporary folder beside it
(with links to the other files, so the refreshed folder can be loaded and checked), and after the checks
each code file is moved over the old one by a rename (each file is replaced atomically; no other file is
touched, none is deleted). `out_dir` writes a refreshed copy instead. A Hub repo is downloaded at one
commit (`snapshot_download`), refreshed and checked the same way, and pushed back through `push_folder`
as one commit based on the downloaded one: the Hub skips the unchanged files, so it changes only code files.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError, VerificationError, first_line
from ..folders import (
    CONFIG_FILE,
    check_output_dir,
    clean_stale_temporaries,
    forget_remote_module,
    pickle_refusal,
    pickled_files,
    staged_folder,
    temporary_folder,
)
from ..hub import CODE_MODULES, auto_maps, code_files, our_reference

CODE_FILES = tuple(f"{name}.py" for name in CODE_MODULES)
# A folder of ours has at least these (older folders carried fewer code files than today's seven).
REQUIRED_CODE_FILES = ("configuration_navil.py", "modeling_navil.py")
ULPS = 64  # logits/pixel tolerance: this many epsilons of the compute dtype times the largest magnitude
NEW_TOKENS = 8  # greedy tokens compared per prompt
TEXT_PROBE = "Say hello in five words."
DTYPES = ("float32", "bfloat16", "float16")
_TESTED = re.compile(r"""^TESTED_TRANSFORMERS\s*=\s*\(\s*["']([^"']+)["']\s*,\s*["']([^"']+)["']""", re.M)
_MINIMUM = re.compile(r"""^MIN_TRANSFORMERS\s*=\s*["']([^"']+)["']""", re.M)


@dataclass
class RefreshResult:
    folder: Path  # where the refreshed files are (the folder itself, `out_dir`, or the download)
    changed: bool  # False: the code files were already this package's, nothing was written
    replaced: list = field(default_factory=list)  # code files whose content changed
    added: list = field(default_factory=list)  # code files the folder lacked
    untouched: int = 0  # other files, left as they were
    checks: dict = field(default_factory=dict)  # {check: description}
    seconds: float = 0.0
    push: object = None  # the PushResult of a Hub refresh


# ---------------------------------------------------------------------------------------------------
# What may be refreshed


def check_refreshable(folder):
    """Raise `ConversionError` unless `folder` is a converted NaViL folder carrying only NaViL's code:
    config.json with model_type navil, no `auto_map` entry naming code that is not ours, no `.py` file
    beside the weights that is not one of our code files, no pickled weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a directory")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{folder} has no config.json: not a converted NaViL folder") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder / CONFIG_FILE} is not valid JSON: {first_line(e)}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "navil_chat":
        raise ConversionError(f"{folder} is an original NaViL checkpoint: convert it (`navil convert`), not refresh")
    if model_type != "navil":
        raise ConversionError(f"{folder} holds a {model_type!r} model, not a converted NaViL folder (model_type navil)")
    names = {p.name for p in folder.iterdir()}
    pickles = pickled_files(names)
    if pickles:
        raise ConversionError(f"{folder}: {pickle_refusal(pickles)}")
    foreign = sorted(n for n in names if n.endswith(".py") and n not in CODE_FILES)
    if foreign:
        raise ConversionError(
            f"{folder} carries code that is not NaViL's ({', '.join(foreign)}): refresh will not touch it"
        )
    missing = [n for n in REQUIRED_CODE_FILES if n not in names]
    if missing:
        raise ConversionError(f"{folder} lacks NaViL's code file(s) {', '.join(missing)}: not a converted NaViL folder")
    for path, _, auto_map in auto_maps(folder):
        others = {k: v for k, v in auto_map.items() if not our_reference(v)}
        if others:
            name, ref = next(iter(others.items()))
            raise ConversionError(
                f"{path.name} auto_map {name} -> {ref!r} is not NaViL's code: refresh replaces NaViL's code only"
            )


def stale_code_files(folder):
    """(code files whose content differs from this package's, code files the folder lacks)."""
    folder = Path(folder)
    replaced, added = [], []
    for source in code_files():
        target = folder / source.name
        if not target.is_file():
            added.append(source.name)
        elif target.read_bytes() != source.read_bytes():
            replaced.append(source.name)
    return replaced, added


def compat_tested_range(folder):
    """What the folder's `compat_navil.py` says about the transformers it was tested with, read as text:
    "5.16.1 to 5.24.0", "at least 5.16.1", or None."""
    path = Path(folder) / "compat_navil.py"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    tested = _TESTED.search(text)
    if tested:
        return tested.group(1), tested.group(2)
    minimum = _MINIMUM.search(text)
    return (minimum.group(1), None) if minimum else None


def _environment_hint(folder):
    found = compat_tested_range(folder)
    if found is None:
        return (
            "its code names no tested transformers range (no TESTED_TRANSFORMERS in compat_navil.py): run `navil "
            "refresh` in an environment with the transformers it was converted with"
        )
    low, high = found
    if high is None:
        return f"its compat_navil.py asks for transformers>={low}: run `navil refresh` in an environment with that"
    return (
        f"its compat_navil.py says it was tested with transformers {low} to {high}: run `navil refresh` in an "
        f"environment with one of those (pip install 'transformers>={low},<={high}')"
    )


# ---------------------------------------------------------------------------------------------------
# The behaviour check: each folder's code in a subprocess of its own


def run_probe(folder, dtype="float32", device=None, new_tokens=NEW_TOKENS):
    """Run `folder`'s code in a fresh Python process (offline, private dynamic-module cache) on the probe
    prompts. Returns ({name: tensor}, transformers version) or raises `_ProbeFailed`."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="navil-refresh-probe-") as scratch:
        scratch = Path(scratch)
        env = dict(os.environ, HF_MODULES_CACHE=str(scratch / "modules"), HF_HUB_OFFLINE="1")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        command = [sys.executable, "-m", __name__, str(Path(folder).resolve()), str(scratch), dtype]
        command += [device or "", str(new_tokens)]
        done = subprocess.run(command, cwd=scratch, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        report = scratch / "report.json"
        outcome = json.loads(report.read_text()) if report.is_file() else None
        if outcome is None or not outcome.get("ok"):
            if outcome is None:
                tail = [line for line in (done.stderr or "").splitlines() if line.strip()][-1:]
                error = f"the process ended with code {done.returncode}" + (f" ({tail[0].strip()})" if tail else "")
            else:
                error = outcome["error"]
            raise _ProbeFailed(error)
        return load_file(scratch / "probe.safetensors"), outcome["transformers"]


class _ProbeFailed(Exception):
    pass


def _probe_prompts(processor):
    from .verify import probe_inputs

    yield "image", probe_inputs(processor)
    messages = [{"role": "user", "content": [{"type": "text", "text": TEXT_PROBE}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    yield "text", processor(text=[prompt], return_tensors="pt")


def _probe_main(argv):
    """The subprocess: load the folder through the Auto classes, record inputs, logits and greedy tokens."""
    folder, scratch, dtype_name, device, new_tokens = argv
    scratch = Path(scratch)
    from . import verify  # noqa: F401 -- its imports load this package's Hub modules: before they are blocked

    # The Hub files fall back to the installed top-level modules when a sibling import fails: here that
    # would mix this package's code into the folder's, so only the folder's own files may be imported.
    for name in CODE_MODULES:
        sys.modules[name] = None
    try:
        import torch
        import transformers
        from safetensors.torch import save_file
        from transformers import AutoModel, AutoProcessor

        dtype = getattr(torch, dtype_name)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
        out = {}
        for name, inputs in _probe_prompts(processor):
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
            if "pixel_values" in inputs:
                out[f"{name}.pixel_values"] = inputs["pixel_values"].float().cpu()
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out[f"{name}.logits"] = model(**inputs).logits[0].float().cpu()
                ids = model.generate(**inputs, max_new_tokens=int(new_tokens), do_sample=False)
            prompt_length = inputs["input_ids"].shape[1]
            out[f"{name}.input_ids"] = inputs["input_ids"][0].cpu()
            out[f"{name}.tokens"] = ids[0, prompt_length:].cpu()
        save_file({k: v.contiguous() for k, v in out.items()}, scratch / "probe.safetensors")
        report = {"ok": True, "transformers": transformers.__version__}
    except BaseException as e:  # noqa: BLE001 -- whatever the folder's code does, report it in one line
        while isinstance(e, ImportError) and e.name in CODE_MODULES and e.__context__ is not None:
            e = e.__context__  # a blocked fallback import: what made the folder's own import fail
        report = {"ok": False, "error": f"{type(e).__name__}: {first_line(e)}"}
    (scratch / "report.json").write_text(json.dumps(report))
    return 0 if report["ok"] else 1


def compare_probes(old, new, dtype="float32", ulps=ULPS):
    """{check: description} when the refreshed folder behaves as the old one; `VerificationError` naming
    the first difference (and the max-abs difference of logits) otherwise."""
    import torch

    eps = torch.finfo(getattr(torch, dtype)).eps
    checks = {}
    for prompt in ("image", "text"):
        what = "a prompt with an image" if prompt == "image" else "a text-only prompt"
        ids_old, ids_new = old[f"{prompt}.input_ids"], new[f"{prompt}.input_ids"]
        if not torch.equal(ids_old, ids_new):
            raise VerificationError(
                f"on {what} the refreshed processor gives other input ids ({ids_new.numel()} tokens, the old code "
                f"{ids_old.numel()})"
            )
        worst = []
        for part in ("pixel_values", "logits"):
            key = f"{prompt}.{part}"
            if key not in old and key not in new:
                continue
            if (key in old) != (key in new) or old[key].shape != new[key].shape:
                raise VerificationError(f"on {what} the refreshed folder gives {part} of another shape")
            diff = (new[key] - old[key]).abs().max().item() if old[key].numel() else 0.0
            tolerance = ulps * eps * max(1.0, old[key].abs().max().item())
            if not diff <= tolerance:
                raise VerificationError(
                    f"on {what} the refreshed code's {part} differ from the old code's: max abs diff {diff:.3g} > "
                    f"tolerance {tolerance:.3g} ({ulps} eps of {dtype} x the largest magnitude)"
                )
            worst.append(f"{part} max abs diff {diff:.3g} <= {tolerance:.3g}")
        tokens_old, tokens_new = old[f"{prompt}.tokens"].tolist(), new[f"{prompt}.tokens"].tolist()
        if tokens_old != tokens_new:
            raise VerificationError(
                f"on {what} greedy decoding differs: the old code gives tokens {tokens_old}, the refreshed {tokens_new}"
            )
        checks[f"{prompt} prompt"] = (
            f"{ids_old.numel()} input ids equal, {'; '.join(worst)}, {len(tokens_old)} greedy tokens identical"
        )
    return checks


def check_same_behaviour(old_folder, new_folder, dtype="float32", device=None, report=None):
    """Run both folders' code (each in its own process) and compare (`compare_probes`)."""
    say = report or (lambda line: None)
    say(f"running the folder's current code ({old_folder}) in a subprocess ...")
    try:
        old, version = run_probe(old_folder, dtype, device)
    except _ProbeFailed as e:
        import transformers

        raise ConversionError(
            f"{old_folder}: the check cannot be made here: its current code fails on transformers "
            f"{transformers.__version__} ({e}); {_environment_hint(old_folder)}"
        ) from None
    say("running the refreshed code in a subprocess ...")
    try:
        new, _ = run_probe(new_folder, dtype, device)
    except _ProbeFailed as e:
        raise VerificationError(f"the refreshed code fails on this folder ({e})") from None
    try:
        checks = compare_probes(old, new, dtype)
    except VerificationError as e:  # old code that runs but misbehaves on this transformers looks the same
        raise VerificationError(
            f"{e}; if it is the old code that misbehaves on transformers {version}: {_environment_hint(old_folder)}"
        ) from None
    checks["code"] = f"the old and the refreshed code ran on transformers {version}, {dtype}"
    return checks


# ---------------------------------------------------------------------------------------------------
# Refreshing a local folder


def _stage(folder):
    """A temporary folder beside `folder` holding this package's code files and symlinks to every other
    entry of `folder` (what the refreshed folder will be, without copying any weight)."""
    folder = Path(folder).resolve()
    tmp = temporary_folder(folder)
    for entry in folder.iterdir():
        if entry.name not in CODE_FILES:
            os.symlink(entry, tmp / entry.name)
    for source in code_files():
        shutil.copyfile(source, tmp / source.name)
    return tmp


def refresh_folder(
    folder,
    out_dir=None,
    *,
    trust_remote_code=False,
    force=False,
    dtype="float32",
    device=None,
    report=None,
):
    """Give the converted NaViL folder `folder` this package's code files, in place or (with `out_dir`) as
    a refreshed copy; every other file is kept byte for byte. The old and the refreshed code are checked to
    behave the same first (`check_same_behaviour`, which runs the folder's current code: needs
    `trust_remote_code=True`). `report` gets progress lines. Returns a `RefreshResult`; raises
    `ConversionError` for a folder that cannot be refreshed (or checked here) and `VerificationError` when
    the refreshed code behaves differently; nothing is written then."""
    from .push import check_folder

    start = time.perf_counter()
    folder = Path(folder)
    check_refreshable(folder)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_dir is not None:
        check_output_dir(out_dir, force, sources=[folder])
    replaced, added = stale_code_files(folder)
    others = sorted(p.name for p in folder.iterdir() if p.name not in CODE_FILES)
    if not replaced and not added:
        return RefreshResult(folder, changed=False, untouched=len(others), seconds=time.perf_counter() - start)
    if not trust_remote_code:
        raise ConversionError(
            f"refresh runs the code {folder} carries now, to compare it with the new: pass --trust-remote-code "
            "(trust_remote_code=True) if you trust that folder"
        )
    parent = folder.resolve().parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write in {parent} (permission denied), where refresh builds the new code")
    clean_stale_temporaries(folder)
    staged = _stage(folder)
    try:
        problems = check_folder(staged)
        if problems:
            raise ConversionError(f"{folder} with the new code is not a complete NaViL folder: {'; '.join(problems)}")
        try:
            checks = check_same_behaviour(folder, staged, dtype, device, report)
        except VerificationError as e:
            raise VerificationError(f"{e}; nothing was written") from None
        if out_dir is None:
            for name in replaced + added:
                old = folder / name
                if old.exists():
                    shutil.copymode(old, staged / name)
                os.replace(staged / name, old)
            target = folder
        else:
            with staged_folder(out_dir, force) as tmp:
                for name in others:
                    source = folder / name
                    copy = shutil.copytree if source.is_dir() else shutil.copy2
                    copy(source, tmp / name)
                for source in code_files():
                    shutil.copyfile(source, tmp / source.name)
            target = Path(out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # the links only: rmtree never follows them
        forget_remote_module(staged)
    return RefreshResult(
        target,
        changed=True,
        replaced=replaced,
        added=added,
        untouched=len(others),
        checks=checks,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------------
# Refreshing a Hub repo


def refresh_repo(
    repo_id,
    out_dir=None,
    *,
    push=True,
    trust_remote_code=False,
    force=False,
    revision=None,
    commit_message=None,
    token=None,
    endpoint=None,
    timeout=None,
    dtype="float32",
    device=None,
    progress=True,
    report=None,
):
    """Download `repo_id` (at the head of `revision`, default main) and refresh it (`refresh_folder`); with
    `push`, publish it back to the same branch through `push_folder`, as one commit on top of the
    downloaded one (it fails, committing nothing, if the branch moved meanwhile). With `out_dir` the
    refreshed folder is kept there; otherwise it is downloaded into a temporary folder and removed."""
    from .. import __version__
    from .push import check_push_target, hub_progress_bars, push_folder, resolve_timeout

    if push:
        check_push_target(repo_id, token)
        resolve_timeout(timeout)
    if out_dir is not None:
        check_output_dir(out_dir, force)
    say = report or (lambda line: None)
    work = Path(out_dir).resolve().parent if out_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="navil-refresh-", dir=work) as scratch:
        local = Path(scratch) / repo_id.split("/")[-1]
        with hub_progress_bars(progress):
            sha = download(repo_id, local, revision=revision, token=token, endpoint=endpoint, report=say)
        shutil.rmtree(local / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        result = refresh_folder(local, trust_remote_code=trust_remote_code, dtype=dtype, device=device, report=report)
        result.folder = f"{repo_id}@{sha[:12]}"
        if result.changed and push:
            result.push = push_folder(
                local,
                repo_id,
                revision=revision,
                commit_message=commit_message or f"Refresh NaViL's code files (navil-hf {__version__})",
                token=token,
                progress=progress,
                endpoint=endpoint,
                timeout=timeout,
                parent_commit=sha,
            )
        if out_dir is not None and result.changed:
            with staged_folder(out_dir, force) as tmp:
                for entry in local.iterdir():
                    os.rename(entry, tmp / entry.name)
            result.folder = Path(out_dir)
    return result


def download(repo_id, local_dir, *, revision=None, token=None, endpoint=None, report=None):
    """Download the head of `revision` of the model repo `repo_id` into `local_dir` (huggingface_hub's
    `snapshot_download` at that commit). Returns the commit's sha. A repo or revision that does not exist
    (or cannot be read with this token) is a `ConversionError`; any other failure a `PushError`."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from ..errors import PushError

    api = HfApi(endpoint=endpoint, token=token, library_name="navil")
    try:
        sha = api.repo_info(repo_id, revision=revision).sha
        if report is not None:
            report(f"downloading {repo_id} at {sha[:12]} ...")
        snapshot_download(repo_id, revision=sha, local_dir=local_dir, token=token, endpoint=endpoint)
    except RevisionNotFoundError:
        raise ConversionError(f"{repo_id} has no branch {revision!r}") from None
    except RepositoryNotFoundError:
        raise ConversionError(
            f"{repo_id}: no such folder, and no such model repo on the Hub (or no access to it with this token)"
        ) from None
    except Exception as e:  # noqa: BLE001 -- network and Hub errors: one line, nothing changed
        raise PushError(f"downloading {repo_id} failed ({first_line(e)}); nothing was changed") from None
    return sha


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
