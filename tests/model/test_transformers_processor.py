"""NaViLProcessor under transformers' own processor contract: `ProcessorTesterMixin`, unchanged, from
the sdist of the installed transformers version (through `tests/hf_mixins.py`).

The processor is built from the Qwen3 fixture tokenizer and a `NaViLImageProcessor` with a small
pixel budget, so the mixin's 30x400 test image expands to a dozen tokens (its `max_length` checks
are 76-117 tokens). The mixin itself skips its video, audio and tool-call tests (NaViL takes text and
images; its templates have no tools). Ours skip, on transformers 5.16 only: the image chat-template test
(that mixin expects one `pixel_values` row per image; 5.19+ counts packed patches by `image_grid_thw`)
and the nested-dict reload (5.16's `AutoImageProcessor` needs torchvision).
"""

import atexit
import inspect
import os
import shutil
import sys
import tempfile
import types
import unittest

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from configuration_navil import NaViLConfig
from image_processing_navil import NaViLImageProcessor
from processing_navil import CHAT_TEMPLATES, NaViLProcessor

import hf_mixins
from conftest import checkpoint

# test_processing_common.py imports `url_to_local_path` from transformers' repository `utils/`, which the
# sdist does not ship (nor hf_mixins' stand-ins). The stand-in maps the mixin's image URLs to a local
# image (this machine may have no network) and leaves other URLs (videos, audio: not used) as they are.
_IMAGE_DIR = tempfile.mkdtemp(prefix="navil-processor-test-")
atexit.register(shutil.rmtree, _IMAGE_DIR, ignore_errors=True)


def _url_to_local_path(url, *args, **kwargs):
    if not url.lower().endswith((".png", ".jpg", ".jpeg")):
        return url
    path = os.path.join(_IMAGE_DIR, os.path.basename(url))
    if not os.path.exists(path):
        pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return path


if "fetch_hub_objects_for_ci" not in sys.modules:
    _standin = types.ModuleType("fetch_hub_objects_for_ci")
    _standin.url_to_local_path = _url_to_local_path
    sys.modules["fetch_hub_objects_for_ci"] = _standin

ProcessorTesterMixin = hf_mixins.mixin("test_processing_common", "ProcessorTesterMixin")


def _auto_image_processor_usable():
    """transformers 5.16's `AutoImageProcessor` is a placeholder that needs torchvision (fixed in 5.19);
    NaViLProcessor loads its image processor without it."""
    try:
        AutoImageProcessor.register  # noqa: B018 -- the placeholder raises on attribute access
    except ImportError:
        return False
    return True


def test_transformers_processor_mixin_available():
    """The mixin must load; a machine that cannot fetch it fails here, once, with the reason."""
    reason = hf_mixins.error()
    if reason is not None:
        pytest.fail(reason, pytrace=False)


class NaViLProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = NaViLProcessor

    @classmethod
    def setUpClass(cls):
        # The mixin loads single components with AutoImageProcessor, which finds a class by the saved
        # `image_processor_type` among registered ones (the Hub path uses `auto_map` + trust_remote_code
        # instead: tests/model/test_processing.py covers it).
        if _auto_image_processor_usable():
            AutoImageProcessor.register(NaViLConfig, NaViLImageProcessor, exist_ok=True)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        if _auto_image_processor_usable():
            from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

            IMAGE_PROCESSOR_MAPPING._extra_content.pop(NaViLConfig, None)

    def get_component(self, attribute, **kwargs):
        if attribute == "image_processor" and not _auto_image_processor_usable():
            return NaViLImageProcessor.from_pretrained(self.tmpdirname, **kwargs)
        return super().get_component(attribute, **kwargs)

    def _test_apply_chat_template(self, modality, *args, **kwargs):
        # Before 5.19 the mixin expects one `pixel_values` row per image; NaViL's are packed patches
        # `[P, 3, 16, 16]` (API.md), as Qwen2-VL's, which 5.19+ counts through `image_grid_thw`.
        if modality == "image" and "_grid_thw" not in inspect.getsource(super()._test_apply_chat_template):
            self.skipTest("this transformers' mixin expects one pixel_values row per image, not packed patches")
        super()._test_apply_chat_template(modality, *args, **kwargs)

    def test_processor_from_and_save_pretrained_as_nested_dict(self):
        if not _auto_image_processor_usable():
            self.skipTest("this transformers' AutoImageProcessor needs torchvision, which is not installed")
        super().test_processor_from_and_save_pretrained_as_nested_dict()

    @classmethod
    def _setup_tokenizer(cls):
        return AutoTokenizer.from_pretrained(str(checkpoint("qwen3")))

    @classmethod
    def _setup_image_processor(cls):
        # 30x400 -> one 2x16-patch scale: <img> 8 x <IMG_CONTEXT> <IMG_LINE_BREAK> <IMG_FRAME_BREAK> </img>
        return NaViLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64)

    @staticmethod
    def prepare_processor_dict():
        return {"chat_template": CHAT_TEMPLATES["qwen3-chat"]}
