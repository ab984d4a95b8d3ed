"""MobileVLM / MobileVLM V2 in one package: model, inference, training, evaluation, GGUF export, serving."""

__version__ = "0.1.0"

from mobilevlm.config import MobileVLMConfig, get_preset  # noqa: E402
from mobilevlm.model import MobileLlamaForCausalLM, MobileLlamaModel, register_auto_classes  # noqa: E402
from mobilevlm.model.loading import load_pretrained_model  # noqa: E402
# Registers `mobilevlm quantize`'s directories with load_pretrained_model (the model layer does not import fast/).
import mobilevlm.fast.checkpoint  # noqa: E402,F401

register_auto_classes()


def __getattr__(name):
    # The generation API pulls in more; import it on first use.
    if name in ("Pipeline", "inference_once"):
        from mobilevlm import generation

        return getattr(generation, name)
    raise AttributeError(name)


__all__ = ["MobileVLMConfig", "MobileLlamaForCausalLM", "MobileLlamaModel", "get_preset", "load_pretrained_model",
           "Pipeline", "inference_once", "__version__"]
