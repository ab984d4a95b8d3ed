"""The original's `mobilevlm.model.mobilellama` import path: this package's model classes under its names.

Importing it registers `model_type: mobilevlm` with transformers' Auto classes, as the original's module does.
"""
from mobilevlm.config import MobileVLMConfig
from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM, MobileLlamaModel, register_auto_classes

register_auto_classes()

__all__ = ["MobileLlamaForCausalLM", "MobileLlamaModel", "MobileVLMConfig"]
