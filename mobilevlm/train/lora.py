"""LoRA on the language model (peft), the projector fully trainable, and `merge` into a normal checkpoint.

Targets are every `nn.Linear` of the language model (q/k/v/o, gate/up/down; not `lm_head`, the projector or
CLIP), as the original's `find_all_linear_names`. The projector is a peft `modules_to_save` module, so it is
trained, checkpointed and resumed with the adapter; the run's final folder also has the original's
`non_lora_trainables.bin` and `config.json` so that original-style LoRA folders and ours merge the same way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from mobilevlm.errors import CheckpointError

logger = logging.getLogger(__name__)

SKIP_MODULES = ("mm_projector", "vision_tower", "vision_resampler")
RUN_ARGS_FILE = "mobilevlm_model_args.json"


def lora_target_modules(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not any(skip in name for skip in SKIP_MODULES)}
    names.discard("lm_head")
    return sorted(names)


def apply_lora(model, training_args):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=training_args.lora_r, lora_alpha=training_args.lora_alpha, lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias, task_type="CAUSAL_LM", target_modules=lora_target_modules(model),
        modules_to_save=["mm_projector"] if model.config.is_multimodal and not training_args.freeze_mm_mlp_adapter else None,
    )
    model = get_peft_model(model, config)
    if training_args.lora_weight_path:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(training_args.lora_weight_path))
    return model


def non_lora_state(peft_model) -> dict[str, torch.Tensor]:
    """Trainable non-LoRA weights under the original's names (`base_model.model.model.mm_projector.*`)."""
    state = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            name = name.replace(".modules_to_save.default", "")
            state[name] = param.detach().cpu().clone()
    return state


def save_lora_extras(peft_model, model_args, out: Path) -> None:
    """What the original wrote next to the adapter: the base config and `non_lora_trainables.bin`."""
    peft_model.get_base_model().config.save_pretrained(out)
    torch.save(non_lora_state(peft_model), out / "non_lora_trainables.bin")
    (out / RUN_ARGS_FILE).write_text(json.dumps(vars(model_args), indent=2))


def _strip(name: str) -> str:
    name = name.removeprefix("base_model.").removeprefix("model.")
    return name if name.startswith(("model.", "lm_head")) else "model." + name


def merge_lora(base_path: str, lora_dir: str, out_dir: str) -> Path:
    """base + LoRA run folder -> a normal checkpoint folder (official layout) with the adapter merged in."""
    from peft import PeftModel

    from mobilevlm.train.arguments import ModelArguments
    from mobilevlm.train.builder import build_model, write_preprocessor_config
    from mobilevlm.tokenizer import load_tokenizer, save_tokenizer_files

    lora_dir, out = Path(lora_dir), Path(out_dir)
    if not (lora_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{lora_dir}: no adapter_config.json (not a LoRA training output)")
    run_args = {}
    if (lora_dir / RUN_ARGS_FILE).is_file():
        run_args = json.loads((lora_dir / RUN_ARGS_FILE).read_text())
    run_args["model_name_or_path"] = str(base_path)
    run_args["pretrain_mm_mlp_adapter"] = None
    known = ModelArguments.__dataclass_fields__
    model, image_processor = build_model(ModelArguments(**{k: v for k, v in run_args.items() if k in known}))
    extras = lora_dir / "non_lora_trainables.bin"
    if extras.is_file():
        state = {_strip(k): v for k, v in torch.load(extras, map_location="cpu", weights_only=True).items()}
        missing_here = [k for k in state if k not in model.state_dict()]
        if missing_here:
            raise CheckpointError(f"{extras}: weights the base model lacks: {', '.join(missing_here[:8])}")
        model.load_state_dict(state, strict=False)
    merged = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer_dir = lora_dir if (lora_dir / "tokenizer.model").is_file() else Path(base_path)
    save_tokenizer_files(out, load_tokenizer(tokenizer_dir).vocab_file)
    if image_processor is not None:
        write_preprocessor_config(image_processor, out)
    logger.info("merged %s + %s -> %s", base_path, lora_dir, out)
    return out
