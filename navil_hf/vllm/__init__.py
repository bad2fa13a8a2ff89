"""vLLM out-of-tree plugin for NaViL (entry point group `vllm.general_plugins`, name `navil`).

`register()` runs in every vLLM process (engine, workers, API server) before a model is resolved:

* registers `NaViLConfig` (model_type `navil`) with transformers' `AutoConfig`, and NaViL's processor and image
  processor with `AutoProcessor` / `AutoImageProcessor`, so a converted folder loads by path with no
  `--trust-remote-code` and none of the folder's code files run;
* registers the architecture `NaViLForConditionalGeneration` (what converted folders' `config.json` name)
  with `vllm.ModelRegistry`, lazily (`"module:Class"`: vLLM imports `navil_hf.vllm.model` only when it builds
  the model).
"""

ARCHITECTURE = "NaViLForConditionalGeneration"
MODEL_CLASS = "navil_hf.vllm.model:NaViLForConditionalGeneration"


def register_transformers_classes() -> None:
    """NaViL's config, processor and image processor as transformers' auto classes know them (idempotent)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    from configuration_navil import NaViLConfig
    from image_processing_navil import NaViLImageProcessor
    from processing_navil import NaViLProcessor

    for register, args in (
        (AutoConfig.register, (NaViLConfig.model_type, NaViLConfig)),
        (AutoImageProcessor.register, (NaViLConfig,)),
        (AutoProcessor.register, (NaViLConfig, NaViLProcessor)),
    ):
        kwargs = {"slow_image_processor_class": NaViLImageProcessor} if register is AutoImageProcessor.register else {}
        try:
            register(*args, exist_ok=True, **kwargs)
        except TypeError:  # an older signature without exist_ok
            try:
                register(*args, **kwargs)
            except ValueError:
                pass  # already registered


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    from vllm import ModelRegistry

    register_transformers_classes()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register", "register_transformers_classes"]
