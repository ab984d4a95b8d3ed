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
from mobilevlm.demo.scenes import COLORS, SHAPES, WORD_ROWS, Scene, caption, render, sample_training_scene

CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Give a short description of the image.")


def training_scenes(seed: int, n: int, word_fraction: float = 0.25, stream: str = "train") -> list[Scene]:
    """`n` scenes, none of them held out for evaluation; `stream` names an independent sequence (the bases'
    corpus and a demo run's stage data draw from different ones)."""
    rng = random.Random(f"{seed}:{stream}")
    return [sample_training_scene(rng, word_fraction) for _ in range(n)]


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
            {"from": "gpt", "value": caption(scene, rng)},
        ]}
        for i, (scene, name) in enumerate(zip(scenes, names))
    ]


@dataclass(frozen=True)
class Mix:
    """How often each kind of question group is drawn for a conversation (relative weights).

    A group is one or several questions about the same image (up to six existence questions, each about a
    present or a near-miss absent object, colour or shape; a multiple-choice question and a rotation of its
    options). Yes/no answers are drawn independently for every question, so that neither the answer priors,
    nor the turn position, nor the previous answer predict them: only looking at the image lowers the loss."""

    short: float = 4.0
    exists: float = 3.0
    yes_no: float = 1.5
    choice: float = 1.5
    ocr: float = 3.0
    caption: float = 0.3
    max_groups: int = 4


def _groups(scene: Scene, mix: Mix) -> tuple[list[str], list[float]]:
    kinds = ["short", "yes_no", "choice", "caption"] + (["ocr"] if scene.words else ["exists"])
    return kinds, [getattr(mix, kind) for kind in kinds]


def _group(kind: str, scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """The (question text, answer) turns of one group, in the benchmark prompt shapes."""
    if kind == "short":
        return [(Q.short_prompt(qa.question), qa.answer) for qa in _short_set(scene, rng)]
    if kind == "exists":
        return _exists_turns(scene, rng)
    if kind == "yes_no":
        return _yes_no_turns(scene, rng)
    if kind == "choice":
        return _choice_turns(rng.choice(Q.short_questions(scene)), rng)
    if kind == "ocr":
        # One of the words only: after "cat" for the top word, the bottom one would be "the other token".
        qa = rng.choice([qa for qa in Q.short_questions(scene) if qa.kind == "ocr"])
        return [(Q.ocr_prompt(qa.question, scene), qa.answer)]
    return [(rng.choice(CAPTION_PROMPTS), caption(scene))]


def _short_set(scene: Scene, rng: random.Random, size: int = 3) -> list[Q.QA]:
    """Up to `size` single-word questions about one image, each of another kind (colour, shape, count, ...) and
    about another object, so that none can be answered from another's words. Each skill needs about a thousand
    answers before the tiny model reads it from the image: several per image cost little next to
    the image's 144 tokens."""
    chosen: list[Q.QA] = []
    candidates = Q.short_questions(scene)
    for qa in rng.sample(candidates, len(candidates)):
        if len(chosen) == size:
            break
        if all(qa.kind != other.kind and (not qa.subject or qa.subject != other.subject) for other in chosen):
            chosen.append(qa)
    return chosen


def _exists_turns(scene: Scene, rng: random.Random, turns: int = 6) -> list[tuple[str, str]]:
    """Up to `turns` existence questions about one image, every answer drawn on its own (yes or no with even
    odds): about an object ("a red circle"), a colour ("a red object") or a shape ("a circle"). Negatives are
    near misses (sharing a colour or a shape with a present object) or random; POPE's "popular" negatives are
    left out, since they would make an object's name predict its answer. A question whose answer follows from
    an earlier answer is never asked (no "red object" after "red circle: yes", no "red star" after "star: no"),
    and the questions stop as soon as one answer has none left, so no turn can be read off another.
    Many independent questions per image are what make the lookup learnable in the demo's budget: the image
    tokens are most of a sample's cost and each extra question adds little to it."""
    colors = sorted({o.color for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})  # sorted sets: each question once, in a reproducible order
    yes = [(o.name, {o.color, o.shape}) for o in scene.objects]
    yes += [(f"{c} object", {c}) for c in colors] + [(s, {s}) for s in shapes]
    no = [(name, set(name.split())) for name in Q.absent_objects(scene, rng.choice(("adversarial", "adversarial", "random")), rng, 6)]
    no += [(f"{c} object", {c}) for c in COLORS if c not in colors] + [(s, {s}) for s in SHAPES if s not in shapes]
    rng.shuffle(yes)
    rng.shuffle(no)
    confirmed: set[str] = set()  # attributes of objects answered "yes": a colour or shape question on them is entailed
    denied: set[str] = set()  # colours / shapes answered "no": an object with one of them is entailed "no"
    out = []
    for _ in range(turns):
        yes[:] = [(name, words) for name, words in yes if not (len(words) == 1 and words <= confirmed)]
        no[:] = [(name, words) for name, words in no if not words & denied]
        # Stop before drawing when either answer has no question left: stopping only when the drawn answer
        # has none would make "no" likelier after the "yes" questions ran out (a readable pattern).
        if not yes or not no:
            break
        answer = rng.choice(("yes", "no"))
        name, words = (yes if answer == "yes" else no).pop()
        if answer == "yes" and len(words) == 2:
            confirmed |= words
        elif answer == "no" and len(words) == 1:
            denied |= words
        out.append((Q.short_prompt(Q.exists_question(name)), answer))
    return out


def _yes_no_turns(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """MME's yes/no questions of one or two subtasks, the yes or the no question of each at random."""
    pairs = Q.yes_no_questions(scene, rng)
    subtasks = rng.sample(range(len(pairs) // 2), min(rng.randint(1, 2), len(pairs) // 2))
    chosen = [pairs[2 * k + rng.randrange(2)] for k in subtasks]
    return [(Q.short_prompt(qa.question), qa.answer) for qa in chosen]


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


def instruction_samples(scenes: list[Scene], names: list[str], seed: int, text_only_fraction: float = 0.05,
                        mix: Mix = Mix()) -> list[dict]:
    """One conversation per scene of 1 to `mix.max_groups` question groups. Most have several turns: the 144
    image tokens are the bulk of every sample, so each extra question about the same image adds supervision
    at a fraction of the compute."""
    rng = random.Random(f"{seed}:instructions")
    samples = []
    for i, (scene, name) in enumerate(zip(scenes, names)):
        kinds, weights = _groups(scene, mix)
        turns, asked = [], set()
        for kind in rng.choices(kinds, weights, k=rng.randint(1, mix.max_groups)):
            group = _group(kind, scene, rng)
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


# What the language model's pre-training text is made of (relative weights). The context lookup is the skill the
# tiny LLaMA lacks and the one every object question needs; it appears from lookup-dense text (several
# independent existence questions per context) and did not from a mix where half the samples were other kinds.
READING_KINDS = {"exists": 0.8, "short": 0.07, "choice": 0.05, "ocr": 0.08}


def reading_samples(scenes: list[Scene], seed: int, n: int) -> list[dict]:
    """Text-only conversations in the benchmark prompt shapes whose answer follows from the text itself: the
    scene's caption (objects in a random order) as a "Context:" line, or the OCR tokens (listed in reading
    order) for "at the top / bottom". They teach the language model the skills the image questions need
    besides seeing, before the image has to supply the facts: above all looking up the object a question names
    (most samples: several independent existence questions against the context), also copying an OCR token
    and mapping an option to its letter. Stage I / II then carry the lookup over to the image tokens."""
    rng = random.Random(f"{seed}:reading")
    shapes = [scene for scene in scenes if scene.objects]
    two_words = [scene for scene in scenes if len(scene.words) == 2]
    kinds = [kind for kind in READING_KINDS if kind != "ocr" or two_words]
    samples = []
    while len(samples) < n:
        kind = rng.choices(kinds, [READING_KINDS[k] for k in kinds])[0]
        if kind == "ocr":
            scene = rng.choice(two_words)
            word = rng.choice(scene.words)
            turns = [(Q.ocr_prompt(f"What word is written at the {WORD_ROWS[word.row]}?", scene), word.text)]
        else:
            scene = rng.choice(shapes)
            context = f"Context: {caption(scene, rng)}\n"
            if kind == "exists":
                turns = _exists_turns(scene, rng)
            elif kind == "short":
                qa = rng.choice(Q.short_questions(scene))
                turns = [(Q.short_prompt(qa.question), qa.answer)]
            else:
                turns = _choice_turns(rng.choice(Q.short_questions(scene)), rng)
            # the context is given once, before the first question, as ScienceQA gives it
            turns[0] = (context + turns[0][0], turns[0][1])
        conversations = []
        for question, answer in turns:
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
