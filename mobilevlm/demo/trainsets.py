"""Training data in LLaVA's JSON format: stage-I captions (`plain`) and stage-II instructions (`v1`).

The instruction mix covers every prompt shape the six benchmarks use (single-word answers, yes/no object
questions, OCR-token prompts, lettered multiple choice with and without a hint or context), plus captions,
multi-turn conversations and text-only samples, as the real fine-tuning mixes do.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from mobilevlm.demo import questions as Q
from mobilevlm.demo.scenes import Scene, caption, render, sample_scene

CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short description of the image.")


def training_scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(f"{seed}:train")
    return [sample_scene(rng) for _ in range(n)]


def save_images(scenes: list[Scene], folder: Path, prefix: str = "img") -> list[str]:
    """Render the scenes into `folder`; returns their file names relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, scene in enumerate(scenes):
        name = f"{prefix}_{i:06d}.png"
        render(scene).save(folder / name)
        names.append(name)
    return names


def caption_samples(scenes: list[Scene], names: list[str], seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:captions")
    return [
        {"id": f"pt-{i:06d}", "image": name, "conversations": [
            {"from": "human", "value": f"{rng.choice(CAPTION_PROMPTS)}\n<image>"},
            {"from": "gpt", "value": caption(scene)},
        ]}
        for i, (scene, name) in enumerate(zip(scenes, names))
    ]


def _turn(scene: Scene, rng: random.Random, popularity: list[str]) -> tuple[str, str]:
    """One (question text, answer) in one of the benchmark prompt shapes, chosen at random."""
    roll = rng.random()
    if scene.words and roll < 0.3:
        qa = rng.choice([qa for qa in Q.short_questions(scene) if qa.kind == "ocr"] or Q.short_questions(scene))
        return Q.ocr_prompt(qa.question, scene), qa.answer
    if roll < 0.45:
        qa = rng.choice(Q.short_questions(scene))
        return Q.short_prompt(qa.question), qa.answer
    if roll < 0.65 and scene.objects:
        return _exists_turn(scene, rng, popularity)
    if roll < 0.75:
        qa = rng.choice(Q.yes_no_questions(scene, rng))
        return Q.short_prompt(qa.question), qa.answer
    if roll < 0.95:
        return _choice_turn(rng.choice(Q.short_questions(scene)), rng)
    return rng.choice(CAPTION_PROMPTS), caption(scene)


def _exists_turn(scene: Scene, rng: random.Random, popularity: list[str]) -> tuple[str, str]:
    if rng.random() < 0.5:
        return Q.short_prompt(Q.exists_question(rng.choice(scene.objects).name)), "yes"
    strategy = rng.choice(("random", "popular", "adversarial"))
    absent = Q.absent_objects(scene, strategy, rng, 3, popularity)
    return Q.short_prompt(Q.exists_question(rng.choice(absent))), "no"


def _choice_turn(qa: Q.QA, rng: random.Random) -> tuple[str, str]:
    """ScienceQA's ("Context: ...") or MMBench's (bare hint line) multiple-choice prompt."""
    options, answer = Q.options_for(qa, rng, rng.randint(2, 4))
    roll = rng.random()
    if roll < 0.25:
        head = "Context: The picture shows shapes or words on a grey background.\n"
    elif roll < 0.5:
        head = "The image shows shapes or words.\n"
    else:
        head = ""
    return f"{head}{qa.question}{Q.option_lines(options)}\n{Q.LETTER_SUFFIX}", Q.LETTERS[answer]


def _text_only_turn(rng: random.Random) -> tuple[str, str]:
    qa = Q.text_only_question(rng)
    if rng.random() < 0.5:
        return Q.short_prompt(qa.question), qa.answer
    return _choice_turn(qa, rng)


def instruction_samples(scenes: list[Scene], names: list[str], seed: int, popularity: list[str],
                        text_only_fraction: float = 0.05, max_turns: int = 6) -> list[dict]:
    """One conversation per scene. Most have several turns: the 144 image tokens are the bulk of every sample,
    so each extra question about the same image adds supervision at a fraction of the compute."""
    rng = random.Random(f"{seed}:instructions")
    samples = []
    for i, (scene, name) in enumerate(zip(scenes, names)):
        n_turns = 1 if rng.random() < 0.25 else rng.randint(2, max_turns)
        turns = [_turn(scene, rng, popularity) for _ in range(n_turns)]
        conversations = []
        for j, (question, answer) in enumerate(turns):
            conversations += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + question},
                              {"from": "gpt", "value": answer}]
        samples.append({"id": f"ft-{i:06d}", "image": name, "conversations": conversations})
        if rng.random() < text_only_fraction:
            question, answer = _text_only_turn(rng)
            samples.append({"id": f"ft-text-{i:06d}", "conversations": [{"from": "human", "value": question},
                                                                         {"from": "gpt", "value": answer}]})
    return samples


def corpus_lines(samples: list[dict]) -> list[str]:
    """Every human and gpt text of the samples (image tags removed): the tokenizer and LLM pre-training text."""
    lines = []
    for sample in samples:
        for turn in sample["conversations"]:
            text = turn["value"].replace("<image>", "").strip()
            lines += [line for line in text.split("\n") if line]
    return lines


def write_json(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples, indent=1))
    return path
