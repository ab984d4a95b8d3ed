"""Training data in LLaVA's JSON format: stage-I captions (`plain`) and stage-II instructions (`v1`).

The instruction mix covers every prompt shape the six benchmarks use (single-word answers, yes/no object
questions, OCR-token prompts, lettered multiple choice with and without a hint or context), plus captions,
multi-turn conversations and text-only samples, as the real fine-tuning mixes do.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mobilevlm.demo import questions as Q
from mobilevlm.demo.scenes import WORD_ROWS, Scene, caption, render, sample_scene

CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short description of the image.")


def training_scenes(seed: int, n: int, word_fraction: float = 0.25) -> list[Scene]:
    rng = random.Random(f"{seed}:train")
    return [sample_scene(rng, word_fraction) for _ in range(n)]


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


@dataclass(frozen=True)
class Mix:
    """How often each kind of question group is drawn for a conversation (relative weights).

    A group is one question or a contrasting pair of questions about the same image whose answers differ (a
    present object and a near-miss absent one, both words of a two-word image, a multiple-choice question and
    a rotation of its options), so that the answer priors are useless and only looking at the image lowers
    the loss."""

    short: float = 4.0
    exists: float = 2.0
    yes_no: float = 1.5
    choice: float = 1.5
    ocr: float = 3.0
    caption: float = 0.3
    max_groups: int = 4


def _groups(scene: Scene, mix: Mix) -> tuple[list[str], list[float]]:
    kinds = ["short", "yes_no", "choice", "caption"] + (["ocr"] if scene.words else ["exists"])
    return kinds, [getattr(mix, kind) for kind in kinds]


def _group(kind: str, scene: Scene, rng: random.Random, popularity: list[str]) -> list[tuple[str, str]]:
    """The (question text, answer) turns of one group, in the benchmark prompt shapes."""
    if kind == "short":
        qa = rng.choice(Q.short_questions(scene))
        return [(Q.short_prompt(qa.question), qa.answer)]
    if kind == "exists":
        return _exists_pair(scene, rng, popularity)
    if kind == "yes_no":
        pair = Q.yes_no_questions(scene, rng)
        start = 2 * rng.randrange(len(pair) // 2)
        turns = [(Q.short_prompt(qa.question), qa.answer) for qa in pair[start: start + 2]]
        rng.shuffle(turns)
        return turns
    if kind == "choice":
        return _choice_turns(rng.choice(Q.short_questions(scene)), rng)
    if kind == "ocr":
        ocr = [qa for qa in Q.short_questions(scene) if qa.kind == "ocr"]
        # Both words of a two-word image, asked the same way: the image decides which OCR token to copy.
        by_form: dict[str, list[Q.QA]] = {}
        for qa in ocr:
            by_form.setdefault(qa.question.split(" written ")[-1].split()[0], []).append(qa)
        chosen = rng.choice(list(by_form.values()))
        rng.shuffle(chosen)
        return [(Q.ocr_prompt(qa.question, scene), qa.answer) for qa in chosen]
    return [(rng.choice(CAPTION_PROMPTS), caption(scene))]


def _exists_pair(scene: Scene, rng: random.Random, popularity: list[str]) -> list[tuple[str, str]]:
    """A present object and an absent one, in random order; the absent one usually differs from a present
    object in one attribute only (same shape other colour, or same colour other shape)."""
    present = rng.choice(scene.objects)
    strategy = rng.choice(("adversarial", "adversarial", "random", "popular"))
    absent = Q.absent_objects(scene, strategy, rng, 3, popularity)
    turns = [(Q.short_prompt(Q.exists_question(present.name)), "yes"),
             (Q.short_prompt(Q.exists_question(rng.choice(absent))), "no")]
    rng.shuffle(turns)
    return turns


def _choice_turns(qa: Q.QA, rng: random.Random) -> list[tuple[str, str]]:
    """ScienceQA's ("Context: ...") or MMBench's (bare hint line) multiple-choice prompt, then the same
    question with its options rotated, as MMBench's circular evaluation asks it: the letter prior is useless."""
    options, answer = Q.options_for(qa, rng, rng.randint(2, 4))
    roll = rng.random()
    if roll < 0.25:
        head = "Context: The picture shows shapes or words on a grey background.\n"
    elif roll < 0.5:
        head = "The image shows shapes or words.\n"
    else:
        head = ""
    shift = rng.randrange(1, len(options))
    turns = []
    for k in (0, shift):
        rotated = options[k:] + options[:k]
        turns.append((f"{head}{qa.question}{Q.option_lines(rotated)}\n{Q.LETTER_SUFFIX}", Q.LETTERS[rotated.index(options[answer])]))
    return turns


def _text_only_turn(rng: random.Random) -> tuple[str, str]:
    qa = Q.text_only_question(rng)
    if rng.random() < 0.5:
        return Q.short_prompt(qa.question), qa.answer
    return _choice_turns(qa, rng)[0]


def instruction_samples(scenes: list[Scene], names: list[str], seed: int, popularity: list[str],
                        text_only_fraction: float = 0.05, mix: Mix = Mix()) -> list[dict]:
    """One conversation per scene of 1 to `mix.max_groups` question groups. Most have several turns: the 144
    image tokens are the bulk of every sample, so each extra question about the same image adds supervision
    at a fraction of the compute."""
    rng = random.Random(f"{seed}:instructions")
    samples = []
    for i, (scene, name) in enumerate(zip(scenes, names)):
        kinds, weights = _groups(scene, mix)
        turns, asked = [], set()
        for kind in rng.choices(kinds, weights, k=rng.randint(1, mix.max_groups)):
            group = _group(kind, scene, rng, popularity)
            # A question asked twice could be answered from the conversation instead of the image.
            if not asked & {question for question, _ in group}:
                turns += group
                asked |= {question for question, _ in group}
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


def reading_samples(scenes: list[Scene], seed: int, n: int) -> list[dict]:
    """Text-only conversations in the benchmark prompt shapes whose answer follows from the text itself: the
    scene's caption as a "Context:" line, or the OCR tokens (listed in reading order) for "at the top / bottom".
    They teach the language model the skills the image questions need besides seeing: copying an OCR token,
    mapping an option to its letter, checking an object against a list, before the image has to supply the facts."""
    rng = random.Random(f"{seed}:reading")
    samples = []
    while len(samples) < n:
        scene = rng.choice(scenes)
        context = f"Context: {caption(scene)}\n"
        if scene.words and len(scene.words) == 2:
            word = rng.choice(scene.words)
            question = f"What word is written at the {WORD_ROWS[word.row]}?"
            turns = [(Q.ocr_prompt(question, scene), word.text)]
        else:
            kind = rng.randrange(3)
            if kind == 0 and scene.objects:
                turns = [(context + question.split("\n", 1)[0] + "\n" + Q.SHORT_SUFFIX, answer)
                         for question, answer in _exists_pair(scene, rng, [])]
            elif kind == 1:
                qa = rng.choice(Q.short_questions(scene))
                turns = [(context + Q.short_prompt(qa.question), qa.answer)]
            else:
                turns = [(context + question, answer) for question, answer in _choice_turns(rng.choice(Q.short_questions(scene)), rng)]
        conversations = []
        for j, (question, answer) in enumerate(turns):
            if j:  # the context is given once, as ScienceQA gives it
                question = question.removeprefix(context)
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        samples.append({"id": f"read-{len(samples):06d}", "conversations": conversations})
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
