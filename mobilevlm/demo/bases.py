"""The three pre-trained parts the demo's MobileVLM starts from, made here because nothing can be downloaded.

- a LLaMA-style SentencePiece tokenizer trained on the generated corpus;
- a tiny CLIP vision tower trained contrastively against the scene captions (a CLIPModel with a small text
  tower, as CLIP itself), saved as a CLIPVisionModel directory with its preprocessor config;
- a tiny MobileLLaMA trained on the generated text in the chat template (standing in for MobileLLaMA-Chat),
  saved as a LLaMA checkpoint directory with the tokenizer.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mobilevlm.demo.scenes import COLORS, IMAGE_SIZE, SHAPES, SIZES, WORDS, Scene, caption, patch_labels, regions, render
from mobilevlm.processing import save_clip_preprocessor_config

Log = Callable[[str], None]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# 4-pixel patches on 96-pixel images: the official 24x24 grid, which llama.cpp's LDP / LDPv2 graphs hard-code.
PATCH = 4
# The language model's context lookup appears suddenly or not at all; this rate gave it most reliably
# (docs/notes/demo.md).
LLM_LR = 1.5e-3


@dataclass(frozen=True)
class TowerSize:
    hidden: int = 48
    layers: int = 3  # the VLM uses hidden_states[-2], i.e. runs only the first two
    heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2


@dataclass(frozen=True)
class LlmSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 352
    max_positions: int = 512
    # Pre-training loss = next-token loss on every token + this times the loss on the assistant's answers alone:
    # the answers are a small share of the tokens, and the lookup they need came with neither weighting alone.
    answer_weight: float = 1.0
    # Weights drawn with std ~1/sqrt(hidden) instead of LLaMA's 0.02: sharper initial attention for a narrow model.
    init_std: float = 0.08


def _chat_lines() -> list[str]:
    from mobilevlm.conversation import get_conv_template

    conv = get_conv_template("v1")
    return [conv.system, f"{conv.roles[0]}: {conv.roles[1]}:"]


def train_tokenizer(lines: list[str], out_dir: Path, vocab_size: int) -> Path:
    """tokenizer.model + tokenizer_config.json in `out_dir`, trained on the corpus plus the chat template text."""
    from mobilevlm.tokenizer import save_tokenizer_files, train_sentencepiece

    corpus = lines + _chat_lines() * max(1, len(lines) // 50)
    path = train_sentencepiece(corpus, vocab_size, Path(out_dir) / "tokenizer.model")
    save_tokenizer_files(out_dir)
    return path


def _optimizer_step(optimizer, loss, step: int, steps: int, lr: float) -> float:
    """One update on the warm-up + cosine schedule both base models use; returns the loss value."""
    for group in optimizer.param_groups:
        group["lr"] = _cosine_lr(step, steps, lr, max(1, steps // 10))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _pixels(scenes: list[Scene]) -> torch.Tensor:
    # Same arithmetic as the saved CLIP processor on a 96-pixel square image (no resize, no crop needed).
    data = torch.stack([torch.frombuffer(bytearray(render(s).tobytes()), dtype=torch.uint8) for s in scenes])
    data = data.view(len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2).float() / 255
    return (data - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _clip_model(vocab_size: int, size: TowerSize, max_text: int):
    from transformers import CLIPConfig, CLIPModel

    vision = dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=size.hidden, intermediate_size=4 * size.hidden,
                  num_hidden_layers=size.layers, num_attention_heads=size.heads, hidden_act="quick_gelu")
    # Text ids are SentencePiece ids plus one extra id used as end-of-text (CLIP pools at the first EOS; the
    # SentencePiece EOS id 2 would select HF's legacy argmax pooling instead).
    text = dict(vocab_size=vocab_size + 1, hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
                num_hidden_layers=size.text_layers, num_attention_heads=4, max_position_embeddings=max_text,
                eos_token_id=vocab_size, pad_token_id=vocab_size, bos_token_id=1, hidden_act="quick_gelu")
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=size.hidden)
    config._attn_implementation = "sdpa"
    return CLIPModel(config)


def _encode_texts(sp, texts: list[str], eot: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [sp.encode(text)[:63] + [eot] for text in texts]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(texts), width), eot)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _soft_clip_loss(image_side: torch.Tensor, text_side: torch.Tensor, texts: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where pairs with the same text are all positives (generated captions can repeat)."""
    logits = scale * F.normalize(image_side, dim=-1) @ F.normalize(text_side, dim=-1).t()
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float, device=logits.device)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _region_features(patches: torch.Tensor, boxes: list[tuple[int, tuple]]) -> torch.Tensor:
    """Mean patch feature inside each (image index, pixel box)."""
    grid = patches.shape[1]
    side = IMAGE_SIZE // grid
    feats = []
    for image, (x0, y0, x1, y1) in boxes:
        c0, r0 = max(0, x0 // side), max(0, y0 // side)
        c1, r1 = min(grid, -(-x1 // side)), min(grid, -(-y1 // side))
        feats.append(patches[image, r0:r1, c0:c1].mean(dim=(0, 1)))
    return torch.stack(feats)


def _patch_targets(scenes: list[Scene], device: str) -> dict[str, torch.Tensor]:
    labels = [patch_labels(scene) for scene in scenes]
    return {name: torch.from_numpy(np.stack([item[name] for item in labels])).to(device) for name in labels[0]}


def _patch_heads(hidden: int) -> torch.nn.ModuleDict:
    """Linear read-outs of the patch tokens the VLM takes: what each patch shows (`scenes.patch_labels`)."""
    classes = {"color": len(COLORS) + 1, "shape": len(SHAPES), "size": len(SIZES), "word": len(WORDS)}
    return torch.nn.ModuleDict({name: torch.nn.Linear(hidden, n) for name, n in classes.items()})


def _patch_loss(heads: torch.nn.ModuleDict, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour (background included) on every patch and on the covered ones; shape, size and word on the patches
    that show one. Linear heads on the tokens themselves, so every patch of a shape says which shape it is as
    plainly as its colour, and a word's patches name the word."""
    covered = targets["color"] > 0
    color_logits = heads["color"](tokens)
    loss = F.cross_entropy(color_logits.flatten(0, 2), targets["color"].flatten())
    if covered.any():
        loss = loss + F.cross_entropy(color_logits[covered], targets["color"][covered])
    for name in ("shape", "size", "word"):
        shown = targets[name] > 0
        if shown.any():
            loss = loss + F.cross_entropy(heads[name](tokens[shown]), targets[name][shown] - 1)
    return loss


def pretrain_vision_tower(scenes: list[Scene], tokenizer_dir: Path, out_dir: Path, seed: int, steps: int,
                          batch_size: int = 32, lr: float = 2e-3, size: TowerSize = TowerSize(), log: Log = print,
                          device: str = "cpu", patch_weight: float = 0.0) -> dict:
    """CLIP training at two levels: whole image vs caption (CLS token, as CLIP), and each object's patch
    region vs its phrase at the layer the VLM reads (dense region-phrase pairs make a tiny tower learn the
    attributes in a minute instead of hours); with `patch_weight` > 0 also per-patch read-outs of colour, shape,
    size and word at that layer (`_patch_loss`), dropped when the tower is saved."""
    import sentencepiece as spm
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    eot = sp.get_piece_size()
    model = _clip_model(eot, size, 64).to(device)
    heads = _patch_heads(size.hidden).to(device)
    parameters = list(model.parameters()) + (list(heads.parameters()) if patch_weight else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    rng = random.Random(f"{seed}:clip")
    grid = IMAGE_SIZE // PATCH
    start, losses = time.time(), []
    for step in range(steps):
        batch = [scenes[i] for i in rng.sample(range(len(scenes)), batch_size)]
        vision = model.vision_model(pixel_values=_pixels(batch).to(device), output_hidden_states=True)
        image_embeds = model.visual_projection(vision.pooler_output)
        captions = [caption(s) for s in batch]
        caption_embeds = model.text_projection(model.text_model(*_encode_texts(sp, captions, eot, device)).pooler_output)
        selected = vision.hidden_states[-2][:, 1:].reshape(batch_size, grid, grid, -1)
        pairs = [(i, phrase, box) for i, s in enumerate(batch) for phrase, box in regions(s)]
        region_embeds = model.visual_projection(model.vision_model.post_layernorm(
            _region_features(selected, [(i, box) for i, _, box in pairs])))
        phrases = [phrase for _, phrase, _ in pairs]
        phrase_embeds = model.text_projection(model.text_model(*_encode_texts(sp, phrases, eot, device)).pooler_output)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = _soft_clip_loss(image_embeds, caption_embeds, captions, scale) + _soft_clip_loss(region_embeds, phrase_embeds, phrases, scale)
        if patch_weight:
            loss = loss + patch_weight * _patch_loss(heads, selected, _patch_targets(batch, device))
        losses.append(_optimizer_step(optimizer, loss, step, steps, lr))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"clip step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} ({time.time() - start:.0f}s)")
    tower = CLIPVisionModel(model.config.vision_config)
    tower.load_state_dict(model.vision_model.cpu().state_dict())
    out_dir = Path(out_dir)
    tower.save_pretrained(out_dir)
    save_clip_preprocessor_config(out_dir, IMAGE_SIZE)
    return {"steps": steps, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.time() - start}


def pretrain_language_model(samples: list[dict], tokenizer_dir: Path, out_dir: Path, seed: int, steps: int,
                            batch_size: int = 16, lr: float = LLM_LR, size: LlmSize = LlmSize(), log: Log = print,
                            device: str = "cpu") -> dict:
    """Next-token training of a tiny LLaMA on text-only conversations in the vicuna-v1 chat template (the
    stand-in for MobileLLaMA-Chat, answers weighted up: `LlmSize.answer_weight`); saved with its tokenizer as a
    LLaMA checkpoint. Returns its losses and time (`probes` measures what it learned)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobilevlm.tokenizer import load_tokenizer, save_tokenizer_files
    from mobilevlm.train.preprocess import preprocess

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    encoded = [preprocess("v1", sample["conversations"], tokenizer, False, size.max_positions) for sample in samples]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
                         max_position_embeddings=size.max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=size.init_std)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(f"{seed}:llm")
    start, losses = time.time(), []
    for step in range(steps):
        # Random batches: batches grouped by length never learned the lookup (docs/notes/demo.md).
        batch = [encoded[i] for i in rng.sample(range(len(encoded)), batch_size)]
        width = max(len(item.input_ids) for item in batch)
        ids = torch.zeros((batch_size, width), dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        answers = torch.full((batch_size, width), -100)
        for row, item in enumerate(batch):
            ids[row, : len(item.input_ids)] = item.input_ids
            mask[row, : len(item.input_ids)] = 1
            answers[row, : len(item.labels)] = item.labels
        ids, mask, answers = ids.to(device), mask.to(device), answers.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].flatten(0, 1)
        answer_loss = F.cross_entropy(logits, answers[:, 1:].flatten(), reduction="sum") / answers.ne(-100).sum().clamp(min=1)
        targets = ids.masked_fill(mask == 0, -100)[:, 1:].flatten()
        loss = F.cross_entropy(logits, targets) + size.answer_weight * answer_loss
        losses.append(_optimizer_step(optimizer, loss, step, steps, lr))
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"llm step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} ({time.time() - start:.0f}s)")
    out_dir = Path(out_dir)
    model.cpu().save_pretrained(out_dir)
    (out_dir / "tokenizer.model").write_bytes((Path(tokenizer_dir) / "tokenizer.model").read_bytes())
    save_tokenizer_files(out_dir)
    return {"steps": steps, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.time() - start}
