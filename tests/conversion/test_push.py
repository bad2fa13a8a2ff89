"""Publishing (`navil push`, `navil convert --push-to-hub`, `conversion.push`): the folder checks, and
uploads through the real huggingface_hub client against the stand-in Hub of `hub_server.py`."""

import hashlib
import json
import shutil
import time
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from navil_hf.cli import main as navil
from navil_hf.conversion import check_folder, push_folder
from navil_hf.conversion.push import folder_files
from navil_hf.errors import ConversionError, PushError

from conftest import fixtures_dir
from hub_server import pointed_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's LFS PUT

TOKEN = "hf_navilTestToken_7c1e9f42b8d3a650"  # distinctive: searched for in every output
QWEN3 = fixtures_dir() / "original-qwen3-tiny" / "checkpoint"
JUNK = (".git/config", ".git/objects/ab/cdef", "__pycache__/modeling_navil.cpython-311.pyc",
        ".cache/huggingface/download/model.safetensors.metadata", "sub/__pycache__/x.pyc", "sub/.DS_Store")  # fmt: skip


@pytest.fixture(scope="module")
def converted(qwen3_folder):
    return qwen3_folder


@pytest.fixture(scope="module")
def converted_sharded(converted, tmp_path_factory):
    """The same folder with its weights in 4 shards and an index (as save_pretrained writes them)."""
    out = shutil.copytree(converted, tmp_path_factory.mktemp("push") / "navil-qwen3-tiny-sharded")
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names, weight_map = sorted(state), {}
    for i in range(4):
        shard = f"model-{i + 1:05d}-of-00004.safetensors"
        part = {name: state[name] for name in names[i::4]}
        save_file(part, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


@pytest.fixture
def folder(converted, tmp_path):
    return shutil.copytree(converted, tmp_path / "navil-tiny")


@pytest.fixture
def sharded(converted_sharded, tmp_path):
    return shutil.copytree(converted_sharded, tmp_path / "navil-tiny-sharded")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, with huggingface_hub pointed at it (`hub_server.pointed_hub`)."""
    with pointed_hub(TOKEN, monkeypatch, tmp_path / "hf-home") as server:
        yield server


@pytest.fixture
def no_retry_wait(monkeypatch):
    """huggingface_hub retries failed transfers 5 times with 1-8 s pauses: keep the retries, drop the pauses."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))


def run_main(capsys, caplog, argv):
    code = navil(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err + caplog.text


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_repo_holds(hub, repo_id, folder, revision="main"):
    """The revision's files are exactly the folder's (plus the Hub's .gitattributes), byte for byte."""
    files = hub.repo(repo_id).head(revision).files
    assert set(files) == set(folder_files(folder)) | {".gitattributes"}
    for path in folder_files(folder):
        entry = files[path]
        if entry.lfs:
            assert hub.state.lfs_store[entry.sha256] == (folder / path).read_bytes(), path
        else:
            assert entry.content == (folder / path).read_bytes(), path


def commit_requests(hub):
    return [p for m, p, _ in hub.requests if m == "POST" and "/commit/" in p]


# ---------------------------------------------------------------------------------------------------
# check_folder


def test_converted_folders_pass_the_checks(converted, converted_sharded):
    assert check_folder(converted) == []
    assert check_folder(converted_sharded) == []
    assert sum(f.endswith(".safetensors") for f in folder_files(converted_sharded)) >= 3


def _rewrite_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _drop_first_shard(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[0]).unlink()


def _edit_json(name, edit):
    def apply(folder):
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return apply


BREAKERS = {
    "code, generation config and model card missing": (
        lambda f: [(f / n).unlink() for n in ("modeling_navil.py", "generation_config.json", "README.md")],
        ["missing code file(s) modeling_navil.py", "missing generation_config.json", "missing model card README.md"],
    ),
    "config": (
        _edit_json("config.json", lambda c: (c.update(model_type="navil_chat"), c["auto_map"].pop("AutoModel"))),
        ["model_type 'navil_chat', expected 'navil'", "auto_map lacks or misnames AutoModel"],
    ),
    "pickle": (
        lambda f: torch.save({"x": torch.zeros(1)}, f / "pytorch_model.bin"),
        ["pickled weight files are refused", "pytorch_model.bin"],
    ),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), ["no safetensors weights"]),
    "tokenizer, processor auto_map, chat template": (
        lambda f: [
            (f / "tokenizer.json").unlink(),
            (f / "chat_template.jinja").unlink(),
            _edit_json("processor_config.json", lambda c: c.pop("auto_map"))(f),
        ],
        [
            "no tokenizer vocabulary",
            "processor_config.json has no auto_map entry for AutoProcessor",
            "no chat template",
        ],
    ),
    "weights that do not match the model": (
        lambda f: _rewrite_weights(
            f,
            lambda s: (
                s.pop("model.language_model.norm.weight"),
                s.update({"extra.weight": torch.zeros(2)}),
                s.update({"model.language_model.embed_tokens.weight": torch.zeros(3, 4)}),
            ),
        ),
        [
            "1 weight(s) the model expects are not in the safetensors: model.language_model.norm.weight",
            "1 safetensors tensor(s) the model does not have: extra.weight",
            "model.language_model.embed_tokens.weight [3, 4] (expected [",
        ],
    ),
    "code that does not load": (
        lambda f: (f / "configuration_navil.py").write_text("raise ImportError('broken on purpose')\n"),
        ["AutoConfig.from_pretrained(trust_remote_code=True) fails"],
    ),
}


@pytest.mark.parametrize("name", list(BREAKERS))
def test_every_problem_is_listed(folder, name):
    breaker, fragments = BREAKERS[name]
    breaker(folder)
    problems = check_folder(folder)
    text = "\n".join(problems)
    for fragment in fragments:
        assert fragment in text, (fragment, problems)


def test_sharded_index_problems(sharded):
    _drop_first_shard(sharded)
    (sharded / "stray.safetensors").write_bytes((sharded / "config.json").read_bytes())
    text = "\n".join(check_folder(sharded))
    assert "lists shard(s) missing from the folder" in text
    assert "not listed in model.safetensors.index.json: stray.safetensors" in text


# ---------------------------------------------------------------------------------------------------
# navil push


def test_incomplete_folder_is_refused_before_any_request(hub, folder, capsys, caplog):
    for name in ("tokenizer.json", "README.md"):
        (folder / name).unlink()
    code, out, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny"])
    assert code == 2
    assert "is not ready to push (2 problems)" in err and "tokenizer" in err and "README.md" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert hub.requests == []
    with pytest.raises(ConversionError, match="not ready to push"):
        push_folder(folder, "owner/navil-tiny")
    assert hub.requests == []


def test_push_uploads_the_folder_as_one_commit(hub, folder, capsys, caplog):
    for junk in JUNK:
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_bytes(b"junk")
    code, out, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny", "--commit-message", "first"])
    assert code == 0, err
    repo = hub.repo("owner/navil-tiny")
    initial, ours = repo.history()[::-1]
    assert ours.message == "first" and ours.parent == initial.oid
    assert ours.added == sorted(folder_files(folder))  # (a) exactly the folder, junk left out
    assert not any(p.startswith((".git/", ".cache/")) or "__pycache__" in p or "DS_Store" in p for p in ours.added)
    assert_repo_holds(hub, "owner/navil-tiny", folder)
    assert len(commit_requests(hub)) == 1
    assert f"{hub.url}/owner/navil-tiny/commit/{ours.oid}" in out


def test_unchanged_folder_makes_no_new_commit(hub, folder, capsys, caplog):
    assert navil(["push", str(folder), "owner/navil-tiny"]) == 0
    commits, puts = len(hub.repo("owner/navil-tiny").commits), sum(hub.state.lfs_put_attempts.values())
    code, out, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny"])
    assert code == 0, err
    assert "nothing changed" in out
    assert len(hub.repo("owner/navil-tiny").commits) == commits  # (b)
    assert sum(hub.state.lfs_put_attempts.values()) == puts and len(commit_requests(hub)) == 1

    card = folder / "README.md"
    card.write_text(card.read_text() + "\nMore words.\n")
    result = push_folder(folder, "owner/navil-tiny", progress=False)
    assert result.changed and hub.repo("owner/navil-tiny").head("main").added == ["README.md"]
    assert_repo_holds(hub, "owner/navil-tiny", folder)


@pytest.mark.parametrize("how", ["500", "drop"])
def test_failed_upload_leaves_no_commit(hub, sharded, no_retry_wait, capsys, caplog, how):
    shards = sorted(p for p in folder_files(sharded) if p.endswith(".safetensors"))
    assert len(shards) >= 3
    failing = sha256(sharded / shards[1])
    hub.fail_lfs_upload(failing, how)
    code, out, err = run_main(capsys, caplog, ["push", str(sharded), "owner/navil-tiny"])
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("navil push: error:")]
    assert len(line) == 1 and "push to owner/navil-tiny failed" in line[0] and "nothing was committed" in line[0]
    assert shards[1] in line[0]  # the file that failed is named
    assert "Traceback" not in err
    assert hub.state.lfs_put_attempts[failing] == 6  # huggingface_hub's 5 retries, exhausted
    assert len(hub.repo("owner/navil-tiny").commits) == 1 and commit_requests(hub) == []  # (c)

    hub.state.fail_lfs.clear()  # the retry succeeds and re-sends only what is missing
    before = dict(hub.state.lfs_put_attempts)
    assert navil(["push", str(sharded), "owner/navil-tiny", "--quiet"]) == 0
    resent = {oid for oid, n in hub.state.lfs_put_attempts.items() if n != before.get(oid, 0)}
    assert resent == {failing}
    assert_repo_holds(hub, "owner/navil-tiny", sharded)


def test_token_is_sent_as_bearer_and_never_printed(hub, sharded, capsys, caplog):
    code, out, err = run_main(capsys, caplog, ["push", str(sharded), "owner/navil-tiny"])
    assert code == 0, err
    hub_api = [(m, p, auth) for m, p, auth in hub.requests if not p.startswith(("/__lfs/upload/", "/api/agent-"))]
    assert len(hub_api) >= 6
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub_api), hub_api  # (d)
    # the presigned LFS upload URLs and the registry fetch get no token
    assert all(auth is None for _, p, auth in hub.requests if p.startswith(("/__lfs/upload/", "/api/agent-")))
    assert TOKEN not in out + err
    assert "LFS files" in err  # huggingface_hub's progress bars are on

    hub.state.token = "hf_someOtherTokenTheServerWants"  # the Hub refuses ours: the error must not echo it
    code, out, err = run_main(capsys, caplog, ["push", str(sharded), "owner/navil-tiny", "--quiet"])
    assert code == 1 and "401" in err and TOKEN not in out + err


def test_no_token_is_a_usage_error(hub, folder, monkeypatch, capsys, caplog):
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny"])
    assert code == 2 and "no Hugging Face token" in err and "HF_TOKEN" in err
    assert hub.requests == []


def test_private_and_revision(hub, folder, capsys, caplog):
    code, out, err = run_main(
        capsys, caplog, ["push", str(folder), "owner/navil-tiny", "--private", "--revision", "dev"]
    )
    assert code == 0, err
    assert hub.state.create_payloads[-1]["visibility"] == "private"  # (e)
    repo = hub.repo("owner/navil-tiny")
    assert repo.private
    assert len(repo.history("main")) == 1  # main untouched
    assert len(repo.history("dev")) == 2 and "branch dev" in out
    assert_repo_holds(hub, "owner/navil-tiny", folder, revision="dev")
    assert any(m == "POST" and p == "/api/models/owner/navil-tiny/branch/dev" for m, p, _ in hub.requests)

    assert navil(["push", str(folder), "owner/public-one"]) == 0
    assert "visibility" not in hub.state.create_payloads[-1]  # the Hub's default, not a forced "public"
    code, _, err = run_main(capsys, caplog, ["push", str(folder), "owner/public-one", "--private", "--revision", "x"])
    assert code == 1 and "already exists and is public" in err
    assert "x" not in hub.repo("owner/public-one").branches and len(hub.repo("owner/public-one").commits) == 2


def test_stale_weights_are_removed_in_the_same_commit(hub, folder, sharded, capsys, caplog):
    assert navil(["push", str(folder), "owner/navil-tiny", "--quiet"]) == 0
    code, out, err = run_main(capsys, caplog, ["push", str(sharded), "owner/navil-tiny", "--quiet"])
    assert code == 0, err
    head = hub.repo("owner/navil-tiny").head("main")
    assert head.deleted == ["model.safetensors"] and "removed stale model.safetensors" in out
    assert_repo_holds(hub, "owner/navil-tiny", sharded)


def test_push_folder_result(hub, folder):
    result = push_folder(folder, "owner/navil-tiny", progress=False, endpoint=hub.url)
    assert result.changed and result.revision == "main" and result.repo_id == "owner/navil-tiny"
    assert result.commit_oid == hub.repo("owner/navil-tiny").head("main").oid
    assert result.files == folder_files(folder) and result.deleted == []
    again = push_folder(folder, "owner/navil-tiny", progress=False)
    assert not again.changed and again.commit_oid == result.commit_oid


def test_hub_refusal_is_a_push_error(hub, folder):
    hub.state.token = "hf_notOurs"
    with pytest.raises(PushError, match="push to owner/navil-tiny failed") as info:
        push_folder(folder, "owner/navil-tiny", progress=False)
    assert TOKEN not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Hostile Hubs: a commit applied behind an error answer, a Hub that never answers

HANG_TIMEOUT = 2.0  # the push timeout in the tests of unanswered requests
MARGIN = 2.5  # seconds a timed-out push may take beyond its timeouts (a busy 2-core machine included)
COMMIT_REQUEST = r"POST /api/models/.+/commit/.+"
HISTORY_REQUEST = r"GET /api/models/.+/commits/.+"


def error_line(err):
    lines = [x for x in err.splitlines() if x.startswith("navil push: error:")]
    assert len(lines) == 1, err
    return lines[0]


def seconds_since_hang(hub, end):
    """Seconds from the first unanswered request reaching the Hub to `end` (a `time.monotonic()`)."""
    assert hub.state.hung, "no request was left unanswered"
    return end - hub.state.hung[0][2]


@pytest.mark.parametrize("how", ["500", "drop"])
def test_commit_applied_behind_an_error_is_reported_as_applied(hub, folder, capsys, caplog, how):
    hub.fail_commit(how)  # the Hub applies the commit, then answers 500 / drops the connection unanswered
    code, out, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny", "--quiet"])
    assert code == 0, err
    repo = hub.repo("owner/navil-tiny")
    head = repo.head("main")
    assert len(repo.history()) == 2 and head.description.startswith("navil-push-id: ")  # recognisable
    assert f"the commit was applied ({head.oid}) although" in err
    assert ("the Hub answered HTTP 500" in err) == (how == "500")
    assert "nothing was committed" not in out + err and "Traceback" not in err
    assert f"{hub.url}/owner/navil-tiny/commit/{head.oid}" in out
    assert len(commit_requests(hub)) == 1  # the commit was not sent twice
    assert any(m == "GET" and p == "/api/models/owner/navil-tiny/commits/main" for m, p, _ in hub.requests)
    assert_repo_holds(hub, "owner/navil-tiny", folder)

    hub.state.commit_failure = None  # pushing again finds the files there
    code, out, _ = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny", "--quiet"])
    assert code == 0 and "nothing changed" in out and len(repo.commits) == 2


@pytest.mark.parametrize("how", ["500", "drop"])
def test_commit_not_applied_is_checked_before_saying_so(hub, folder, capsys, caplog, how):
    hub.fail_commit(how, apply=False)
    code, out, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny", "--quiet"])
    assert code == 1
    line = error_line(err)
    assert "push to owner/navil-tiny failed" in line and "Traceback" not in err
    if how == "500":  # an answer came: what the history shows is final
        assert "500" in line and f"{hub.url}/api/models/owner/navil-tiny/commit/main" in line
        assert "nothing was committed (checked afterwards: the history of main has no commit of this push)" in line
    else:  # no answer: the Hub may still be working on it, so no claim that nothing was committed
        assert "Server disconnected" in line and f"POST {hub.url}/api/models/owner/navil-tiny/commit/main" in line
        assert "no commit of this push was on main when checked right after" in line
        assert "nothing was committed" not in line and f"check {hub.url}/owner/navil-tiny/commits/main" in line
    assert len(hub.repo("owner/navil-tiny").commits) == 1 and len(commit_requests(hub)) == 1


@pytest.mark.parametrize("hanging", ["every request", "LFS uploads"])
def test_hub_that_never_answers_times_out(hub, folder, hanging):
    from huggingface_hub.utils import _http

    factory = _http._GLOBAL_CLIENT_FACTORY
    hub.hang_requests(None if hanging == "every request" else r"PUT /__lfs/upload/.+")  # accepted, never answered
    with pytest.raises(PushError) as info:
        push_folder(folder, "owner/navil-tiny", progress=False, timeout=HANG_TIMEOUT)
    took = seconds_since_hang(hub, time.monotonic())
    assert HANG_TIMEOUT * 0.9 <= took < HANG_TIMEOUT + MARGIN, took  # one timeout: a hung request is not retried
    message = str(info.value)
    if hanging == "every request":
        assert f"no answer within the 2 s timeout (POST {hub.url}/api/repos/create; " in message
        assert [(m, p) for m, p, _ in hub.state.hung] == [("POST", "/api/repos/create")]
    else:  # the body may or may not fit in the socket buffers: no answer, or could not send it
        assert f"within the 2 s timeout (PUT {hub.url}/__lfs/upload/{sha256(folder / 'model.safetensors')}" in message
        assert "model.safetensors" in message.split("within")[0]  # the file is named
        assert len(hub.state.hung) == 1 and hub.state.lfs_put_attempts == {}
    assert "set it with timeout= or NAVIL_PUSH_TIMEOUT" in message
    assert message.endswith("nothing was committed")  # true: the commit request was never sent
    assert commit_requests(hub) == [] and "Traceback" not in message
    assert _http._GLOBAL_CLIENT_FACTORY is factory  # huggingface_hub's client factory is restored


def test_timeout_applies_to_a_users_client_factory_and_leaves_it_in_place(hub, folder):
    """The limit is put on the shared client huggingface_hub's factory made (here a user's own, set with the
    public `set_client_factory`) for the push only: the factory stays, and so does the client, as it was."""
    from huggingface_hub import get_session, set_client_factory
    from huggingface_hub.utils import _http, httpx

    made = []

    def users_factory():
        made.append(httpx.Client(follow_redirects=True, timeout=None))
        return made[-1]

    previous = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(users_factory)
    try:
        hub.fail_commit("hang", apply=True)
        result = push_folder(folder, "owner/navil-tiny", progress=False, timeout=HANG_TIMEOUT)
        assert "although the Hub did not answer within the 2 s timeout" in result.warning  # seen and limited
        assert len(made) == 1 and get_session() is made[0] and _http._GLOBAL_CLIENT_FACTORY is users_factory
        assert made[0].event_hooks == {"request": [], "response": []}  # the push's hook is gone
        assert "send" not in vars(made[0]) and "close" not in vars(made[0]) and not made[0].is_closed
    finally:
        set_client_factory(previous)


@pytest.mark.parametrize("apply", [True, False])
def test_commit_that_is_never_answered_is_checked(hub, folder, apply):
    hub.fail_commit("hang", apply=apply)
    if apply:  # on a branch: the history read back is that branch's
        result = push_folder(folder, "owner/navil-tiny", progress=False, timeout=HANG_TIMEOUT, revision="dev")
        head = hub.repo("owner/navil-tiny").head("dev")
        assert result.changed and result.commit_oid == head.oid and head.message.startswith("Upload navil-tiny")
        assert result.commit_url == f"{hub.url}/owner/navil-tiny/commit/{head.oid}" and result.revision == "dev"
        assert f"the commit was applied ({head.oid}) although the Hub did not answer within the 2 s timeout" in (
            result.warning
        )
        assert ("GET", "/api/models/owner/navil-tiny/commits/dev") in [(m, p) for m, p, _ in hub.requests]
        assert len(hub.repo("owner/navil-tiny").history("main")) == 1
        assert_repo_holds(hub, "owner/navil-tiny", folder, revision="dev")
    else:
        with pytest.raises(PushError) as info:
            push_folder(folder, "owner/navil-tiny", progress=False, timeout=HANG_TIMEOUT)
        message = str(info.value)
        assert f"no answer within the 2 s timeout (POST {hub.url}/api/models/owner/navil-tiny/commit/main" in message
        assert "no commit of this push was on main when checked right after" in message
        assert "nothing was committed" not in message and f"check {hub.url}/owner/navil-tiny/commits/main" in message
        assert len(hub.repo("owner/navil-tiny").commits) == 1
    assert HANG_TIMEOUT * 0.9 <= seconds_since_hang(hub, time.monotonic()) < HANG_TIMEOUT + MARGIN
    assert len(hub.state.hung) == 1 and len(commit_requests(hub)) == 1


def test_outcome_that_cannot_be_checked_is_not_guessed(hub, folder):
    hub.hang_requests(f"{COMMIT_REQUEST}|{HISTORY_REQUEST}")  # the commit and the check both go unanswered
    with pytest.raises(PushError) as info:
        push_folder(folder, "owner/navil-tiny", progress=False, timeout=1)
    took = seconds_since_hang(hub, time.monotonic())
    assert 2 * 0.9 <= took < 2 + MARGIN, took  # two timeouts: the commit request, then the check
    message = str(info.value)
    assert "could not determine whether the commit was applied" in message
    assert f"no answer within the 1 s timeout (GET {hub.url}/api/models/owner/navil-tiny/commits/main" in message
    assert message.endswith(f"check {hub.url}/owner/navil-tiny/commits/main")
    assert "nothing was committed" not in message
    assert [p for _, p, _ in hub.state.hung] == [
        "/api/models/owner/navil-tiny/commit/main",
        "/api/models/owner/navil-tiny/commits/main",
    ]


def test_push_timeout_from_the_environment(hub, folder, monkeypatch, capsys, caplog):
    monkeypatch.setenv("NAVIL_PUSH_TIMEOUT", "1")
    hub.hang_requests()
    code, _, err = run_main(capsys, caplog, ["push", str(folder), "owner/navil-tiny", "--quiet"])
    took = seconds_since_hang(hub, time.monotonic())
    assert code == 1 and "no answer within the 1 s timeout" in error_line(err) and 0.9 <= took < 1 + MARGIN

    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv("NAVIL_PUSH_TIMEOUT", bad)
        with pytest.raises(ConversionError, match="NAVIL_PUSH_TIMEOUT must be a positive number of seconds"):
            push_folder(folder, "owner/navil-tiny")
    with pytest.raises(ConversionError, match="timeout must be a positive number"):
        push_folder(folder, "owner/navil-tiny", timeout=0)
    assert len(hub.requests) == 1  # only the hung request of the first push


# ---------------------------------------------------------------------------------------------------
# navil convert --push-to-hub


def test_convert_push_to_hub_end_to_end(hub, tmp_path, capsys, caplog):
    out_dir = tmp_path / "converted"
    code, out, err = run_main(
        capsys, caplog, ["convert", str(QWEN3), str(out_dir), "--quiet", "--push-to-hub", "owner/navil-tiny"]
    )
    assert code == 0, err
    assert "verified logits" in out and "pushed" in out  # (g)
    assert_repo_holds(hub, "owner/navil-tiny", out_dir)
    assert TOKEN not in out + err


def test_convert_push_checks_come_before_converting(hub, tmp_path, monkeypatch, capsys, caplog):
    out_dir = tmp_path / "converted"
    code, _, err = run_main(capsys, caplog, ["convert", str(QWEN3), str(out_dir), "--push-to-hub", "not a repo"])
    assert code == 2 and "not a valid Hub repo id" in err
    code, _, err = run_main(capsys, caplog, ["convert", str(QWEN3), str(out_dir), "--private"])
    assert code == 2 and "--private, --revision and --timeout need --push-to-hub" in err
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_main(capsys, caplog, ["convert", str(QWEN3), str(out_dir), "--push-to-hub", "owner/x"])
    assert code == 2 and "no Hugging Face token" in err
    assert not out_dir.exists() and hub.requests == []


def test_installed_hub_modules_are_the_code_files_folders_carry():
    """setup.py installs every `*_navil.py` at the root; a converted folder carries exactly those."""
    from navil_hf.hub import CODE_MODULES

    from conftest import REPO_ROOT

    assert sorted(CODE_MODULES) == sorted(path.stem for path in REPO_ROOT.glob("*_navil.py"))


def test_a_client_replaced_during_the_push_makes_its_commit_checked():
    """huggingface_hub closes its shared client after a connection error in an upload and makes a new one,
    which the push's hook is not on: a commit request may then go unseen, so its outcome is checked."""
    from huggingface_hub import close_session

    from navil_hf.conversion.push import _request_timeout, _Requests

    sent = _Requests()
    with _request_timeout(1.0, sent):
        assert not sent.commit_maybe_sent
        close_session()
    assert sent.replaced and sent.commit_maybe_sent and not sent.commit
