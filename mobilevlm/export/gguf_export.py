"""`export_gguf`: a checkpoint directory -> the language-model GGUF (+ the mmproj GGUF for a MobileVLM)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mobilevlm.errors import CheckpointError
from mobilevlm.export.checkpoint import CheckpointTensors
from mobilevlm.export.language_model import write_language_model
from mobilevlm.export.mmproj import check_supported, write_mmproj
from mobilevlm.export.tensors import OUTTYPES


@dataclass
class ExportResult:
    language_model: Path
    mmproj: Path | None  # None for a text-only MobileLLaMA


def export_gguf(model_dir: str | os.PathLike, outdir: str | os.PathLike, outtype: str = "f16",
                literal_cls: bool = False) -> ExportResult:
    """Write `<name>-<outtype>.gguf` and, for a MobileVLM, `mmproj-<name>-<f16|f32>.gguf` into `outdir`.

    `outtype` sets the language model's weight matrices (f32, f16, q8_0, q4_0; norms stay F32). The mmproj
    keeps F16 matrices (F32 with outtype f32), as llama.cpp's own converter does: the vision side is small and
    its conv kernels must be F16 anyway. Everything llama.cpp cannot run is refused before any file is written.

    The mmproj leaves out CLIP's class token, which today's llama.cpp misplaces (mobilevlm.export.mmproj,
    docs/export.md); `literal_cls=True` writes the class embedding and the full position table as CLIP has them.
    """
    from mobilevlm.model.loading import read_config

    if outtype not in OUTTYPES:
        raise CheckpointError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    config = read_config(model_dir)
    if config.is_multimodal:
        check_supported(config)
    ckpt = CheckpointTensors(model_dir)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = model_dir.resolve().name
    mmproj = None
    if config.is_multimodal:
        mmproj_type = "f32" if outtype == "f32" else "f16"
        mmproj = write_mmproj(ckpt, config, outtype, outdir / f"mmproj-{name}-{mmproj_type}.gguf", literal_cls)
    language_model = write_language_model(ckpt, config, outtype, outdir / f"{name}-{outtype}.gguf")
    return ExportResult(language_model, mmproj)
