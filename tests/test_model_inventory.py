"""Full-size models built on the meta device: key names, shapes and parameter counts of the official checkpoints.

The expected inventory is written out here from the reference (§2.3-§2.4), not derived from our modules.
"""
from __future__ import annotations

import pytest
import torch

from mobilevlm.config import get_preset
from mobilevlm.model import MobileLlamaForCausalLM

CLIP = "model.vision_tower.vision_tower.vision_model."
SIZES = {"1.7b": dict(H=2048, I=5632, N=24, S=512), "3b": dict(H=2560, I=6912, N=32, S=640)}


def llm_inventory(H: int, I: int, N: int) -> dict[str, tuple]:
    keys = {"model.embed_tokens.weight": (32000, H), "model.norm.weight": (H,), "lm_head.weight": (32000, H)}
    for i in range(N):
        p = f"model.layers.{i}."
        keys.update({p + f"self_attn.{n}.weight": (H, H) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        keys.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
                     p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
    return keys


def clip_inventory() -> dict[str, tuple]:
    keys = {CLIP + "embeddings.class_embedding": (1024,), CLIP + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
            CLIP + "embeddings.position_embedding.weight": (577, 1024)}
    for norm in ("pre_layrnorm", "post_layernorm"):
        keys.update({CLIP + f"{norm}.weight": (1024,), CLIP + f"{norm}.bias": (1024,)})
    for j in range(24):
        p = CLIP + f"encoder.layers.{j}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys.update({p + f"self_attn.{n}.weight": (1024, 1024), p + f"self_attn.{n}.bias": (1024,)})
        for n in ("layer_norm1", "layer_norm2"):
            keys.update({p + f"{n}.weight": (1024,), p + f"{n}.bias": (1024,)})
        keys.update({p + "mlp.fc1.weight": (4096, 1024), p + "mlp.fc1.bias": (4096,),
                     p + "mlp.fc2.weight": (1024, 4096), p + "mlp.fc2.bias": (1024,)})
    return keys


def ldp_inventory(H: int, S: int) -> dict[str, tuple]:
    p = "model.mm_projector.model."
    keys = {p + "mlp.1.weight": (H, 1024), p + "mlp.1.bias": (H,), p + "mlp.3.weight": (H, H), p + "mlp.3.bias": (H,)}
    for b in (1, 2):
        q = p + f"mb_block.{b}.block."
        keys.update({q + "0.0.weight": (H, 1, 3, 3), q + "0.1.weight": (H,), q + "0.1.bias": (H,),
                     q + "1.fc1.weight": (S, H, 1, 1), q + "1.fc1.bias": (S,),
                     q + "1.fc2.weight": (H, S, 1, 1), q + "1.fc2.bias": (H,),
                     q + "2.0.weight": (H, H, 1, 1), q + "2.1.weight": (H,), q + "2.1.bias": (H,)})
    return keys


def ldpv2_inventory(H: int) -> dict[str, tuple]:
    p = "model.mm_projector."
    return {p + "mlp.mlp.0.weight": (H, 1024), p + "mlp.mlp.0.bias": (H,), p + "mlp.mlp.2.weight": (H, H),
            p + "mlp.mlp.2.bias": (H,), p + "peg.peg.0.weight": (H, 1, 3, 3), p + "peg.peg.0.bias": (H,)}


def build_on_meta(preset: str) -> MobileLlamaForCausalLM:
    with torch.device("meta"):
        return MobileLlamaForCausalLM(get_preset(preset))


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


@pytest.mark.parametrize("size,projector,preset,proj_params,llm_params", [
    ("1.7b", "ldpnet", "mobilevlm_1.7b", 18_936_832, 1_364_297_728),
    ("3b", "ldpnet", "mobilevlm_3b", 28_913_920, 2_701_560_320),
    ("1.7b", "ldpnetv2", "mobilevlm_v2_1.7b", 6_316_032, 1_364_297_728),
    ("3b", "ldpnetv2", "mobilevlm_v2_3b", 9_205_760, 2_701_560_320),
])
def test_full_size_state_dict_matches_official_inventory(size, projector, preset, proj_params, llm_params):
    model = build_on_meta(preset)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(p.device.type == "meta" for p in model.parameters()), "building must not allocate weights"

    d = SIZES[size]
    projector_keys = ldp_inventory(d["H"], d["S"]) if projector == "ldpnet" else ldpv2_inventory(d["H"])
    expected = {**llm_inventory(d["H"], d["I"], d["N"]), **clip_inventory(), **projector_keys}
    assert sorted(set(shapes) - set(expected)) == []
    assert sorted(set(expected) - set(shapes)) == []
    assert {k: v for k, v in shapes.items() if v != expected[k]} == {}

    groups = {"projector": 0, "clip": 0, "llm": 0}
    for name, shape in shapes.items():
        group = "projector" if ".mm_projector." in name else "clip" if ".vision_tower." in name else "llm"
        groups[group] += torch.Size(shape).numel()
    assert groups == {"projector": proj_params, "clip": 303_507_456, "llm": llm_params}
    # the expected inventory itself agrees with the published totals
    assert numel(projector_keys.values()) == proj_params


def test_text_only_mobilellama_has_no_vision_parts():
    model = build_on_meta("mobilellama_1.4b")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == llm_inventory(2048, 5632, 24)
    assert numel(shapes.values()) == 1_364_297_728


def test_v2_7b_projector_size():
    model = build_on_meta("mobilevlm_v2_7b")
    assert sum(p.numel() for p in model.model.mm_projector.parameters()) == 21_020_672
    assert model.config.num_image_tokens == 144
