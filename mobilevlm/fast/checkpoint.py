"""Quantized checkpoints: `save_quantized` writes config.json (with a `quantization` entry), one safetensors
file of int8/int4 weights + bf16 rest, and the source's tokenizer / preprocessor files; `load_quantized` builds
the model skeleton on the meta device and assigns the stored tensors, so loading never holds a full-precision
copy (peak memory ~ the quantized size). The token embedding table stays in the file, memory-mapped: a prompt
reads only its tokens' rows, so it costs a few pages of resident memory instead of the whole table.

Importing this module registers the format with `load_pretrained_model` (the package's `__init__` does)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from mobilevlm.errors import CheckpointError, MobileVLMError
from mobilevlm.fast.memory import release_freed_memory
from mobilevlm.fast.quantize import (QUANTIZED_CLASSES, Int4Linear, Int8Linear, quantizable_linears, quantized_class,
                                     to_bfloat16)
from mobilevlm.model.loading import read_config, register_checkpoint_format

WEIGHTS = "model.safetensors"
# Non-weight files of a checkpoint directory that a quantized copy needs unchanged.
CARRIED_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                 "generation_config.json", "added_tokens.json")


def save_quantized(model, source_dir, out_dir) -> Path:
    """Writes a quantized model (see `quantize_model`) with the files of its source checkpoint directory."""
    from safetensors.torch import save_file

    quantization = getattr(model.config, "quantization", None)
    if not quantization:
        raise CheckpointError("the model is not quantized; call quantize_model(model, 'int8'|'int4') first")
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(source_dir).resolve():
        raise CheckpointError(f"{out_dir}: the output directory must differ from the source checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, out_dir / name)
    # safetensors refuses tensors that share storage (views made by the lean decoder's fusion): copy those.
    state = {key: (value.clone(memory_format=torch.contiguous_format) if value._base is not None or not value.is_contiguous() else value)
             for key, value in model.state_dict().items()}
    save_file(state, out_dir / WEIGHTS, metadata={"format": "pt", "mobilevlm_quantization": quantization["mode"]})
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def is_quantized_checkpoint(model_dir) -> bool:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return bool(json.loads(config_file.read_text()).get("quantization"))
    except json.JSONDecodeError:
        return False


def _empty_quantized_model(config):
    from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM

    quantization = config.quantization
    mode = quantization.get("mode")
    if mode not in QUANTIZED_CLASSES:
        raise CheckpointError(f"config.json: quantization.mode {mode!r} is not one of {', '.join(QUANTIZED_CLASSES)}")
    # Checkpoints written before the tower went int8 in both modes have no vision_mode: their tower is in `mode`.
    vision_mode = quantization.get("vision_mode", mode)
    if vision_mode not in QUANTIZED_CLASSES:
        raise CheckpointError(f"config.json: quantization.vision_mode {vision_mode!r} is not one of "
                              f"{', '.join(QUANTIZED_CLASSES)}")
    with torch.device("meta"):
        model = MobileLlamaForCausalLM(config)
    to_bfloat16(model)
    for parent, attr, name, linear in list(quantizable_linears(model, quantization.get("include_vision", False))):
        kind = quantized_class(mode, name, vision_mode)
        setattr(parent, attr, kind.empty(linear.out_features, linear.in_features, linear.bias is not None,
                                         quantization.get("group_size") or 0))
    return model


def _rebuild_non_persistent(model, config) -> None:
    """Buffers that are not saved (rotary frequencies, CLIP position ids) come out of the meta device empty."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.get_model().rotary_emb = LlamaRotaryEmbedding(config)
    for name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if buffer_name != "position_ids":
                    raise CheckpointError(f"internal: no rule to rebuild buffer {name}.{buffer_name}")
                module.register_buffer(buffer_name, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)


def _mapped_tensor(path: Path, key: str) -> torch.Tensor:
    """A read-only-in-practice view of one tensor of a safetensors file, mapped (copy-on-write) rather than
    read: pages become resident only when touched. The file must not be rewritten in place while in use."""
    import numpy as np

    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        entry = json.loads(file.read(header_size))[key]
    if entry["dtype"] != "BF16":
        raise CheckpointError(f"{path}: {key} is {entry['dtype']}; a quantized checkpoint stores it in BF16")
    begin, end = entry["data_offsets"]
    mapped = np.memmap(path, dtype=np.uint16, mode="c", offset=8 + header_size + begin, shape=((end - begin) // 2,))
    return torch.from_numpy(mapped).view(torch.bfloat16).reshape(entry["shape"])


def _assign_from_file(model: nn.Module, path: Path) -> None:
    """Reads the tensors module by module and packs each int4 layer as soon as it is read, so that peak memory is
    the quantized model plus one layer, not the whole file twice (a state dict and the packed copy)."""
    from safetensors import safe_open

    missing = []
    with safe_open(str(path), framework="pt") as file:
        available = set(file.keys())
    consumed = set()
    embedding = model.get_input_embeddings()
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        names = [name for name, _ in module.named_parameters(recurse=False)]
        names += [name for name, _ in module.named_buffers(recurse=False)
                  if name not in module._non_persistent_buffers_set]
        if isinstance(module, Int4Linear):
            names.append("qweight")
        if not names:
            continue
        # Reopened per module, and every tensor copied out of the map: a tensor that still points into the map
        # keeps the whole file mapped, and each page read so far would count as resident.
        with safe_open(str(path), framework="pt") as file:
            for name in names:
                key = prefix + name
                if key not in available:
                    missing.append(key)
                    continue
                if module is embedding and name == "weight":
                    tensor = _mapped_tensor(path, key)
                else:
                    tensor = file.get_tensor(key).clone()
                consumed.add(key)
                if name in module._parameters:
                    _check_shape(key, module._parameters[name], tensor)
                    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
                elif name in module._buffers:
                    _check_shape(key, module._buffers[name], tensor)
                    module._buffers[name] = tensor
                else:
                    expected = torch.empty(module.out_features, module.in_features // 2, dtype=torch.uint8, device="meta")
                    _check_shape(key, expected, tensor)
                    module._portable, module._packed = tensor, None
        if isinstance(module, (Int4Linear, Int8Linear)) and prefix + "qweight" in consumed:
            module.pack()
            # packing frees its staging buffers (tens of MB per matrix), which glibc would otherwise keep
            release_freed_memory()
    if missing:
        raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:6])}"
                              + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    unexpected = available - consumed
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model does not have: {', '.join(sorted(unexpected)[:6])}")


def _check_shape(key: str, expected: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(expected.shape) != tuple(tensor.shape) or expected.dtype != tensor.dtype:
        raise CheckpointError(f"{key}: expected {expected.dtype} {tuple(expected.shape)}, "
                              f"found {tensor.dtype} {tuple(tensor.shape)} (does the file fit config.json?)")


def load_quantized(model_dir):
    """(tokenizer, model, image_processor, context_len) from a directory written by `save_quantized`."""
    from mobilevlm.processing import build_image_processor
    from mobilevlm.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if not getattr(config, "quantization", None):
        raise CheckpointError(f"{model_dir / 'config.json'}: no 'quantization' entry; this is not a quantized checkpoint")
    if not (model_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{model_dir}: no {WEIGHTS}")
    tokenizer = load_tokenizer(model_dir)
    model = _empty_quantized_model(config)
    _assign_from_file(model, model_dir / WEIGHTS)
    _rebuild_non_persistent(model, config)
    leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if leftover:
        raise CheckpointError(f"{model_dir / WEIGHTS}: no values for {', '.join(leftover[:6])}")
    model.requires_grad_(False)
    image_processor = None
    if config.is_multimodal:
        image_processor = build_image_processor(config.vision_config().image_size, model_dir, config.mm_vision_tower)
    return tokenizer, model.eval(), image_processor, config.context_length


def _load_for_device(model_dir, device, dtype):
    """`load_pretrained_model`'s view of the format; the stored weights fix the dtype."""
    if str(device) != "cpu":
        raise MobileVLMError(f"{model_dir} is a quantized CPU checkpoint; load the full-precision one on {device}")
    return load_quantized(model_dir)


register_checkpoint_format("quantized", is_quantized_checkpoint, _load_for_device)
