"""navil-hf: the Hugging Face package for NaViL (OpenGVLab, NeurIPS 2025).

The parts (README "Architecture"):

* the Hub files at the repository root (`configuration_navil`, `modeling_navil`,
  `image_processing_navil`, `processing_navil`, `compat_navil`): the remote code every converted folder
  carries, installed as top-level modules;
* `navil_hf.conversion`: original checkpoints and pretrained LLMs -> Hub folders and back, publishing
  (the repository's `conversion/` folder);
* `navil_hf.cli` (the `navil` command, also `python -m navil_hf`) and `navil_hf.demo` (the demo model).

Importing this package is cheap: nothing heavy (torch, transformers) is imported until it is used.
"""

__version__ = "0.2.0"
DISTRIBUTION = "navil-hf"
