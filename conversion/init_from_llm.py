"""Start a NaViL from a pretrained LLM (a transformers folder or a GGUF file): a fresh native-resolution
encoder and connector, visual experts copied from the LLM's text weights, the tokenizer extended with the
image tokens; the LLM's text logits are checked unchanged before the folder is written:

    python conversion/init_from_llm.py LLM_DIR_OR_GGUF OUT_DIR [--vision-preset NAME] [--list-presets]

The same as `navil init-from-llm` (`--help` lists every option); the library is `navil_hf.conversion`
(`init_from_llm`).
"""

from _script import run

if __name__ == "__main__":
    run("init-from-llm")
