"""The vision tower against transformers' own CLIPVisionModel: hidden_states[select_layer], class token dropped."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel

from mobilevlm.testing import make_tiny_model


def reference_clip(model) -> CLIPVisionModel:
    """A stand-alone CLIPVisionModel holding the tower's weights, loaded by the official key names."""
    config = model.config.vision_config()
    clip = CLIPVisionModel(config).eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    weights = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = clip.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return clip


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_patch_features_equal_clip_hidden_state(pixels, select_layer):
    model = make_tiny_model("tiny_v2", seed=4, mm_vision_select_layer=select_layer)
    with torch.no_grad():
        ours = model.get_model().vision_tower(pixels)
        hidden = reference_clip(model)(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 4  # embeddings + 3 layers of the tiny tower
    assert ours.shape == (2, 24 * 24, 32)
    torch.testing.assert_close(ours, hidden[select_layer][:, 1:], rtol=1e-5, atol=1e-5)


def test_cls_patch_keeps_the_class_token(pixels):
    model = make_tiny_model("tiny_v2", seed=4, mm_vision_select_feature="cls_patch", mm_projector_type="linear")
    with torch.no_grad():
        ours = model.get_model().vision_tower(pixels)
        hidden = reference_clip(model)(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        projected = model.encode_images(pixels)
    assert ours.shape == (2, 24 * 24 + 1, 32)
    torch.testing.assert_close(ours, hidden, rtol=1e-5, atol=1e-5)
    assert projected.shape == (2, model.config.num_image_tokens, 64) == (2, 577, 64)


@pytest.mark.parametrize("preset", ["tiny_v1", "tiny_v2"])
def test_encode_images_is_projector_of_clip_features(pixels, preset):
    model = make_tiny_model(preset, seed=5)
    with torch.no_grad():
        features = reference_clip(model)(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = model.get_model().mm_projector(features)
        encoded = model.encode_images(pixels)
    assert encoded.shape == (2, 144, 64) and model.config.num_image_tokens == 144
    torch.testing.assert_close(encoded, expected, rtol=1e-5, atol=1e-5)


def test_vision_tower_is_frozen():
    model = make_tiny_model("tiny_v2")
    assert not any(p.requires_grad for p in model.get_model().vision_tower.parameters())
    assert all(p.requires_grad for p in model.get_model().mm_projector.parameters())


def test_dropping_unused_layers_keeps_the_features(pixels):
    tower = make_tiny_model("tiny_v2", seed=4).get_model().vision_tower
    with torch.no_grad():
        before = tower(pixels)
    layers = len(tower.vision_tower.vision_model.encoder.layers)
    tower.drop_unused_layers()
    assert len(tower.vision_tower.vision_model.encoder.layers) == tower.num_layers_used < layers
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), before, rtol=0, atol=0)
