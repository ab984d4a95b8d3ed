"""The demo's recipe at toy size, for tests: every phase of `run_demo` in seconds (its scores mean nothing)."""
from __future__ import annotations

from dataclasses import replace

from mobilevlm.demo import bases
from mobilevlm.demo.pipeline import FAST


def toy_demo_settings():
    return replace(FAST, train_images=120, pretrain_samples=40, finetune_samples=60, clip_steps=2, llm_steps=4,
                   eval_sizes={"gqa": 2, "sqa": 2, "textvqa": 2, "pope": 1, "mme": 1, "mmbench": 1},
                   tower=bases.TowerSize(hidden=16, layers=3, heads=2, text_hidden=16, text_layers=1),
                   llm=bases.LlmSize(hidden=32, layers=2, heads=2, intermediate=64, max_positions=512))
