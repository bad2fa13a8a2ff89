"""Shared test helpers: the repository root on `sys.path` (the Hub files import each other as
top-level modules there), the location of the parity fixtures, the fixture checkpoints converted once per
session (`converted_folder`, `qwen3_folder`, `internlm2_folder`), the check of a user mistake
(`assert_usage_error`, `usage_error`) and the `slow` marker."""

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# The two fixture checkpoints by LLM family, and token ids of a tokenizer layout the config tests use.
FIXTURES = {"qwen3": "original-qwen3-tiny", "internlm2": "original-internlm2-tiny"}


def token_ids():
    from configuration_navil import SPECIAL_TOKENS

    return {t: i for i, t in enumerate(("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *SPECIAL_TOKENS))}


def checkpoint(name) -> Path:
    """The original-layout checkpoint folder of fixture `name` (`qwen3` or `internlm2`)."""
    return fixtures_dir() / FIXTURES[name] / "checkpoint"


def copy_checkpoint(name, dest) -> Path:
    """A writable copy of fixture `name`'s checkpoint at `dest`."""
    shutil.copytree(checkpoint(name), dest)
    for path in Path(dest).iterdir():
        path.chmod(0o644)
    return Path(dest)


def fixtures_dir() -> Path:
    """The parity fixtures: `$NAVIL_FIXTURES`, else `<repo>/../shared/fixtures`."""
    return Path(os.environ.get("NAVIL_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_path() -> Path:
    path = fixtures_dir()
    if not path.is_dir():
        pytest.fail(f"parity fixtures not found at {path} (set NAVIL_FIXTURES)")
    return path


# ---------------------------------------------------------------------------------------------------
# Converted fixture folders, built once per session. Tests only read them: a test that changes a folder
# works on a copy (`shutil.copytree`); the session checks at its end that none was changed.


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="session")
def converted_folder(tmp_path_factory):
    """`converted_folder(name, *flags)`: fixture `name`'s checkpoint (`qwen3` or `internlm2`) converted as a
    user converts it, `navil convert ORIGINAL OUT --quiet [flags]` (e.g. `--fold-visual-output`), once per
    session and set of flags."""
    from navil_hf.cli import main as navil

    folders = {}

    def build(name, *flags):
        key = (name, *flags)
        if key not in folders:
            out = tmp_path_factory.mktemp(f"converted-{name}") / f"navil-{name}-tiny"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                code = navil(["--debug", "convert", str(checkpoint(name)), str(out), "--quiet", *flags])
            assert code == 0, f"navil convert {name} {' '.join(flags)}: exit {code}\n{printed.getvalue()}"
            folders[key] = out, _listing(out)
        return folders[key][0]

    yield build
    changed = [str(out) for out, listing in folders.values() if _listing(out) != listing]
    assert not changed, f"a test changed the session's converted folders {changed}: copy a folder to change it"


@pytest.fixture(scope="session")
def qwen3_folder(converted_folder) -> Path:
    """The Qwen3 fixture converted with the defaults (read only)."""
    return converted_folder("qwen3")


@pytest.fixture(scope="session")
def internlm2_folder(converted_folder) -> Path:
    """The InternLM2 fixture converted with the defaults (read only)."""
    return converted_folder("internlm2")


# ---------------------------------------------------------------------------------------------------
# User mistakes: every command reports one as exit code 2 and one line on stderr, no traceback.


def assert_usage_error(code, err, *fragments) -> str:
    """Assert that exit code `code` and stderr `err` are a usage error whose line holds every fragment;
    returns the line."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def usage_error(capsys, argv, *fragments) -> str:
    """Run `navil ARGV` in this process and `assert_usage_error` on its exit code and stderr; returns the line."""
    from navil_hf.cli import main as navil

    code = navil([str(arg) for arg in argv])
    return assert_usage_error(code, capsys.readouterr().err, *fragments)


# Markers that transformers' test mixins (tests/model/test_transformers_*.py) and its testing_utils decorators put
# on their tests; registered so pytest does not warn about them.
HF_MARKERS = (
    "accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
    "is_agent_test", "is_expert_parallel_test", "is_fsdp_test", "is_pipeline_test", "is_staging_test",
    "is_tensor_parallel_test", "is_training_test", "order",
)  # fmt: skip


def pytest_configure(config):
    for marker in HF_MARKERS:
        config.addinivalue_line("markers", f"{marker}: set by transformers' test mixins")
    config.addinivalue_line(
        "markers",
        "slow: an end-to-end run (training, torchrun, the demo model's download and build, refresh, learning); "
        '`pytest -m "not slow"` leaves them out, CI runs them (transformers\' mixins mark theirs too)',
    )
