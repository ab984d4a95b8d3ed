"""Shared fixtures: tiny official-layout checkpoints written once per test session (no downloads anywhere)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores are shared with other work; tiny models gain nothing from more threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_v2_dir(tmp_path_factory) -> Path:
    """A MobileVLM V2-layout (ldpnetv2) tiny checkpoint: config.json, model.safetensors, tokenizer, processor."""
    from mobilevlm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), preset="tiny_v2", seed=0)


@pytest.fixture(scope="session")
def tiny_v1_bin_dir(tmp_path_factory) -> Path:
    """A MobileVLM V1-layout (ldpnet) tiny checkpoint as the original saved it: pytorch_model.bin with inv_freq."""
    from mobilevlm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v1"), preset="tiny_v1", seed=1, weights="bin")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A text-only MobileLLaMA tiny checkpoint (no vision tower, no projector)."""
    from mobilevlm.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_text"), preset="tiny_llama", seed=2)


@pytest.fixture(scope="session")
def sp_model_path(tiny_v2_dir) -> Path:
    """The LLaMA-style SentencePiece model trained for the tiny checkpoints."""
    return tiny_v2_dir / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_v2_dir):
    """A Pipeline on the tiny V2 checkpoint whose lm_head never prefers byte-fallback pieces, so answers are text."""
    import torch

    from mobilevlm.generation import Pipeline

    pipe = Pipeline.from_pretrained(tiny_v2_dir)
    with torch.no_grad():
        pipe.model.lm_head.weight[3:259] = 0  # ids 3..258 are <0x00>..<0xFF>
    return pipe
