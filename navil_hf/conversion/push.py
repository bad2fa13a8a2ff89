"""Publishing a converted NaViL folder to the Hugging Face Hub (`navil push`, `navil convert --push-to-hub`).

Before anything is sent, `check_folder` makes sure the folder is what API.md "Loading" promises: the
code files (`CODE_MODULES`), `config.json` (`model_type: navil`, `auto_map` for the four auto classes), safetensors weights
(one file, or an index whose shards are all there; no pickled `.bin`/`.pt` files), the tokenizer, a
processor config with `auto_map`, a chat template, `generation_config.json` and a model card -- and that it
loads: `AutoConfig` and `AutoProcessor` load it with `trust_remote_code=True`, and the parameter names and
shapes of the model built from that config on the `meta` device equal the safetensors headers exactly
(headers only: no weight is read, so this is cheap for a 9B model too).

`push_folder` then creates the repo (and branch) if needed and uploads the folder as ONE commit through
`HfApi.create_commit`. `HfApi.upload_folder` is not used on purpose: with `hf_xet` installed it streams
large folders as several commits (one at least every few minutes), so an interrupted upload of a big
checkpoint would leave a half-published model. With one commit the repository changes all at once or
not at all. Files the Hub already holds with the same content are skipped by huggingface_hub itself; a
push of an unchanged folder makes no commit. The token comes from `token=` or huggingface_hub's own
resolution (`HF_TOKEN`, then the saved login) and is never printed.

A hostile or broken Hub cannot make a push hang or lie about its outcome:

- Every HTTP request of the push (API calls, LFS uploads, the check below) has a timeout (`timeout=`,
  else the `NAVIL_PUSH_TIMEOUT` environment variable, else `DEFAULT_TIMEOUT` seconds). huggingface_hub
  has none of its own for uploads (its client is created with `timeout=None`; `HF_HUB_ETAG_TIMEOUT` and
  `HF_HUB_DOWNLOAD_TIMEOUT` only cover downloads), so for the duration of the push its shared client
  (`get_session()`) gets a request hook that gives each request without a timeout this one
  (`_request_timeout` says why there and what it cannot cover). The limit is per network operation
  (connecting, each read, each write), not for a whole upload, so large files are not cut off. A request
  that times out ends the push at once with a `PushError` naming the timeout and the request
  (huggingface_hub's retries, meant for transient errors, would multiply the wait on a Hub that hangs);
  HTTP errors and dropped connections are still retried where huggingface_hub retries them. Uploads
  through Xet (`hf_xet`) do not use this client.
- The commit carries a unique id (`navil-push-id: ...` in its description). When the commit request
  fails -- an error status, a dropped connection, a timeout -- the branch's history is read back and
  searched for that id, down to the commit the push was based on. A commit that was applied although
  the answer was an error counts as a success (`PushResult.warning` says what happened; the command
  line prints it); otherwise `PushError` says whether nothing was committed (verified), whether no commit
  was there when checked although the Hub never answered (so it may still appear), or that it could not
  be determined, with the URL of the branch's commits to look at.
"""

import json
import logging
import math
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError, PushError, first_line
from ..folders import (
    CHAT_TEMPLATE_FILES,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    PICKLE_SUFFIXES,
    PROCESSOR_CONFIGS,
    SAFETENSORS_INDEX,
    SINGLE_SAFETENSORS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_VOCAB_FILES,
    pickle_refusal,
    pickled_files,
    read_safetensors_header,
)
from ..hub import AUTO_MAP, CODE_MODULES, tied_weight_keys

CODE_FILES = tuple(f"{name}.py" for name in CODE_MODULES)
CONFIG_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")
# Never uploaded: version control, caches (`.cache/huggingface` appears in folders downloaded with
# `hf download --local-dir`), Python byte code, editor/OS droppings.
IGNORE_PATTERNS = (
    ".git", ".git/*", "*/.git", "*/.git/*",
    ".cache", ".cache/*", "*/.cache", "*/.cache/*",
    "__pycache__", "__pycache__/*", "*/__pycache__", "*/__pycache__/*", "*.pyc", "*.pyo",
    ".DS_Store", "*/.DS_Store", ".ipynb_checkpoints/*", "*/.ipynb_checkpoints/*",
)  # fmt: skip
# Remote files a push replaces: weights of the repo revision that the folder does not have (e.g. the old
# single `model.safetensors` when a sharded checkpoint is pushed over it) are deleted in the same commit,
# so transformers cannot pick up stale weights beside the new ones.
STALE_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json") + PICKLE_SUFFIXES + (".bin.index.json",)
MAX_LISTED = 8
TIMEOUT_ENV = "NAVIL_PUSH_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds without progress on one request (connect, a read, a write)
PUSH_ID_PREFIX = "navil-push-id: "
MAX_HISTORY_PAGES = 20  # pages of the branch history read back to look for a commit after a failed push
_COMMIT_PATH = re.compile(r"/api/models/[^/]+/[^/]+/commit/.+$")  # POST: the commit request
_TIMEOUT_KINDS = ("connect", "read", "write", "pool")

logger = logging.getLogger(__name__)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    changed: bool  # False: the revision already held exactly these files, no commit was made
    repo_url: str
    files: list = field(default_factory=list)  # paths in the folder that were part of the push
    deleted: list = field(default_factory=list)  # stale remote weight files removed by the commit
    # set when the commit was applied although the commit request failed (e.g. the Hub answered 500
    # after committing, or never answered): found in the branch history afterwards
    warning: str | None = None


# ---------------------------------------------------------------------------------------------------
# What is uploaded


def folder_files(folder):
    """Relative POSIX paths of the files `push_folder` uploads (sorted), junk (`IGNORE_PATTERNS`) left out."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=list(IGNORE_PATTERNS)))


# ---------------------------------------------------------------------------------------------------
# Checks


def check_folder(folder):
    """Every reason `folder` is not ready to publish, as a list of messages (empty when it is ready)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a directory"]
    files = set(folder_files(folder))
    problems = []

    missing_code = [name for name in CODE_FILES if name not in files]
    if missing_code:
        problems.append(f"missing code file(s) {', '.join(missing_code)}")

    config = _read_json(folder, CONFIG_FILE, files, problems)
    config_ok = config is not None
    if config is not None:
        if config.get("model_type") != "navil":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, expected 'navil'")
            config_ok = False
        auto_map = config.get("auto_map") or {}
        wrong = [c for c in CONFIG_AUTO_CLASSES if auto_map.get(c) != AUTO_MAP[c]]
        if wrong:
            problems.append(
                "config.json auto_map lacks or misnames " + ", ".join(f"{c} (expected {AUTO_MAP[c]})" for c in wrong)
            )
            config_ok = False

    shards = _check_weight_files(folder, files, problems)

    tokenizer_config = _read_json(folder, TOKENIZER_CONFIG_FILE, files, problems)
    has_vocab = any(name in files for name in TOKENIZER_VOCAB_FILES)
    if not has_vocab:
        problems.append(f"no tokenizer vocabulary (one of {', '.join(TOKENIZER_VOCAB_FILES)})")

    processor_name = next((name for name in PROCESSOR_CONFIGS if name in files), None)
    processor_config = None
    if processor_name is None:
        problems.append(f"missing {PROCESSOR_CONFIGS[0]} (or {PROCESSOR_CONFIGS[1]})")
    else:
        processor_config = _read_json(folder, processor_name, files, problems)
        if processor_config is not None and "AutoProcessor" not in (processor_config.get("auto_map") or {}):
            problems.append(f"{processor_name} has no auto_map entry for AutoProcessor")

    has_template = any(name in files for name in CHAT_TEMPLATE_FILES) or any(
        isinstance(c, dict) and c.get("chat_template") for c in (tokenizer_config, processor_config)
    )
    if not has_template:
        problems.append(
            "no chat template (chat_template.jinja, or chat_template in tokenizer_config.json / the processor config)"
        )

    _read_json(folder, GENERATION_CONFIG_FILE, files, problems)
    readme = folder / "README.md"
    if "README.md" not in files:
        problems.append("missing model card README.md")
    elif not readme.read_text(encoding="utf-8", errors="replace").strip():
        problems.append("README.md (the model card) is empty")

    # Loading checks, only where the files they need passed the checks above (no repeated complaints; and
    # transformers imports every model it knows to word the error for a config it cannot map).
    loaded_config = _check_loads_config(folder, problems) if config_ok and not missing_code else None
    tokenizer_ok = tokenizer_config is not None and has_vocab
    if loaded_config is not None and tokenizer_ok and processor_config is not None and has_template:
        _check_loads_processor(folder, problems)
    if loaded_config is not None and shards is not None:
        _check_weights_match_model(folder, loaded_config, shards, problems)
    return problems


def validate_folder(folder):
    """Raise `ConversionError` listing every problem `check_folder` finds."""
    problems = check_folder(folder)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ConversionError(f"{folder} is not ready to push ({count}): " + "; ".join(problems))


def _read_json(folder, name, files, problems):
    if name not in files:
        problems.append(f"missing {name}")
        return None
    try:
        value = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        problems.append(f"{name} is not valid JSON ({e})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{name} does not hold a JSON object")
        return None
    return value


def _check_weight_files(folder, files, problems):
    """Pickled weights, index consistency. Returns {shard file: [tensor names the index assigns] or None}
    for the shards to compare with the model, or None when the weights are unusable."""
    pickled = pickled_files(files)
    if pickled:
        problems.append(pickle_refusal(pickled))
    safetensors = sorted(f for f in files if f.endswith(".safetensors"))
    if SAFETENSORS_INDEX in files:
        try:
            weight_map = json.loads((Path(folder) / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty or not a mapping")
        except (ValueError, KeyError, TypeError, OSError) as e:
            problems.append(f"{SAFETENSORS_INDEX} has no usable weight_map ({e})")
            return None
        shards = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        absent = sorted(s for s in shards if s not in files)
        if absent:
            problems.append(f"{SAFETENSORS_INDEX} lists shard(s) missing from the folder: {_listing(absent)}")
        unlisted = sorted(set(safetensors) - set(shards))
        if unlisted:
            problems.append(f"safetensors file(s) not listed in {SAFETENSORS_INDEX}: {_listing(unlisted)}")
        return None if absent else shards
    if SINGLE_SAFETENSORS in files:
        others = [f for f in safetensors if f != SINGLE_SAFETENSORS]
        if others:
            problems.append(f"safetensors file(s) beside {SINGLE_SAFETENSORS} without an index: {_listing(others)}")
        return {SINGLE_SAFETENSORS: None}
    problems.append(f"no safetensors weights ({SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX} with its shards)")
    return None


def _check_loads_config(folder, problems):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 -- any failure means users cannot load it either
        problems.append(f"AutoConfig.from_pretrained(trust_remote_code=True) fails: {first_line(e)}")
        return None


def _check_loads_processor(folder, problems):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    except Exception as e:  # noqa: BLE001
        problems.append(f"AutoProcessor.from_pretrained(trust_remote_code=True) fails: {first_line(e)}")
        return
    if not getattr(processor, "chat_template", None):
        problems.append("the processor loaded from the folder has no chat template")


def expected_weight_shapes(config):
    """{name: shape} the folder's model expects and the names that may be left out (tied weights),
    from the model built on the `meta` device through the folder's own code (`AutoModel.from_config`)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}, tied_weight_keys(model)


def safetensors_shapes(folder, shards):
    """{name: shape} from the safetensors headers (no tensor data is read) and problems found on the way."""
    shapes, problems = {}, []
    for shard, indexed in sorted(shards.items()):
        try:
            header = read_safetensors_header(Path(folder) / shard)
        except ConversionError as e:  # a truncated or corrupt header
            problems.append(f"cannot read the safetensors header of {shard}: {first_line(e)}")
            continue
        names = list(header)
        for name in names:
            if name in shapes:
                problems.append(f"tensor {name} is stored in more than one safetensors file")
            shapes[name] = tuple(header[name]["shape"])
        if indexed is not None:
            listed_elsewhere = sorted(set(indexed) - set(names))
            if listed_elsewhere:
                problems.append(
                    f"{SAFETENSORS_INDEX} places {len(listed_elsewhere)} tensor(s) in {shard} that it does not "
                    f"hold: {_listing(listed_elsewhere)}"
                )
    return shapes, problems


def _check_weights_match_model(folder, config, shards, problems):
    try:
        expected, optional = expected_weight_shapes(config)
    except Exception as e:  # noqa: BLE001
        problems.append(f"cannot build the model from config.json on the meta device: {first_line(e)}")
        return
    stored, header_problems = safetensors_shapes(folder, shards)
    problems.extend(header_problems)
    missing = sorted(set(expected) - set(stored) - optional)
    unexpected = sorted(set(stored) - set(expected))
    misshapen = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
    if missing:
        problems.append(f"{len(missing)} weight(s) the model expects are not in the safetensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} safetensors tensor(s) the model does not have: {_listing(unexpected)}")
    if misshapen:
        details = [f"{n} {list(stored[n])} (expected {list(expected[n])})" for n in misshapen]
        problems.append(f"{len(misshapen)} weight(s) with the wrong shape: {_listing(details)}")


def _listing(items):
    items = list(items)
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------------
# Upload


def check_push_target(repo_id, token=None):
    """Cheap checks before any work: a valid repo id and a token to push with. Raises `ConversionError`."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConversionError(f"{repo_id!r} is not a valid Hub repo id (OWNER/NAME): {first_line(e)}") from None
    if token is None and get_token() is None:
        raise ConversionError(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (a token with write access)"
        )


def push_folder(
    folder,
    repo_id,
    *,
    private=False,
    revision=None,
    commit_message=None,
    token=None,
    progress=True,
    endpoint=None,
    timeout=None,
    parent_commit=None,
):
    """Check `folder` (`validate_folder`) and upload it to the model repo `repo_id` as one commit.

    Args:
        private: create the repo private. `False` leaves a new repo's visibility to the Hub's default
            (public unless the organisation defaults to private). An existing repo keeps its visibility;
            with `private=True` an existing *public* repo is refused rather than published to.
        revision: branch to commit to (created from the default branch if missing); default `main`.
        commit_message: summary of the commit (default "Upload <folder name> with navil").
        token: a Hub token; `None` uses huggingface_hub's resolution (`HF_TOKEN`, then the saved login).
        progress: show huggingface_hub's progress bars (enabled for the call even if disabled elsewhere).
        endpoint: Hub URL; `None` uses huggingface_hub's configuration (`HF_ENDPOINT`).
        timeout: seconds any one network operation of the push (connect, a read, a write) may take before
            the push fails; `None` uses `NAVIL_PUSH_TIMEOUT`, else `DEFAULT_TIMEOUT` (60 s).
        parent_commit: the commit the branch must still be at (e.g. the one `folder` was downloaded from);
            when it has moved on, nothing is sent and `PushError` says so.

    Returns a `PushResult` (with `warning` set when the commit was applied although the commit request
    failed). Raises `ConversionError` for an incomplete folder or bad arguments (nothing is sent) and
    `PushError` when the Hub rejects or the upload fails; its message says whether nothing was committed,
    or, when that could not be verified, where to look.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    timeout = resolve_timeout(timeout)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a directory")
    check_push_target(repo_id, token)
    validate_folder(folder)
    files = folder_files(folder)
    api = HfApi(endpoint=endpoint, token=token, library_name="navil")
    message = commit_message or f"Upload {folder.resolve().name} with navil"
    push_id = uuid.uuid4().hex
    sent = _Requests()
    with hub_progress_bars(progress), _request_timeout(timeout, sent), _scrubbed_errors(repo_id, token):
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        repo_id = repo_url.repo_id or repo_id
        info = api.repo_info(repo_id)
        if private and info.private is False:
            raise PushError(
                f"{repo_id} already exists and is public, so a private push is refused (an existing repo keeps its "
                "visibility: make it private on the Hub first, or push without --private); nothing was committed"
            )
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.repo_info(repo_id, revision=revision)
        if parent_commit is not None and info.sha != parent_commit:
            raise PushError(
                f"{repo_id} ({revision or 'main'}) has moved on from {parent_commit[:12]} to {info.sha[:12]} since the "
                "folder was read from it; nothing was committed"
            )
        remote = [s.rfilename for s in (info.siblings or [])]
        stale = sorted(p for p in remote if p.endswith(STALE_WEIGHT_SUFFIXES) and p not in files)
        operations = [CommitOperationDelete(path_in_repo=p) for p in stale]
        operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=folder / p) for p in files]
        failure = applied = None
        try:
            commit = api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                commit_description=f"{PUSH_ID_PREFIX}{push_id}",  # to recognise the commit after a failure
                revision=revision,
                parent_commit=info.sha,  # fail rather than overwrite a commit made since we looked
            )
        except Exception as e:  # whatever broke: re-raised at once unless the commit request went out
            if not sent.commit_maybe_sent:
                raise  # it never did: nothing was committed
            failure = e
        if failure is not None:  # outside the except block: the PushError it may raise carries no traceback of e
            applied = _commit_outcome(api, repo_id, revision or "main", info.sha, push_id, failure, token)
    if applied is not None:
        oid, warning = applied
        return PushResult(
            repo_id=repo_id,
            revision=revision or "main",
            commit_url=_commit_url(api, repo_id, oid),
            commit_oid=oid,
            changed=True,
            repo_url=str(repo_url),
            files=files,
            deleted=stale,
            warning=warning,
        )
    return PushResult(
        repo_id=repo_id,
        revision=revision or "main",
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
        changed=commit.oid != info.sha,
        repo_url=str(repo_url),
        files=files,
        deleted=stale,
    )


def resolve_timeout(timeout=None):
    """The push timeout in seconds: `timeout`, else `NAVIL_PUSH_TIMEOUT`, else `DEFAULT_TIMEOUT`.
    Raises `ConversionError` for a value that is not a positive finite number."""
    source = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        source, timeout = TIMEOUT_ENV, text
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConversionError(f"{source} must be a positive number of seconds, got {timeout!r}")
    return value


class _Requests:
    """What the push has sent (filled in by the request hook of `_request_timeout`)."""

    def __init__(self):
        self.commit = False  # a commit request went out (it may or may not have been applied)
        self.replaced = False  # huggingface_hub closed the client the hook is on: later requests go unseen

    @property
    def commit_maybe_sent(self):
        return self.commit or self.replaced

    def saw(self, request):
        if request.method == "POST" and _COMMIT_PATH.search(request.url.path):
            self.commit = True


class _HubTimeout(Exception):
    """A request of the push got no progress within the timeout. Deliberately not an HTTP-library exception:
    huggingface_hub retries those (up to 5 times, with pauses), which would multiply the wait on a Hub
    that hangs; this one ends the push at once."""

    def __init__(self, request, kind, seconds):
        self.request, self.kind, self.seconds = request, kind, seconds
        what = {"connect": "could not connect", "write": "could not send the request", "pool": "no free connection"}
        super().__init__(
            f"{what.get(kind, 'no answer')} within the {seconds:g} s timeout ({request.method} "
            f"{str(request.url).split('?')[0]}; set it with timeout= or {TIMEOUT_ENV})"
        )


@contextmanager
def _request_timeout(timeout, sent):
    """For the block, every request made through huggingface_hub's shared HTTP client (the one its public
    `get_session()` returns, made by whatever client factory is set) that has no timeout of its own gets
    `timeout` seconds (per network operation), is reported to `sent`, and a timeout raises `_HubTimeout`
    instead of being retried.

    huggingface_hub's public API sets no timeout for API calls and uploads (`HF_HUB_ETAG_TIMEOUT` and
    `HF_HUB_DOWNLOAD_TIMEOUT` cover downloads only) and passes `timeout=None` explicitly in some calls
    (`repo_info`, paginated listings), which would override a client default; `set_client_factory` can
    replace the client factory but nothing public reads the one in place, so wrapping it would lose a
    user's factory. So the shared client itself gets, through httpx's public client API, a request hook
    that sets the limit on each request and a guarded `send`; both are taken off afterwards and the
    factory is left alone. huggingface_hub replaces its shared client after a connection error during an
    upload (`close_session`): the new client has no limit, and `sent.replaced` makes the push check the
    outcome of its commit instead of assuming the commit request was never sent."""
    from huggingface_hub import get_session

    client = get_session()
    timeout_error = _httpx().TimeoutException
    kinds = {"ConnectTimeout": "connect", "WriteTimeout": "write", "PoolTimeout": "pool"}
    hooks = {name: list(functions) for name, functions in client.event_hooks.items()}
    overridden = {name: vars(client)[name] for name in ("send", "close") if name in vars(client)}
    send, close = client.send, client.close

    def hook(request):
        limits = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            kind: timeout if limits.get(kind) is None else limits[kind] for kind in _TIMEOUT_KINDS
        }
        sent.saw(request)

    def guarded_send(request, *args, **kwargs):
        try:
            return send(request, *args, **kwargs)
        except timeout_error as e:
            kind = kinds.get(type(e).__name__, "read")
            seconds = (request.extensions.get("timeout") or {}).get(kind)
            raise _HubTimeout(request, kind, seconds if isinstance(seconds, (int, float)) else timeout) from e

    def noted_close(*args, **kwargs):
        sent.replaced = True
        return close(*args, **kwargs)

    client.event_hooks = {**hooks, "request": [*hooks.get("request", []), hook]}
    client.send = guarded_send  # `request`, `get`, `post`, `stream` all go through `send`
    client.close = noted_close
    try:
        yield
    finally:
        client.event_hooks = hooks
        for name in ("send", "close"):
            if name in overridden:
                setattr(client, name, overridden[name])
            else:
                delattr(client, name)


def _commit_url(api, repo_id, oid):
    return f"{api.endpoint}/{repo_id}/commit/{oid}"


def _commits_url(api, repo_id, revision):
    from urllib.parse import quote

    return f"{api.endpoint}/{repo_id}/commits/{quote(revision, safe='')}"


def _find_push(api, repo_id, revision, parent, push_id):
    """Read the branch history back, newest first, down to `parent` (the commit the push was based on).
    Returns the sha of the commit carrying `push_id`, or None when the history since `parent` holds none.
    Raises `LookupError` when `parent` is not reached, and whatever the requests raise."""
    from urllib.parse import quote

    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = f"{api.endpoint}/api/models/{repo_id}/commits/{quote(revision, safe='')}"
    headers = build_hf_headers(token=api.token, library_name="navil")
    for _ in range(MAX_HISTORY_PAGES):  # no retries here: one try per page, each under the push timeout
        response = get_session().get(url, headers=headers)
        hf_raise_for_status(response)
        for item in response.json():
            text = f"{item.get('title') or ''}\n{item.get('message') or ''}"
            if push_id in text:
                return item["id"]
            if item.get("id") == parent:
                return None
        url = response.links.get("next", {}).get("url")
        if not url:
            break
    raise LookupError(f"the history of {revision} read back does not reach the commit the push started from")


def _commit_outcome(api, repo_id, revision, parent, push_id, error, token):
    """After a failed commit request: (sha, warning) when the commit was applied anyway; otherwise raise the
    `PushError` that says truthfully what is known."""
    detail = _failure_detail(error, token)
    answered = _http_status(error)
    commits = _commits_url(api, repo_id, revision)
    try:
        oid = _find_push(api, repo_id, revision, parent, push_id)
    except Exception as check:  # noqa: BLE001 -- the check failed too: say so, never guess
        why = _failure_detail(check, token)
        raise PushError(
            f"push to {repo_id} failed ({detail}); could not determine whether the commit was applied "
            f"(reading the history of {revision} back failed: {why}): check {commits}"
        ) from None
    if oid is not None:
        if answered is not None:
            how = f"the Hub answered HTTP {answered}"
        elif _timeout_of(error) is not None and _timeout_of(error).kind == "read":
            how = f"the Hub did not answer within the {_timeout_of(error).seconds:g} s timeout"
        else:
            how = f"the commit request got no answer ({detail})"
        return oid, f"{repo_id}: the commit was applied ({oid}) although {how}: {_commit_url(api, repo_id, oid)}"
    if answered is not None:
        raise PushError(
            f"push to {repo_id} failed ({detail}); nothing was committed (checked afterwards: the history of "
            f"{revision} has no commit of this push)"
        )
    raise PushError(
        f"push to {repo_id} failed ({detail}); no commit of this push was on {revision} when checked right after, "
        f"but the Hub never answered the commit request and may still apply it: check {commits}"
    )


def _chain(error, limit):
    """`error` and its causes (explicit or implicit), `limit` at most. The causes of a timeout or a network
    error of the HTTP library are its internals (the same message again): the chain stops there."""
    httpx = _httpx()
    seen = []
    while error is not None and len(seen) < limit and error not in seen:
        seen.append(error)
        if isinstance(error, (_HubTimeout, httpx.RequestError)):
            break
        error = error.__cause__ or error.__context__
    return seen


def _httpx():
    """The HTTP library huggingface_hub runs on (`httpx2` from its 2.x releases, which export it as
    `huggingface_hub.utils.httpx`; `httpx` in 1.x)."""
    from huggingface_hub import utils

    try:
        return utils.httpx
    except AttributeError:  # huggingface_hub 1.x
        import httpx

        return httpx


def _http_status(error):
    """The HTTP status of the answer behind `error`, or None when no answer came."""
    for e in _chain(error, limit=8):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _timeout_of(error):
    return next((e for e in _chain(error, limit=8) if isinstance(e, _HubTimeout)), None)


def _describe(error):
    """One line for one exception of the chain; network errors name the request that failed."""
    line = first_line(error)
    if isinstance(error, _httpx().RequestError):
        try:
            request = error.request
        except RuntimeError:  # no request attached
            return line
        url = str(request.url).split("?")[0]
        if url not in line:
            line = f"{line.rstrip('.')} ({request.method} {url})"
    return line


def _failure_detail(error, token):
    """The first lines of `error` and its causes (3 at most, repeats left out), the token scrubbed."""
    causes = []
    for seen in _chain(error, limit=8):
        line = _describe(seen)
        if line not in causes and len(causes) < 3:
            causes.append(line)
    detail = ": ".join(causes)
    for secret in _secrets(token):
        detail = detail.replace(secret, "***")
    return detail


@contextmanager
def hub_progress_bars(enabled):
    """huggingface_hub's progress bars on (or off) for the block, restored afterwards. The
    `HF_HUB_DISABLE_PROGRESS_BARS` environment variable keeps priority."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    forced = constants.HF_HUB_DISABLE_PROGRESS_BARS is not None
    switch = not forced and enabled == was_disabled
    if switch:
        (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        if switch:
            (disable_progress_bars if was_disabled else enable_progress_bars)()


@contextmanager
def _scrubbed_errors(repo_id, token):
    """Turn any failure of the Hub calls before the commit request into one `PushError` line that never
    contains the token."""
    try:
        yield
    except (PushError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 -- HTTP errors, network errors, LFS errors, bad Hub answers
        # only failures before the commit request was sent get here (see push_folder): nothing was committed
        raise PushError(f"push to {repo_id} failed ({_failure_detail(e, token)}); nothing was committed") from None


def _secrets(token):
    from huggingface_hub import get_token

    try:
        resolved = get_token()
    except Exception:  # noqa: BLE001 -- e.g. a failed OIDC exchange: scrub what we know
        resolved = None
    values = {token, resolved, os.environ.get("HF_TOKEN")}
    return [v for v in values if isinstance(v, str) and len(v) >= 4]
