"""Image processor for NaViL: native-resolution images as a multi-scale pyramid of 16-px patches.

Per image (SPEC.md §2), each image on its own:

* target size of the base scale: Qwen2-VL's `smart_resize` with factor 1, so the area lands in
  `[min_pixels, max_pixels]` and the aspect ratio is kept;
* pyramid ("visual multi-scale packing"): repeatedly shrink the pixel budget to
  `grid patches * patch_size**2 * ratio**2` and recompute from the original size, until the budget
  falls under `min_pixels` or the grid stops shrinking; scales are emitted smallest first;
* per scale: bicubic resize of the uint8 image (as PIL does), zero padding bottom/right to a multiple
  of `patch_size * merge_size`, rescale 1/255, normalise (padded pixels end at -1.0), then cut into
  `[3, 16, 16]` patches in 2x2-merge-block order. The scales (and images) of one call run on several
  threads, each writing its own slice of the output; the result does not depend on the thread count.

Reading the input (`load_rgb_image`), before any of that:

* size limit: an image over `max_input_pixels` pixels (default `DEFAULT_MAX_INPUT_PIXELS` = 2**27,
  about 134M; `None` for none) is a `ValueError`, checked on the size alone -- before a file's or a
  PIL image's pixels are decoded. PIL's own decompression-bomb check on files still applies
  (`PIL.Image.MAX_IMAGE_PIXELS`);
* EXIF: a PIL image (or file) with an EXIF Orientation other than 1 is turned upright with
  `PIL.ImageOps.exif_transpose` first, so a portrait photo stored landscape stays portrait;
* modes, to RGB uint8: "RGB" as is; "L", "1" (0/255), "CMYK", "YCbCr", "HSV", "LAB", "RGBX" with PIL's
  `convert("RGB")`; 16-bit greyscale "I;16"/"I;16L"/"I;16B"/"I;16N", and "I" (32-bit, read as 16-bit:
  clipped to 0..65535) scaled by 255/65535 and rounded, so 65535 is 255 and a gradient stays a gradient;
  float "F": NaN -> 0, then if the largest finite value is at most 1.0 the image is taken as 0..1 and
  multiplied by 255, otherwise as 0..255; clipped to 0..255 (infinities land on the ends) and rounded;
  alpha ("RGBA", "LA", "PA", "RGBa", "P" with a transparent palette entry or an RGBA palette, "L"/"RGB"
  with a PNG transparency key) is composited on white: `(c * a + 255 * (255 - a)) / 255`, rounded, so
  opaque pixels are unchanged. Other modes are a `ValueError` naming the mode;
* arrays (numpy or torch, HWC or HW): uint8, uint16 (the "I;16" rule) or bool (0/255), with 1
  (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels, alpha as above; float arrays are refused
  (scale them to uint8 yourself, or pass a PIL "F" image), as are other ranks and channel counts.

Settings are checked when the processor is built and when a call overrides them (`ValueError` naming
the setting and what it may be), so no accepted setting can put NaN or inf into `pixel_values`.

The shape math (`smart_resize`, `scale_pyramid`, `image_token_layout`, `num_image_tokens`, ...) is
pure module-level code so a serving engine can count tokens without building the processor;
`image_tokens` is the one statement of an image's token layout (SPEC §3) that the processor's text,
vLLM's ids and every count use.
"""

import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

try:
    from .configuration_navil import (
        IMAGE_CONTEXT_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_START_TOKEN,
    )
except ImportError:  # imported as a top-level module (tests, scripts next to the file)
    from configuration_navil import (
        IMAGE_CONTEXT_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_START_TOKEN,
    )

MAX_ASPECT_RATIO = 200
PARALLEL_MIN_PATCHES = 2048  # below this (about a 720x720 image) thread start-up costs more than it saves


# --------------------------------------------------------------------------------------------------
# Shape math
# --------------------------------------------------------------------------------------------------


def smart_resize(height, width, min_pixels, max_pixels):
    """Target `(height, width)` of one scale: Qwen2-VL's `smart_resize` with `factor=1` (SPEC §2.1).

    The area is brought into `[min_pixels, max_pixels]` keeping the aspect ratio; sizes are not
    rounded to any multiple (padding to 32 comes later). An aspect ratio over 200 is an error.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio {ratio:.1f} ({height}x{width}, height x width) is over the limit of {MAX_ASPECT_RATIO}"
        )
    h_bar, w_bar = round(height), round(width)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(1, math.floor(height / beta))
        w_bar = max(1, math.floor(width / beta))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta)
        w_bar = math.ceil(width * beta)
    return h_bar, w_bar


def grid_size(resized_height, resized_width, patch_size=16, merge_size=2):
    """Patch grid `(grid_h, grid_w)` of a resized image once padded to a multiple of patch*merge."""
    factor = patch_size * merge_size
    return (-(-resized_height // factor) * merge_size, -(-resized_width // factor) * merge_size)


def scale_pyramid(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """All scales of one image, smallest first: a list of `(resized_h, resized_w, grid_h, grid_w)`.

    Starts from `smart_resize(height, width, min_pixels, max_pixels)`; each further scale uses the
    pixel budget `(grid_h * grid_w * patch_size**2) * scale_downsample_ratio**2` of the previous
    one, recomputed from the original size with `min_pixels` unchanged. Stops when the budget is under
    `min_pixels` or the new grid is not strictly smaller (SPEC §2.5). `multi_scale=False` gives the
    base scale only.
    """
    resized_h, resized_w = smart_resize(height, width, min_pixels, max_pixels)
    grid_h, grid_w = grid_size(resized_h, resized_w, patch_size, merge_size)
    scales = [(resized_h, resized_w, grid_h, grid_w)]
    while multi_scale:
        budget = (grid_h * grid_w * patch_size**2) * scale_downsample_ratio**2
        if budget < min_pixels:
            break
        resized_h, resized_w = smart_resize(height, width, min_pixels, budget)
        new_grid_h, new_grid_w = grid_size(resized_h, resized_w, patch_size, merge_size)
        # Sizes shrink monotonically with the budget, so "strictly smaller" is the same on area or per side.
        if new_grid_h * new_grid_w >= grid_h * grid_w:
            break
        grid_h, grid_w = new_grid_h, new_grid_w
        scales.append((resized_h, resized_w, grid_h, grid_w))
    return scales[::-1]


def image_token_layout(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """Per scale, smallest first, the `(rows, cols)` of `<IMG_CONTEXT>` tokens an image occupies:
    `(grid_h / merge_size, grid_w / merge_size)`."""
    scales = scale_pyramid(
        height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size, multi_scale
    )
    return [(grid_h // merge_size, grid_w // merge_size) for _, _, grid_h, grid_w in scales]


# The five tokens of SPEC §3's layout, in `image_tokens`' order: start, context, line break, frame break, end.
IMAGE_LAYOUT_TOKENS = (
    IMAGE_START_TOKEN, IMAGE_CONTEXT_TOKEN, IMAGE_LINE_BREAK_TOKEN, IMAGE_FRAME_BREAK_TOKEN, IMAGE_END_TOKEN,
)  # fmt: skip


def image_tokens(grids, merge_size=2, tokens=IMAGE_LAYOUT_TOKENS):
    """The tokens one image occupies in the prompt (SPEC §3), the one statement of that layout: `<img>`;
    per scale (`grids`: the image's `image_grid_thw` rows `(t, grid_h, grid_w)`, smallest first)
    `grid_h / merge_size` rows of `<IMG_CONTEXT>` x `grid_w / merge_size` + `<IMG_LINE_BREAK>`, then
    `<IMG_FRAME_BREAK>`; finally `</img>`.

    `tokens` are the five in the order of `IMAGE_LAYOUT_TOKENS` (start, context, line break, frame
    break, end): the token strings by default (`"".join(...)` is the prompt text), or their ids (the
    `input_ids`); `len(...)` is the count."""
    start, context, line_break, frame_break, end = tokens
    out = [start]
    for _, grid_h, grid_w in grids:
        row = [context] * (int(grid_w) // merge_size) + [line_break]
        out += row * (int(grid_h) // merge_size) + [frame_break]
    out.append(end)
    return out


def _pyramid_grids(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """`image_grid_thw` rows of one image, smallest scale first."""
    scales = scale_pyramid(
        height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size, multi_scale
    )
    return [(1, grid_h, grid_w) for _, _, grid_h, grid_w in scales]


def num_image_context_tokens(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """Number of `<IMG_CONTEXT>` tokens (= connector outputs) for one image, all scales."""
    grids = _pyramid_grids(
        height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size, multi_scale
    )
    return image_tokens(grids, merge_size).count(IMAGE_CONTEXT_TOKEN)


def num_image_tokens(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """Number of prompt tokens one `<image>` placeholder expands to: the length of its `image_tokens`."""
    grids = _pyramid_grids(
        height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size, multi_scale
    )
    return len(image_tokens(grids, merge_size))


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


DEFAULT_MAX_INPUT_PIXELS = 2**27  # ~134M pixels (an 11585 x 11585 image), above PIL's own warning threshold
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def check_input_pixels(height, width, max_input_pixels, what="image"):
    """Refuse an image of `height x width` over `max_input_pixels` pixels (`None`: no limit) -- on its
    size alone, before any pixel is decoded."""
    if max_input_pixels is not None and height * width > max_input_pixels:
        raise ValueError(
            f"{what} is {width}x{height} (width x height) = {width * height} pixels, over the limit of "
            f"max_input_pixels={max_input_pixels}; to accept it, raise the limit: "
            f"NaViLImageProcessor(max_input_pixels=...) (None for no limit) or max_input_pixels=... in the call"
        )


def load_rgb_image(image, max_input_pixels=DEFAULT_MAX_INPUT_PIXELS):
    """One image item -> upright RGB `PIL.Image` (decoded). Accepts a `PIL.Image` of any mode PIL
    converts, a file path (str / Path), or an HWC / HW uint8, uint16 or bool array (numpy or torch)
    with 1-4 channels; the rules are in the module docstring. `max_input_pixels` is checked before
    decoding."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            opened = Image.open(path)  # lazy: reads the header only
        except Exception as err:
            raise ValueError(f"cannot read image file {path!r}: {err}") from err
        with opened:
            _check_not_empty(opened.height, opened.width)
            check_input_pixels(opened.height, opened.width, max_input_pixels, f"image file {path!r}")
            try:
                rgb = pil_to_rgb(exif_upright(opened))
            except Exception as err:
                raise ValueError(f"cannot read image file {path!r}: {err}") from err
            if rgb is opened:
                rgb = opened.copy()  # closing the file releases the opened image's pixels
        image = rgb
    elif isinstance(image, Image.Image):
        _check_not_empty(image.height, image.width)
        check_input_pixels(image.height, image.width, max_input_pixels)
        image = pil_to_rgb(exif_upright(image))
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = Image.fromarray(array_to_rgb(image, max_input_pixels))
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: expected a PIL.Image, a file path, or an HWC uint8 "
            "numpy array / torch tensor"
        )
    image.load()  # decode now: the scales are resized from several threads
    return image


def _check_not_empty(height, width):
    if width == 0 or height == 0:
        raise ValueError(f"empty image: width={width}, height={height}")


def exif_upright(image):
    """`image` turned upright by its EXIF Orientation (`PIL.ImageOps.exif_transpose`); the image itself
    when the tag is absent or 1 (no copy)."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _has_alpha(image):
    if image.mode in _ALPHA_MODES:
        return True
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def pil_to_rgb(image):
    """A `PIL.Image` of any supported mode -> RGB (the module docstring's rules). An RGB image without
    a transparency key is returned as is."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _GREY16_MODES:
        return Image.fromarray(grey16_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "F":
        return Image.fromarray(float_to_uint8(np.asarray(image))).convert("RGB")
    if _has_alpha(image):
        return Image.fromarray(composite_on_white(np.asarray(image.convert("RGBA"))))
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"unsupported image mode {mode!r}: {err}") from err


def grey16_to_uint8(values):
    """16-bit values (any integer dtype; clipped to 0..65535) -> uint8 `round(v * 255 / 65535)`."""
    values = np.clip(values, 0, 65535).astype(np.uint32)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def float_to_uint8(values):
    """Float pixels -> uint8: NaN -> 0; 0..1 when the largest finite value is at most 1.0 (times 255),
    else 0..255; clipped (infinities land on the ends) and rounded."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.max() <= 1.0:
        values = values * 255.0
    values = np.clip(np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0)
    return np.floor(values + 0.5).astype(np.uint8)


def composite_on_white(pixels):
    """`[..., C + 1]` uint8 colour + alpha -> `[..., C]` uint8 over white: `(c * a + 255 * (255 - a)) / 255`
    rounded (exact: an opaque pixel keeps its colour, a clear one is white)."""
    colour, alpha = pixels[..., :-1].astype(np.uint16), pixels[..., -1:].astype(np.uint16)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def array_to_rgb(array, max_input_pixels=DEFAULT_MAX_INPUT_PIXELS):
    """Numpy array / torch tensor image -> HWC (or HW grey) uint8 array for `Image.fromarray`: uint8 as
    is, uint16 scaled like "I;16", bool as 0/255; 2 and 4 channels composited on white."""
    kind = "torch tensor" if isinstance(array, torch.Tensor) else "numpy array"
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        allowed = array.dtype in (torch.uint8, torch.uint16, torch.bool)
        dtype = array.dtype
        if allowed:
            array = array.numpy()
    else:
        dtype = array.dtype
        allowed = array.dtype.kind == "b" or (array.dtype.kind == "u" and array.dtype.itemsize in (1, 2))
    if not allowed:
        hint = (
            "; scale a float image to 0-255 and cast it to uint8, or pass a PIL 'F' image"
            if "float" in str(dtype)
            else ""
        )
        raise ValueError(
            f"image {kind} must have dtype uint8 (HWC, values 0-255), uint16 (0-65535) or bool, got {dtype}{hint}"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (2, 3, 4))):
        hint = " (channels first? pass it as HWC)" if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) else ""
        raise ValueError(
            f"image {kind} must be HWC with 1, 2, 3 or 4 channels (or HW grayscale), got shape "
            f"{tuple(array.shape)}{hint}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"empty image: shape {tuple(array.shape)}")
    check_input_pixels(array.shape[0], array.shape[1], max_input_pixels, f"image {kind}")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8) * np.uint8(255)
    elif array.dtype.itemsize == 2:
        array = grey16_to_uint8(array)
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array = composite_on_white(array)
        if array.shape[-1] == 1:
            array = array[..., 0]
    array = np.ascontiguousarray(array)
    return array if array.ndim == 3 else np.repeat(array[..., None], 3, axis=-1)


def flatten_images(images):
    """A single image, a list of images, or a list of lists (one per sample) -> flat list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]


NORMALIZE_CHUNK = 128  # patches per normalisation step: ~400 KB of float32, stays in L2 cache


def normalize_patches_into(out, patches, rescale_factor, image_mean, image_std):
    """`out[:] = (float32(patches) * rescale_factor - mean) / std` for uint8 `[N, 3, p, p]` patches, in
    float32 and in the order `ToTensor` + `Normalize` use (a rescale of 1/255 is a division by 255),
    chunk by chunk so each chunk's three float passes run in cache."""
    by_division = math.isclose(rescale_factor, 1 / 255, rel_tol=1e-12)
    mean = np.asarray(image_mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image_std, dtype=np.float32).reshape(1, 3, 1, 1)
    for start in range(0, len(patches), NORMALIZE_CHUNK):
        chunk, dest = patches[start : start + NORMALIZE_CHUNK], out[start : start + NORMALIZE_CHUNK]
        if by_division:  # uint8 -> float32 is exact, so casting inside the ufunc changes nothing
            np.divide(chunk, np.float32(255), out=dest, dtype=np.float32)
        else:
            np.multiply(chunk, np.float32(rescale_factor), out=dest, dtype=np.float32)
        dest -= mean
        dest /= std
    return out


def merge_block_view(padded, patch_size=16, merge_size=2):
    """`[H, W, C]` array (H, W multiples of patch*merge) -> strided view
    `[H/(p*m), W/(p*m), m, m, C, p, p]`: block rows, block cols, the `m x m` patches of a block
    row-major, then one patch channels-first. Reshaping it to `[N, C, p, p]` gives merge-block order."""
    height, width, channels = padded.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = padded.reshape(
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size, channels
    )  # (bh, mh, py, bw, mw, px, C)
    return blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, py, px)


def patchify(padded, patch_size=16, merge_size=2):
    """`[H, W, C]` array -> `[N, C, p, p]` patches in 2x2-merge-block order (SPEC §2.4)."""
    channels = padded.shape[-1]
    return merge_block_view(padded, patch_size, merge_size).reshape(-1, channels, patch_size, patch_size)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

_RESAMPLE_FILTERS = {int(f): f.name for f in Image.Resampling}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _positive_int(name, value, allow_none=False):
    """`value` as an int >= 1 (an integral float is fine; bools, NaN, inf, fractions are not)."""
    if value is None and allow_none:
        return None
    ok = False
    if isinstance(value, (bool, np.bool_)):
        pass
    elif isinstance(value, numbers.Integral):
        ok = value >= 1
    elif isinstance(value, numbers.Real):
        ok = math.isfinite(value) and float(value).is_integer() and value >= 1
    if not ok:
        allowed = "a positive integer (1 or more)" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _as_float(value):
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf if value > 0 else -math.inf


def _finite_float(name, value, nonzero=False, allowed="a finite number"):
    """`value` as a float that is finite in float32 (and non-zero if asked)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        number = _as_float(value)
        ok = math.isfinite(number) and abs(number) <= _FLOAT32_MAX and not (nonzero and np.float32(number) == 0)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def _channel_values(name, values, nonzero=False):
    """`image_mean` / `image_std`: 3 finite numbers (non-zero for the std), one per RGB channel."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {values!r}")
    allowed = "3 finite non-zero float32 numbers" if nonzero else "3 finite float32 numbers"
    try:
        return [_finite_float(name, value, nonzero, allowed) for value in values]
    except ValueError:
        raise ValueError(f"{name} must be {allowed} (one per RGB channel), got {values!r}") from None


def check_settings(settings):
    """Validate and normalise a dict of the processor's call settings (`_CALL_SETTINGS` keys, with
    `min_pixels` / `max_pixels` resolved). Raises `ValueError` naming the setting and its allowed values."""
    s = dict(settings)
    s["min_dynamic_patch"] = _positive_int("min_dynamic_patch", s["min_dynamic_patch"])
    s["max_dynamic_patch"] = _positive_int("max_dynamic_patch", s["max_dynamic_patch"])
    s["min_pixels"] = _positive_int("min_pixels", s["min_pixels"])
    s["max_pixels"] = _positive_int("max_pixels", s["max_pixels"])
    if not s["min_pixels"] <= s["max_pixels"]:
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got {s['min_pixels']} and {s['max_pixels']} "
            "(min_pixels may not be larger than max_pixels)"
        )
    ratio = s["scale_downsample_ratio"]
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, (bool, np.bool_)) and 0 < _as_float(ratio) <= 1
    if not ok:  # 1.0 is legal: SPEC §2.5 stops once the grid is not strictly smaller (so, as a rule, at once)
        raise ValueError(f"scale_downsample_ratio must be in (0, 1], got {ratio!r}")
    s["scale_downsample_ratio"] = float(ratio)
    threads = s["num_threads"]
    if threads is not None:
        try:
            threads = _positive_int("num_threads", threads)
        except ValueError:
            raise ValueError(f"num_threads must be at least 1 (an integer; None: every CPU), got {threads!r}") from None
    s["num_threads"] = threads
    s["max_input_pixels"] = _positive_int("max_input_pixels", s["max_input_pixels"], allow_none=True)
    s["image_mean"] = _channel_values("image_mean", s["image_mean"])
    s["image_std"] = _channel_values("image_std", s["image_std"], nonzero=True)
    s["rescale_factor"] = _finite_float(
        "rescale_factor", s["rescale_factor"], nonzero=True, allowed="a finite non-zero float32 number"
    )
    resample = s["resample"]
    if isinstance(resample, bool) or not isinstance(resample, numbers.Integral) or resample not in _RESAMPLE_FILTERS:
        names = ", ".join(f"{value} ({name})" for value, name in sorted(_RESAMPLE_FILTERS.items()))
        raise ValueError(f"resample must be a PIL resampling filter: {names}; got {resample!r}")
    s["resample"] = int(resample)
    for key in ("multi_scale", "do_rescale", "do_normalize"):
        s[key] = bool(s[key])
    # The normalisation must stay within float32 for every uint8 value: it is monotonic in the pixel,
    # so checking 0 and 255 with the very float32 operations `normalize_patches_into` uses is enough.
    rescale_factor = s["rescale_factor"] if s["do_rescale"] else 1.0
    mean, std = (s["image_mean"], s["image_std"]) if s["do_normalize"] else ((0.0,) * 3, (1.0,) * 3)
    ends = np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1).repeat(3, axis=1)
    with np.errstate(all="ignore"):
        out = normalize_patches_into(np.empty(ends.shape, np.float32), ends, rescale_factor, mean, std)
    if not np.isfinite(out).all():
        raise ValueError(
            f"rescale_factor={rescale_factor}, image_mean={list(mean)} and image_std={list(std)} put pixel values "
            "outside float32's range ((pixel * rescale_factor - mean) / std must stay finite for pixels 0..255)"
        )
    return s


class NaViLImagesKwargs(ImagesKwargs, total=False):
    """The image settings a call may override (`NaViLImageProcessor.__call__`, or a processor's
    `images_kwargs` / flat keyword arguments): besides the standard `do_rescale`, `rescale_factor`,
    `do_normalize`, `image_mean`, `image_std`, `resample` and `return_tensors`:

    * `min_pixels`, `max_pixels`: pixel-area bounds of the base scale;
    * `min_dynamic_patch`, `max_dynamic_patch`: the same bounds in patches (used when the matching
      `*_pixels` is not given);
    * `scale_downsample_ratio`, `multi_scale`: the scale pyramid;
    * `num_threads`: threads for one call (does not change the result);
    * `max_input_pixels`: the largest input image accepted, in pixels (checked before decoding).

    The other standard image keys (`size`, `do_resize`, `crop_size`, `do_pad`, ...) have no meaning for
    NaViL's native-resolution pyramid and are rejected."""

    min_pixels: int | None
    max_pixels: int | None
    min_dynamic_patch: int | None
    max_dynamic_patch: int | None
    scale_downsample_ratio: float | None
    multi_scale: bool | None
    num_threads: int | None
    max_input_pixels: int | None


# Call-time overrides `preprocess` accepts: NaViLImagesKwargs' own keys and these standard ones.
_CALL_SETTINGS = (
    *NaViLImagesKwargs.__annotations__.keys() - ImagesKwargs.__annotations__.keys(),
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
)


class NaViLImageProcessor(BaseImageProcessor):
    r"""Turns images into NaViL's multi-scale patch sequence.

    Args:
        patch_size: patch side in pixels (16).
        merge_size: side of the patch block merged into one LLM token (2); sizes are padded to
            multiples of `patch_size * merge_size`.
        min_pixels, max_pixels: pixel-area bounds of the base scale; default to
            `min_dynamic_patch * patch_size**2` and `max_dynamic_patch * patch_size**2`.
        min_dynamic_patch, max_dynamic_patch: the original checkpoints' names for those bounds, in patches.
        scale_downsample_ratio: side ratio between consecutive scales (0.7071 ~ halving the area).
        multi_scale: `False` keeps the base scale only.
        image_mean, image_std, rescale_factor: normalisation `(x * rescale_factor - mean) / std`;
            `do_rescale=False` / `do_normalize=False` skip the rescale / the mean-std step.
        resample: PIL resampling filter (bicubic).
        num_threads: threads that process the scales (and images) of one call side by side -- PIL's
            resize and numpy release the GIL; `None` uses every CPU (at most 8). Results do not depend
            on it.
        max_input_pixels: the largest input image accepted, in pixels (default `DEFAULT_MAX_INPUT_PIXELS`
            = 2**27); larger ones are a `ValueError` before their pixels are decoded. `None`: no limit.

    Every setting is checked here and when a call overrides it: a `ValueError` names the setting and
    what it may be (positive integers for sizes, `0 < min_pixels <= max_pixels`, `scale_downsample_ratio`
    in (0, 1], 3 finite means, 3 finite non-zero stds, a finite non-zero `rescale_factor`, ...).

    Every setting but `patch_size` and `merge_size` (which must match the model) can also be given to a
    single call (`NaViLImagesKwargs`), e.g. `image_processor(images, max_pixels=512 * 512)`.

    Returns (`__call__`): `pixel_values` `[P, 3, patch, patch]` float32 (all images, per image all its
    scales smallest first), `image_grid_thw` `[S, 3]` int64 rows `[1, grid_h, grid_w]`, `num_scales`
    `[num_images]` int64.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "num_scales"]
    valid_kwargs = NaViLImagesKwargs
    # No fixed output size: an image keeps its aspect ratio within `min_pixels`/`max_pixels`. (transformers'
    # processor tests read `image_processor.size`; a class attribute, so it is not saved with the settings.)
    size = None

    def __init__(
        self,
        patch_size=16,
        merge_size=2,
        min_pixels=None,
        max_pixels=None,
        min_dynamic_patch=256,
        max_dynamic_patch=24576,
        scale_downsample_ratio=0.7071,
        multi_scale=True,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        rescale_factor=1 / 255,
        resample=Image.BICUBIC,
        num_threads=None,
        do_rescale=True,
        do_normalize=True,
        max_input_pixels=DEFAULT_MAX_INPUT_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = _positive_int("patch_size", patch_size)
        self.merge_size = _positive_int("merge_size", merge_size)
        p2 = self.patch_size**2
        min_dynamic_patch = _positive_int("min_dynamic_patch", min_dynamic_patch)
        max_dynamic_patch = _positive_int("max_dynamic_patch", max_dynamic_patch)
        s = check_settings(
            dict(
                min_dynamic_patch=min_dynamic_patch, max_dynamic_patch=max_dynamic_patch,
                min_pixels=min_dynamic_patch * p2 if min_pixels is None else min_pixels,
                max_pixels=max_dynamic_patch * p2 if max_pixels is None else max_pixels,
                scale_downsample_ratio=scale_downsample_ratio, multi_scale=multi_scale, image_mean=image_mean,
                image_std=image_std, rescale_factor=rescale_factor, resample=resample, num_threads=num_threads,
                do_rescale=do_rescale, do_normalize=do_normalize, max_input_pixels=max_input_pixels,
            )
        )  # fmt: skip
        self.min_dynamic_patch = s["min_dynamic_patch"]
        self.max_dynamic_patch = s["max_dynamic_patch"]
        self.min_pixels = s["min_pixels"]
        self.max_pixels = s["max_pixels"]
        self.scale_downsample_ratio = s["scale_downsample_ratio"]
        self.multi_scale = s["multi_scale"]
        self.image_mean = s["image_mean"]
        self.image_std = s["image_std"]
        self.rescale_factor = s["rescale_factor"]
        self.resample = s["resample"]
        self.num_threads = s["num_threads"]
        self.do_rescale = s["do_rescale"]
        self.do_normalize = s["do_normalize"]
        self.max_input_pixels = s["max_input_pixels"]

    def resolve_settings(self, overrides=None):
        """This processor's settings with a call's `overrides` (`NaViLImagesKwargs` keys) applied and
        checked (`check_settings`); `None` values mean "the processor's own". A dict of every call setting
        (`max_dynamic_patch` alone sets `max_pixels`, ...); unknown keys are a TypeError."""
        overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
        unknown = sorted(set(overrides) - set(_CALL_SETTINGS))
        if unknown:
            raise TypeError(f"NaViLImageProcessor got unexpected arguments: {', '.join(unknown)}")
        settings = {key: getattr(self, key) for key in _CALL_SETTINGS}
        settings.update(overrides)
        p2 = self.patch_size**2
        if "min_pixels" not in overrides and "min_dynamic_patch" in overrides:
            settings["min_pixels"] = _positive_int("min_dynamic_patch", overrides["min_dynamic_patch"]) * p2
        if "max_pixels" not in overrides and "max_dynamic_patch" in overrides:
            settings["max_pixels"] = _positive_int("max_dynamic_patch", overrides["max_dynamic_patch"]) * p2
        return check_settings(settings)

    def pyramid(self, height, width, **overrides):
        """`scale_pyramid` with this processor's settings (or a call's `overrides`)."""
        return self._pyramid(height, width, self.resolve_settings(overrides))

    def _pyramid(self, height, width, s):
        return scale_pyramid(
            height, width, s["min_pixels"], s["max_pixels"], s["scale_downsample_ratio"],
            self.patch_size, self.merge_size, s["multi_scale"],
        )  # fmt: skip

    def get_number_of_image_patches(self, height, width, images_kwargs=None):
        """Rows of `pixel_values` one image of `height x width` gives (all its scales), with this processor's
        settings or a call's `images_kwargs` (`NaViLImagesKwargs`), without processing pixels: transformers'
        `get_number_of_image_patches`, what a processor counts tokens from (`// merge_size**2` per image is
        its `<IMG_CONTEXT>` tokens)."""
        return sum(grid_h * grid_w for _, _, grid_h, grid_w in self.pyramid(height, width, **(images_kwargs or {})))

    def num_image_tokens(self, height, width, **overrides):
        """Prompt tokens one image of this size expands to (see module-level `num_image_tokens`), with
        this processor's settings (or a call's `overrides`)."""
        s = self.resolve_settings(overrides)
        return num_image_tokens(
            height, width, s["min_pixels"], s["max_pixels"], s["scale_downsample_ratio"],
            self.patch_size, self.merge_size, s["multi_scale"],
        )  # fmt: skip

    def _process_scale(self, image, resized_h, resized_w, grid_h, grid_w, out, settings):
        """One scale of one image into `out` `[grid_h * grid_w, 3, p, p]`: bicubic resize, zero pad,
        uint8 reorder into merge-block patch order (one copy), then cast + normalise into `out`."""
        p = self.patch_size
        resized = image
        if (resized_w, resized_h) != image.size:
            resized = image.resize((resized_w, resized_h), resample=settings["resample"])
        padded = np.zeros((grid_h * p, grid_w * p, 3), dtype=np.uint8)
        padded[:resized_h, :resized_w] = np.asarray(resized)
        patches = np.ascontiguousarray(merge_block_view(padded, p, self.merge_size)).reshape(-1, 3, p, p)
        rescale_factor = settings["rescale_factor"] if settings["do_rescale"] else 1.0
        mean, std = settings["image_mean"], settings["image_std"]
        if not settings["do_normalize"]:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        normalize_patches_into(out, patches, rescale_factor, mean, std)

    def __call__(self, images, return_tensors=None, **kwargs):
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images, return_tensors=None, **kwargs):
        """Process a single image, a list, or a nested list (one list per sample; flattened).

        Every image is processed independently (no setting carries from one image to the next).
        `kwargs` override this processor's settings for this call (`NaViLImagesKwargs`; `None` keeps
        the processor's own); any other argument is a `TypeError`.
        """
        settings = self.resolve_settings(kwargs)
        rgb_images = [load_rgb_image(image, settings["max_input_pixels"]) for image in flatten_images(images)]
        if not rgb_images:
            raise ValueError("no images given")
        plans = [self._pyramid(image.height, image.width, settings) for image in rgb_images]

        num_patches = sum(grid_h * grid_w for plan in plans for _, _, grid_h, grid_w in plan)
        p = self.patch_size
        pixel_values = np.empty((num_patches, 3, p, p), dtype=np.float32)
        jobs, offset = [], 0
        for image, plan in zip(rgb_images, plans):
            for resized_h, resized_w, grid_h, grid_w in plan:
                n = grid_h * grid_w
                jobs.append((image, resized_h, resized_w, grid_h, grid_w, pixel_values[offset : offset + n], settings))
                offset += n
        threads = min(len(jobs), settings["num_threads"] or min(os.cpu_count() or 1, 8))
        if threads > 1 and num_patches >= PARALLEL_MIN_PATCHES:
            jobs.sort(key=lambda job: -job[3] * job[4])  # largest first: the threads finish together
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda job: self._process_scale(*job), jobs))  # re-raises a job's exception
        else:
            for job in jobs:
                self._process_scale(*job)

        image_grid_thw = np.array([[1, gh, gw] for plan in plans for _, _, gh, gw in plan], dtype=np.int64)
        num_scales = np.array([len(plan) for plan in plans], dtype=np.int64)
        data = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw, "num_scales": num_scales}
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = [
    "IMAGE_LAYOUT_TOKENS",
    "NaViLImageProcessor",
    "NaViLImagesKwargs",
    "image_token_layout",
    "image_tokens",
    "num_image_context_tokens",
    "num_image_tokens",
    "scale_pyramid",
    "smart_resize",
]
