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

The shape math (`smart_resize`, `scale_pyramid`, `image_token_layout`, `num_image_tokens`, ...) is
pure module-level code so a serving engine can count tokens without building the processor.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

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


def num_image_context_tokens(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """Number of `<IMG_CONTEXT>` tokens (= connector outputs) for one image, all scales."""
    layout = image_token_layout(
        height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size, multi_scale
    )
    return sum(rows * cols for rows, cols in layout)


def num_image_tokens(
    height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size=16, merge_size=2, multi_scale=True
):
    """Number of prompt tokens one `<image>` placeholder expands to (SPEC §3): `<img>`, per scale
    `rows * (cols + 1)` (context tokens plus one `<IMG_LINE_BREAK>` per row) and one
    `<IMG_FRAME_BREAK>`, then `</img>`."""
    layout = image_token_layout(
        height, width, min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size, multi_scale
    )
    return 2 + sum(rows * (cols + 1) + 1 for rows, cols in layout)


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def load_rgb_image(image):
    """One image item -> RGB `PIL.Image`. Accepts a `PIL.Image`, a file path (str / Path), or an HWC
    uint8 array (numpy or torch) with 1, 3 or 4 channels (or HW grayscale)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except Exception as err:
            raise ValueError(f"cannot read image file {path!r}: {err}") from err
    elif isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = Image.fromarray(_as_hwc_uint8(image)).convert("RGB")
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: expected a PIL.Image, a file path, or an HWC uint8 "
            "numpy array / torch tensor"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"empty image: width={image.width}, height={image.height}")
    image.load()  # decode now: the scales are resized from several threads
    return image


def _as_hwc_uint8(array):
    kind = "torch tensor" if isinstance(array, torch.Tensor) else "numpy array"
    if isinstance(array, torch.Tensor):
        if array.dtype != torch.uint8:
            raise ValueError(f"image {kind} must have dtype uint8 (HWC, values 0-255), got {array.dtype}")
        array = array.detach().cpu().numpy()
    elif array.dtype != np.uint8:
        raise ValueError(f"image {kind} must have dtype uint8 (HWC, values 0-255), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = " (channels first? pass it as HWC)" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise ValueError(
            f"image {kind} must be HWC with 1, 3 or 4 channels (or HW grayscale), got shape {tuple(array.shape)}{hint}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"empty image: shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)


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


class NaViLImagesKwargs(ImagesKwargs, total=False):
    """The image settings a call may override (`NaViLImageProcessor.__call__`, or a processor's
    `images_kwargs` / flat keyword arguments): besides the standard `do_rescale`, `rescale_factor`,
    `do_normalize`, `image_mean`, `image_std`, `resample` and `return_tensors`:

    * `min_pixels`, `max_pixels`: pixel-area bounds of the base scale;
    * `min_dynamic_patch`, `max_dynamic_patch`: the same bounds in patches (used when the matching
      `*_pixels` is not given);
    * `scale_downsample_ratio`, `multi_scale`: the scale pyramid;
    * `num_threads`: threads for one call (does not change the result).

    The other standard image keys (`size`, `do_resize`, `crop_size`, `do_pad`, ...) have no meaning for
    NaViL's native-resolution pyramid and are rejected."""

    min_pixels: int | None
    max_pixels: int | None
    min_dynamic_patch: int | None
    max_dynamic_patch: int | None
    scale_downsample_ratio: float | None
    multi_scale: bool | None
    num_threads: int | None


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

    Every setting but `patch_size` and `merge_size` (which must match the model) can also be given to a
    single call (`NaViLImagesKwargs`), e.g. `image_processor(images, max_pixels=512 * 512)`.

    Returns (`__call__`): `pixel_values` `[P, 3, patch, patch]` float32 (all images, per image all its
    scales smallest first), `image_grid_thw` `[S, 3]` int64 rows `[1, grid_h, grid_w]`, `num_scales`
    `[num_images]` int64.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "num_scales"]
    valid_kwargs = NaViLImagesKwargs

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.min_dynamic_patch = int(min_dynamic_patch)
        self.max_dynamic_patch = int(max_dynamic_patch)
        self.min_pixels = int(min_pixels) if min_pixels is not None else self.min_dynamic_patch * self.patch_size**2
        self.max_pixels = int(max_pixels) if max_pixels is not None else self.max_dynamic_patch * self.patch_size**2
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if not 0 < scale_downsample_ratio < 1:
            raise ValueError(f"scale_downsample_ratio must be in (0, 1), got {scale_downsample_ratio}")
        self.scale_downsample_ratio = float(scale_downsample_ratio)
        self.multi_scale = bool(multi_scale)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}")
        self.rescale_factor = float(rescale_factor)
        self.resample = int(resample)
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        self.num_threads = None if num_threads is None else int(num_threads)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)

    def _settings(self, overrides=None):
        """This processor's settings with a call's `overrides` (`NaViLImagesKwargs` keys) applied and
        checked; `None` values mean "the processor's own"."""
        overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
        unknown = sorted(set(overrides) - set(_CALL_SETTINGS))
        if unknown:
            raise TypeError(f"NaViLImageProcessor got unexpected arguments: {', '.join(unknown)}")
        settings = {key: getattr(self, key) for key in _CALL_SETTINGS}
        settings.update(overrides)
        p2 = self.patch_size**2
        if "min_pixels" not in overrides and "min_dynamic_patch" in overrides:
            settings["min_pixels"] = int(overrides["min_dynamic_patch"]) * p2
        if "max_pixels" not in overrides and "max_dynamic_patch" in overrides:
            settings["max_pixels"] = int(overrides["max_dynamic_patch"]) * p2
        min_pixels, max_pixels = int(settings["min_pixels"]), int(settings["max_pixels"])
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        ratio = float(settings["scale_downsample_ratio"])
        if not 0 < ratio < 1:
            raise ValueError(f"scale_downsample_ratio must be in (0, 1), got {ratio}")
        threads = settings["num_threads"]
        if threads is not None and int(threads) < 1:
            raise ValueError(f"num_threads must be at least 1, got {threads}")
        mean, std = [float(m) for m in settings["image_mean"]], [float(s) for s in settings["image_std"]]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {mean} and {std}")
        settings.update(
            min_pixels=min_pixels, max_pixels=max_pixels, scale_downsample_ratio=ratio,
            multi_scale=bool(settings["multi_scale"]), num_threads=None if threads is None else int(threads),
            image_mean=mean, image_std=std, rescale_factor=float(settings["rescale_factor"]),
            resample=int(settings["resample"]), do_rescale=bool(settings["do_rescale"]),
            do_normalize=bool(settings["do_normalize"]),
        )  # fmt: skip
        return settings

    def pyramid(self, height, width, **overrides):
        """`scale_pyramid` with this processor's settings (or a call's `overrides`)."""
        return self._pyramid(height, width, self._settings(overrides))

    def _pyramid(self, height, width, s):
        return scale_pyramid(
            height, width, s["min_pixels"], s["max_pixels"], s["scale_downsample_ratio"],
            self.patch_size, self.merge_size, s["multi_scale"],
        )  # fmt: skip

    def num_image_tokens(self, height, width, **overrides):
        """Prompt tokens one image of this size expands to (see module-level `num_image_tokens`), with
        this processor's settings (or a call's `overrides`)."""
        s = self._settings(overrides)
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
        settings = self._settings(kwargs)
        rgb_images = [load_rgb_image(image) for image in flatten_images(images)]
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
    "NaViLImageProcessor",
    "NaViLImagesKwargs",
    "image_token_layout",
    "num_image_context_tokens",
    "num_image_tokens",
    "scale_pyramid",
    "smart_resize",
]
