"""`run_training`: one stage of MobileVLM / MobileLLaMA training, the original `train.py` on transformers' Trainer.

`run_training(["--model_name_or_path", ..., "--data_path", ...])` (or with the three argument dataclasses)
trains and returns the output folder. A folder that already holds `checkpoint-N` folders resumes from the
last one, as the original did; the output loads with `load_pretrained_model`.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from mobilevlm.errors import MobileVLMError

logger = logging.getLogger(__name__)


def _arguments(args):
    from mobilevlm.train.arguments import parse_arguments

    if args is None or isinstance(args, (list, tuple)) and all(isinstance(a, str) for a in args):
        return parse_arguments(list(args) if args is not None else None)
    model_args, data_args, training_args = args
    return model_args, data_args, training_args


def _check(model_args, data_args, training_args) -> None:
    if not data_args.data_path:
        raise MobileVLMError("--data_path is required")
    if not Path(data_args.data_path).is_file():
        raise MobileVLMError(f"--data_path {data_args.data_path}: no such file")
    if training_args.bits in (4, 8):
        raise MobileVLMError("--bits 4/8 (QLoRA) is not supported yet: use --lora_enable True in 16/32 bits")
    if model_args.tune_mm_mlp_adapter and training_args.lora_enable:
        raise MobileVLMError("--tune_mm_mlp_adapter trains the projector only; it cannot be combined with LoRA")


def run_training(args=None, callbacks=None) -> str:
    """Train one stage; returns the output directory. `args`: a list of command-line strings (original flag
    names) or a `(ModelArguments, DataArguments, TrainingArguments)` tuple. `callbacks` go to the Trainer."""
    import transformers

    from mobilevlm.tokenizer import load_tokenizer
    from mobilevlm.train.builder import build_model
    from mobilevlm.train.collator import SupervisedCollator
    from mobilevlm.train.data import LazySupervisedDataset
    from mobilevlm.train.lora import apply_lora, save_lora_extras
    from mobilevlm.train.trainer import STAGING_DIR, VLMTrainer

    model_args, data_args, training_args = _arguments(args)
    _check(model_args, data_args, training_args)
    transformers.set_seed(training_args.seed)
    out = Path(training_args.output_dir)
    if training_args.should_save and (out / STAGING_DIR).exists():
        shutil.rmtree(out / STAGING_DIR)  # an interrupted checkpoint write: never resumed from

    model, image_processor = build_model(model_args, training_args)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    tokenizer.model_max_length = training_args.model_max_length
    tokenizer.padding_side = "right"
    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    base_config = (model.get_base_model() if training_args.lora_enable else model).config
    base_config.image_aspect_ratio = data_args.image_aspect_ratio
    base_config.tokenizer_padding_side = "right"
    base_config.tokenizer_model_max_length = training_args.model_max_length

    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, model_args.version, training_args.model_max_length,
        image_folder=data_args.image_folder, image_processor=image_processor,
        image_aspect_ratio=data_args.image_aspect_ratio, skip_bad_samples=data_args.skip_bad_samples)
    if dataset.report.skipped:
        logger.warning(dataset.report.summary())
    train_set, eval_set = dataset.split(data_args.eval_data_fraction, seed=training_args.seed)
    trainer = VLMTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=SupervisedCollator(tokenizer.pad_token_id, training_args.model_max_length),
        tokenizer=tokenizer, image_processor=image_processor, callbacks=callbacks,
        mismatch_budget=math.floor(data_args.max_mismatch_ratio * len(train_set)),
    )
    if any(isinstance(callback, transformers.PrinterCallback) for callback in callbacks or ()):
        # a caller's own log printer (a PrinterCallback subclass) replaces the Trainer's raw `{'loss': ...}` lines
        for default in [cb for cb in trainer.callback_handler.callbacks if type(cb) is transformers.PrinterCallback]:
            trainer.remove_callback(default)
    resume = out.is_dir() and any(p.is_dir() for p in out.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_state()
    trainer.save_model(str(out))
    if training_args.should_save:
        if training_args.lora_enable:
            save_lora_extras(model, model_args, out)
        report = {**dataset.report.to_dict(), "tokenization_mismatches": trainer.mismatched}
        (out / "data_report.json").write_text(json.dumps(report, indent=2))
        logger.info("%s; %d tokenization mismatches", dataset.report.summary(), len(trainer.mismatched))
    return str(out)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_command(argv)
    return 0


def train_command(argv) -> str:
    """`run_training` for a process of its own (a launcher's rank, or the CLI): the process group goes down after."""
    try:
        return run_training(argv)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # Without this, a gloo rank can abort at interpreter exit ("terminate called without an active
            # exception") after the work is done, and the launcher reports the whole run as failed.
            dist.destroy_process_group()
