"""Named training recipes: each stage's flags as in the original `run.sh` / `run_v1.sh` (reference §7).

A recipe gives the flags of `pretrain` (stage I), `finetune` (stage II) and `finetune.lora`; the pipeline adds
the paths. The official ones assume 8 GPUs (global batch = per-device batch x 8); on fewer devices raise
`--gradient_accumulation_steps` to keep the global batch. The `tiny_*` recipes are for CPU smoke runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Flags every official VLM stage passes.
COMMON = {
    "vision_tower_type": "clip", "mm_vision_select_layer": -2, "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "bf16": True, "tf32": True, "num_train_epochs": 1,
    "gradient_accumulation_steps": 1, "weight_decay": 0.0, "warmup_ratio": 0.03, "lr_scheduler_type": "cosine",
    "model_max_length": 2048, "gradient_checkpointing": True, "dataloader_num_workers": 4, "lazy_preprocess": True,
    "save_strategy": "steps", "save_total_limit": 1, "logging_steps": 1, "report_to": "tensorboard",
    "evaluation_strategy": "no",
}
PRETRAIN = {"version": "plain", "image_aspect_ratio": "square", "per_device_train_batch_size": 32,
            "deepspeed": "zero2", "save_steps": 24000}
FINETUNE = {"version": "v1", "image_aspect_ratio": "pad", "group_by_modality_length": True,
            "per_device_train_batch_size": 16}
LORA = {"lora_enable": True, "lora_r": 128, "lora_alpha": 256}


@dataclass(frozen=True)
class Recipe:
    name: str
    projector: str
    pretrain: dict
    finetune: dict
    lora: dict
    # V1 stage II starts from the LLM + the stage-I projector file; V2 stage II from the whole stage-I model.
    finetune_from_projector: bool
    notes: str = ""
    common: dict = field(default_factory=lambda: dict(COMMON))

    def stage_flags(self, stage: str) -> dict:
        specific = {"pretrain": self.pretrain, "finetune": self.finetune, "finetune.lora": self.lora}
        if stage not in specific:
            raise KeyError(f"unknown stage {stage!r}; use pretrain, finetune or finetune.lora")
        return {**self.common, "mm_projector_type": self.projector, **specific[stage]}


def _v1(name: str, finetune_lr: float, finetune_ds: str, lora_lr: float, lora_ds: str) -> Recipe:
    return Recipe(
        name, "ldpnet",
        pretrain={**PRETRAIN, "tune_mm_mlp_adapter": True, "learning_rate": 1e-3},
        finetune={**FINETUNE, "learning_rate": finetune_lr, "deepspeed": finetune_ds, "save_steps": 50000},
        lora={**FINETUNE, **LORA, "learning_rate": lora_lr, "deepspeed": lora_ds, "save_steps": 50000},
        finetune_from_projector=True,
        notes="MobileVLM V1: stage I trains the projector only (1e-3); stage II the LLM + projector",
    )


def _v2(name: str) -> Recipe:
    return Recipe(
        name, "ldpnetv2",
        pretrain={**PRETRAIN, "learning_rate": 2e-5, "mm_projector_lr": 1e-3},
        finetune={**FINETUNE, "learning_rate": 4e-5, "deepspeed": "zero3", "save_steps": 2000},
        lora={**FINETUNE, **LORA, "learning_rate": 2e-4, "deepspeed": "zero3", "save_steps": 2000},
        finetune_from_projector=False,
        notes="MobileVLM V2: stage I trains LLM (2e-5) + projector (1e-3); stage II everything at 4e-5",
    )


# Small enough for 2 CPU cores in a minute or two: no DeepSpeed, no bf16, no workers, short sequences.
TINY = {"bf16": False, "tf32": False, "gradient_checkpointing": False, "dataloader_num_workers": 0,
        "model_max_length": 256, "report_to": "none", "save_steps": 1000, "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant", "logging_steps": 5}


def _tiny(name: str, base: Recipe) -> Recipe:
    def shrink(flags: dict, batch: int, epochs: int, lr_scale: float) -> dict:
        out = {k: v for k, v in flags.items() if k != "deepspeed"}
        out.update(per_device_train_batch_size=batch, num_train_epochs=epochs, learning_rate=flags["learning_rate"] * lr_scale)
        return out

    return Recipe(name, base.projector, pretrain=shrink(base.pretrain, 8, 3, 5.0), finetune=shrink(base.finetune, 8, 3, 25.0),
                  lora={**shrink(base.lora, 8, 3, 5.0), "lora_r": 8, "lora_alpha": 16},
                  finetune_from_projector=base.finetune_from_projector, notes=f"CPU-sized {base.name}",
                  common={**COMMON, **TINY})


RECIPES: dict[str, Recipe] = {
    "mobilevlm_1.7b": _v1("mobilevlm_1.7b", 2e-5, "zero2", 1e-4, "zero2"),
    "mobilevlm_3b": _v1("mobilevlm_3b", 4e-5, "zero3", 2e-4, "zero3"),
    "mobilevlm_v2_1.7b": _v2("mobilevlm_v2_1.7b"),
    "mobilevlm_v2_3b": _v2("mobilevlm_v2_3b"),
}
RECIPES["tiny_v1"] = _tiny("tiny_v1", RECIPES["mobilevlm_1.7b"])
RECIPES["tiny_v2"] = _tiny("tiny_v2", RECIPES["mobilevlm_v2_1.7b"])

# MobileLLaMA chat SFT (FastChat, reference §7.5): text-only vicuna v1.1 data, 8 GPUs x 16 x accumulation 2.
SFT = {
    "mobilellama_1.4b_sft": {"learning_rate": 2e-5, "num_train_epochs": 3},
    "mobilellama_2.7b_sft": {"learning_rate": 3e-5, "num_train_epochs": 2},
}
SFT_COMMON = {"version": "v1", "bf16": True, "tf32": True, "per_device_train_batch_size": 16,
              "gradient_accumulation_steps": 2, "eval_data_fraction": 0.02, "eval_strategy": "steps",
              "eval_steps": 2000, "save_strategy": "steps", "save_steps": 1800, "save_total_limit": 8,
              "weight_decay": 0.0, "warmup_ratio": 0.04, "lr_scheduler_type": "cosine", "model_max_length": 2048,
              "gradient_checkpointing": True, "logging_steps": 1, "fsdp": "full_shard auto_wrap",
              "fsdp_config": "fsdp_llama", "report_to": "tensorboard"}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def sft_flags(name: str) -> dict:
    if name not in SFT:
        raise KeyError(f"unknown SFT recipe {name!r}; known: {', '.join(SFT)}")
    return {**SFT_COMMON, **SFT[name]}


def to_argv(flags: dict) -> list[str]:
    """{flag: value} -> ["--flag", "value", ...] for the argument parser (booleans as True / False)."""
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        argv += [f"--{key}", str(value)]
    return argv
