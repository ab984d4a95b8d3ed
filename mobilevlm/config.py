"""MobileVLMConfig (the official config.json keys) and named presets for the official and the tiny test sizes.

The official config.json is a LlamaConfig plus the `mm_*` keys below. It names the CLIP tower only by hub id
(`mm_vision_tower`) and the original downloads the tower's config at load time; we cannot download, so the
tower's architecture comes from, in order: our own `mm_vision_tower_config` key (written by `save_pretrained`,
which makes a checkpoint self-contained), a local directory named by `mm_vision_tower`, or the table of
known CLIP towers below. Unknown extra keys (the lit-gpt leftovers of the 3B configs, including a
contradictory `n_head`) are kept as attributes and ignored: only the HF LLaMA keys define the architecture.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPVisionConfig, LlamaConfig

from mobilevlm.errors import CheckpointError

CLIP_L14_336 = "openai/clip-vit-large-patch14-336"

# Architectures of the CLIP towers MobileVLM checkpoints name, so that no download is needed to build them.
KNOWN_VISION_TOWERS = {
    CLIP_L14_336: dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


class MobileVLMConfig(LlamaConfig):
    model_type = "mobilevlm"

    def __init__(
        self,
        mm_vision_tower: str | None = None,
        vision_tower_type: str = "clip",
        mm_hidden_size: int | None = None,
        mm_projector_type: str = "linear",
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        mm_use_im_start_end: bool = False,
        mm_use_im_patch_token: bool = False,
        image_aspect_ratio: str = "pad",
        image_grid_pinpoints=None,
        tune_mm_mlp_adapter: bool = False,
        freeze_mm_mlp_adapter: bool = False,
        use_mm_proj: bool = True,
        mm_projector_lr: float | None = None,
        max_sequence_length: int | None = None,
        mm_vision_tower_config: dict | None = None,
        **kwargs,
    ):
        self.mm_vision_tower = mm_vision_tower
        self.vision_tower_type = vision_tower_type
        self.mm_hidden_size = mm_hidden_size
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_use_im_start_end = mm_use_im_start_end
        self.mm_use_im_patch_token = mm_use_im_patch_token
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints
        self.tune_mm_mlp_adapter = tune_mm_mlp_adapter
        self.freeze_mm_mlp_adapter = freeze_mm_mlp_adapter
        self.use_mm_proj = use_mm_proj
        self.mm_projector_lr = mm_projector_lr
        self.max_sequence_length = max_sequence_length
        self.mm_vision_tower_config = mm_vision_tower_config
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("architectures", ["MobileLlamaForCausalLM"])
        super().__init__(**kwargs)

    @property
    def is_multimodal(self) -> bool:
        return bool(self.mm_vision_tower)

    @property
    def context_length(self) -> int:
        return self.max_sequence_length or 2048

    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP vision tower's config, found without any download (see the module docstring)."""
        if self.mm_vision_tower_config:
            return CLIPVisionConfig(**self.mm_vision_tower_config)
        name = self.mm_vision_tower
        local = Path(str(name)) / "config.json"
        if local.is_file():
            data = json.loads(local.read_text())
            data = data.get("vision_config", data)  # a full CLIPModel directory or a CLIPVisionModel one
            return CLIPVisionConfig(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})
        if name in KNOWN_VISION_TOWERS:
            return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
        raise CheckpointError(
            f"mm_vision_tower {name!r} is neither a local CLIP directory nor a known tower "
            f"({', '.join(KNOWN_VISION_TOWERS)}); put its config.json in a directory and point mm_vision_tower there"
        )

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes in the LLM: the patch grid; LDPv2 pools it to 12x12, LDP halves each side
        (a stride-2 3x3 convolution with padding 1)."""
        vision = self.vision_config()
        grid = vision.image_size // vision.patch_size
        tokens = grid * grid + (1 if self.mm_vision_select_feature == "cls_patch" else 0)
        if self.mm_projector_type.startswith("ldpnetv2"):
            return 12 * 12
        if self.mm_projector_type.startswith("ldpnet"):
            return ((grid + 1) // 2) ** 2
        return tokens


_LLM_SIZES = {
    "1.4b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "2.7b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "vicuna7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6),
}

# A CLIP tower with the official 24x24 patch grid (96-px images, 4-px patches) at toy width.
TINY_VISION_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=96, patch_size=4, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

_COMMON_LLM = dict(vocab_size=32000, hidden_act="silu", rope_theta=10000.0, tie_word_embeddings=False,
                   attention_bias=False, mlp_bias=False, initializer_range=0.02, use_cache=True)

_VLM = dict(mm_vision_tower=CLIP_L14_336, mm_hidden_size=1024, mm_vision_select_layer=-2,
            mm_vision_select_feature="patch", image_aspect_ratio="pad", max_sequence_length=2048)

PRESETS: dict[str, dict] = {
    "mobilellama_1.4b": {**_COMMON_LLM, **_LLM_SIZES["1.4b"]},
    "mobilellama_2.7b": {**_COMMON_LLM, **_LLM_SIZES["2.7b"]},
    "mobilevlm_1.7b": {**_COMMON_LLM, **_LLM_SIZES["1.4b"], **_VLM, "mm_projector_type": "ldpnet"},
    "mobilevlm_3b": {**_COMMON_LLM, **_LLM_SIZES["2.7b"], **_VLM, "mm_projector_type": "ldpnet"},
    "mobilevlm_v2_1.7b": {**_COMMON_LLM, **_LLM_SIZES["1.4b"], **_VLM, "mm_projector_type": "ldpnetv2"},
    "mobilevlm_v2_3b": {**_COMMON_LLM, **_LLM_SIZES["2.7b"], **_VLM, "mm_projector_type": "ldpnetv2"},
    "mobilevlm_v2_7b": {**_COMMON_LLM, **_LLM_SIZES["vicuna7b"], **_VLM, "mm_projector_type": "ldpnetv2",
                        "max_sequence_length": 4096},
    "tiny_llama": {**_COMMON_LLM, **_LLM_SIZES["tiny"], "vocab_size": 512},
    "tiny_v1": {**_COMMON_LLM, **_LLM_SIZES["tiny"], **_VLM, "vocab_size": 512, "mm_projector_type": "ldpnet",
                "mm_vision_tower": "tiny-clip-96", "mm_hidden_size": 32, "mm_vision_tower_config": TINY_VISION_TOWER,
                "max_sequence_length": 1024},
    "tiny_v2": {**_COMMON_LLM, **_LLM_SIZES["tiny"], **_VLM, "vocab_size": 512, "mm_projector_type": "ldpnetv2",
                "mm_vision_tower": "tiny-clip-96", "mm_hidden_size": 32, "mm_vision_tower_config": TINY_VISION_TOWER,
                "max_sequence_length": 1024},
}


def get_preset(name: str, **overrides) -> MobileVLMConfig:
    """A config for a named size; `overrides` replace any key (e.g. `mm_projector_type="linear"`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    if values.get("mm_vision_tower_config") is not None and "mm_hidden_size" not in overrides:
        values["mm_hidden_size"] = values["mm_vision_tower_config"]["hidden_size"]
    return MobileVLMConfig(**values)
