"""Convert an original OpenGVLab NaViL checkpoint (NaViL-2B or NaViL-9B) into a Hub folder that
`AutoModel`/`AutoProcessor.from_pretrained(OUT_DIR, trust_remote_code=True)` load, verified before it is
written, and optionally publish it:

    python conversion/convert_original_to_hf.py ORIGINAL_DIR OUT_DIR [--push-to-hub OWNER/NAME] [--dtype bfloat16]

The same as `navil convert` (`--help` lists every option); the library is `navil_hf.conversion`
(`convert_checkpoint`).
"""

from _script import run

if __name__ == "__main__":
    run("convert")
