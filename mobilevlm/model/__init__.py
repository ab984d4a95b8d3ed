from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM, MobileLlamaModel, register_auto_classes

__all__ = ["MobileLlamaForCausalLM", "MobileLlamaModel", "register_auto_classes"]
