"""Checkpoints in the official layout (.bin with rotary buffers, safetensors, sharded) load and round-trip (§8.1)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mobilevlm
from mobilevlm.config import MobileVLMConfig
from mobilevlm.constants import IMAGE_TOKEN_INDEX as IMG
from mobilevlm.errors import CheckpointError, MobileVLMError
from mobilevlm.model import MobileLlamaForCausalLM
from mobilevlm.model.loading import load_pretrained_model
from mobilevlm.testing import make_tiny_checkpoint, make_tiny_model

IDS = torch.tensor([[1, 30, IMG, 31, 32]])
PIXELS = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))


def assert_same_weights(model, expected):
    ours, theirs = model.state_dict(), expected.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, images=PIXELS).logits


def test_safetensors_checkpoint(tiny_v2_dir):
    tokenizer, model, processor, context_len = load_pretrained_model(tiny_v2_dir)
    assert isinstance(model, MobileLlamaForCausalLM) and not model.training
    assert context_len == 1024 and model.dtype == torch.float32
    assert tokenizer("hi").input_ids[0] == 1 and processor.crop_size.height == 96
    assert_same_weights(model, make_tiny_model("tiny_v2", seed=0))
    config = json.loads((tiny_v2_dir / "config.json").read_text())
    assert config["model_type"] == "mobilevlm" and config["architectures"] == ["MobileLlamaForCausalLM"]
    for key in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
                "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio",
                "vision_tower_type", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter"):
        assert key in config, key


def test_official_bin_with_rotary_buffers(tiny_v1_bin_dir):
    stored = torch.load(tiny_v1_bin_dir / "pytorch_model.bin", weights_only=True)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in stored
    assert "model.mm_projector.model.mb_block.2.block.1.fc2.weight" in stored
    _, model, _, _ = load_pretrained_model(tiny_v1_bin_dir)
    assert_same_weights(model, make_tiny_model("tiny_v1", seed=1))
    assert model.config.mm_projector_type == "ldpnet"


@pytest.mark.parametrize("weights,index", [("safetensors", "model.safetensors.index.json"),
                                           ("bin", "pytorch_model.bin.index.json")])
def test_sharded_checkpoints(tmp_path, weights, index):
    make_tiny_checkpoint(tmp_path, preset="tiny_v2", seed=3, weights=weights, max_shard_size="200KB")
    weight_map = json.loads((tmp_path / index).read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    _, model, _, _ = load_pretrained_model(tmp_path)
    assert_same_weights(model, make_tiny_model("tiny_v2", seed=3))


def test_save_pretrained_round_trip(tmp_path, tiny_v2_dir):
    _, model, _, _ = load_pretrained_model(tiny_v2_dir)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as stored:
        keys = set(stored.keys())
    assert keys == set(model.state_dict())
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.mm_projector.peg.peg.0.bias" in keys and "lm_head.weight" in keys
    shutil.copy(tiny_v2_dir / "tokenizer.model", tmp_path)
    _, again, _, _ = load_pretrained_model(tmp_path)
    assert_same_weights(again, model)
    assert torch.equal(logits(again), logits(model))


def test_auto_classes_after_import(tiny_v2_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert mobilevlm.MobileLlamaForCausalLM is MobileLlamaForCausalLM
    assert isinstance(AutoConfig.from_pretrained(tiny_v2_dir), MobileVLMConfig)
    model = AutoModelForCausalLM.from_pretrained(tiny_v2_dir)
    assert type(model) is MobileLlamaForCausalLM
    assert_same_weights(model, make_tiny_model("tiny_v2", seed=0))


def test_lit_gpt_leftovers_are_ignored(tmp_path, tiny_v2_dir):
    shutil.copytree(tiny_v2_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    # the 3B configs' extra keys, with a head count that contradicts num_attention_heads (4 here, as 32 there)
    config.update({"_mlp_class": "LLaMAMLP", "_norm_class": "RMSNorm", "bias": False, "block_size": 2048,
                   "n_embd": 64, "n_head": 2, "n_layer": 2, "n_query_groups": 2, "name": "huggy_llama_3b",
                   "norm_eps": 1e-6, "org": "huggyllama", "padded_vocab_size": 512, "parallel_residual": False,
                   "rope_base": 10000, "rotary_percentage": 1.0, "shared_attention_norm": False})
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, model, _, _ = load_pretrained_model(tmp_path)
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 16
    assert model.config.n_head == 2  # kept, but it defines nothing
    reference = make_tiny_model("tiny_v2", seed=0)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


def test_official_mobilellama_text_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # what mtgv/MobileLLaMA-*-Base holds: model_type "llama", a plain LlamaForCausalLM, fp16 weights
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)
    reference = LlamaForCausalLM(config).eval()
    reference.half().save_pretrained(tmp_path)
    reference.float()
    shutil.copy(make_tiny_checkpoint(tmp_path / "tok", preset="tiny_llama") / "tokenizer.model", tmp_path)
    tokenizer, model, processor, context_len = load_pretrained_model(tmp_path)
    assert processor is None and not model.is_multimodal and context_len == 2048
    assert model.dtype == torch.float32  # fp16 converted on CPU
    ids = torch.tensor([tokenizer("Q: What is the largest animal?\nA:").input_ids])
    with torch.no_grad():
        expected = reference.half().float()(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_on_request(tiny_v2_dir):
    _, model, _, _ = load_pretrained_model(tiny_v2_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert logits(model).dtype == torch.bfloat16
    with pytest.raises(MobileVLMError, match="unknown dtype 'float8'"):
        load_pretrained_model(tiny_v2_dir, dtype="float8")
    with pytest.raises(MobileVLMError, match="bitsandbytes"):
        load_pretrained_model(tiny_v2_dir, load_4bit=True)


def copy_without(tiny_dir, target, *names):
    shutil.copytree(tiny_dir, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*names))
    return target


def test_missing_directory_config_or_weights(tmp_path, tiny_v2_dir):
    with pytest.raises(CheckpointError, match="nowhere: no such model directory"):
        load_pretrained_model(tmp_path / "nowhere")
    no_config = copy_without(tiny_v2_dir, tmp_path / "a", "config.json")
    with pytest.raises(CheckpointError, match=r"a: no config.json"):
        load_pretrained_model(no_config)
    no_weights = copy_without(tiny_v2_dir, tmp_path / "b", "*.safetensors")
    with pytest.raises(CheckpointError, match=r"b: no weights"):
        load_pretrained_model(no_weights)
    broken = copy_without(tiny_v2_dir, tmp_path / "c")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON"):
        load_pretrained_model(broken)


def test_hub_id_without_network(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="mtgv/MobileVLM_V2-1.7B: not a local directory.*hub failed"):
        load_pretrained_model("mtgv/MobileVLM_V2-1.7B")


def test_missing_and_wrong_shaped_weights_are_named(tmp_path, tiny_v2_dir):
    weights = load_file(tiny_v2_dir / "model.safetensors")
    missing = copy_without(tiny_v2_dir, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if k != "model.mm_projector.peg.peg.0.bias"},
              missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing weights: model\.mm_projector\.peg\.peg\.0\.bias"):
        load_pretrained_model(missing)

    wrong = copy_without(tiny_v2_dir, tmp_path / "wrong")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(weights, wrong / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wrong shapes: model\.layers\.1\.mlp\.up_proj\.weight \(100, 64\) vs \(128, 64\)"):
        load_pretrained_model(wrong)


@pytest.mark.parametrize("layout", ["vision_only", "full_clip"])
def test_vision_tower_from_local_clip_directory(tmp_path, tiny_v2_dir, layout):
    from transformers import CLIPConfig, CLIPVisionConfig

    from mobilevlm.config import TINY_VISION_TOWER

    model_dir = copy_without(tiny_v2_dir, tmp_path / "model", "preprocessor_config.json")
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    vision = CLIPVisionConfig(**TINY_VISION_TOWER)
    config = vision.to_dict() if layout == "vision_only" else CLIPConfig(vision_config=TINY_VISION_TOWER).to_dict()
    (clip_dir / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_v2_dir / "preprocessor_config.json", clip_dir)
    settings = json.loads((model_dir / "config.json").read_text())
    settings.pop("mm_vision_tower_config")
    settings["mm_vision_tower"] = str(clip_dir)  # as the original allows: a local CLIP directory
    (model_dir / "config.json").write_text(json.dumps(settings))
    _, model, processor, _ = load_pretrained_model(model_dir)
    assert processor.crop_size.height == 96
    assert_same_weights(model, make_tiny_model("tiny_v2", seed=0))


def test_unknown_vision_tower_is_named(tmp_path, tiny_v2_dir):
    model_dir = copy_without(tiny_v2_dir, tmp_path / "model")
    settings = json.loads((model_dir / "config.json").read_text())
    settings.pop("mm_vision_tower_config")
    settings["mm_vision_tower"] = "someone/siglip-so400m"
    (model_dir / "config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="mm_vision_tower 'someone/siglip-so400m'"):
        load_pretrained_model(model_dir)
