"""`mobilevlm train` (one stage, the original train.py flags), `mobilevlm merge` (LoRA -> checkpoint) and
`mobilevlm pipeline RECIPE TASKS LANGUAGE_MODEL VISION_MODEL` (the original run.sh)."""
from __future__ import annotations



def register(subparsers) -> None:
    train = subparsers.add_parser(
        # prefix_chars="+": every --flag is passed through untouched to the trainer's own argument parser.
        "train", help="train one stage (original train.py flags; see docs/training.md)", add_help=False,
        prefix_chars="+",
        description="All flags go to the trainer, e.g. --model_name_or_path --version --data_path --image_folder "
                    "--vision_tower --mm_projector_type --tune_mm_mlp_adapter --mm_projector_lr --output_dir ...; "
                    "`mobilevlm train --help` lists them all.")
    train.add_argument("flags", nargs="*")
    train.set_defaults(func=run_train)

    merge = subparsers.add_parser("merge", help="merge a LoRA training output into a normal checkpoint")
    merge.add_argument("base", help="the model the LoRA run started from")
    merge.add_argument("lora_dir", help="the LoRA run's output folder")
    merge.add_argument("output_dir", help="where to write the merged checkpoint")
    merge.set_defaults(func=run_merge)

    pipeline = subparsers.add_parser("pipeline", help="stage I -> stage II -> evaluation with a named recipe")
    pipeline.add_argument("recipe", help="mobilevlm_1.7b, mobilevlm_3b, mobilevlm_v2_1.7b, mobilevlm_v2_3b, tiny_v1, tiny_v2")
    pipeline.add_argument("tasks", help="tasks joined by '-': pretrain, finetune, finetune.lora, test")
    pipeline.add_argument("language_model", help="MobileLLaMA(-Chat) checkpoint directory")
    pipeline.add_argument("vision_model", help="CLIP vision model directory (or hub id)")
    pipeline.add_argument("--output-dir", required=True)
    pipeline.add_argument("--pretrain-data", help="stage-I LLaVA-format JSON / JSONL")
    pipeline.add_argument("--pretrain-images", help="stage-I image folder")
    pipeline.add_argument("--finetune-data", help="stage-II LLaVA-format JSON / JSONL")
    pipeline.add_argument("--finetune-images", help="stage-II image folder")
    pipeline.add_argument("--eval-data", help="benchmark data folder for the test task")
    pipeline.add_argument("--benchmarks", help="comma-separated benchmarks for the test task (default: all)")
    pipeline.add_argument("--eval-limit", type=int, help="questions per benchmark (smoke runs)")
    pipeline.add_argument("--pretrain-args", default="", help="extra stage-I flags, quoted, e.g. '--num_train_epochs 2'")
    pipeline.add_argument("--finetune-args", default="", help="extra stage-II flags, quoted")
    pipeline.add_argument("--print-commands", action="store_true",
                          help="print each stage's `python -m mobilevlm.train` flags (for torchrun / deepspeed) and exit")
    pipeline.set_defaults(func=run_pipeline_command)


def run_train(args) -> int:
    import logging

    from mobilevlm.train.train import train_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = [f for f in args.flags if f != "--"]
    if not flags or flags == ["--help"] or flags == ["-h"]:
        from mobilevlm.train.arguments import parse_arguments

        parse_arguments(["--help"])
    out = train_command(flags)
    print(out)
    return 0


def run_merge(args) -> int:
    from mobilevlm.train.lora import merge_lora

    print(merge_lora(args.base, args.lora_dir, args.output_dir))
    return 0


def run_pipeline_command(args) -> int:
    import json
    import logging
    import shlex

    from mobilevlm.train.pipeline import parse_tasks, run_pipeline, stage_argv

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.print_commands:
        out = args.output_dir.rstrip("/")
        for task in parse_tasks(args.tasks):
            if task == "test":
                continue
            pretrain = task == "pretrain"
            argv = stage_argv(args.recipe, task, args.language_model, args.vision_model,
                              args.pretrain_data if pretrain else args.finetune_data,
                              args.pretrain_images if pretrain else args.finetune_images,
                              f"{out}/{task}", None if pretrain else f"{out}/pretrain",
                              shlex.split(args.pretrain_args if pretrain else args.finetune_args))
            print("python -m mobilevlm.train " + shlex.join(argv))
        return 0
    results = run_pipeline(
        args.recipe, args.tasks, args.language_model, args.vision_model, args.output_dir,
        args.pretrain_data, args.pretrain_images, args.finetune_data, args.finetune_images,
        args.eval_data, args.benchmarks, args.eval_limit,
        shlex.split(args.pretrain_args), shlex.split(args.finetune_args))
    print(json.dumps({k: (v if isinstance(v, str) else v.get("row", v)) for k, v in results.items()}, indent=2))
    return 0
