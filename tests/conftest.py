"""Shared test helpers: the repository root on `sys.path` (the Hub files import each other as
top-level modules there) and the location of the parity fixtures."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def fixtures_dir() -> Path:
    """The parity fixtures: `$NAVIL_FIXTURES`, else `<repo>/../shared/fixtures`."""
    return Path(os.environ.get("NAVIL_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_path() -> Path:
    path = fixtures_dir()
    if not path.is_dir():
        pytest.fail(f"parity fixtures not found at {path} (set NAVIL_FIXTURES)")
    return path
