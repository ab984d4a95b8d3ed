"""`VLMTrainer`: transformers' Trainer plus what the MobileVLM recipes need.

- a separate learning rate for the projector (`--mm_projector_lr`, V2 stage I), in the original's four groups;
- the `group_by_modality_length` sampler, and `--train_sampling_strategy group_by_length` fed the dataset's
  word counts (the Trainer would otherwise tokenize every sample, loading its image, to learn its length);
- tokenization mismatches counted per sample id, and the run stopped once they exceed the budget;
- checkpoints written atomically: into a staging folder first, renamed into place when complete, so a run
  killed while saving never leaves a half-written `checkpoint-N` for the resume to pick up;
- every save (checkpoints and the final model) in the official layout: config.json, safetensors, tokenizer
  files, preprocessor config, and `mm_projector.bin` when only the projector trains.
All distributed work (DDP, DeepSpeed, FSDP) is the Trainer's and accelerate's.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mobilevlm.errors import DataError

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"


def projector_state(model) -> dict[str, torch.Tensor]:
    """The original's stage-I `mm_projector.bin`: the projector weights under their full key names."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "mm_projector" in k}


class VLMTrainer(Trainer):
    def __init__(self, *args, tokenizer=None, image_processor=None, mismatch_budget: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.mm_tokenizer = tokenizer
        self.image_processor = image_processor
        self.mismatch_budget = mismatch_budget
        self.mismatched: dict[str, str] = {}
        self._staging: str | None = None

    # ---- optimizer and sampler -------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        lr = self.args.mm_projector_lr
        if self.optimizer is not None or lr is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {(d, p): [] for d in (True, False) for p in (False, True)}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups[(name in decay, "mm_projector" in name)].append(param)
        param_groups = []
        for (is_decay, is_projector), params in groups.items():
            if params:
                group = {"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0}
                if is_projector:
                    group["lr"] = lr
                param_groups.append(group)
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "modality_lengths"):
                from transformers.trainer_pt_utils import LengthGroupedSampler

                # With one process and no accumulation the original's sampler groups nothing (its mega-batch is
                # one batch): a third of a random batch of the demo's conversations is padding.
                return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=[abs(n) for n in dataset.modality_lengths])
            return super()._get_train_sampler(train_dataset)
        from mobilevlm.train.collator import ModalityLengthGroupedSampler

        return ModalityLengthGroupedSampler(dataset.modality_lengths, self.args.train_batch_size,
                                            self.args.world_size * self.args.gradient_accumulation_steps,
                                            self.args.seed)

    # ---- mismatch accounting ---------------------------------------------------------------------------
    def _record_mismatches(self, inputs: dict) -> None:
        sample_ids = inputs.pop("sample_ids", None) or []
        reasons = inputs.pop("mismatches", None) or []
        for sample_id, reason in zip(sample_ids, reasons):
            if reason and sample_id not in self.mismatched:
                self.mismatched[sample_id] = reason
                logger.warning("tokenization mismatch in sample %r: %s (its labels are all ignored)", sample_id, reason)
        if len(self.mismatched) > self.mismatch_budget:
            listing = ", ".join(repr(s) for s in list(self.mismatched)[:10])
            raise DataError(
                f"{len(self.mismatched)} samples have label masks that do not line up with their tokens "
                f"(more than the {self.mismatch_budget} allowed by --max_mismatch_ratio): {listing}. "
                "Check --version against the data and the tokenizer."
            )

    def training_step(self, model, inputs, *args, **kwargs):
        self._record_mismatches(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop("sample_ids", None)
        inputs.pop("mismatches", None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    # ---- saving --------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = os.path.join(run_dir, STAGING_DIR)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank has written its part (optimizer shards, RNG state)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(run_dir, STAGING_DIR, name), final)
            shutil.rmtree(os.path.join(run_dir, STAGING_DIR), ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = True  # the original saves use_cache True; training runs without the cache
        try:
            super()._save(output_dir, state_dict)
        finally:
            if config is not None:
                config.use_cache = False
        if not self.args.should_save:
            return
        self.write_extras(Path(output_dir), model, state_dict)

    def write_extras(self, out: Path, model, state_dict=None) -> None:
        """Tokenizer and preprocessor files, and the projector alone when it is what this stage trains."""
        from mobilevlm.tokenizer import save_tokenizer_files
        from mobilevlm.train.builder import write_preprocessor_config

        if self.mm_tokenizer is not None:
            save_tokenizer_files(out, self.mm_tokenizer.vocab_file)
        if self.image_processor is not None:
            write_preprocessor_config(self.image_processor, out)
        base = getattr(model, "get_base_model", lambda: model)()
        if getattr(base.config, "tune_mm_mlp_adapter", False):
            torch.save(projector_state(base), out / "mm_projector.bin")
