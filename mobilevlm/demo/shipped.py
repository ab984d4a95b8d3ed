"""The demo's pre-trained bases: how they are built (`build_bases`, the `mobilevlm demo bases` verb), where the
shipped ones live, and their manifest.

As MobileVLM starts from a pre-trained MobileLLaMA and a pre-trained CLIP ViT, the demo starts from small bases
of its own: a SentencePiece tokenizer, a tiny CLIP vision tower and a tiny MobileLLaMA, trained by this package's
code on generated text and images (held-out scenes excluded), shipped inside the package, so that the demo
spends its minutes on stage I and stage II only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from mobilevlm.demo import bases, probes, trainsets
from mobilevlm.errors import MobileVLMError

Log = Callable[[str], None]
SHIPPED = Path(__file__).parent / "assets"
TOWER_DIR, LLM_DIR, MANIFEST = "clip-vit-tiny-96", "mobilellama-tiny", "manifest.json"


@dataclass(frozen=True)
class BaseSettings:
    seed: int = 0
    corpus_scenes: int = 20000
    word_fraction: float = 0.25
    vocab_size: int = 1000
    clip_steps: int = 600
    clip_batch: int = 32
    clip_lr: float = 2e-3
    # The per-patch read-outs make shape and word as readable from the tokens as colour (`bases._patch_loss`).
    patch_weight: float = 1.0
    reading_samples: int = 40000
    llm_steps: int = 3000
    llm_batch: int = 16
    llm_lr: float = bases.LLM_LR
    tower: bases.TowerSize = field(default_factory=bases.TowerSize)
    llm: bases.LlmSize = field(default_factory=bases.LlmSize)


SHIPPED_SETTINGS = BaseSettings()
# CI-sized: proves the rebuild path runs and its output loads; the result is not good for anything.
FAST_SETTINGS = replace(BaseSettings(), corpus_scenes=400, vocab_size=400, clip_steps=4, clip_batch=8, reading_samples=200,
                        llm_steps=6, llm_batch=4, tower=bases.TowerSize(hidden=16, layers=3, heads=2, text_hidden=16, text_layers=1),
                        llm=bases.LlmSize(hidden=32, layers=2, heads=2, intermediate=64, max_positions=512))


def corpus(settings: BaseSettings) -> dict:
    """The bases' training material from their own stream of (never held-out) scenes: the scenes for the tower,
    the reading conversations for the language model, all text for the tokenizer."""
    scenes = trainsets.training_scenes(settings.seed, settings.corpus_scenes, settings.word_fraction, stream="bases")
    names = [f"{i}.png" for i in range(len(scenes))]
    captions = trainsets.caption_samples(scenes, names, settings.seed)
    instructions = trainsets.instruction_samples(scenes, names, settings.seed)
    reading = trainsets.reading_samples(scenes, settings.seed, settings.reading_samples)
    return {"scenes": scenes, "reading": reading, "lines": trainsets.corpus_lines(captions + instructions + reading)}


def build_bases(out: str | Path, settings: BaseSettings = SHIPPED_SETTINGS, log: Log = print, device: str = "cpu",
                command: str = "") -> dict:
    """Train tokenizer, tower and language model into `out` (`clip-vit-tiny-96/`, `mobilellama-tiny/` with the
    tokenizer), probe them and write `manifest.json`; returns the manifest."""
    import torch

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise MobileVLMError(f"--out {out}: the folder is not empty and holds no demo bases; choose a new or empty folder")
    start = time.time()
    material = corpus(settings)
    log(f"corpus: {len(material['scenes'])} scenes, {len(material['reading'])} reading conversations")
    staging = out / ".building"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer_dir = staging / "tokenizer"
    bases.train_tokenizer(material["lines"], tokenizer_dir, settings.vocab_size)
    tower = bases.pretrain_vision_tower(material["scenes"], tokenizer_dir, staging / TOWER_DIR, settings.seed,
                                        settings.clip_steps, batch_size=settings.clip_batch, lr=settings.clip_lr,
                                        size=settings.tower, log=log, device=device, patch_weight=settings.patch_weight)
    llm = bases.pretrain_language_model(material["reading"], tokenizer_dir, staging / LLM_DIR, settings.seed,
                                        settings.llm_steps, batch_size=settings.llm_batch, lr=settings.llm_lr,
                                        size=settings.llm, log=log, device=device)
    shutil.rmtree(tokenizer_dir)  # the language model's folder holds the tokenizer, as a LLaMA checkpoint does
    log("probing the bases on held-out scenes")
    manifest = {
        "built_by": command or "mobilevlm demo bases",
        "settings": asdict(settings),
        "seconds": round(time.time() - start, 1),
        "hardware": _hardware(device),
        "reproducible": "a rebuild with the same command, package versions, machine and thread count gives the same "
                        "files; another CPU or thread count gives other floating-point rounding and other files",
        "tower": {"config": _config(staging / TOWER_DIR), "parameters": _parameters(staging / TOWER_DIR),
                  "training": tower, "probes": probes.tower_probes(staging / TOWER_DIR, settings.seed)},
        "language_model": {"config": _config(staging / LLM_DIR), "parameters": _parameters(staging / LLM_DIR),
                           "training": llm, "probes": probes.language_probes(staging / LLM_DIR, settings.seed)},
        "files": file_hashes(staging),
        "torch": torch.__version__,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float) + "\n")
    for name in (TOWER_DIR, LLM_DIR, MANIFEST):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / name, target)
    staging.rmdir()
    return manifest


def file_hashes(root: Path) -> dict[str, str]:
    root = Path(root)
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST}


def verify(root: str | Path = SHIPPED) -> dict:
    """The manifest of a bases folder, after checking every file against its recorded hash."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise MobileVLMError(f"{root}: no {MANIFEST}: not a demo bases folder (build one with `mobilevlm demo bases`)")
    manifest = json.loads((root / MANIFEST).read_text())
    found = file_hashes(root)
    if found != manifest["files"]:
        changed = sorted(set(found.items()) ^ set(manifest["files"].items()))
        raise MobileVLMError(f"{root}: files differ from {MANIFEST}: {', '.join(sorted({name for name, _ in changed}))}")
    return manifest


def _config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def _hardware(device: str) -> dict:
    import torch

    from mobilevlm.fast.native import cpu_model_name

    info = {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
