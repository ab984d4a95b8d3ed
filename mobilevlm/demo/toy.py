"""The demo at toy size, for tests: every phase of `run_demo` in seconds (its scores mean nothing)."""
from __future__ import annotations

from dataclasses import replace

from mobilevlm.demo.pipeline import FAST


def toy_demo_settings():
    return replace(FAST, train_images=120, pretrain_samples=40, finetune_samples=60, reading_in_finetune=10,
                   eval_sizes={"gqa": 2, "sqa": 2, "textvqa": 2, "pope": 1, "mme": 1, "mmbench": 1})
