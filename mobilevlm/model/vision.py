"""The frozen CLIP vision tower: features of one hidden layer (default the second-to-last), CLS token dropped.

The module path reproduces the official state-dict names: the meta-model's `vision_tower` (this class) holds a
`vision_tower` whose `vision_model` is the CLIP vision transformer, hence
`model.vision_tower.vision_tower.vision_model.encoder.layers.0...` with no key renaming on load or save.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from mobilevlm.config import MobileVLMConfig
from mobilevlm.errors import CheckpointError
from mobilevlm.processing import build_image_processor


class _CLIPHolder(nn.Module):
    """The original wraps HF's CLIPVisionModel, whose top module used to be `vision_model`; keep that level."""

    def __init__(self, vision_config):
        super().__init__()
        self.vision_model = CLIPVisionModel(vision_config)


class CLIPVisionTower(nn.Module):
    def __init__(self, config: MobileVLMConfig):
        super().__init__()
        if config.vision_tower_type != "clip":
            raise CheckpointError(f"vision_tower_type {config.vision_tower_type!r} is not supported (only 'clip')")
        if config.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"mm_vision_select_feature {config.mm_vision_select_feature!r}: use 'patch' or 'cls_patch'")
        vision_config = config.vision_config()
        vision_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.vision_config = vision_config
        self.vision_tower_name = config.mm_vision_tower
        self._model_config = config  # read lazily for the image processor (its name_or_path is set on loading)
        self._image_processor = None
        self.select_layer = config.mm_vision_select_layer
        self.select_feature = config.mm_vision_select_feature
        self.vision_tower = _CLIPHolder(vision_config)
        self.requires_grad_(False)  # frozen in every MobileVLM stage

    # The original's tower API, used by its scripts after `model.get_vision_tower()`. The weights always come
    # from the checkpoint itself, so the tower is loaded from the start and `load_model()` has nothing to do.
    is_loaded = True

    def load_model(self) -> None:
        """Kept for the original's scripts: the weights are already the checkpoint's (nothing is downloaded)."""

    # No `config` property (the original's is the CLIP config): transformers treats a submodule with a
    # `config` as a model of its own and changes its attention settings. Use `vision_config`.

    def load_image_processor(self) -> None:
        """Kept for the original's scripts: `image_processor` is built on first use."""

    @property
    def image_processor(self):
        """The checkpoint's CLIP processor, as `load_pretrained_model` returns it."""
        if self._image_processor is None:
            config = self._model_config
            self._image_processor = build_image_processor(self.vision_config.image_size,
                                                          getattr(config, "name_or_path", None) or None,
                                                          config.mm_vision_tower)
        return self._image_processor

    @image_processor.setter
    def image_processor(self, processor) -> None:
        self._image_processor = processor

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def device(self) -> torch.device:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.device

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def num_layers_used(self) -> int:
        """Encoder layers that contribute to the selected hidden state (hidden_states[0] is the embedding)."""
        total = self.vision_config.num_hidden_layers
        return self.select_layer if self.select_layer >= 0 else total + 1 + self.select_layer

    def drop_unused_layers(self) -> None:
        """Frees the encoder layers after the selected one (12.6M parameters of CLIP ViT-L/14 with the default
        second-to-last layer). For inference only: the state dict no longer has them, so do not save after it."""
        del self.vision_tower.vision_model.encoder.layers[self.num_layers_used:]

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        clip = self.vision_tower.vision_model
        hidden = clip.pre_layrnorm(clip.embeddings(images.to(self.dtype)))
        # Run only the layers the selected hidden state depends on (the original computes all of them and
        # discards the rest; the result is identical).
        for layer in clip.encoder.layers[: self.num_layers_used]:
            hidden = layer(hidden, attention_mask=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if self.select_feature == "patch":
            hidden = hidden[:, 1:]
        return hidden.to(images.dtype)
