"""Build the model a training run starts from, and set which parameters train.

Three starting points, as in the original recipes:
- a text-only MobileLLaMA checkpoint + `--vision_tower` (stage I): the CLIP tower is loaded from its own
  directory, the projector is created fresh (PyTorch default init) or read from `--pretrain_mm_mlp_adapter`;
- a MobileVLM checkpoint (stage II from a stage-I output, LoRA): loaded whole;
- a text-only MobileLLaMA without `--vision_tower` (MobileLLaMA chat SFT): a plain causal LM.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mobilevlm.config import MobileVLMConfig
from mobilevlm.errors import CheckpointError

logger = logging.getLogger(__name__)


def _vision_tower_config(vision_tower: str) -> dict:
    """The CLIP vision config as a dict stored in our config (`mm_vision_tower_config`): the output checkpoint
    then needs neither the tower's directory nor a download to be rebuilt."""
    probe = MobileVLMConfig(mm_vision_tower=vision_tower)
    config = probe.vision_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        config.pop(key, None)
    return config


def _load_clip_weights(model, vision_tower: str) -> None:
    from transformers import CLIPVisionModel

    try:
        clip = CLIPVisionModel.from_pretrained(vision_tower)
    except OSError as err:
        raise CheckpointError(f"--vision_tower {vision_tower}: cannot load CLIP vision weights ({err})") from None
    target = model.get_model().vision_tower.vision_tower.vision_model
    missing, unexpected = target.load_state_dict(clip.state_dict(), strict=False)
    if missing:
        raise CheckpointError(f"--vision_tower {vision_tower}: missing CLIP weights {', '.join(missing[:8])}")


def _multimodal_config(model_dir: Path, model_args) -> MobileVLMConfig:
    from mobilevlm.model.loading import read_config

    base = read_config(model_dir).to_dict()
    base.pop("model_type", None)
    vision = _vision_tower_config(model_args.vision_tower)
    base.update(
        mm_vision_tower=model_args.vision_tower,
        mm_vision_tower_config=vision,
        vision_tower_type=model_args.vision_tower_type,
        mm_hidden_size=vision["hidden_size"],
        mm_projector_type=model_args.mm_projector_type,
        mm_vision_select_layer=model_args.mm_vision_select_layer,
        mm_vision_select_feature=model_args.mm_vision_select_feature,
        mm_use_im_start_end=model_args.mm_use_im_start_end,
        mm_use_im_patch_token=model_args.mm_use_im_patch_token,
    )
    return MobileVLMConfig(**base)


def _attach_vision(model_dir: Path, model_args):
    from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM

    from transformers.utils import logging as hf_logging

    config = _multimodal_config(model_dir, model_args)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new tower and projector are "missing" by design: no loading table
    try:
        model, info = MobileLlamaForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32,
                                                             output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    not_new = [k for k in info.get("missing_keys", []) if ".vision_tower." not in k and ".mm_projector." not in k]
    if not_new:
        raise CheckpointError(f"{model_dir}: missing language-model weights {', '.join(sorted(not_new)[:8])}")
    _load_clip_weights(model, model_args.vision_tower)
    for module in model.get_model().mm_projector.modules():  # the original's fresh projector: PyTorch defaults
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def load_projector(model, path: str) -> None:
    """`--pretrain_mm_mlp_adapter`: a stage-I `mm_projector.bin` (keys `model.mm_projector.*`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"--pretrain_mm_mlp_adapter {path}: cannot read ({err})") from None
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not weights:
        raise CheckpointError(f"--pretrain_mm_mlp_adapter {path}: no mm_projector weights in the file")
    try:
        model.get_model().mm_projector.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"--pretrain_mm_mlp_adapter {path}: does not fit the projector ({err})") from None


def build_model(model_args, training_args=None):
    """(model in float32, image processor or None) for `model_args`; trainable flags set for `training_args`."""
    from mobilevlm.model.loading import load_model, read_config, resolve_model_dir
    from mobilevlm.processing import build_image_processor

    if not model_args.model_name_or_path:
        raise CheckpointError("--model_name_or_path is required")
    model_dir = resolve_model_dir(model_args.model_name_or_path)
    config = read_config(model_dir)
    if config.is_multimodal:
        if model_args.vision_tower and model_args.vision_tower != config.mm_vision_tower:
            logger.warning("%s already has a vision tower (%s); --vision_tower %s is ignored",
                           model_dir, config.mm_vision_tower, model_args.vision_tower)
        model = load_model(model_dir, config, torch.float32, "cpu")
    elif model_args.vision_tower:
        model = _attach_vision(model_dir, model_args)
    else:
        model = load_model(model_dir, config, torch.float32, "cpu")
    model.train()
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    image_processor = None
    if model.config.is_multimodal:
        source = model_dir if (model_dir / "preprocessor_config.json").is_file() else model.config.mm_vision_tower
        image_processor = build_image_processor(model.config.vision_config().image_size, source)
        image_processor.source_dir = str(source)
    if training_args is not None:
        set_trainable(model, model_args, training_args)
    return model, image_processor


def set_trainable(model, model_args, training_args) -> None:
    """Which parameters train (the original's logic); the CLIP tower never does."""
    multimodal = model.config.is_multimodal
    model.requires_grad_(not training_args.lora_enable)
    if model_args.freeze_backbone:
        for name, param in model.named_parameters():
            if ".mm_projector." not in name:
                param.requires_grad_(False)
    if multimodal:
        projector = model.get_model().mm_projector
        if model_args.tune_mm_mlp_adapter:
            model.requires_grad_(False)
            projector.requires_grad_(True)
        if training_args.freeze_mm_mlp_adapter:
            projector.requires_grad_(False)
        model.get_model().vision_tower.requires_grad_(False)
    model.config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    model.config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    model.config.mm_projector_lr = training_args.mm_projector_lr
    model.config.use_cache = False


def write_preprocessor_config(image_processor, out_dir: Path) -> None:
    source = Path(getattr(image_processor, "source_dir", "") or "") / "preprocessor_config.json"
    target = out_dir / "preprocessor_config.json"
    if source.is_file():
        target.write_text(source.read_text())
    else:
        settings = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
        settings["image_processor_type"] = "CLIPImageProcessor"
        target.write_text(json.dumps(settings, indent=2, default=str))
