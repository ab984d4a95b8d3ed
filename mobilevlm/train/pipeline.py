"""`run_pipeline`: the original `run.sh ARCH pretrain-finetune-test LANGUAGE_MODEL VISION_MODEL` in one call.

Stages run in this process one after the other (for multi-GPU runs, launch each stage with torchrun /
deepspeed and `python -m mobilevlm.train`, using `stage_argv` to get its flags). Outputs go to
`<output_dir>/pretrain`, `<output_dir>/finetune` (or `finetune.lora` + `finetune.lora.merged`) and
`<output_dir>/test`; a stage whose output folder already holds a finished model is not run again.
"""
from __future__ import annotations

import logging
from pathlib import Path

from mobilevlm.errors import MobileVLMError
from mobilevlm.train.recipes import get_recipe, to_argv

logger = logging.getLogger(__name__)

TASKS = ("pretrain", "finetune", "finetune.lora", "test")


def parse_tasks(tasks: str) -> list[str]:
    chosen = [t for t in tasks.split("-") if t]
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen:
        raise MobileVLMError(f"unknown task(s) {unknown or tasks!r}; join {', '.join(TASKS)} with '-'")
    return chosen


def _finished(out: Path) -> bool:
    return (out / "config.json").is_file() and ((out / "model.safetensors").is_file()
                                               or (out / "model.safetensors.index.json").is_file()
                                               or (out / "adapter_config.json").is_file())


def stage_argv(recipe_name: str, stage: str, language_model: str, vision_model: str, data_path: str,
               image_folder: str, output_dir: str, pretrain_dir: str | None = None, extra: list[str] = ()) -> list[str]:
    """The full flag list of one stage of a recipe (what the original run.sh passes), plus `extra` flags."""
    recipe = get_recipe(recipe_name)
    flags = recipe.stage_flags(stage)
    paths = {"data_path": data_path, "image_folder": image_folder, "output_dir": output_dir}
    if stage == "pretrain":
        paths.update(model_name_or_path=language_model, vision_tower=vision_model)
    elif recipe.finetune_from_projector:
        if pretrain_dir is None:
            raise MobileVLMError(f"{recipe_name} {stage} needs the stage-I output (its mm_projector.bin)")
        paths.update(model_name_or_path=language_model, vision_tower=vision_model,
                     pretrain_mm_mlp_adapter=str(Path(pretrain_dir) / "mm_projector.bin"))
    else:
        if pretrain_dir is None:
            raise MobileVLMError(f"{recipe_name} {stage} starts from the stage-I output folder: give it")
        paths.update(model_name_or_path=pretrain_dir)
    return to_argv({**flags, **paths}) + list(extra)


def run_pipeline(recipe: str, tasks: str, language_model: str, vision_model: str, output_dir: str,
                 pretrain_data: str | None = None, pretrain_images: str | None = None,
                 finetune_data: str | None = None, finetune_images: str | None = None,
                 eval_data: str | None = None, benchmarks: str | None = None, eval_limit: int | None = None,
                 pretrain_args: list[str] = (), finetune_args: list[str] = (), callbacks=None) -> dict:
    """Run the chosen tasks of a recipe; returns {"pretrain": dir, "finetune": dir, "test": results, ...}.

    `pretrain_args` / `finetune_args` are extra flags appended to the stage's (later flags win), e.g.
    `["--num_train_epochs", "2"]`. "test" evaluates the last trained model with mobilevlm.eval."""
    from mobilevlm.train.train import run_training

    chosen = parse_tasks(tasks)
    out = Path(output_dir)
    results: dict = {}
    pretrain_dir = out / "pretrain"
    model_dir = None
    if "pretrain" in chosen:
        if not pretrain_data:
            raise MobileVLMError("the pretrain task needs pretrain_data (a LLaVA-format JSON)")
        if not _finished(pretrain_dir):
            run_training(stage_argv(recipe, "pretrain", language_model, vision_model, pretrain_data,
                                    pretrain_images, str(pretrain_dir), extra=pretrain_args), callbacks=callbacks)
        results["pretrain"] = model_dir = str(pretrain_dir)
    for stage in ("finetune", "finetune.lora"):
        if stage not in chosen:
            continue
        if not finetune_data:
            raise MobileVLMError(f"the {stage} task needs finetune_data (a LLaVA-format JSON)")
        stage_dir = out / stage
        if not _finished(stage_dir):
            run_training(stage_argv(recipe, stage, language_model, vision_model, finetune_data, finetune_images,
                                    str(stage_dir), str(pretrain_dir), extra=finetune_args), callbacks=callbacks)
        model_dir = str(stage_dir)
        if stage == "finetune.lora":
            from mobilevlm.train.lora import merge_lora

            merged = out / "finetune.lora.merged"
            if not _finished(merged):
                base = language_model if get_recipe(recipe).finetune_from_projector else str(pretrain_dir)
                merge_lora(base, str(stage_dir), str(merged))
            model_dir = str(merged)
        results[stage] = model_dir
    if "test" in chosen:
        if model_dir is None:
            raise MobileVLMError("the test task evaluates the model trained by this pipeline: add finetune or pretrain")
        if not eval_data:
            raise MobileVLMError("the test task needs eval_data (the benchmark data folder)")
        from mobilevlm.eval.evaluate import run_evaluation

        kwargs = {"benchmarks": benchmarks} if benchmarks else {}
        results["test"] = run_evaluation(model_dir, eval_data, out_dir=out / "test", limit=eval_limit, **kwargs)
    return results
