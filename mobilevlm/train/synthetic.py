"""A tiny, self-contained training setup for tests and smoke runs: no downloads, seconds on a CPU.

`make_training_setup(root)` writes a text-only tiny MobileLLaMA (`llm/`), a tiny CLIP vision model (`clip/`),
coloured-shape images and two LLaVA-format data files: `pretrain.json` (plain captions) and
`finetune.jsonl` (v1 questions about the image colour, mixed with text-only chat turns).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


@dataclass
class TrainingSetup:
    root: Path
    llm: Path
    clip: Path
    images: Path
    pretrain_data: Path
    finetune_data: Path


def make_clip_dir(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mobilevlm.config import TINY_VISION_TOWER

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_TOWER)).save_pretrained(path)
    return path


def make_training_setup(root: str | os.PathLike, n_images: int = 16, seed: int = 0) -> TrainingSetup:
    from PIL import Image, ImageDraw

    from mobilevlm.testing import make_tiny_checkpoint

    root = Path(root)
    setup = TrainingSetup(root, root / "llm", root / "clip", root / "images", root / "pretrain.json",
                          root / "finetune.jsonl")
    make_tiny_checkpoint(setup.llm, preset="tiny_llama", seed=seed)
    make_clip_dir(setup.clip, seed)
    setup.images.mkdir(parents=True, exist_ok=True)
    pretrain, finetune = [], []
    names = list(COLOURS)
    for i in range(n_images):
        name = names[i % len(names)]
        image = Image.new("RGB", (96 + 8 * (i % 3), 96), (250, 250, 250))
        ImageDraw.Draw(image).rectangle((16 + i % 5, 16, 72, 72), fill=COLOURS[name])
        image.save(setup.images / f"{i:03d}.png")
        pretrain.append({"id": f"pt-{i}", "image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A {name} square."}]})
        finetune.append({"id": f"ft-{i}", "image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "What colour is the square?\n<image>"},
            {"from": "gpt", "value": name}]})
        finetune.append({"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": "Hello world! How are you today?"},
            {"from": "gpt", "value": "I am fine, thank you."}]})
    setup.pretrain_data.write_text(json.dumps(pretrain, indent=1))
    setup.finetune_data.write_text("\n".join(json.dumps(s) for s in finetune) + "\n")
    return setup
