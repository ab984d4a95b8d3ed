"""The original's `mobilevlm.utils` import path: its helpers, mapped onto this package's own code.

Only what the original's scripts, evaluation and training import is here; its gradio-demo helpers
(`build_logger`, `StreamToLogger`, `violates_moderation`, `pretty_print_semaphore`) are not.
"""
from __future__ import annotations

import base64
import binascii

import torch

from mobilevlm.errors import ImageError
from mobilevlm.generation import KeywordsStoppingCriteria
from mobilevlm.processing import expand2square, load_image, process_images, tokenizer_image_token

server_error_msg = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
moderation_msg = "YOUR INPUT VIOLATES OUR CONTENT MODERATION GUIDELINES. PLEASE TRY AGAIN."


def load_image_from_base64(image):
    """A base64-encoded image, not EXIF-rotated, in RGB (the original converts it later, in the CLIP processor)."""
    try:
        data = base64.b64decode(image)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"<base64 image>: not base64 ({err})") from None
    return load_image(data, name="<base64 image>", exif=False)


def get_model_name_from_path(model_path: str) -> str:
    """The checkpoint's folder name; a `checkpoint-N` folder is prefixed with its parent's (the answer files' model_id)."""
    parts = model_path.strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def disable_torch_init() -> None:
    """Skips the default initialisation of Linear and LayerNorm layers (the checkpoint overwrites it), as the
    original; this process-wide change stays in effect."""
    setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    setattr(torch.nn.LayerNorm, "reset_parameters", lambda self: None)


__all__ = ["KeywordsStoppingCriteria", "disable_torch_init", "expand2square", "get_model_name_from_path",
           "load_image_from_base64", "moderation_msg", "process_images", "server_error_msg", "tokenizer_image_token"]
