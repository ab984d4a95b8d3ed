"""Image loading and preprocessing, and the chunk-wise tokenization of prompts around `<image>`.

Preprocessing is pinned to transformers' PIL CLIP processor (`CLIPImageProcessorPil`): the torchvision-backed
one resizes differently from the original's PIL bicubic path (up to 3e-2 in normalised pixels).
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS
from mobilevlm.errors import ImageError

ImageSource = str | os.PathLike | bytes | Image.Image


def load_image(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None,
               exif: bool = True) -> Image.Image:
    """Open an image file / bytes as RGB; ImageError for anything unusable.

    `exif=True` (a photo a person shows: CLI, chat, server): EXIF orientation applied, transparency composited
    on white. `exif=False` opens as the official evaluation scripts do, `Image.open(path).convert("RGB")`: no
    rotation, PIL's own conversion. A PIL image is taken as its caller opened it: not rotated, only brought to
    RGB as a photo is. `max_pixels` guards against decompression bombs: the size is checked from the header,
    before decoding.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        except OSError as err:
            raise ImageError(f"{label}: cannot open image file ({err.strerror or err})") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
                check_image_size(image.width, image.height, max_pixels, label)
                image.load()
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not an image file (format not recognised)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{label}: image too large (decompression bomb guard)") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{label}: image data is truncated or corrupt ({err})") from None
        finally:
            if not isinstance(source, bytes):
                stream.close()
    check_image_size(image.width, image.height, max_pixels, label)
    if isinstance(source, Image.Image):
        return to_rgb(image)
    if not exif:
        return image.convert("RGB")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the image itself
        pass
    return to_rgb(image)


def check_image_size(width: int, height: int, max_pixels: int, label: str) -> None:
    """Pixel limit, counted on what preprocessing will allocate: padding makes a square of the longer side, and
    a very elongated image becomes a huge strip after the shortest-edge resize."""
    if width * height > max_pixels:
        raise ImageError(f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels}")
    if max(width, height) ** 2 > max_pixels:
        raise ImageError(f"{label}: {width}x{height} would be padded to a {max(width, height)}-pixel square, "
                         f"over the limit of {max_pixels} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageError(f"{label}: {width}x{height} is more elongated than {MAX_ASPECT_RATIO}:1")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit greyscale is scaled down, transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit data, whichever mode Pillow gives it (16-bit PGM opens as "I"), down to 8 bits; via "I" because
        # point() cannot scale the big-endian I;16B directly
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return canvas
    return image.convert("RGB")


def expand2square(image: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of the longer side, the original centred (offset (long - short) // 2)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def build_image_processor(image_size: int, model_dir: str | os.PathLike | None = None,
                          vision_tower: str | None = None) -> CLIPImageProcessorPil:
    """The CLIP processor: a preprocessor_config.json in the checkpoint or in a local `mm_vision_tower` directory,
    else the standard CLIP preprocessing (bicubic shortest-edge resize, centre crop, OpenAI mean/std) at the
    tower's image size."""
    for directory in (model_dir, vision_tower):
        if directory and (Path(directory) / "preprocessor_config.json").is_file():
            settings = json.loads((Path(directory) / "preprocessor_config.json").read_text())
            keep = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                    "do_normalize", "image_mean", "image_std", "do_convert_rgb")
            return CLIPImageProcessorPil(**{k: v for k, v in settings.items() if k in keep})
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def save_clip_preprocessor_config(directory: str | os.PathLike, image_size: int) -> None:
    """preprocessor_config.json of the standard CLIP preprocessing at `image_size` (for towers we create)."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(str(directory))


ASPECT_RATIO_MODES = ("pad", "square")  # "square": the processor's own resize + centre crop (training's default)


def pads_images(setting) -> bool:
    """Whether `process_images` squares images first. A model config (the original's third argument) pads only
    when its `image_aspect_ratio` is "pad", like the original; a string must be one of ASPECT_RATIO_MODES;
    None is the plain processor."""
    if setting is None:
        return False
    if isinstance(setting, str):
        if setting not in ASPECT_RATIO_MODES:
            raise ValueError(f"image_aspect_ratio {setting!r} is not a known mode; use one of "
                             f"{', '.join(map(repr, ASPECT_RATIO_MODES))} or None")
        return setting == "pad"
    return getattr(setting, "image_aspect_ratio", None) == "pad"


def process_images(images: list[Image.Image], image_processor, image_aspect_ratio="pad") -> torch.Tensor:
    """[n, 3, H, W] pixel values; padding squares each image in the processor's mean colour first (the original).

    `image_aspect_ratio` is "pad", "square" or None, or a model config as in the original's
    `process_images(images, image_processor, model.config)` (see `pads_images`).
    """
    if pads_images(image_aspect_ratio):
        fill = tuple(int(m * 255) for m in image_processor.image_mean)
        images = [expand2square(image, fill) for image in images]
    return image_processor(images, return_tensors="pt")["pixel_values"]


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenize each chunk between `<image>` tags on its own (BOS kept once) and join with `image_token_index`.

    This reproduces the original exactly, including the lone '▁' each chunk's dummy prefix produces.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_token_index)
        ids.extend(chunk[offset:])
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported tensor type {return_tensors!r}")
    return ids
