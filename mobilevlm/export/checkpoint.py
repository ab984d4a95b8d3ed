"""Read a checkpoint directory's tensors one at a time, without loading the whole model.

Export must stay within a phone-builder's laptop memory for a 3B model, so tensors are looked up by name
across single or sharded safetensors / pytorch_model.bin files and materialised only when asked for.
safetensors files are opened lazily; .bin files are memory-mapped (torch zip format), so a shard costs
address space, not RAM.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mobilevlm.errors import CheckpointError

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in _INDEX_FILES:
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a weight index with a 'weight_map' ({err})") from err
            files = sorted({model_dir / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing)}")
            return files
    for name in _SINGLE_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise CheckpointError(
        f"{model_dir}: no weights found (expected model.safetensors, pytorch_model.bin or a sharded index)"
    )


class CheckpointTensors:
    """Name -> tensor access over every weight file of `model_dir`; shapes are known before any data is read."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._where: dict[str, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in _weight_files(self.model_dir):
            if path.suffix == ".safetensors":
                self._add_safetensors(path)
            else:
                self._add_bin(path)

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors header ({err})") from err
        for name in handle.keys():
            self._where[name] = handle
            self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def _add_bin(self, path: Path) -> None:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Pre-1.6 (non-zip) pickles cannot be memory-mapped; such a shard is read whole.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read PyTorch weights ({err})") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        for name, tensor in state.items():
            self._where[name] = state
            self._shapes[name] = tuple(tensor.shape)

    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._shapes[name]

    def load(self, name: str) -> torch.Tensor:
        """The tensor as float32 (a fresh copy; the caller may modify it)."""
        self._require(name)
        source = self._where[name]
        tensor = source[name] if isinstance(source, dict) else source.get_tensor(name)
        return tensor.to(torch.float32, copy=True)

    def _require(self, name: str) -> None:
        if name not in self._shapes:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint weights")
