"""Image loading and preprocessing (§4) against an independent PIL + numpy computation; bad image files."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mobilevlm.errors import ImageError
from mobilevlm.processing import build_image_processor, expand2square, load_image, process_images

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_pixels(image: Image.Image, size: int, pad: bool) -> np.ndarray:
    """The original's path written with PIL and numpy: pad to a centred square, bicubic resize, crop, normalise."""
    if pad:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (122, 116, 104))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas.resize((size, size), Image.BICUBIC)
    else:
        short, long = min(image.size), max(image.size)
        scaled = (size, int(size * long / short))
        image = image.resize(scaled if image.width <= image.height else scaled[::-1], Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float64) / 255.0
    return ((array - MEAN) / STD).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(96)


def test_standard_clip_processor_settings():
    proc = build_image_processor(336)
    assert (proc.size.shortest_edge, proc.crop_size.height, proc.crop_size.width) == (336, 336, 336)
    assert tuple(proc.image_mean) == tuple(MEAN) and tuple(proc.image_std) == tuple(STD)
    assert proc.resample == 3 and proc.do_center_crop
    assert tuple(int(m * 255) for m in proc.image_mean) == (122, 116, 104)


@pytest.mark.parametrize("size", [(50, 80), (80, 50), (81, 40)])
def test_expand2square_centres_on_pad_colour(size):
    image = Image.new("RGB", size, (200, 10, 10))
    square = np.asarray(expand2square(image, (122, 116, 104)))
    side = max(size)
    assert square.shape == (side, side, 3)
    red = np.all(square == (200, 10, 10), axis=-1)
    rows, cols = np.nonzero(red)
    offset = (side - min(size)) // 2
    if size[0] < size[1]:
        assert (cols.min(), cols.max(), rows.min(), rows.max()) == (offset, offset + size[0] - 1, 0, side - 1)
    else:
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (offset, offset + size[1] - 1, 0, side - 1)
    assert np.all(square[~red] == (122, 116, 104))
    assert expand2square(image.resize((30, 30)), (0, 0, 0)).size == (30, 30)


@pytest.mark.parametrize("size", [(50, 80), (120, 70), (96, 96), (300, 200)])
def test_pad_path_equals_pil_reference(processor, size):
    image = random_image(*size, seed=sum(size))
    pixels = process_images([image, image.transpose(Image.FLIP_LEFT_RIGHT)], processor, "pad")
    assert pixels.shape == (2, 3, 96, 96)
    np.testing.assert_allclose(pixels[0].numpy(), reference_pixels(image, 96, pad=True), atol=1e-5)
    np.testing.assert_allclose(pixels[1].numpy(), reference_pixels(image.transpose(Image.FLIP_LEFT_RIGHT), 96, True), atol=1e-5)


@pytest.mark.parametrize("size", [(50, 80), (200, 120)])
def test_crop_path_equals_pil_reference(processor, size):
    image = random_image(*size, seed=1)
    pixels = process_images([image], processor, image_aspect_ratio="square")
    np.testing.assert_allclose(pixels[0].numpy(), reference_pixels(image, 96, pad=False), atol=1e-5)


def saved(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def row(image: Image.Image) -> list:
    return [image.getpixel((x, 0)) for x in range(image.width)]


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    assert row(load_image(saved(rgba)))[:2] == [(10, 20, 30), (255, 255, 255)]  # transparent -> white

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert row(load_image(saved(palette))) == [(0, 0, 0), (250, 100, 50)]

    grey = Image.new("L", (1, 1), 77)
    assert load_image(saved(grey)).getpixel((0, 0)) == (77, 77, 77)

    deep = Image.new("I;16", (2, 1))
    deep.putpixel((0, 0), 0x8000)
    deep.putpixel((1, 0), 0xFFFF)
    assert row(load_image(saved(deep))) == [(128, 128, 128), (255, 255, 255)]

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=100)
    r, g, b = load_image(path).getpixel((0, 0))
    assert r > 240 and g < 15 and b < 15
    for image in (rgba, palette, grey, deep, cmyk):
        assert load_image(image).mode == "RGB"


@pytest.mark.parametrize("fmt,data", [
    ("tiff-I;16B", None), ("tiff-I;16", None),
    ("pgm", b"P5\n2 1\n65535\n\x80\x00\xff\xff"),  # 16-bit PGM: Pillow opens it as mode "I"
])
def test_sixteen_bit_files_scale_to_eight_bits(fmt, data):
    if data is None:
        deep = Image.new(fmt.split("-")[1], (2, 1))
        deep.putpixel((0, 0), 0x8000)
        deep.putpixel((1, 0), 0xFFFF)
        data = saved(deep, "TIFF")
    assert row(load_image(data)) == [(128, 128, 128), (255, 255, 255)]


def test_more_modes():
    assert load_image(Image.new("LA", (1, 1), (50, 128))).getpixel((0, 0)) == (152, 152, 152)  # on white
    assert load_image(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("YCbCr", (1, 1), (100, 128, 128))).getpixel((0, 0)) == (100, 100, 100)
    assert load_image(Image.new("F", (1, 1), 100.4)).getpixel((0, 0)) == (100, 100, 100)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    loaded = load_image(saved(image, "JPEG", exif=exif, quality=95))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_bad_image_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="missing.png.*cannot open"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path)  # a directory
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt.*not an image"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(saved(random_image(64, 64))[:600])
    with pytest.raises(ImageError, match="cut.png.*truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="<image bytes>"):
        load_image(b"\x89PNG\r\n\x1a\n garbage")


def test_pixel_limit(tmp_path):
    small = tmp_path / "small.png"
    random_image(20, 20).save(small)
    with pytest.raises(ImageError, match="small.png: 20x20 pixels exceeds the limit of 399"):
        load_image(small, max_pixels=399)
    assert load_image(small, max_pixels=400).size == (20, 20)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 7_000)).save(bomb)  # 70 megapixels, a few kB on disk
    with pytest.raises(ImageError, match="bomb.png: 10000x7000 pixels exceeds the limit"):
        load_image(bomb)


@pytest.mark.parametrize("size,limit,reason", [((2000, 50), 1_000_000, "padded to a 2000-pixel square"),
                                               ((600, 10), 64_000_000, "more elongated than 50:1")])
def test_sizes_that_preprocessing_would_blow_up_are_refused(size, limit, reason):
    """Width x height is small, but padding (a square of the longer side) or the shortest-edge resize of a very
    elongated strip would allocate far more: refused from the header, before decoding."""
    import io

    from PIL import Image

    from mobilevlm.errors import ImageError
    from mobilevlm.processing import load_image

    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    with pytest.raises(ImageError, match=reason):
        load_image(buffer.getvalue(), max_pixels=limit)
