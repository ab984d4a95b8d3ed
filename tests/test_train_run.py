"""End-to-end tiny training runs on CPU: stage I / II, frozen parameters, projector lr, resume, mismatches."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mobilevlm.model.loading import load_pretrained_model
from mobilevlm.train import run_training
from mobilevlm.train.synthetic import make_training_setup

COMMON = ["--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "True", "--save_strategy", "steps",
          "--save_steps", "1000", "--logging_steps", "1", "--mm_vision_select_layer", "-2", "--seed", "0",
          "--model_max_length", "128", "--lr_scheduler_type", "constant", "--disable_tqdm", "True"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("train"))


def stage1(setup, out, *extra):
    return run_training(["--model_name_or_path", str(setup.llm), "--vision_tower", str(setup.clip),
                         "--version", "plain", "--data_path", str(setup.pretrain_data), "--image_folder", str(setup.images),
                         "--output_dir", str(out), "--per_device_train_batch_size", "4", *COMMON, *extra])


def finetune(model, setup, out, *extra, callbacks=None):
    return run_training(["--model_name_or_path", str(model), "--version", "v1", "--data_path", str(setup.finetune_data),
                         "--image_folder", str(setup.images), "--image_aspect_ratio", "pad",
                         "--output_dir", str(out), "--per_device_train_batch_size", "4", *COMMON, *extra],
                        callbacks=callbacks)


def losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def v1_stage1(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("v1s1")
    stage1(setup, out, "--mm_projector_type", "ldpnet", "--tune_mm_mlp_adapter", "True", "--learning_rate", "5e-3",
           "--num_train_epochs", "5")
    return out


def test_v1_stage1_trains_projector_only_and_loss_falls(setup, v1_stage1):
    trained, llm, clip = weights(v1_stage1), weights(setup.llm), load_file(str(setup.clip / "model.safetensors"))
    for key, value in llm.items():
        assert torch.equal(trained[key], value), key  # the language model is bit-identical
    clip_keys = [k for k in trained if ".vision_tower." in k]
    assert len(clip_keys) == len(clip)
    for key in clip_keys:
        assert torch.equal(trained[key], clip[key.split("vision_tower.vision_tower.vision_model.")[1]]), key
    run = losses(v1_stage1)
    assert sum(run[-4:]) / 4 < sum(run[:4]) / 4 - 0.3, run
    projector = torch.load(v1_stage1 / "mm_projector.bin", weights_only=True)
    assert projector and all(k.startswith("model.mm_projector.") for k in projector)
    for key, value in projector.items():
        assert torch.equal(trained[key], value)
    tokenizer, model, processor, _ = load_pretrained_model(str(v1_stage1))
    assert model.config.mm_projector_type == "ldpnet" and processor is not None
    assert model.config.use_cache is True


def test_pretrain_mm_mlp_adapter_loads_stage1_projector(setup, v1_stage1):
    from mobilevlm.train.arguments import ModelArguments
    from mobilevlm.train.builder import build_model

    args = ModelArguments(model_name_or_path=str(setup.llm), vision_tower=str(setup.clip), mm_projector_type="ldpnet",
                          mm_vision_select_layer=-2, pretrain_mm_mlp_adapter=str(v1_stage1 / "mm_projector.bin"))
    model, _ = build_model(args)
    state = model.state_dict()
    for key, value in torch.load(v1_stage1 / "mm_projector.bin", weights_only=True).items():
        assert torch.equal(state[key], value)


def test_v2_stage1_projector_lr_groups_and_frozen_clip(setup, tmp_path):
    seen = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            seen["groups"] = [(g["lr"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]

    run_training(["--model_name_or_path", str(setup.llm), "--vision_tower", str(setup.clip), "--version", "plain",
                  "--data_path", str(setup.pretrain_data), "--image_folder", str(setup.images),
                  "--output_dir", str(tmp_path), "--per_device_train_batch_size", "8", "--mm_projector_type", "ldpnetv2",
                  "--learning_rate", "2e-5", "--mm_projector_lr", "1e-3", "--max_steps", "2", *COMMON],
                 callbacks=[Grab()])
    groups = seen["groups"]
    projector = [names for lr, names in groups if lr == 1e-3]
    other = [names for lr, names in groups if lr == 2e-5]
    assert projector and all(".mm_projector." in n for names in projector for n in names)
    assert other and all(".mm_projector." not in n for names in other for n in names)
    assert any("layers.0.self_attn.q_proj" in n for names in other for n in names)
    assert not any(".vision_tower." in n for _, names in groups for n in names)
    trained, llm = weights(tmp_path), weights(setup.llm)
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], llm["model.layers.0.self_attn.q_proj.weight"])
    clip = load_file(str(setup.clip / "model.safetensors"))
    for key in (k for k in trained if ".vision_tower." in k):
        assert torch.equal(trained[key], clip[key.split("vision_tower.vision_tower.vision_model.")[1]])


def test_run_killed_while_saving_resumes_to_identical_weights(setup, v1_stage1, tmp_path, monkeypatch):
    from mobilevlm.train.trainer import VLMTrainer

    flags = ["--max_steps", "6", "--save_steps", "2", "--learning_rate", "1e-3", "--group_by_modality_length", "True",
             "--lr_scheduler_type", "cosine"]
    finetune(v1_stage1, setup, tmp_path / "full", *flags)
    save_optimizer = VLMTrainer._save_optimizer_and_scheduler

    def killed_at_step_6(self, output_dir):  # the weights of checkpoint-6 are written, its trainer state is not
        save_optimizer(self, output_dir)
        if self.state.global_step == 6:
            raise KeyboardInterrupt("killed while saving")

    with monkeypatch.context() as patch:
        patch.setattr(VLMTrainer, "_save_optimizer_and_scheduler", killed_at_step_6)
        with pytest.raises(KeyboardInterrupt):
            finetune(v1_stage1, setup, tmp_path / "resumed", *flags)
    run = tmp_path / "resumed"
    assert (run / ".staging" / "checkpoint-6" / "model.safetensors").is_file()
    assert (run / "checkpoint-4").is_dir() and not (run / "checkpoint-6").exists()
    finetune(v1_stage1, setup, run, *flags)  # resumes from checkpoint-4
    full, resumed = weights(tmp_path / "full"), weights(run)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert losses(tmp_path / "full")[-2:] == losses(run)[-2:]
    assert not (run / ".staging").exists()
