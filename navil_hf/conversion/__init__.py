"""Conversion of original OpenGVLab NaViL checkpoints to our Hub format and back, `init-from-llm`, and
publishing (the library behind `navil convert/init-from-llm/push/refresh` and the scripts in the
repository's top-level `conversion/` folder).

The names below are imported on first use (PEP 562), so importing the package -- as the command line
does for its error classes -- does not import torch or transformers.
"""

import importlib

# name -> the module that defines it, relative to this package
_EXPORTS = {
    "BackConversionResult": ".back",
    "convert_to_original": ".back",
    "ConversionResult": ".convert",
    "convert_checkpoint": ".convert",
    "ConversionError": "..errors",
    "PushError": "..errors",
    "VerificationError": "..errors",
    "write_hub_folder": "..hub",
    "KeyMismatchError": ".keymap",
    "convert_state_dict": ".keymap",
    "to_original_state_dict": ".keymap",
    "OriginalCheckpointError": ".original",
    "convert_config": ".original",
    "expected_original_shapes": ".original",
    "to_original_config": ".original",
    "PushResult": ".push",
    "RefreshResult": ".refresh",
    "refresh_folder": ".refresh",
    "refresh_repo": ".refresh",
    "check_folder": ".push",
    "push_folder": ".push",
    "validate_folder": ".push",
    "fold_chained_projection": ".surgery",
    "merge_internlm2_wqkv": ".surgery",
    "split_internlm2_wqkv": ".surgery",
    "unfold_chained_projection": ".surgery",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackConversionResult",
    "ConversionError",
    "ConversionResult",
    "KeyMismatchError",
    "OriginalCheckpointError",
    "PushError",
    "PushResult",
    "RefreshResult",
    "VerificationError",
    "check_folder",
    "convert_checkpoint",
    "convert_config",
    "convert_state_dict",
    "convert_to_original",
    "expected_original_shapes",
    "fold_chained_projection",
    "merge_internlm2_wqkv",
    "push_folder",
    "refresh_folder",
    "refresh_repo",
    "split_internlm2_wqkv",
    "to_original_config",
    "to_original_state_dict",
    "unfold_chained_projection",
    "validate_folder",
    "write_hub_folder",
]
