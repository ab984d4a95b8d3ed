"""What the shipped bases can do before any MobileVLM training, measured on held-out scenes.

Tower: linear probes on the patch tokens the VLM reads (the mean over an object's or a word's patches) for
colour, shape, size, position and the word. Language model: the skills the image questions need once the image
supplies the facts, measured in text: looking an object up in a "Context:" caption (AUC), copying the right OCR
token, and answering a multiple-choice question with the right letter.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from mobilevlm.demo import questions as Q
from mobilevlm.demo.scenes import (COLORS, COLUMNS, ROWS, SHAPES, SIZES, WORD_ROWS, WORDS, Scene, caption, regions,
                                   sample_shapes, sample_words)


def held_out_scenes(seed: int, n: int, sampler) -> list[Scene]:
    rng = random.Random(f"{seed}:probe")
    scenes = []
    while len(scenes) < n:
        scene = sampler(rng)
        if scene.held_out:
            scenes.append(scene)
    return scenes


@torch.no_grad()
def _region_tokens(tower, scenes: list[Scene]) -> tuple[torch.Tensor, list[tuple[Scene, int]]]:
    """Mean selected-layer patch token over every object's / word's box, and (scene, index) for each."""
    from mobilevlm.demo.bases import _pixels, _region_features

    grid = tower.config.image_size // tower.config.patch_size
    feats, owners = [], []
    for start in range(0, len(scenes), 64):
        batch = scenes[start:start + 64]
        hidden = tower(pixel_values=_pixels(batch), output_hidden_states=True).hidden_states[-2][:, 1:]
        tokens = hidden.reshape(len(batch), grid, grid, -1)
        boxes = [(i, box) for i, scene in enumerate(batch) for _, box in regions(scene)]
        feats.append(_region_features(tokens, boxes))
        owners += [(scene, k) for scene in batch for k in range(len(regions(scene)))]
    return torch.cat(feats), owners


def _probe_accuracy(train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, test_y: list[int], steps: int = 300) -> float:
    """Accuracy of a multinomial logistic regression (standardised features, light L2) on the test half."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = max(train_y + test_y) + 1
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    target = torch.tensor(train_y)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_x), target) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (probe(test_x).argmax(1) == torch.tensor(test_y)).float().mean().item()


def tower_probes(tower_dir: str | Path, seed: int = 0, images: int = 400) -> dict[str, float]:
    """{attribute: held-out accuracy %} of linear probes on the tower's tokens, with each attribute's chance."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    shapes = held_out_scenes(seed, images, sample_shapes)
    words = held_out_scenes(seed, images // 2, sample_words)
    shape_x, shape_owner = _region_tokens(tower, shapes)
    word_x, word_owner = _region_tokens(tower, words)
    objects = [scene.objects[k] for scene, k in shape_owner]
    attributes = {
        "color": [list(COLORS).index(o.color) for o in objects],
        "shape": [SHAPES.index(o.shape) for o in objects],
        "size": [list(SIZES).index(o.size) for o in objects],
        "position": [3 * o.row + o.col for o in objects],
    }
    results = {}
    half = len(objects) // 2
    for name, labels in attributes.items():
        results[name] = 100 * _probe_accuracy(shape_x[:half], labels[:half], shape_x[half:], labels[half:])
    word_labels = [WORDS.index(scene.words[k].text) for scene, k in word_owner]
    half = len(word_labels) // 2
    results["word"] = 100 * _probe_accuracy(word_x[:half], word_labels[:half], word_x[half:], word_labels[half:])
    results["chance"] = {"color": 100 / len(COLORS), "shape": 100 / len(SHAPES), "size": 100 / len(SIZES),
                         "position": 100 / (len(ROWS) * len(COLUMNS)), "word": 100 / len(WORDS)}
    return results


def _prompt(tokenizer, question: str) -> torch.Tensor:
    from mobilevlm.conversation import get_conv_template

    conv = get_conv_template("v1")
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return tokenizer(conv.get_prompt(), return_tensors="pt").input_ids


@torch.no_grad()
def _greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 6) -> str:
    ids = _prompt(tokenizer, question)
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def context_lookup_auc(model, tokenizer, seed: int, scenes: int = 60) -> float:
    """How well the language model answers "Is there a <colour> <shape>?" from a "Context:" caption: the ranking
    of logit("yes") - logit("no") against the truth (AUC; 0.5 = chance) on 3-object scenes with two present and
    two absent objects, as the POPE-style set asks. The skill the image questions need, measured in text."""
    rng = random.Random(f"{seed}:lookup-check")
    yes, no = (tokenizer(word, add_special_tokens=False).input_ids[-1] for word in ("yes", "no"))
    model.eval()
    scored = []
    with torch.no_grad():
        for scene in held_out_scenes(seed, scenes, lambda r: sample_shapes(r, count=3)):
            context = f"Context: {caption(scene, rng)}\n"
            names = [(o.name, True) for o in rng.sample(scene.objects, 2)]
            names += [(name, False) for name in Q.absent_objects(scene, rng.choice(("adversarial", "random")), rng, 2)]
            for name, present in names:
                logits = model(input_ids=_prompt(tokenizer, context + Q.short_prompt(Q.exists_question(name)))).logits[0, -1]
                scored.append((float(logits[yes] - logits[no]), present))
    positives = [score for score, present in scored if present]
    negatives = [score for score, present in scored if not present]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def ocr_copy_rate(model, tokenizer, seed: int, n: int = 60) -> float:
    """% of TextVQA-style prompts (two OCR tokens, "What word is written at the top / bottom?") answered with the
    right token: the tokens are listed in reading order, so the text alone answers it (chance 50)."""
    rng = random.Random(f"{seed}:ocr-check")
    right = 0
    for scene in held_out_scenes(seed, n, lambda r: sample_words(r, count=2)):
        word = rng.choice(scene.words)
        question = Q.ocr_prompt(f"What word is written at the {WORD_ROWS[word.row]}?", scene)
        right += _greedy_answer(model, tokenizer, question).lower().rstrip(".") == word.text
    return 100 * right / n


def option_letter_accuracy(model, tokenizer, seed: int, n: int = 60) -> float:
    """% of multiple-choice questions about a "Context:" caption answered with the right letter (2-4 options)."""
    rng = random.Random(f"{seed}:letter-check")
    right = 0
    for scene in held_out_scenes(seed, n, sample_shapes):
        qa = rng.choice(Q.short_questions(scene))
        options, answer = Q.options_for(qa, rng, rng.randint(2, 4))
        question = f"Context: {caption(scene, rng)}\n{qa.question}{Q.option_lines(options)}\n{Q.LETTER_SUFFIX}"
        right += _greedy_answer(model, tokenizer, question, max_new_tokens=2).startswith(Q.LETTERS[answer])
    return 100 * right / n


def language_probes(model_dir: str | Path, seed: int = 0) -> dict[str, float]:
    from mobilevlm.model.loading import load_pretrained_model

    tokenizer, model, _, _ = load_pretrained_model(model_dir)
    model.eval()
    return {"context_lookup_auc": context_lookup_auc(model, tokenizer, seed),
            "ocr_copy_rate": ocr_copy_rate(model, tokenizer, seed),
            "option_letter_accuracy": option_letter_accuracy(model, tokenizer, seed),
            "chance": {"context_lookup_auc": 0.5, "ocr_copy_rate": 50.0, "option_letter_accuracy": 100 * (1 / 2 + 1 / 3 + 1 / 4) / 3}}

