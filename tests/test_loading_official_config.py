"""config.json files as the mtgv checkpoints ship them (§2.1, §2.5), read and built on the meta device."""
from __future__ import annotations

import json

import torch

from mobilevlm.config import get_preset
from mobilevlm.model import MobileLlamaForCausalLM
from mobilevlm.model.loading import read_config
from mobilevlm.processing import build_image_processor

V2_1_7B = {
    "architectures": ["MobileLlamaForCausalLM"], "model_type": "mobilevlm", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "max_sequence_length": 2048, "mm_hidden_size": 1024, "mm_projector_type": "ldpnetv2",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
    "image_grid_pinpoints": None, "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vision_tower_type": "clip",
    "vocab_size": 32000, "mm_projector_lr": None,
}

# MobileVLM-3B: the 2.7B sizes plus the lit-gpt leftovers, whose n_head (16) contradicts num_attention_heads (32)
V1_3B = {**V2_1_7B, "mm_projector_type": "ldpnet", "hidden_size": 2560, "intermediate_size": 6912,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "_mlp_class": "LLaMAMLP", "_norm_class": "RMSNorm", "bias": False, "block_size": 2048, "gelu_approximate": "none",
         "lm_head_bias": False, "n_embd": 2560, "n_head": 16, "n_layer": 32, "n_query_groups": 16,
         "name": "huggy_llama_3b", "norm_eps": 1e-06, "org": "huggyllama", "padded_vocab_size": 32000,
         "padding_multiple": 64, "parallel_residual": False, "rope_base": 10000, "rope_condense_ratio": 1,
         "rotary_percentage": 1.0, "shared_attention_norm": False}
V1_3B.pop("max_sequence_length")


def build(config) -> MobileLlamaForCausalLM:
    with torch.device("meta"):
        return MobileLlamaForCausalLM(config)


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_v2_1_7b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V2_1_7B))
    config = read_config(tmp_path)
    assert config.context_length == 2048 and config.num_image_tokens == 144
    vision = config.vision_config()
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (336, 14, 1024, 24)
    assert vision.hidden_act == "quick_gelu"
    assert shapes(build(config)) == shapes(build(get_preset("mobilevlm_v2_1.7b")))
    processor = build_image_processor(vision.image_size, tmp_path, config.mm_vision_tower)
    assert processor.crop_size.height == 336 and processor.size.shortest_edge == 336


def test_3b_config_uses_hf_head_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V1_3B))
    config = read_config(tmp_path)
    assert config.num_attention_heads == 32 and config.head_dim == 80 and config.context_length == 2048
    model = build(config)
    assert model.model.rotary_emb.inv_freq.shape == (40,)  # rotate-half over head_dim 80, not 160
    assert shapes(model) == shapes(build(get_preset("mobilevlm_3b")))
