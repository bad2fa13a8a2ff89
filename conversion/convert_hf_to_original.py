"""Convert a converted NaViL folder back into the original OpenGVLab layout (config, safetensors and
tokenizer as the original code reads them), verified tensor by tensor before it is written:

    python conversion/convert_hf_to_original.py HF_DIR ORIGINAL_OUT [--approximate]

The same as `navil to-original` (`--help` lists every option); the library is
`navil_hf.conversion` (`convert_to_original`).
"""

from _script import run

if __name__ == "__main__":
    run("to-original")
