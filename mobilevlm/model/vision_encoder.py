"""The original's `mobilevlm.model.vision_encoder` import path: this package's CLIP tower under its names.

The tower's weights come from the MobileVLM checkpoint (nothing is downloaded), so `delay_load` means nothing
here and a freshly built tower holds random weights until a checkpoint is loaded into the model.
"""
from mobilevlm.config import MobileVLMConfig
from mobilevlm.model.vision import CLIPVisionTower


def build_vision_tower(model_cfg, **kwargs) -> CLIPVisionTower:
    """The tower a model config (or the original's training `ModelArguments`) describes."""
    if not isinstance(model_cfg, MobileVLMConfig):
        model_cfg = MobileVLMConfig(
            mm_vision_tower=getattr(model_cfg, "mm_vision_tower", getattr(model_cfg, "vision_tower", None)),
            vision_tower_type=getattr(model_cfg, "vision_tower_type", None),
            mm_vision_select_layer=model_cfg.mm_vision_select_layer,
            mm_vision_select_feature=getattr(model_cfg, "mm_vision_select_feature", "patch"),
        )
    return CLIPVisionTower(model_cfg)


__all__ = ["CLIPVisionTower", "build_vision_tower"]
