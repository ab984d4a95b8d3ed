"""The demo's bases: the rebuild path (`mobilevlm demo bases --fast`), the manifest, the shipped bases, and that
they load through the same paths as real checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mobilevlm.demo import bases, probes, shipped
from mobilevlm.demo import trainsets as T


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mobilevlm.cli import main

    root = tmp_path_factory.mktemp("bases") / "demo_bases"
    assert main(["demo", "bases", "--fast", "--out", str(root)]) == 0
    return root


def test_rebuild_writes_checkpoint_folders_and_a_manifest_that_verifies(built):
    manifest = shipped.verify(built)
    assert manifest["built_by"] == "mobilevlm demo bases --seed 0 --device cpu --fast"
    assert set(manifest["files"]) >= {"clip-vit-tiny-96/model.safetensors", "clip-vit-tiny-96/preprocessor_config.json",
                                      "mobilellama-tiny/model.safetensors", "mobilellama-tiny/tokenizer.model"}
    assert manifest["tower"]["parameters"] > 0 and manifest["language_model"]["parameters"] > 0
    assert {"color", "shape", "size", "position", "word"} <= set(manifest["tower"]["probes"])
    assert {"context_lookup_auc", "ocr_copy_rate", "option_letter_accuracy"} <= set(manifest["language_model"]["probes"])
    assert manifest["hardware"]["threads"] >= 1 and "reproducible" in manifest


def test_a_rebuild_with_the_same_seed_reproduces_the_files(built, tmp_path):
    from mobilevlm.cli import main

    assert main(["demo", "bases", "--fast", "--out", str(tmp_path / "again")]) == 0
    assert shipped.verify(tmp_path / "again")["files"] == shipped.verify(built)["files"]


def test_a_changed_or_missing_file_fails_verification(built, tmp_path):
    from mobilevlm.errors import MobileVLMError

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / "mobilellama-tiny" / "config.json").write_text("{}")
    with pytest.raises(MobileVLMError, match="mobilellama-tiny/config.json"):
        shipped.verify(copy)
    with pytest.raises(MobileVLMError, match="no manifest.json"):
        shipped.verify(tmp_path / "nothing")


def test_the_bases_corpus_holds_no_held_out_scene():
    material = shipped.corpus(shipped.FAST_SETTINGS)
    assert material["scenes"] and not any(scene.held_out for scene in material["scenes"])


SHIPPED_MISSING = not (shipped.SHIPPED / shipped.MANIFEST).is_file()


@pytest.mark.skipif(SHIPPED_MISSING, reason="the package ships no demo bases yet")
def test_shipped_bases_match_their_manifest_and_load_as_real_checkpoints():
    from transformers import CLIPVisionModel

    from mobilevlm.model.loading import load_pretrained_model
    from mobilevlm.tokenizer import load_tokenizer

    manifest = shipped.verify()
    size = sum(path.stat().st_size for path in shipped.SHIPPED.rglob("*") if path.is_file())
    assert size <= 30 * 2**20
    tower = CLIPVisionModel.from_pretrained(shipped.SHIPPED / shipped.TOWER_DIR)
    assert tower.config.image_size // tower.config.patch_size == 24  # the official grid, for llama.cpp
    assert sum(p.numel() for p in tower.parameters()) == manifest["tower"]["parameters"]
    tokenizer, model, image_processor, _ = load_pretrained_model(shipped.SHIPPED / shipped.LLM_DIR)
    assert image_processor is None and model.config.vocab_size == len(tokenizer)
    assert len(load_tokenizer(shipped.SHIPPED / shipped.LLM_DIR)) == len(tokenizer)
    assert manifest["language_model"]["probes"]["context_lookup_auc"] > 0.9


@pytest.mark.slow
@pytest.mark.skipif(SHIPPED_MISSING, reason="the package ships no demo bases yet")
def test_a_built_wheel_carries_the_shipped_bases(tmp_path):
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(root)], check=True)
    wheel = next(tmp_path.glob("mobilevlm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mobilevlm/demo/assets/{name}" for name in [shipped.MANIFEST, *shipped.verify()["files"]]}
    assert expected <= names, sorted(expected - names)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    scenes = T.training_scenes(0, 60)
    names = [f"{i}.png" for i in range(60)]
    samples = T.caption_samples(scenes, names, 0) + T.instruction_samples(scenes, names, 0)
    bases.train_tokenizer(T.corpus_lines(samples), root / "tokenizer", 400)
    tower = bases.pretrain_vision_tower(scenes, root / "tokenizer", root / "clip", 0, steps=2, batch_size=4,
                                        size=TINY_TOWER, log=lambda m: None, patch_weight=1.0)
    llm = bases.pretrain_language_model(T.reading_samples(scenes, 0, 60), root / "tokenizer", root / "llm", 0, steps=40,
                                        batch_size=8, size=TINY_LLM, log=lambda m: None)
    return root, tower, llm


TINY_TOWER = bases.TowerSize(hidden=16, layers=3, heads=2, text_hidden=16, text_layers=1)
TINY_LLM = bases.LlmSize(hidden=32, layers=2, heads=2, intermediate=64, max_positions=256)


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
    scores = [probes.context_lookup_auc(_Oracle(tokenizer, sign), tokenizer, 0, scenes=8) for sign in (1.0, -1.0, 0.0)]
    assert scores == [1.0, 0.0, 0.5]
