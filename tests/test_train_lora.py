"""LoRA: a merged checkpoint gives the logits of base + adapter; the CLI merge verb."""
from pathlib import Path

import pytest
import torch

from mobilevlm.cli import main
from mobilevlm.model.loading import load_pretrained_model
from mobilevlm.processing import process_images, tokenizer_image_token
from mobilevlm.testing import make_tiny_checkpoint
from mobilevlm.train import run_training
from mobilevlm.train.lora import lora_target_modules
from mobilevlm.train.synthetic import make_training_setup


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    setup = make_training_setup(root / "data", n_images=8)
    base = make_tiny_checkpoint(root / "base", preset="tiny_v2", seed=3)
    out = run_training(["--model_name_or_path", str(base), "--version", "v1", "--data_path", str(setup.finetune_data),
                        "--image_folder", str(setup.images), "--image_aspect_ratio", "pad", "--output_dir", str(root / "lora"),
                        "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
                        "--per_device_train_batch_size", "4", "--max_steps", "4", "--report_to", "none",
                        "--use_cpu", "True", "--dataloader_num_workers", "0", "--model_max_length", "128",
                        "--disable_tqdm", "True"])
    assert Path(out) == root / "lora"
    return base, Path(out), setup, root


def logits(model, tokenizer, processor, setup):
    from PIL import Image

    ids = tokenizer_image_token("USER: <image>\nWhat colour is the square? ASSISTANT:", tokenizer, return_tensors="pt")[None]
    image = process_images([Image.open(setup.images / "001.png").convert("RGB")], processor, "pad")
    with torch.no_grad():
        return model(input_ids=ids, images=image).logits


def test_lora_targets_language_model_linears_only(lora_run):
    base, *_ = lora_run
    _, model, _, _ = load_pretrained_model(str(base))
    assert lora_target_modules(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_merged_checkpoint_matches_base_plus_adapter(lora_run):
    from peft import PeftModel

    base, lora_dir, setup, root = lora_run
    assert (lora_dir / "adapter_config.json").is_file() and (lora_dir / "non_lora_trainables.bin").is_file()
    merged_dir = root / "merged"
    assert main(["merge", str(base), str(lora_dir), str(merged_dir)]) == 0

    tokenizer, base_model, processor, _ = load_pretrained_model(str(base))
    reference_base = logits(base_model, tokenizer, processor, setup)
    adapted = PeftModel.from_pretrained(base_model, str(lora_dir)).eval()
    expected = logits(adapted, tokenizer, processor, setup)
    _, merged, merged_processor, _ = load_pretrained_model(str(merged_dir))
    got = logits(merged, tokenizer, merged_processor, setup)
    assert (expected - reference_base).abs().max() > 1e-3  # the adapter (and projector) did change the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())
