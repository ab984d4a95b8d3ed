"""Images between arrival and generation: read the header, estimate the decode's memory, decode to pixel values.

A queued request holds its images as the model's pixel tensor (`pipeline.pixel_values` of the decoded image: the
exact values generation would compute), not as the decoded picture nor the compressed file: the tensor's size is
fixed by the vision tower (3 x S x S in the model's dtype; 1.3 MiB at 336 px in float32) whatever the upload,
while a file may be up to --max-image-mb and its decoded form up to 4 bytes x --max-image-pixels, and keeping the
file would mean decoding it a second time, on the generation thread, with its peak memory again.
docs/serving.md has the measurements.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from mobilevlm.errors import ImageError, MobileVLMError
from mobilevlm.processing import check_image_size, load_image
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.budget import MiB


@dataclass
class ImageFile:
    """An image's compressed bytes and what its header says, checked against the pixel limit."""
    data: bytes
    where: str  # the request field, for error messages
    width: int
    height: int
    max_pixels: int


def probe_image(data: bytes, where: str, max_pixels: int) -> ImageFile:
    """Reads only the header (no pixel data is decoded); ApiError 400 for non-images and oversized ones."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        check_image_size(width, height, max_pixels, where)
    except ImageError as err:
        raise ApiError(400, str(err), param=where, code="invalid_image") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"{where}: not an image file (format not recognised)", param=where,
                       code="invalid_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(400, f"{where}: image too large (decompression bomb guard)", param=where,
                       code="invalid_image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, f"{where}: image data is truncated or corrupt ({err})", param=where,
                       code="invalid_image") from None
    return ImageFile(data, where, width, height, max_pixels)


def decode_cost(image: ImageFile) -> int:
    """Peak bytes decoding and preprocessing one image allocates, an upper estimate. Measured (Pillow 13,
    transformers' PIL CLIP processor, 4000x4000 and 4000x2000): 13.7-14.1 x side^2 for RGB (Pillow keeps RGB in 4
    bytes a pixel, then the padded square, its array and the resize), up to 6 x width x height more when
    transparency is composited on white; 8 x width x height also covers a mode conversion or an EXIF rotation."""
    side = max(image.width, image.height)
    return 15 * side * side + 8 * image.width * image.height + MiB


def pixel_bytes(pipeline) -> int:
    """What one image's pixel tensor takes (0 for a text-only model), from a 1x1 image through the real path."""
    if not pipeline.is_multimodal:
        return 0
    pixels = pipeline.pixel_values([Image.new("RGB", (1, 1))])
    return pixels.numel() * pixels.element_size()


def to_pixels(pipeline, image: ImageFile) -> torch.Tensor:
    """The [1, 3, S, S] tensor generation would compute from this image; ApiError 400 if it cannot be decoded."""
    try:
        picture = load_image(image.data, max_pixels=image.max_pixels, name=image.where)
        return pipeline.pixel_values([picture])
    except ImageError as err:
        raise ApiError(400, str(err), param=image.where, code="invalid_image") from None
    except MobileVLMError as err:  # e.g. a text-only model
        raise ApiError(400, str(err), param=image.where) from None
