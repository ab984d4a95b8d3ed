"""Output types and the streaming GGUF write: tensor infos first, then each tensor produced, encoded, written, freed.

`gguf.GGUFWriter.add_tensor` keeps every array until the file is written; for a 3B model in fp32 that is
more RAM than a laptop has. Declaring the tensor infos up front (shapes are known from the checkpoint
headers) and then calling `write_tensor_data` one tensor at a time keeps at most one tensor in memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}

_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def matrix_type(shape: tuple[int, ...], outtype: str) -> GGMLQuantizationType:
    """Storage type of a weight matrix for `outtype`: block quants need rows that are whole blocks, else F16.

    llama.cpp's own converter makes the same fallback, so odd-sized matrices still load.
    """
    qtype = OUTTYPES[outtype][0]
    if qtype in _FLOAT_DTYPES:
        return qtype
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F16


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order; GGUF stores it reversed
    qtype: GGMLQuantizationType
    produce: Callable[[], np.ndarray]  # float32 data of `shape`, computed only when written

    def byte_shape(self) -> tuple[int, ...]:
        if self.qtype in _FLOAT_DTYPES:
            return self.shape
        return tuple(quant_shape_to_byte_shape(self.shape, self.qtype))

    def nbytes(self) -> int:
        itemsize = np.dtype(_FLOAT_DTYPES[self.qtype]).itemsize if self.qtype in _FLOAT_DTYPES else 1
        return int(np.prod(self.byte_shape(), dtype=np.int64)) * itemsize

    def encode(self) -> np.ndarray:
        data = np.ascontiguousarray(self.produce(), dtype=np.float32)
        if data.shape != self.shape:
            raise AssertionError(f"{self.name}: produced shape {data.shape}, planned {self.shape}")
        if self.qtype in _FLOAT_DTYPES:
            return data.astype(_FLOAT_DTYPES[self.qtype], copy=False)
        return quantize(data, self.qtype)


def write_gguf(writer: GGUFWriter, path: Path, tensors: Iterable[PlannedTensor]) -> Path:
    """Write the metadata already added to `writer` plus `tensors` to `path`, streaming tensor data.

    The file appears under its final name only when complete, so an interrupted export leaves no GGUF that
    llama.cpp would try (and fail) to load.
    """
    tensors = list(tensors)
    for t in tensors:
        if t.qtype in _FLOAT_DTYPES:
            writer.add_tensor_info(t.name, t.shape, np.dtype(_FLOAT_DTYPES[t.qtype]), t.nbytes())
        else:
            writer.add_tensor_info(t.name, t.byte_shape(), np.dtype(np.uint8), t.nbytes(), raw_dtype=t.qtype)
    partial = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.encode())
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return path
