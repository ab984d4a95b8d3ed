"""Command-line arguments of `mobilevlm train`, with the original `train.py` flag names and meanings.

They are plain dataclasses parsed by `transformers.HfArgumentParser`, so a line of the original `run.sh`
(`--model_name_or_path ... --version plain --tune_mm_mlp_adapter True --mm_projector_lr 1e-3 ...`) works as is.
Defaults are the original's, except where noted.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import transformers

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "MobileLLaMA or MobileVLM checkpoint directory"})
    version: str = field(default="v1", metadata={"help": "data template: plain (stage I), v1 (stage II / SFT), "
                                                   "llama_2, llava_llama_2, v0, mpt (original default: v0)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "train the projector only (V1 stage I)"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP vision model (local directory or hub id) "
                                                              "to attach to a text-only MobileLLaMA"})
    vision_tower_type: str = field(default="clip")
    mm_vision_select_layer: int = field(default=-1, metadata={"help": "CLIP hidden layer to use (recipes: -2)"})
    mm_vision_select_feature: str = field(default="patch")
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "a stage-I mm_projector.bin"})
    mm_projector_type: str = field(default="linear", metadata={"help": "ldpnet (V1), ldpnetv2 (V2), linear, mlp2x_gelu"})
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=True)


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-format JSON list or JSONL file"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for compatibility: samples are always "
                                                                  "tokenized lazily"})
    is_multimodal: bool = field(default=False, metadata={"help": "accepted for compatibility (set from the model)"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the samples' `image` paths are relative to"})
    image_aspect_ratio: str = field(default="square", metadata={"help": "square (centre crop) or pad"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip malformed samples / missing or unreadable "
                                                                    "images (reported) instead of stopping"})
    max_mismatch_ratio: float = field(default=0.0, metadata={"help": "tolerated fraction of samples whose label "
                                                                     "masking does not line up with their tokens"})
    eval_data_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction as an eval set "
                                                                     "(MobileLLaMA SFT used 0.02)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "accepted for compatibility; unused"})
    model_max_length: int = field(default=512, metadata={"help": "longest token sequence before the image splice"})
    double_quant: bool = field(default=True)
    quant_type: str = field(default="nf4")
    bits: int = field(default=16, metadata={"help": "4 or 8 for QLoRA (bitsandbytes, CUDA only)"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = ""
    lora_bias: str = "none"
    mm_projector_lr: float | None = None
    group_by_modality_length: bool = field(default=False)
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of --eval_strategy"})
    warmup_ratio: float | None = field(default=None, metadata={"help": "old form of a fractional --warmup_steps"})

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
            self.warmup_steps = self.warmup_ratio
        if self.tf32 and not _cuda_available():
            logger.warning("--tf32 needs an Ampere or newer GPU; ignored on this machine")
            self.tf32 = None
        if self.bf16 and not self.use_cpu and not _cuda_available():
            self.use_cpu = True  # transformers wants bf16 without a GPU spelled out as CPU training
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):
            self.deepspeed = resolve_deepspeed_config(self.deepspeed)
        if self.deepspeed:
            _require_deepspeed()
        if isinstance(self.fsdp_config, str) and not self.fsdp_config.lstrip().startswith("{"):
            self.fsdp_config = resolve_deepspeed_config(self.fsdp_config, "--fsdp_config")
        super().__post_init__()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _require_deepspeed() -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        from mobilevlm.errors import MobileVLMError

        raise MobileVLMError("--deepspeed needs the deepspeed package (pip install deepspeed, on a GPU machine); "
                             "leave --deepspeed out to train with plain PyTorch (one process or torchrun DDP)")


def resolve_deepspeed_config(name: str, flag: str = "--deepspeed") -> str:
    """A path as is; `zero2` / `zero3` / `fsdp_llama` (or the original's `scripts/deepspeed/zero2.json`) -> the
    launcher config shipped with the package."""
    if os.path.isfile(name):
        return name
    stem = Path(name).name.removesuffix(".json")
    shipped = DEEPSPEED_DIR / f"{stem}.json"
    if shipped.is_file():
        return str(shipped)
    from mobilevlm.errors import MobileVLMError

    known = ", ".join(p.stem for p in sorted(DEEPSPEED_DIR.glob("*.json")))
    raise MobileVLMError(f"{flag} {name}: no such file, and not a shipped config ({known})")


def parse_arguments(args: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=args)
    return model_args, data_args, training_args
