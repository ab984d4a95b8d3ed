"""`mobilevlm train` / `pipeline` verbs, recipes and argument translation."""
import pytest

from mobilevlm.cli import main
from mobilevlm.train.arguments import parse_arguments, resolve_deepspeed_config
from mobilevlm.train.pipeline import parse_tasks, stage_argv
from mobilevlm.train.recipes import RECIPES, get_recipe, sft_flags
from mobilevlm.errors import MobileVLMError


def test_original_run_sh_flags_parse_one_to_one(tmp_path):
    model_args, data_args, training_args = parse_arguments([
        "--model_name_or_path", "m", "--version", "plain",
        "--data_path", "d.json", "--image_folder", "img", "--vision_tower", "openai/clip-vit-large-patch14-336",
        "--vision_tower_type", "clip", "--mm_projector_type", "ldpnetv2", "--mm_projector_lr", "1e-3",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "square", "--bf16", "False", "--output_dir", str(tmp_path), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "24000", "--save_total_limit", "1", "--learning_rate", "2e-5",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--tf32", "True", "--model_max_length", "2048", "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "4", "--lazy_preprocess", "True", "--report_to", "none",
        "--group_by_modality_length", "False", "--lora_enable", "False", "--lora_r", "128", "--lora_alpha", "256"])
    assert model_args.mm_projector_type == "ldpnetv2" and model_args.mm_vision_select_layer == -2
    assert training_args.mm_projector_lr == 1e-3 and training_args.model_max_length == 2048
    assert training_args.warmup_steps == 0.03 and training_args.eval_strategy == "no"
    assert data_args.image_aspect_ratio == "square" and training_args.tf32 is None  # no GPU here


def without_deepspeed(argv):
    if "--deepspeed" not in argv:
        return argv
    at = argv.index("--deepspeed")
    return argv[:at] + argv[at + 2:]


def test_deepspeed_flag_needs_the_package(tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    with pytest.raises(MobileVLMError, match="pip install deepspeed"):
        parse_arguments(["--deepspeed", "scripts/deepspeed/zero2.json", "--output_dir", str(tmp_path)])


def test_shipped_launcher_configs():
    import json

    for name in ("zero2", "zero3", "fsdp_llama"):
        assert json.loads(open(resolve_deepspeed_config(name)).read())
    with pytest.raises(MobileVLMError, match="no such file"):
        resolve_deepspeed_config("zero9")


def test_recipes_follow_reference_section_7():
    v1, v2 = get_recipe("mobilevlm_1.7b"), get_recipe("mobilevlm_v2_3b")
    assert v1.stage_flags("pretrain")["tune_mm_mlp_adapter"] and v1.stage_flags("pretrain")["learning_rate"] == 1e-3
    assert v1.stage_flags("finetune")["learning_rate"] == 2e-5 and get_recipe("mobilevlm_3b").finetune["learning_rate"] == 4e-5
    assert v2.stage_flags("pretrain")["mm_projector_lr"] == 1e-3 and v2.stage_flags("pretrain")["learning_rate"] == 2e-5
    assert v2.stage_flags("finetune")["learning_rate"] == 4e-5 and v2.stage_flags("finetune")["deepspeed"] == "zero3"
    assert v2.stage_flags("finetune.lora")["lora_r"] == 128 and v2.stage_flags("finetune.lora")["lora_alpha"] == 256
    assert {"tiny_v1", "tiny_v2"} <= set(RECIPES) and sft_flags("mobilellama_2.7b_sft")["learning_rate"] == 3e-5


def test_stage_argv_parses(tmp_path):
    for recipe in RECIPES:
        for stage in ("pretrain", "finetune", "finetune.lora"):
            argv = stage_argv(recipe, stage, "llm", "clip", "d.json", "img", str(tmp_path / stage), str(tmp_path / "pre"))
            assert ("--deepspeed" in argv) == recipe.startswith("mobilevlm")
            model_args, _, training_args = parse_arguments(without_deepspeed(argv))
            if stage != "pretrain" and not get_recipe(recipe).finetune_from_projector:
                assert model_args.model_name_or_path == str(tmp_path / "pre")
            assert training_args.output_dir == str(tmp_path / stage)


def test_parse_tasks():
    assert parse_tasks("pretrain-finetune-test") == ["pretrain", "finetune", "test"]
    with pytest.raises(MobileVLMError):
        parse_tasks("pretrain-bake")


def test_pipeline_print_commands(capsys, tmp_path):
    assert main(["pipeline", "mobilevlm_1.7b", "pretrain-finetune", "llm", "clip", "--output-dir", str(tmp_path),
                 "--pretrain-data", "p.json", "--finetune-data", "f.json", "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "--tune_mm_mlp_adapter True" in lines[0]
    assert "--pretrain_mm_mlp_adapter" in lines[1] and "mm_projector.bin" in lines[1]


def test_train_cli_reports_data_errors(tmp_path, capsys):
    from mobilevlm.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m", preset="tiny_llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a1", "conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}\n')
    code = main(["train", "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir",
                 str(tmp_path / "o"), "--use_cpu", "True", "--report_to", "none"])
    assert code == 1
    err = capsys.readouterr().err
    assert "d.jsonl" in err and "'a1'" in err
