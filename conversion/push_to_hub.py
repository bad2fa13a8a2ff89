"""Check a converted NaViL folder (complete, loadable, our code only) and upload it to a Hub model repo
as one commit:

    python conversion/push_to_hub.py OUT_DIR OWNER/NAME [--private] [--revision BRANCH]

The same as `navil push` (`--help` lists every option); the library is `navil_hf.conversion`
(`push_folder`).
"""

from _script import run

if __name__ == "__main__":
    run("push")
