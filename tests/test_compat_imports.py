"""Every name the original's scripts, evaluation and training import, at its import path, and the model and tower
attributes its scripts use."""
from __future__ import annotations

import importlib

import pytest
import torch
from PIL import Image

# module -> names imported from it by scripts/inference.py, mobilevlm/eval/model_vqa_*.py, mobilevlm/train/train.py
ORIGINAL_IMPORTS = {
    "mobilevlm.constants": ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "DEFAULT_IMAGE_TOKEN", "DEFAULT_IMAGE_PATCH_TOKEN",
                            "DEFAULT_IM_START_TOKEN", "DEFAULT_IM_END_TOKEN", "IMAGE_PLACEHOLDER", "LOGDIR"],
    "mobilevlm.conversation": ["conv_templates", "SeparatorStyle", "default_conversation", "Conversation"],
    "mobilevlm.utils": ["disable_torch_init", "process_images", "tokenizer_image_token", "KeywordsStoppingCriteria",
                        "get_model_name_from_path", "load_image_from_base64", "expand2square"],
    "mobilevlm.model.mobilevlm": ["load_pretrained_model"],
    "mobilevlm.model.mobilellama": ["MobileLlamaForCausalLM", "MobileLlamaModel", "MobileVLMConfig"],
    "mobilevlm.model.vision_encoder": ["CLIPVisionTower", "build_vision_tower"],
    "mobilevlm.model.vision_projector": ["build_vision_projector", "LDPNetProjector", "LDPNetV2Projector", "LDPBlock",
                                         "FeatureIRLayer", "TokenDownLayer", "PosInjectLayer"],
    "mobilevlm.train.trainer": ["VLMTrainer"],
}


@pytest.mark.parametrize("module", sorted(ORIGINAL_IMPORTS))
def test_original_import_paths(module):
    loaded = importlib.import_module(module)
    assert [name for name in ORIGINAL_IMPORTS[module] if not hasattr(loaded, name)] == []


def test_names_are_this_packages_own():
    from mobilevlm import conversation, generation, processing
    from mobilevlm.model import mobilellama, mobilevlm, vision_encoder
    from mobilevlm.model.vision import CLIPVisionTower
    from mobilevlm import utils

    assert mobilellama.MobileLlamaForCausalLM is mobilevlm.MobileLlamaForCausalLM
    assert utils.process_images is processing.process_images
    assert utils.tokenizer_image_token is processing.tokenizer_image_token
    assert utils.KeywordsStoppingCriteria is generation.KeywordsStoppingCriteria
    assert vision_encoder.CLIPVisionTower is CLIPVisionTower
    assert conversation.conv_templates["v1"].get_prompt() == conversation.conv_vicuna_v1.get_prompt()


def test_get_model_name_from_path():
    from mobilevlm.utils import get_model_name_from_path

    assert get_model_name_from_path("mtgv/MobileVLM_V2-1.7B/") == "MobileVLM_V2-1.7B"
    assert get_model_name_from_path("runs/finetune/checkpoint-400") == "finetune_checkpoint-400"


def test_mmtag_templates_move_the_image_into_its_own_turn():
    from mobilevlm.conversation import conv_llava_v1_mmtag

    conv = conv_llava_v1_mmtag.copy()
    conv.append_message(conv.roles[0], ("What is it?\n<image>", Image.new("RGB", (4, 4)), "Default"))
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt().endswith(
        "</Image>. USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is it? ASSISTANT:")


def test_loader_and_tower_as_the_original_scripts_use_them(tiny_v2_dir):
    from mobilevlm.model.mobilevlm import load_pretrained_model
    from mobilevlm.model.vision_encoder import build_vision_tower
    from mobilevlm.model.vision_projector import build_vision_projector

    tokenizer, model, image_processor, context_len = load_pretrained_model(str(tiny_v2_dir), False, False)
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and context_len == 1024
    tower = model.get_vision_tower()
    assert tower is model.get_model().get_vision_tower() is model.get_model().vision_tower
    assert tower.is_loaded and tower.load_model() is None and tower.load_image_processor() is None
    assert tower.vision_tower_name == "tiny-clip-96" and tower.hidden_size == 32 and tower.num_patches == 576
    assert tower.dummy_feature.shape == (1, 32)
    image = Image.new("RGB", (50, 80), (10, 90, 200))
    assert torch.equal(tower.image_processor(image, return_tensors="pt")["pixel_values"],
                       image_processor.preprocess(image, return_tensors="pt")["pixel_values"])
    pixels = image_processor.preprocess(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels), model.get_model().mm_projector(tower(pixels)))
        built = build_vision_projector(model.config)
        built.load_state_dict(model.get_model().mm_projector.state_dict())
        torch.testing.assert_close(built(tower(pixels)), model.encode_images(pixels), rtol=0, atol=0)
    assert type(build_vision_tower(model.config)) is type(tower)


def test_generate_without_criteria_and_text_only(tiny_v2_dir):
    """The ScienceQA script passes stopping_criteria=None and images=None for a question without a picture."""
    from mobilevlm.model.mobilevlm import load_pretrained_model
    from mobilevlm.utils import tokenizer_image_token

    tokenizer, model, _, _ = load_pretrained_model(str(tiny_v2_dir))
    input_ids = tokenizer_image_token("USER: Hello ASSISTANT:", tokenizer, return_tensors="pt").unsqueeze(0)
    with torch.inference_mode():
        output_ids = model.generate(input_ids, images=None, do_sample=False, temperature=0, max_new_tokens=4,
                                    use_cache=True, stopping_criteria=None)
    assert torch.equal(output_ids[:, :input_ids.shape[1]], input_ids) and output_ids.shape[1] > input_ids.shape[1]
