"""Conversion of original OpenGVLab NaViL checkpoints to our Hub format and back, and the `navil` command line."""

from .back import BackConversionResult, convert_to_original
from .convert import ConversionResult, convert_checkpoint
from .errors import ConversionError, PushError, VerificationError
from .hub import write_hub_folder
from .keymap import KeyMismatchError, convert_state_dict, to_original_state_dict
from .original import OriginalCheckpointError, convert_config, expected_original_shapes, to_original_config
from .push import PushResult, check_folder, push_folder, validate_folder
from .surgery import fold_chained_projection, merge_internlm2_wqkv, split_internlm2_wqkv, unfold_chained_projection

__all__ = [
    "BackConversionResult",
    "ConversionError",
    "ConversionResult",
    "KeyMismatchError",
    "OriginalCheckpointError",
    "PushError",
    "PushResult",
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
    "split_internlm2_wqkv",
    "to_original_config",
    "to_original_state_dict",
    "unfold_chained_projection",
    "validate_folder",
    "write_hub_folder",
]
