"""Shared test helpers: the repository root on `sys.path` (the Hub files import each other as
top-level modules there), the location of the parity fixtures and the check of a user mistake
(`assert_usage_error`, `usage_error`)."""

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
    "is_tensor_parallel_test", "is_training_test", "order", "slow",
)  # fmt: skip


def pytest_configure(config):
    for marker in HF_MARKERS:
        config.addinivalue_line("markers", f"{marker}: set by transformers' test mixins")
