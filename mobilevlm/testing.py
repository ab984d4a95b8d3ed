"""Tiny checkpoints in the official layout, written in-process, for tests (no downloads anywhere).

The tokenizer is a LLaMA-style SentencePiece model trained on a small built-in corpus; it is cached per
process because training it is the slow part.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch

from mobilevlm.config import CLIP_L14_336, get_preset
from mobilevlm.processing import save_clip_preprocessor_config

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: What is in the image? ASSISTANT: A red circle.",
    "What colour is the square? Answer the question using a single word or phrase.",
    "Is there a blue triangle in the image? Please answer yes or no.",
    "Answer with the option's letter from the given choices directly. A. red B. green C. blue D. yellow",
    "The quick brown fox jumps over the lazy dog. 0123456789, numbers and words: one two three four five.",
    "Hello world! How are you today? I am fine, thank you. Where is the cat? The cat is on the mat.",
    "There are three small green squares at the top left and a large yellow star in the centre.",
    "Reference OCR token: STOP, EXIT, OPEN. What does the sign say? It says stop.",
]


@functools.lru_cache(maxsize=None)
def _cached_tokenizer_model(vocab_size: int) -> bytes:
    from mobilevlm.tokenizer import train_sentencepiece

    lines = [line for text in CORPUS for line in (text, text.lower(), text.upper())] * 4
    with tempfile.TemporaryDirectory() as tmp:
        path = train_sentencepiece(lines, vocab_size, Path(tmp) / "tokenizer.model")
        return path.read_bytes()


def write_tiny_tokenizer(model_dir: str | os.PathLike, vocab_size: int = 512) -> None:
    from mobilevlm.tokenizer import save_tokenizer_files

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "tokenizer.model").write_bytes(_cached_tokenizer_model(vocab_size))
    save_tokenizer_files(model_dir)


def make_tiny_model(preset: str = "tiny_v2", seed: int = 0, **overrides):
    from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM

    torch.manual_seed(seed)
    model = MobileLlamaForCausalLM(get_preset(preset, **overrides))
    # Random-normal weights everywhere (default init leaves norms at 1 and zero biases, which hides bugs).
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.5 if param.ndim == 1 else 0.08)
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
                param.add_(1.0)
    return model.eval()


def make_tiny_checkpoint(path: str | os.PathLike, preset: str = "tiny_v2", seed: int = 0,
                         weights: str = "safetensors", max_shard_size: str | None = None, **overrides) -> Path:
    """Write config.json + weights (`safetensors` or `bin`, optionally sharded) + tokenizer files.

    Tiny towers have no hub id, so their config keeps our `mm_vision_tower_config` key (official configs lack it).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(preset, seed, **overrides)
    save_kwargs = {"safe_serialization": weights == "safetensors"}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    if weights == "safetensors":
        model.save_pretrained(path, **save_kwargs)
    else:
        write_official_bin(model, path, max_shard_size)
    write_tiny_tokenizer(path, model.config.vocab_size)
    if model.config.is_multimodal:
        save_clip_preprocessor_config(path, model.config.vision_config().image_size)
    return path


def write_official_bin(model, path: Path, max_shard_size: str | None = None) -> None:
    """pytorch_model.bin (or shards + index) the way the 4.33-era original saved it, buffers included."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):  # older checkpoints carry the rotary buffer
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(model.config.head_dim // 2)
    config = model.config.to_dict()
    if model.config.mm_vision_tower == CLIP_L14_336:  # an official config names its tower only by hub id
        config.pop("mm_vision_tower_config", None)
    config["transformers_version"] = "4.33.1"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if not max_shard_size:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys = list(state)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, path / name)
        weight_map.update({k: name for k in shard_keys})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
