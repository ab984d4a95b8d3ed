"""The original's `mobilevlm.model.vision_projector` import path: this package's projectors under its names.

`build_vision_projector(config)` takes the model config as the original does; the classes themselves take
(input features, hidden size) here rather than a config.
"""
from mobilevlm.model.projector import (FeatureIRLayer, LDPBlock, LDPNetProjector, LDPNetV2Projector, PosInjectLayer,
                                       TokenDownLayer)
from mobilevlm.model.projector import build_vision_projector as _build


def build_vision_projector(config, delay_load=False, **kwargs):
    return _build(getattr(config, "mm_projector_type", "linear"), config.mm_hidden_size, config.hidden_size)


__all__ = ["FeatureIRLayer", "LDPBlock", "LDPNetProjector", "LDPNetV2Projector", "PosInjectLayer", "TokenDownLayer",
           "build_vision_projector"]
