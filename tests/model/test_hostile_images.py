"""Images that used to be read wrong, silently (hostile inputs, item 8): EXIF orientation, every PIL mode
and array dtype to RGB uint8, invalid processor settings, the input pixel limit, and property-based
invariants of `NaViLImageProcessor` over sizes, modes and settings (hypothesis)."""

import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from configuration_navil import (
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_FRAME_BREAK_TOKEN,
    IMAGE_LINE_BREAK_TOKEN,
    IMAGE_START_TOKEN,
)
from image_processing_navil import (
    DEFAULT_MAX_INPUT_PIXELS,
    MAX_ASPECT_RATIO,
    NaViLImageProcessor,
    image_token_layout,
    num_image_context_tokens,
    num_image_tokens,
    smart_resize,
)
from processing_navil import image_placeholder_expansion

SMALL = dict(min_pixels=32 * 32, max_pixels=128 * 128)  # small budgets keep every test cheap
# derandomize: the same examples on every run (no flaky CI, no .hypothesis folder in the tree)
PROPERTY = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def process(image, **kwargs):
    return NaViLImageProcessor(**(SMALL | kwargs))(image)


def assert_same_output(a, b):
    for key in ("pixel_values", "image_grid_thw", "num_scales"):
        assert np.array_equal(a[key], b[key]), key


def grey_rgb(values):
    """HW uint8 -> the RGB PIL image a grey image of those values is."""
    return Image.fromarray(np.repeat(values[..., None], 3, axis=-1))


# --------------------------------------------------------------------------------- EXIF orientation

# PIL transpose that stores an upright image under EXIF orientation o (the inverse of what a viewer applies)
STORE_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(stored, orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORE_AS))
def test_exif_orientation_png_all_orientations(orientation, tmp_path):
    upright = Image.fromarray(random_rgb(90, 60, seed=orientation))  # portrait: 60 wide, 90 tall
    data = with_orientation(upright.transpose(STORE_AS[orientation]), orientation, "PNG")
    reference = process(upright)
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    for item in (Image.open(io.BytesIO(data)), path):
        assert_same_output(process(item), reference)


def test_exif_orientation_6_jpeg_is_processed_portrait(tmp_path):
    upright = Image.fromarray(random_rgb(96, 64, seed=1))
    data = with_orientation(upright.transpose(Image.Transpose.ROTATE_90), 6, "JPEG")  # stored landscape 96x64
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (96, 64) and stored.getexif()[0x0112] == 6
    # the reference: the same decoded JPEG pixels (without the tag, which `convert` would keep), turned
    # upright by hand (a lossless transpose)
    decoded = Image.fromarray(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    reference = process(decoded.transpose(Image.Transpose.ROTATE_270))
    (tmp_path / "photo.jpg").write_bytes(data)
    for item in (stored, tmp_path / "photo.jpg"):
        out = process(item, multi_scale=False)
        grid_h, grid_w = out["image_grid_thw"][0, 1:].tolist()
        assert grid_h > grid_w  # portrait
        assert_same_output(process(item), reference)
    assert stored.size == (96, 64)  # the caller's image is left alone


# ------------------------------------------------------------------------------------------ modes


def test_16bit_grey_is_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 65535 // (64 * 64 - 1)).reshape(64, 64).astype(np.uint16)
    expected = np.round(ramp / 257).astype(np.uint8)  # 65535 -> 255
    assert len(np.unique(expected)) == 256
    reference = process(grey_rgb(expected))
    images = {
        "I;16": Image.fromarray(ramp),
        "I;16B": Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes()),
        "I": Image.fromarray(ramp.astype(np.int32)),
    }
    assert [image.mode for image in images.values()] == list(images)
    path = tmp_path / "ramp16.png"
    images["I;16"].save(path)
    items = [*images.values(), path, ramp, torch.from_numpy(ramp.astype(np.int32)).to(torch.uint16)]
    for item in items:
        assert_same_output(process(item), reference)
    # "I" is read as 16-bit: values beyond the range are clipped to its ends
    wild = Image.fromarray(np.array([[-5, 70000] * 20] * 40, dtype=np.int32))
    assert_same_output(process(wild), process(grey_rgb(np.array([[0, 255] * 20] * 40, dtype=np.uint8))))


def test_float_mode_rules():
    unit = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)
    expected = np.floor(unit.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    assert_same_output(process(Image.fromarray(unit)), process(grey_rgb(expected)))  # 0..1 -> 0..255
    wide = unit * 300 - 20  # max > 1: read as 0..255 and clipped
    clipped = np.floor(np.clip(wide.astype(np.float64), 0, 255) + 0.5).astype(np.uint8)
    assert_same_output(process(Image.fromarray(wide)), process(grey_rgb(clipped)))
    hostile = unit.copy()
    hostile[0, :3] = [np.nan, np.inf, -np.inf]  # NaN -> 0, infinities to the ends; the rest stays 0..1
    expected_hostile = expected.copy()
    expected_hostile[0, :3] = [0, 255, 0]
    out = process(Image.fromarray(hostile))
    assert np.isfinite(out["pixel_values"]).all()
    assert_same_output(out, process(grey_rgb(expected_hostile)))


def test_alpha_is_composited_on_white():
    rgb = random_rgb(40, 50, seed=3)
    alpha = np.random.default_rng(4).integers(0, 256, (40, 50, 1), dtype=np.uint8)
    alpha[:5] = 0  # fully clear rows come out white
    alpha[5:10] = 255  # opaque rows keep their colour
    a = alpha.astype(np.uint32)
    over_white = ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    assert (over_white[:5] == 255).all() and np.array_equal(over_white[5:10], rgb[5:10])
    reference = process(Image.fromarray(over_white))
    rgba = np.concatenate([rgb, alpha], axis=-1)
    for item in (Image.fromarray(rgba), rgba, torch.from_numpy(rgba.copy())):
        assert_same_output(process(item), reference)
    premultiplied = Image.fromarray(rgba).convert("RGBa")
    out = process(premultiplied)
    assert_same_output(out, process(Image.fromarray(rgba).convert("RGBa").convert("RGBA")))

    grey = rgb[..., 0]
    grey_white = ((grey[..., None] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)[..., 0]
    la = np.stack([grey, alpha[..., 0]], axis=-1)
    for item in (Image.fromarray(la), la):
        assert_same_output(process(item), process(grey_rgb(grey_white)))

    # palette with a transparent entry, and "PA"
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 0
    opaque = np.asarray(palette.convert("RGB")).copy()
    opaque[np.asarray(palette) == 0] = 255
    assert (np.asarray(palette) == 0).any()
    assert_same_output(process(palette), process(Image.fromarray(opaque)))
    pa = palette.convert("PA")
    assert pa.mode == "PA"
    assert_same_output(process(pa), process(Image.fromarray(opaque)))
    # an opaque RGBA image is the RGB image, bit for bit
    assert_same_output(process(Image.fromarray(rgb).convert("RGBA")), process(Image.fromarray(rgb)))


def test_png_transparency_key_is_composited(tmp_path):
    rgb = random_rgb(30, 40, seed=5)
    rgb[:3] = (10, 20, 30)
    image = Image.fromarray(rgb)
    path = tmp_path / "keyed.png"
    image.save(path, transparency=(10, 20, 30))
    with Image.open(path) as opened:
        assert opened.mode == "RGB" and opened.info["transparency"] == (10, 20, 30)
    keyed = rgb.copy()
    keyed[(rgb == (10, 20, 30)).all(-1)] = 255
    assert_same_output(process(path), process(Image.fromarray(keyed)))


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"])
def test_other_modes_follow_pil_conversion(mode):
    base = Image.fromarray(random_rgb(37, 45, seed=6))
    image = base.quantize(64) if mode == "P" else base.convert(mode)
    assert image.mode == mode
    assert_same_output(process(image), process(image.convert("RGB")))


def test_unsupported_mode_and_arrays_are_clear_errors():
    with pytest.raises(ValueError, match="unsupported image mode 'La'"):
        process(Image.new("La", (40, 40)))
    for array, message in [
        (np.zeros((10, 10, 3), dtype=np.float32), r"dtype uint8.*float32; scale a float image"),
        (torch.zeros(10, 10, 3, dtype=torch.float16), r"dtype uint8.*torch.float16"),
        (np.zeros((10, 10, 3), dtype=np.int32), r"dtype uint8.*int32"),
        (np.zeros((10, 10, 5), dtype=np.uint8), r"1, 2, 3 or 4 channels.*\(10, 10, 5\)"),
        (np.zeros((2, 10, 10, 3), dtype=np.uint8), r"HWC.*\(2, 10, 10, 3\)"),
        (np.zeros(10, dtype=np.uint16), r"HWC.*\(10,\)"),
        (torch.zeros(4, 20, 30, dtype=torch.uint8), r"\(4, 20, 30\).*channels first"),
    ]:
        with pytest.raises(ValueError, match=message):
            process(array)
    # bool arrays are black and white
    mask = np.random.default_rng(7).random((30, 30)) > 0.5
    assert_same_output(process(mask), process(grey_rgb(mask.astype(np.uint8) * 255)))


# --------------------------------------------------------------------------------------- settings

INVALID_SETTINGS = [
    (dict(patch_size=0), r"patch_size must be a positive integer.*0"),
    (dict(patch_size=2.5), r"patch_size must be a positive integer.*2\.5"),
    (dict(merge_size=-1), r"merge_size must be a positive integer.*-1"),
    (dict(merge_size=True), r"merge_size must be a positive integer.*True"),
    (dict(min_pixels=float("nan")), r"min_pixels must be a positive integer.*nan"),
    (dict(max_pixels=float("inf")), r"max_pixels must be a positive integer.*inf"),
    (dict(min_pixels=0), r"min_pixels must be a positive integer"),
    (dict(min_pixels=4096, max_pixels=1024), r"need 0 < min_pixels <= max_pixels, got 4096 and 1024"),
    (dict(min_dynamic_patch=0), r"min_dynamic_patch must be a positive integer"),
    (dict(scale_downsample_ratio=0.0), r"scale_downsample_ratio must be in \(0, 1\], got 0\.0"),
    (dict(scale_downsample_ratio=1.5), r"scale_downsample_ratio must be in \(0, 1\], got 1\.5"),
    (dict(scale_downsample_ratio=float("nan")), r"scale_downsample_ratio must be in \(0, 1\], got nan"),
    (dict(image_std=(0.5, 0.0, 0.5)), r"image_std must be 3 finite non-zero float32 numbers"),
    (dict(image_std=(0.5, float("inf"), 0.5)), r"image_std must be 3 finite non-zero float32 numbers"),
    (dict(image_std=(1e-46, 0.5, 0.5)), r"image_std must be 3 finite non-zero float32 numbers"),  # 0 in float32
    (dict(image_mean=(float("nan"), 0.5, 0.5)), r"image_mean must be 3 finite float32 numbers"),
    (dict(image_mean=(0.5, 0.5)), r"image_mean needs 3 values \(one per RGB channel\)"),
    (dict(image_std=(0.5,) * 4), r"image_std needs 3 values"),
    (dict(image_mean="abc"), r"image_mean needs 3 values"),
    (dict(rescale_factor=float("nan")), r"rescale_factor must be a finite non-zero float32 number, got nan"),
    (dict(rescale_factor=0.0), r"rescale_factor must be a finite non-zero float32 number"),
    (dict(rescale_factor=1e39), r"rescale_factor must be a finite non-zero float32 number"),  # inf in float32
    (dict(rescale_factor=1e-300), r"rescale_factor must be a finite non-zero float32 number"),  # 0 in float32
    (dict(image_std=(1e-39, 0.5, 0.5)), r"outside float32's range"),
    (dict(rescale_factor=1e37), r"outside float32's range"),
    (dict(resample=99), r"resample must be a PIL resampling filter: 0 \(NEAREST\).*got 99"),
    (dict(num_threads=0), r"num_threads must be at least 1"),
    (dict(num_threads=1.5), r"num_threads must be at least 1"),
    (dict(max_input_pixels=0), r"max_input_pixels must be a positive integer \(1 or more\) or None"),
    (dict(max_input_pixels=float("inf")), r"max_input_pixels must be a positive integer"),
]
CALL_TIME = {"patch_size", "merge_size"}  # fixed by the model: not call settings


@pytest.mark.parametrize("kwargs, message", INVALID_SETTINGS, ids=[str(kwargs) for kwargs, _ in INVALID_SETTINGS])
def test_invalid_settings_rejected_at_construction_and_call(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NaViLImageProcessor(**kwargs)
    if set(kwargs) & CALL_TIME:
        return
    ip = NaViLImageProcessor(min_pixels=1, max_pixels=1 << 20)
    image = Image.fromarray(random_rgb(40, 40))
    with pytest.raises(ValueError, match=message):
        ip(image, **kwargs)
    with pytest.raises(ValueError, match=message):
        ip.num_image_tokens(40, 40, **kwargs)


def test_ratio_one_is_the_base_scale_and_extreme_valid_settings_stay_finite():
    image = Image.fromarray(random_rgb(300, 200, seed=8))
    assert_same_output(process(image, scale_downsample_ratio=1.0), process(image, multi_scale=False))
    for kwargs in [
        dict(image_std=(1e-30, -1e-30, 3e-30), image_mean=(1e8, -1e8, 0.0)),
        dict(rescale_factor=1e30, image_std=(1.0, 1.0, 1.0)),
        dict(rescale_factor=-1.0),
        dict(rescale_factor=1e-40),
        dict(do_rescale=False, do_normalize=False),
        dict(scale_downsample_ratio=1e-9),
        dict(min_pixels=1, max_pixels=1),
    ]:
        out = process(image, **kwargs)
        assert np.isfinite(out["pixel_values"]).all(), kwargs


@given(
    mean=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3),
    std=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3),
    rescale=st.floats(allow_nan=True, allow_infinity=True),
)
@PROPERTY
def test_property_any_float_settings_are_rejected_or_finite(mean, std, rescale):
    try:
        ip = NaViLImageProcessor(image_mean=mean, image_std=std, rescale_factor=rescale, **SMALL)
    except ValueError as err:
        assert any(name in str(err) for name in ("image_mean", "image_std", "rescale_factor"))
        return
    assert np.isfinite(ip(random_rgb(20, 30))["pixel_values"]).all()


# ------------------------------------------------------------------------------------ pixel limit


def png_header_only(width, height):
    """A PNG that claims `width x height` greyscale pixels but holds almost no data: opening it is
    cheap, decoding it fails (so a limit checked after decoding would fail differently)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def test_default_pixel_limit_checked_before_decoding(tmp_path):
    assert DEFAULT_MAX_INPUT_PIXELS == 2**27 == NaViLImageProcessor().max_input_pixels
    data = png_header_only(12000, 12000)  # 144M pixels: over our limit, under PIL's bomb error (179M)
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    message = r"12000x12000 \(width x height\) = 144000000 pixels, over the limit of max_input_pixels=134217728.*raise"
    with pytest.warns(Image.DecompressionBombWarning):
        lazy = Image.open(io.BytesIO(data))
    with pytest.raises(ValueError, match=message):
        NaViLImageProcessor()(lazy)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match="huge.png.*" + message):
        NaViLImageProcessor()(path)
    with pytest.raises(OSError, match="truncated"):  # proof that the processor never decoded it
        lazy.load()


def test_pixel_limit_is_configurable():
    image = Image.fromarray(random_rgb(30, 40, seed=9))  # 1200 pixels
    limited = NaViLImageProcessor(max_input_pixels=1000, **SMALL)
    for item in (image, np.asarray(image), torch.from_numpy(np.asarray(image).copy())):
        with pytest.raises(ValueError, match=r"40x30 .*= 1200 pixels, over the limit of max_input_pixels=1000"):
            limited(item)
    reference = process(image)
    assert_same_output(limited(image, max_input_pixels=1200), reference)  # raised for one call
    assert_same_output(NaViLImageProcessor(max_input_pixels=None, **SMALL)(image), reference)  # no limit
    assert limited.max_input_pixels == 1000
    loaded = NaViLImageProcessor.from_dict(limited.to_dict())
    assert loaded.max_input_pixels == 1000


# ------------------------------------------------------------------------------ property-based


def aspect_ok(height, width):
    return max(height, width) / min(height, width) <= MAX_ASPECT_RATIO


MODES = ["RGB", "L", "1", "P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "I;16", "I", "F", "uint16", "bool"]


def make_image(mode, height, width, seed):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70000, (height, width), dtype=np.int32))
    if mode == "F":
        values = rng.random((height, width), dtype=np.float32) * rng.choice([1.0, 255.0, 1e6])
        values[rng.random((height, width)) < 0.05] = np.nan
        return Image.fromarray(values.astype(np.float32))
    if mode == "uint16":
        return rng.integers(0, 65536, (height, width, rng.choice([1, 2, 3, 4])), dtype=np.uint16)
    if mode == "bool":
        return rng.random((height, width)) > 0.5
    if mode in ("RGBA", "LA"):
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], -1)).convert(mode)
    if mode in ("P", "PA"):
        palette = Image.fromarray(rgb).quantize(8)
        palette.info["transparency"] = 0
        return palette.convert(mode) if mode == "PA" else palette
    return Image.fromarray(rgb).convert(mode)


@st.composite
def sizes(draw, max_side=600):
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(max(1, math.ceil(height / MAX_ASPECT_RATIO)), min(max_side, height * MAX_ASPECT_RATIO)))
    return height, width


@st.composite
def processor_settings(draw):
    patch_size = draw(st.sampled_from([8, 14, 16]))
    merge_size = draw(st.sampled_from([1, 2]))
    min_pixels = draw(st.integers(1, 256 * 256))
    max_pixels = draw(st.integers(min_pixels, 512 * 512))
    ratio = draw(st.one_of(st.just(0.7071), st.just(1.0), st.floats(0.05, 1.0)))
    multi_scale = draw(st.booleans())
    return dict(
        patch_size=patch_size,
        merge_size=merge_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        scale_downsample_ratio=ratio,
        multi_scale=multi_scale,
    )


def tokens_of(text):
    counts = {}
    for token in (
        IMAGE_START_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_CONTEXT_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
    ):
        counts[token] = text.count(token)
    return counts


DEFAULT_CONFIG = dict(patch_size=16, merge_size=2, min_pixels=256 * 256, max_pixels=24576 * 256)
DEFAULT_CONFIG |= dict(scale_downsample_ratio=0.7071, multi_scale=True)


@given(size=sizes(), mode=st.sampled_from(MODES), config=processor_settings(), seed=st.integers(0, 2**16))
@example(size=(600, 600), mode="RGBA", config=DEFAULT_CONFIG, seed=0)
@example(size=(600, 3), mode="I;16", config=DEFAULT_CONFIG | dict(patch_size=14, merge_size=1), seed=1)
@example(size=(1, 200), mode="F", config=DEFAULT_CONFIG | dict(min_pixels=1, max_pixels=1), seed=2)
@PROPERTY
def test_property_output_invariants(size, mode, config, seed):
    height, width = size
    ip = NaViLImageProcessor(**config)
    out = ip(make_image(mode, height, width, seed), return_tensors="np")
    pixel_values, grid, num_scales = out["pixel_values"], out["image_grid_thw"], out["num_scales"]
    p, m = config["patch_size"], config["merge_size"]
    assert pixel_values.dtype == np.float32 and pixel_values.shape[1:] == (3, p, p)
    assert np.isfinite(pixel_values).all()
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0  # mean = std = 0.5
    assert pixel_values.shape[0] == grid.prod(-1).sum()
    assert (grid[:, 0] == 1).all() and (grid[:, 1:] % m == 0).all() and (grid[:, 1:] > 0).all()
    assert num_scales.tolist() == [len(grid)]
    if not config["multi_scale"]:
        assert len(grid) == 1
    areas = grid[:, 1] * grid[:, 2]
    assert (np.diff(areas) > 0).all()  # smallest scale first, strictly growing

    args = (height, width, config["min_pixels"], config["max_pixels"], config["scale_downsample_ratio"], p, m)
    args += (config["multi_scale"],)
    layout = image_token_layout(*args)
    assert layout == [(gh // m, gw // m) for _, gh, gw in grid.tolist()]
    expansion = tokens_of(image_placeholder_expansion(grid.tolist(), m))
    implied = sum(expansion.values())
    assert num_image_tokens(*args) == implied == ip.num_image_tokens(height, width)
    assert num_image_context_tokens(*args) == expansion[IMAGE_CONTEXT_TOKEN] == pixel_values.shape[0] // m**2
    assert expansion[IMAGE_FRAME_BREAK_TOKEN] == len(grid)
    resized_h, resized_w = smart_resize(height, width, config["min_pixels"], config["max_pixels"])
    assert (grid[-1, 1], grid[-1, 2]) == (-(-resized_h // (p * m)) * m, -(-resized_w // (p * m)) * m)


@given(
    short=st.integers(1, 3),
    factor=st.floats(MAX_ASPECT_RATIO * 1.001, MAX_ASPECT_RATIO * 3),
    tall=st.booleans(),
    mode=st.sampled_from(["RGB", "L", "RGBA", "I;16"]),
)
@PROPERTY
def test_property_extreme_aspect_ratio_raises(short, factor, tall, mode):
    long = math.ceil(short * factor)
    assume(long / short > MAX_ASPECT_RATIO)
    height, width = (long, short) if tall else (short, long)
    match = rf"aspect ratio .* is over the limit of {MAX_ASPECT_RATIO}"
    with pytest.raises(ValueError, match=match):
        smart_resize(height, width, 32 * 32, 128 * 128)
    with pytest.raises(ValueError, match=match):
        num_image_tokens(height, width, 32 * 32, 128 * 128, 0.7071)
    with pytest.raises(ValueError, match=match):
        process(make_image(mode, height, width, seed=short))
