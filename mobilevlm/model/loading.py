"""`load_pretrained_model`: an official (or our own) checkpoint directory -> tokenizer, model, processor, context.

Differences from the original loader, on purpose:
- the CLIP tower always comes from the checkpoint itself (the original re-downloads it for V1 checkpoints;
  the tower was frozen in training, so both are the same weights up to bf16 rounding);
- on CPU the default dtype is float32 (fp16 checkpoints are converted: fp16 matmuls are very slow on CPUs);
  bfloat16 is available with `dtype="bfloat16"`;
- a missing or wrong-shaped weight is an error naming the keys, not a warning and a randomly initialised layer.

Directories in a format of another layer (the CPU fast path's quantized checkpoints) load through
`register_checkpoint_format`: the format registers itself here, so this module never imports it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from mobilevlm.config import MobileVLMConfig
from mobilevlm.errors import CheckpointError, MobileVLMError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HARMLESS_EXTRA_KEYS = ("rotary_emb.inv_freq", "position_ids")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointFormat(NamedTuple):
    recognises: Callable[[Path], bool]
    # (model_dir, device, dtype) -> (tokenizer, model, image_processor, context_len)
    load: Callable[[Path, str, str | torch.dtype | None], tuple]


CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(name: str, recognises: Callable[[Path], bool], load: Callable) -> None:
    """`load_pretrained_model` hands a directory that `recognises` accepts to `load` instead of transformers."""
    CHECKPOINT_FORMATS[name] = CheckpointFormat(recognises, load)


def resolve_model_dir(model_path: str | os.PathLike) -> Path:
    """A local directory as is; anything else is taken as a hub id and downloaded (needs network)."""
    path = Path(model_path)
    if path.is_dir():
        return path
    if path.exists() or str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") != 1:
        raise CheckpointError(f"{model_path}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_path), allow_patterns=["*.json", "*.model", "*.safetensors", "*.bin"]))
    except Exception as err:  # offline, unknown repo, ...: one clear message instead of a network traceback
        raise CheckpointError(
            f"{model_path}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(err).__name__}). Download the checkpoint elsewhere and pass its directory."
        ) from None


def read_config(model_dir: Path) -> MobileVLMConfig:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{model_dir}: no config.json")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: invalid JSON ({err})") from None
    if data.get("model_type", "llama") not in ("mobilevlm", "llama"):
        raise CheckpointError(f"{config_file}: model_type {data.get('model_type')!r} is not a MobileVLM or LLaMA model")
    data.pop("model_type", None)
    return MobileVLMConfig(**data)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise MobileVLMError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _quantization_config(load_8bit: bool, load_4bit: bool, device: str):
    if not (load_8bit or load_4bit):
        return None
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        raise MobileVLMError("load_8bit / load_4bit use bitsandbytes and need a CUDA GPU; on CPU use --quantize int8|int4")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")


def load_model(model_dir: Path, config: MobileVLMConfig, dtype: torch.dtype, device: str,
               device_map=None, quantization_config=None):
    from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM

    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{model_dir}: no weights ({' / '.join(WEIGHT_FILES)})")
    # Mismatched shapes are collected in the loading info (and raised below naming the keys) instead of
    # transformers' own RuntimeError, which names none.
    kwargs = dict(config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model, info = MobileLlamaForCausalLM.from_pretrained(str(model_dir), **kwargs)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing weights: {', '.join(sorted(info['missing_keys']))}")
    if info.get("mismatched_keys"):
        problems.append("wrong shapes: " + ", ".join(f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" if isinstance(k, tuple) else str(k)
                                                      for k in info["mismatched_keys"]))
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith(HARMLESS_EXTRA_KEYS)]
    if unexpected:
        logger.warning("%s: ignoring %d weights the model does not use: %s", model_dir, len(unexpected), ", ".join(unexpected[:8]))
    if device_map is None and quantization_config is None:
        model.to(device)
    model.config.use_cache = True
    return model.eval()


def load_pretrained_model(model_path, load_8bit: bool = False, load_4bit: bool = False, device_map=None,
                          device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Returns `(tokenizer, model, image_processor, context_len)` like the original; image_processor is None for
    text-only MobileLLaMA checkpoints."""
    from mobilevlm.processing import build_image_processor
    from mobilevlm.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(model_path)
    for checkpoint_format in CHECKPOINT_FORMATS.values():
        if checkpoint_format.recognises(model_dir):
            return checkpoint_format.load(model_dir, device, dtype)
    config = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, config, resolve_dtype(dtype, device), device, device_map,
                       _quantization_config(load_8bit, load_4bit, device))
    image_processor = None
    if config.is_multimodal:
        image_processor = build_image_processor(config.vision_config().image_size, model_dir, config.mm_vision_tower)
    return tokenizer, model, image_processor, config.context_length
