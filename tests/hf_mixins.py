"""transformers' own common model-test mixins, importable as the package `hf_tests`.

transformers' sdist ships `tests/test_modeling_common.py` (ModelTesterMixin), `test_training_mixin.py`,
`test_fsdp_mixin.py`, `test_tensor_parallel_mixin.py`, `test_configuration_common.py` and friends.
They are transformers' code, not ours: they are never committed here. This module obtains them for
the installed `transformers.__version__` and makes them importable:

1. Source `tests/` dir: `$NAVIL_HF_TESTS_DIR` (an already-extracted sdist `tests/`, e.g. pre-fetched by
   CI), else the cache `$NAVIL_HF_TESTS_CACHE/<version>/tests` (default
   `~/.cache/navil/transformers-tests/<version>/tests`), filled on first use by
   `python -m pip download --no-binary :all: --no-deps transformers==<version>` from PyPI: only the
   sdist's `tests/**.py` are extracted, into a temporary folder that is then renamed into place
   (atomic: a concurrent run sees either nothing or the complete folder). Later runs reuse it.
2. Package: per session, a fresh temporary folder `<tmp>/hf_tests/` receives a copy of those files,
   an empty `__init__.py` (the sdist has none, `test_configuration_common.py` executes it), and our
   stand-ins (`tests/hf_standins/`) for exactly the modules the sdist lacks. The cache and
   `$NAVIL_HF_TESTS_DIR` are never written to, and a changed stand-in can never be stale.
   `<tmp>` goes on `sys.path`, so the mixins' relative imports resolve and the rank processes of the
   distributed mixins (spawned, `sys.path` inherited) can unpickle `hf_tests.*` functions.

Any failure raises `HFTestsUnavailable` with one message that says what to do; the test module turns
it into one failing test (never a skip: a test that cannot fail is a defect).

`python tests/hf_mixins.py` prepares the cache for the installed version and prints the folder.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "hf_tests"
STANDINS = Path(__file__).resolve().parent / "hf_standins"
# The modules the stand-ins replace, as paths inside transformers' tests/.
STANDIN_MODULES = (
    "generation/test_utils.py",
    "exporters/test_export.py",
    "utils/test_configuration_utils.py",
    "distributed_testing_utils.py",
)
_MARKER = "test_modeling_common.py"  # a source tests/ dir without it is not transformers' tests/

_state: dict = {}


class HFTestsUnavailable(RuntimeError):
    """transformers' test files for the installed version could not be obtained."""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def cache_root() -> Path:
    env = os.environ.get("NAVIL_HF_TESTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "navil" / "transformers-tests"


def cached_tests_dir(version: str) -> Path:
    return cache_root() / version / "tests"


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
        f"transformers=={version}", "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HFTestsUnavailable(f"`{' '.join(cmd)}` could not run: {e}") from None
    archives = sorted(dest.glob(f"transformers-{version}.tar.gz"))
    if proc.returncode != 0 or not archives:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise HFTestsUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return archives[0]


def _extract_tests(archive: Path, out: Path) -> None:
    """Extract only the sdist's `tests/**.py` into `out` (flattening the `transformers-X/tests/` prefix)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile() or not member.name.endswith(".py"):
                continue
            relative = Path(*parts[2:])
            if ".." in relative.parts:
                continue
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (out / _MARKER).is_file():
        raise HFTestsUnavailable(f"{archive} has no tests/{_MARKER}")


def fetch_tests(version: str | None = None) -> Path:
    """The extracted sdist `tests/` of `version` (default: the installed one), downloaded on first use."""
    version = version or transformers_version()
    target = cached_tests_dir(version)
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        archive = _download_sdist(version, work / "sdist")
        staged = work / "tests"
        _extract_tests(archive, staged)
        try:
            os.rename(staged, target)  # atomic on one file system
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent run that got there first
                raise
    except OSError as e:
        raise HFTestsUnavailable(f"could not store transformers {version}'s tests in {target}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def source_tests_dir() -> Path:
    env = os.environ.get("NAVIL_HF_TESTS_DIR")
    if env:
        path = Path(env).expanduser()
        if not (path / _MARKER).is_file():
            raise HFTestsUnavailable(
                f"NAVIL_HF_TESTS_DIR={env} is not transformers' tests/ folder (no {_MARKER} in it)"
            )
        return path
    return fetch_tests()


def _build_package(source: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="navil-hf-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = root / PACKAGE
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (package / "__init__.py").touch()
    for module in STANDIN_MODULES:
        target = package / module
        if target.exists():
            continue  # the sdist ships it: the real one is used
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STANDINS / module, target)
        init = target.parent / "__init__.py"
        if target.parent != package and not init.exists():
            shutil.copy(STANDINS / Path(module).parent / "__init__.py", init)
    return root


def load():
    """Import and return the `hf_tests` package (idempotent). Raises `HFTestsUnavailable`."""
    if "module" in _state:
        return _state["module"]
    if "error" in _state:
        raise HFTestsUnavailable(_state["error"])
    try:
        version = transformers_version()
        try:
            source = source_tests_dir()
        except HFTestsUnavailable as e:
            raise HFTestsUnavailable(
                f"transformers' test mixins for transformers=={version} are unavailable: {e}\n"
                f"Fix: give this machine access to PyPI, or set NAVIL_HF_TESTS_DIR to the tests/ folder of the "
                f"transformers-{version} sdist (`pip download --no-binary :all: --no-deps transformers=={version}`)."
            ) from None
        root = _build_package(source)
        sys.path.insert(0, str(root))
        module = importlib.import_module(PACKAGE)
    except HFTestsUnavailable as e:
        _state["error"] = str(e)
        raise
    _state["module"] = module
    return module


def import_module(name: str):
    """`hf_tests.<name>`, e.g. `import_module("test_modeling_common")`."""
    load()
    return importlib.import_module(f"{PACKAGE}.{name}")


def error() -> str | None:
    """Why the mixins are unavailable, or None when they load."""
    try:
        load()
    except HFTestsUnavailable as e:
        return str(e)
    return None


def mixin(module: str, name: str):
    """The class `hf_tests.<module>.<name>`; when the mixins are unavailable, a placeholder base marked
    `__test__ = False`, so the test classes built on it are not collected (one test reports the failure)."""
    if error() is not None:
        return type(name, (), {"__test__": False, "__doc__": "transformers' mixin unavailable (see hf_mixins)"})
    return getattr(import_module(module), name)


def check_all_reduce(rank: int, value: float) -> None:
    """A rank function for the stand-in `run_distributed`'s own test (module-level: ranks unpickle it by
    name). Every rank contributes `value * (rank + 1)` to an all-reduce; a negative value makes every rank
    raise instead (whichever rank the spawner reports first, the caller sees this message)."""
    import torch
    import torch.distributed as dist

    if value < 0:
        raise ValueError(f"rank {rank} refuses a negative value")
    total = torch.tensor([value * (rank + 1)])
    dist.all_reduce(total)
    world = dist.get_world_size()
    expected = value * world * (world + 1) / 2
    if total.item() != expected:
        raise AssertionError(f"rank {rank}: all_reduce gave {total.item()}, expected {expected}")


if __name__ == "__main__":
    try:
        print(source_tests_dir())
    except HFTestsUnavailable as e:
        sys.exit(f"error: {e}")
