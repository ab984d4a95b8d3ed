"""The demo's pre-trained parts load through the same paths as real checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from mobilevlm.demo import bases
from mobilevlm.demo import trainsets as T

TINY_TOWER = bases.TowerSize(hidden=16, layers=3, heads=2, text_hidden=16, text_layers=1)
TINY_LLM = bases.LlmSize(hidden=32, layers=2, heads=2, intermediate=64, max_positions=256)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    scenes = T.training_scenes(0, 60)
    names = [f"{i}.png" for i in range(60)]
    samples = T.caption_samples(scenes, names, 0) + T.instruction_samples(scenes, names, 0)
    bases.train_tokenizer(T.corpus_lines(samples), root / "tokenizer", 400)
    tower = bases.pretrain_vision_tower(scenes, root / "tokenizer", root / "clip", 0, steps=2, batch_size=4,
                                        size=TINY_TOWER, log=lambda m: None)
    llm = bases.pretrain_language_model(T.reading_samples(scenes, 0, 60), root / "tokenizer", root / "llm", 0, steps=40,
                                        batch_size=8, size=TINY_LLM, log=lambda m: None)
    return root, tower, llm


def test_tokenizer_is_llama_style(parts):
    from mobilevlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(parts[0] / "tokenizer")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("Is there a red circle? 日本").input_ids
    assert ids[0] == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Is there a red circle? 日本"  # byte fallback
    assert tokenizer.convert_ids_to_tokens(tokenizer("a\nb").input_ids)[2] == "<0x0A>"


def test_vision_tower_is_a_clip_vision_directory_with_the_official_grid(parts):
    from transformers import CLIPVisionModel

    from mobilevlm.processing import build_image_processor
    from mobilevlm.demo.scenes import render, sample_shapes
    import random

    clip_dir = parts[0] / "clip"
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    assert tower.config.image_size // tower.config.patch_size == 24
    processor = build_image_processor(96, clip_dir)
    pixels = processor([render(sample_shapes(random.Random(0)))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 96, 96)
    assert tower(pixel_values=pixels).last_hidden_state.shape == (1, 577, TINY_TOWER.hidden)
    assert json.loads((clip_dir / "config.json").read_text())["model_type"] == "clip_vision_model"


def test_pixels_match_the_saved_processor(parts):
    import random

    from mobilevlm.demo.scenes import render, sample_scene
    from mobilevlm.processing import build_image_processor

    scenes = [sample_scene(random.Random(i)) for i in range(3)]
    processor = build_image_processor(96, parts[0] / "clip")
    expected = processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    assert torch.allclose(bases._pixels(scenes), expected, atol=1e-5)


def test_language_model_loads_as_a_mobilellama_checkpoint_and_learned(parts):
    from mobilevlm.model.loading import load_pretrained_model

    root, _, llm = parts
    tokenizer, model, image_processor, _ = load_pretrained_model(root / "llm")
    assert image_processor is None and model.config.vocab_size == len(tokenizer)
    assert llm["final_loss"] < llm["first_loss"] * 0.75


def test_region_features_average_the_covered_patches():
    patches = torch.arange(24 * 24, dtype=torch.float).view(1, 24, 24, 1)
    feats = bases._region_features(patches, [(0, (0, 0, 8, 4))])  # pixels 0-8 x 0-4 = patches (0, 0..1)
    assert feats.item() == pytest.approx((0 + 1) / 2)


class _Oracle:
    """A stand-in language model whose yes-no margin is +1 when the asked object is in the context, -1 if not
    (times `sign`), or 0 for every question: the lookup check must score it 1, 0 and 0.5."""

    def __init__(self, tokenizer, sign: float):
        self.tokenizer, self.sign = tokenizer, sign
        self.yes, self.no = (tokenizer(w, add_special_tokens=False).input_ids[-1] for w in ("yes", "no"))

    def eval(self):
        return self

    def __call__(self, input_ids):
        text = self.tokenizer.decode(input_ids[0])
        context, question = text.split("Context:")[1].split("Is there a ")
        name = question.split(" in the image")[0]
        colour, shape = name.split()
        present = any(f"{colour} {shape}" in part for part in context.replace(" and ", ", ").split(", "))
        logits = torch.zeros(1, input_ids.shape[1], len(self.tokenizer))
        logits[0, -1, self.yes] = self.sign * (1.0 if present else -1.0)
        return type("Out", (), {"logits": logits})()


def test_context_lookup_check_scores_a_perfect_an_inverted_and_a_blind_model(parts):
    from mobilevlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(parts[0] / "tokenizer")
    scores = [bases.context_lookup_auc(_Oracle(tokenizer, sign), tokenizer, 0, scenes=8) for sign in (1.0, -1.0, 0.0)]
    assert scores == [1.0, 0.0, 0.5]
    assert 0.0 <= parts[2]["context_lookup_auc"] <= 1.0
