"""`navil refresh` (`conversion.refresh`): a converted folder gets this package's code files, every other
file untouched, after the old and the new code were checked to behave the same (each in a subprocess).

"Old" folders are made from a fresh conversion by editing its code files: behaviour-neutral (a comment,
another tested range), computing something else (logits scaled by 1.001), or failing on import."""

import hashlib
import json
import shutil

import pytest
import torch

from navil_hf.cli import main as navil
from navil_hf.conversion import push_folder
from navil_hf.conversion.refresh import CODE_FILES, compat_tested_range
from navil_hf.hub import code_files

from conftest import fixtures_dir
from hub_server import pointed_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's LFS PUT

QWEN3 = fixtures_dir() / "original-qwen3-tiny" / "checkpoint"
TOKEN = "hf_navilRefreshToken_3b9d27c4e1f0"
OLD_RANGE = ("5.10.0", "5.12.0")


@pytest.fixture(scope="module")
def converted(qwen3_folder):
    return qwen3_folder


def make_old(converted, dest, modeling=None, compat=None):
    """A copy of `converted` whose code is "old": compat_navil.py names another tested range and
    modeling_navil.py has a comment more; `modeling`/`compat` edit those files' text further."""
    folder = shutil.copytree(converted, dest)
    text = (folder / "compat_navil.py").read_text()
    start = text.index("TESTED_TRANSFORMERS = ")
    end = text.index("\n", start)
    text = text[:start] + f"TESTED_TRANSFORMERS = {OLD_RANGE!r}  # an old folder" + text[end:]
    (folder / "compat_navil.py").write_text(compat(text) if compat else text)
    text = (folder / "modeling_navil.py").read_text() + "\n# converted with an older navil-hf\n"
    (folder / "modeling_navil.py").write_text(modeling(text) if modeling else text)
    return folder


@pytest.fixture
def old(converted, tmp_path):
    return make_old(converted, tmp_path / "navil-tiny")


def snapshot(folder):
    """{name: (sha256, mtime_ns)} of every file in the folder, and the folder's parent listing."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    state = {name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for name, p in files.items()}
    return state, sorted(p.name for p in folder.parent.iterdir())


def run(capsys, argv):
    code = navil(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Refreshing


def test_refresh_in_place_keeps_every_other_file(old, converted, capsys):
    before, listing = snapshot(old)
    code, out, err = run(capsys, ["refresh", str(old), "--trust-remote-code", "-q"])
    assert code == 0, err
    assert err == ""
    print(out)
    assert "verified image prompt" in out and "verified text prompt" in out
    assert "replaced modeling_navil.py, compat_navil.py" in out
    after, listing_after = snapshot(old)
    assert listing_after == listing  # no temporary folder left beside it
    assert set(after) == set(before)
    for name in before:
        if name not in CODE_FILES:
            assert after[name] == before[name], f"{name} was touched"
    for source in code_files():
        assert (old / source.name).read_bytes() == source.read_bytes()

    # The refreshed folder loads through the Auto classes and computes what a fresh conversion does.
    from transformers import AutoModel, AutoProcessor

    from navil_hf.conversion.verify import probe_inputs

    logits = []
    for folder in (old, converted):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        assert not any(info.values()), info
        with torch.no_grad():
            logits.append(model.eval()(**probe_inputs(processor)).logits)
    assert torch.equal(*logits)


@pytest.mark.slow
def test_refresh_to_another_folder_leaves_the_source_alone(old, tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    before = snapshot(old)
    out = tmp_path / "elsewhere" / "refreshed"
    code, out_text, err = run(capsys, ["refresh", str(old), "--out", str(out), "--trust-remote-code", "-q"])
    assert code == 0, err
    assert snapshot(old) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in old.iterdir())
    for path in old.iterdir():
        if path.name not in CODE_FILES:
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    for source in code_files():
        assert (out / source.name).read_bytes() == source.read_bytes()
    code, _, err = run(capsys, ["refresh", str(old), "--out", str(out), "--trust-remote-code", "-q"])
    assert code == 2 and "pass --force to replace it" in one_line(err)


@pytest.mark.slow
def test_old_code_that_computes_differently_is_refused(converted, tmp_path, capsys):
    def scale_logits(text):
        assert text.count("logits = self.lm_head(hidden)") == 1
        return text.replace("logits = self.lm_head(hidden)", "logits = self.lm_head(hidden) * 1.001")

    folder = make_old(converted, tmp_path / "navil-tiny", modeling=scale_logits)
    before = snapshot(folder)
    code, out, err = run(capsys, ["refresh", str(folder), "--trust-remote-code", "-q"])
    assert code == 1
    line = one_line(err)
    print(line)
    assert "logits differ from the old code's: max abs diff" in line and "nothing was written" in line
    assert "if it is the old code that misbehaves" in line and "tested with transformers 5.10.0 to 5.12.0" in line
    assert snapshot(folder) == before


def test_old_code_that_cannot_run_here_is_refused(converted, tmp_path, capsys):
    def break_import(text):
        return text.replace("import transformers\n", "import transformers\nfrom transformers import NoSuchHelper\n", 1)

    folder = make_old(converted, tmp_path / "navil-tiny", compat=break_import)
    before = snapshot(folder)
    code, out, err = run(capsys, ["refresh", str(folder), "--trust-remote-code", "-q"])
    assert code == 2
    line = one_line(err)
    print(line)
    assert "the check cannot be made here" in line and "NoSuchHelper" in line
    assert "tested with transformers 5.10.0 to 5.12.0" in line and "'transformers>=5.10.0,<=5.12.0'" in line
    assert snapshot(folder) == before


def test_refresh_needs_trust_remote_code(old, capsys):
    before = snapshot(old)
    code, out, err = run(capsys, ["refresh", str(old)])
    assert code == 2
    assert "pass --trust-remote-code" in one_line(err)
    assert snapshot(old) == before


def test_up_to_date_folder_is_not_written(converted, tmp_path, capsys):
    folder = shutil.copytree(converted, tmp_path / "navil-tiny")
    before = snapshot(folder)
    code, out, err = run(capsys, ["refresh", str(folder)])  # nothing to run, so no consent needed
    assert code == 0, err
    assert "already those of navil-hf" in out and "nothing written" in out
    assert snapshot(folder) == before


def _set_json(name, key, value):
    def edit(folder):
        data = json.loads((folder / name).read_text())
        data[key] = value
        (folder / name).write_text(json.dumps(data))

    return edit


NOT_OURS = {
    "another model": (_set_json("config.json", "model_type", "llama"), "holds a 'llama' model"),
    "an original checkpoint": (_set_json("config.json", "model_type", "navil_chat"), "convert it"),
    "foreign code": (lambda f: (f / "helper.py").write_text("print('hi')\n"), "code that is not NaViL's (helper.py)"),
    "pickles": (lambda f: (f / "pytorch_model.bin").write_bytes(b"x"), "pickled weight files are refused"),
    "foreign auto_map": (
        _set_json("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["someone/repo--tok.Tok", None]}),
        "is not NaViL's code",
    ),
    "no model code": (lambda f: (f / "modeling_navil.py").unlink(), "lacks NaViL's code file(s) modeling_navil.py"),
}


@pytest.mark.parametrize("case", NOT_OURS)
def test_folders_that_are_not_navil_are_refused(old, case, capsys):
    edit, expected = NOT_OURS[case]
    edit(old)
    before = snapshot(old)
    code, out, err = run(capsys, ["refresh", str(old), "--trust-remote-code"])
    assert code == 2
    assert expected in one_line(err)
    assert snapshot(old) == before


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["refresh", "no/such/folder"], "no such folder (and not a Hub repo id"),
        (["refresh", "{old}", "--push"], "--push needs the REPO_ID"),
        (["refresh", "{old}", "--revision", "dev"], "need --push REPO_ID for a local folder"),
        (["refresh", "{old}", "--force"], "--force applies to --out DIR only"),
        (["refresh", "{old}/config.json"], "is not a folder"),
    ],
)
def test_usage_errors(old, argv, expected, capsys):
    code, out, err = run(capsys, [a.format(old=old) for a in argv])
    assert code == 2
    assert expected in one_line(err)


def test_tested_range_is_read_as_text(tmp_path):
    (tmp_path / "compat_navil.py").write_text(
        'raise SystemExit("never imported")\nMIN_TRANSFORMERS = "5.1.0"\nTESTED_TRANSFORMERS = ("5.1.0", "5.3.2")\n'
    )
    assert compat_tested_range(tmp_path) == ("5.1.0", "5.3.2")
    (tmp_path / "compat_navil.py").write_text('MIN_TRANSFORMERS = "5.1.0"\n')
    assert compat_tested_range(tmp_path) == ("5.1.0", None)
    (tmp_path / "compat_navil.py").unlink()
    assert compat_tested_range(tmp_path) is None


def test_help_lists_refresh(capsys):
    assert navil(["--help"]) == 0
    assert "refresh" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# A Hub repo


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub with huggingface_hub pointed at it (`hub_server.pointed_hub`), its caches in tmp_path."""
    with pointed_hub(TOKEN, monkeypatch, tmp_path / "hf-home") as server:
        yield server


@pytest.mark.slow
def test_hub_repo_is_refreshed_in_one_commit_of_code_files(hub, old, capsys):
    push_folder(old, "owner/navil-tiny", progress=False)
    repo = hub.repo("owner/navil-tiny")
    uploaded = repo.head("main")
    commits = [p for m, p, _ in hub.requests if m == "POST" and "/commit/" in p]

    code, out, err = run(capsys, ["refresh", "owner/navil-tiny", "--trust-remote-code", "-q"])
    assert code == 0, err
    print(out)
    head = repo.head("main")
    assert head.parent == uploaded.oid
    assert sorted(head.added) == ["compat_navil.py", "modeling_navil.py"] and head.deleted == []
    assert len([p for m, p, _ in hub.requests if m == "POST" and "/commit/" in p]) == len(commits) + 1
    assert set(head.files) == set(uploaded.files)
    for path, entry in head.files.items():
        if path not in CODE_FILES:
            assert entry == uploaded.files[path], path
    by_name = {p.name: p.read_bytes() for p in code_files()}
    for name in CODE_FILES:
        assert head.files[name].content == by_name[name]
    assert f"{hub.url}/owner/navil-tiny/commit/{head.oid}" in out

    code, out, err = run(capsys, ["refresh", "owner/navil-tiny", "-q"])  # now up to date: no commit
    assert code == 0, err
    assert "already those of navil-hf" in out and repo.head("main").oid == head.oid


def test_push_based_on_a_commit_the_branch_has_left_is_refused(hub, old):
    from navil_hf.errors import PushError

    first = push_folder(old, "owner/navil-tiny", progress=False)
    (old / "README.md").write_text("changed meanwhile\n")
    push_folder(old, "owner/navil-tiny", progress=False)
    commits = len(hub.repo("owner/navil-tiny").commits)
    with pytest.raises(
        PushError, match="has moved on from .* since the folder was read from it; nothing was committed"
    ):
        push_folder(old, "owner/navil-tiny", progress=False, parent_commit=first.commit_oid)
    assert len(hub.repo("owner/navil-tiny").commits) == commits
