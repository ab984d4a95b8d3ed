"""Questions about a scene, phrased once here so that training data and evaluation sets use the same words.

The suffixes are the benchmarks' own (LLaVA-1.5 evaluation prompts), so the fine-tuned model sees in training
exactly the prompt shapes it is evaluated with. Answers are single lower-case words or digits.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from mobilevlm.demo.scenes import COLORS, COLUMNS, ROWS, SHAPES, SIZES, WORD_ROWS, WORDS, Scene, Shape

SHORT_SUFFIX = "Answer the question using a single word or phrase."
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDE"
COUNT_WORDS = ("0", "1", "2", "3")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str
    domain: tuple[str, ...] = ()  # the possible answers, for building multiple-choice options
    # The object the question is about ("red circle"; empty for counts and words): two questions about the same
    # object in one conversation could answer each other ("What color is the circle?" after "Is the red circle
    # small or large?").
    subject: str = ""


def _unique(items, attr):
    counts: dict[str, int] = {}
    for item in items:
        counts[getattr(item, attr)] = counts.get(getattr(item, attr), 0) + 1
    return [item for item in items if counts[getattr(item, attr)] == 1]


def short_questions(scene: Scene) -> list[QA]:
    """Every single-word question the scene answers unambiguously."""
    if scene.words:
        return _word_questions(scene)
    objects = scene.objects
    qas = [QA("How many objects are there?", str(len(objects)), "count", COUNT_WORDS[1:])]
    for obj in _unique(objects, "shape"):
        qas.append(QA(f"What color is the {obj.shape}?", obj.color, "color", tuple(COLORS), obj.name))
    for obj in _unique(objects, "color"):
        qas.append(QA(f"What shape is the {obj.color} object?", obj.shape, "shape", SHAPES, obj.name))
    for shape in SHAPES:
        n = sum(o.shape == shape for o in objects)
        qas.append(QA(f"How many {shape}s are there?", str(n), "count", COUNT_WORDS))
    for obj in objects:
        qas.append(QA(f"Is the {obj.name} on the left, in the center or on the right?", COLUMNS[obj.col], "position", COLUMNS, obj.name))
        qas.append(QA(f"Is the {obj.name} at the top, in the middle or at the bottom?", ROWS[obj.row], "position", ROWS, obj.name))
        qas.append(QA(f"Is the {obj.name} small or large?", obj.size, "size", tuple(SIZES), obj.name))
    return qas


def _word_questions(scene: Scene) -> list[QA]:
    words = scene.words
    if len(words) == 1:
        w = words[0]
        return [
            QA("What word is written in the image?", w.text, "ocr", WORDS),
            QA("What color is the word?", w.color, "color", tuple(COLORS)),
        ]
    qas = []
    for w in words:
        qas.append(QA(f"What word is written in {w.color}?", w.text, "ocr", WORDS))
        qas.append(QA(f"What word is written at the {WORD_ROWS[w.row]}?", w.text, "ocr", WORDS))
        qas.append(QA(f'What color is the word "{w.text}"?', w.color, "color", tuple(COLORS)))
    return qas


def absent_objects(scene: Scene, strategy: str, rng: random.Random, k: int, popularity: list[str] | None = None) -> list[str]:
    """Names ("red circle") of k objects not in the scene, chosen the way POPE chooses its negatives.

    random: uniformly; popular: the most frequent objects of the training data first; adversarial: objects
    sharing a colour or a shape with something present (the nearest thing to POPE's co-occurring objects).
    """
    present = {o.name for o in scene.objects}
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    if strategy == "random":
        return rng.sample(absent, k)
    if strategy == "popular":
        order = popularity or sorted(absent)
        return [name for name in order if name in absent][:k]
    if strategy == "adversarial":
        near = [n for n in absent if any(n.split()[0] == o.color or n.split()[1] == o.shape for o in scene.objects)]
        far = [n for n in absent if n not in near]
        rng.shuffle(near)
        rng.shuffle(far)
        return (near + far)[:k]
    raise ValueError(f"unknown negative-sampling strategy {strategy!r}")


_EXISTS = "Is there a {} in the image?"


def exists_question(name: str) -> str:
    return _EXISTS.format(name)


def asked_object(question: str) -> str:
    """The object an `exists_question` names ("red circle"), read back with the same wording."""
    prefix, suffix = _EXISTS.split("{}")
    if not (question.startswith(prefix) and question.endswith(suffix)):
        raise ValueError(f"not an existence question: {question!r}")
    return question[len(prefix):len(question) - len(suffix)]


def yes_no_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Pairs of (yes, no) questions, in MME's subtasks: existence, count, position, color, OCR."""
    pairs: list[QA] = []
    if scene.words:
        present = [w.text for w in scene.words]
        other = rng.choice([w for w in WORDS if w not in present])
        pairs += [
            QA(f'Is the word "{rng.choice(present)}" written in this image?', "yes", "OCR"),
            QA(f'Is the word "{other}" written in this image?', "no", "OCR"),
        ]
        return pairs
    objects = scene.objects
    obj = rng.choice(objects)
    absent = absent_objects(scene, "adversarial", rng, 1)[0]
    pairs += [QA(f"Is there a {obj.name} in this image?", "yes", "existence"),
              QA(f"Is there a {absent} in this image?", "no", "existence")]
    wrong = rng.choice([n for n in range(1, 4) if n != len(objects)])
    pairs += [QA(f"Are there {len(objects)} objects in this image?", "yes", "count"),
              QA(f"Are there {wrong} objects in this image?", "no", "count")]
    side = _side_pair(obj)
    pairs += [QA(f"Is the {obj.name} {side[0]}?", "yes", "position"), QA(f"Is the {obj.name} {side[1]}?", "no", "position")]
    unique = _unique(objects, "shape")
    if unique:
        target = rng.choice(unique)
        other_color = rng.choice([c for c in COLORS if c != target.color])
        pairs += [QA(f"Is the {target.shape} {target.color}?", "yes", "color"),
                  QA(f"Is the {target.shape} {other_color}?", "no", "color")]
    return pairs


def _side_pair(obj: Shape) -> tuple[str, str]:
    phrases = {0: "on the left side of the image", 2: "on the right side of the image"}
    if obj.col in phrases:
        return phrases[obj.col], phrases[2 - obj.col]
    rows = {0: "in the top part of the image", 1: "in the middle of the image", 2: "in the bottom part of the image"}
    return rows[obj.row], rows[(obj.row + 1) % 3]


def options_for(qa: QA, rng: random.Random, n_options: int) -> tuple[list[str], int]:
    """n distinct options from the answer's domain, the right one at a random place; returns (options, index)."""
    distractors = rng.sample([d for d in qa.domain if d != qa.answer], min(n_options - 1, len(qa.domain) - 1))
    options = distractors + [qa.answer]
    rng.shuffle(options)
    return options, options.index(qa.answer)


def option_lines(options: list[str]) -> str:
    return "".join(f"\n{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def short_prompt(question: str) -> str:
    return f"{question}\n{SHORT_SUFFIX}"


def ocr_prompt(question: str, scene: Scene) -> str:
    """TextVQA's three-line prompt: question, the OCR tokens in reading order, the single-word suffix."""
    tokens = ", ".join(w.text for w in sorted(scene.words, key=lambda w: w.row))
    return f"{question}\nReference OCR token: {tokens}\n{SHORT_SUFFIX}"


def text_only_question(rng: random.Random) -> QA:
    """Questions about the world of the scenes that need no image (ScienceQA has such; training mixes them in)."""
    kind = rng.randrange(3)
    if kind == 0:
        shape = rng.choice(SHAPES[1:])
        sides = {"square": "4", "triangle": "3", "star": "10"}[shape]
        return QA(f"How many sides does a {shape} have?", sides, "knowledge", ("3", "4", "5", "10"))
    if kind == 1:
        size = rng.choice(tuple(SIZES))
        return QA(f"What is the opposite of {size}?", "large" if size == "small" else "small", "knowledge", ("small", "large", "red", "left"))
    color = rng.choice(tuple(COLORS))
    return QA("Which of these is a color?", color, "knowledge", (color,) + SHAPES + ("cat",))
