"""Held-out evaluation sets in the file formats of the six benchmarks, laid out as the seed's `benchmark_data/` tree.

Each writer follows the official files field by field (see the reference's benchmark notes): GQA's question
jsonl + testdev_balanced_questions.json, POPE's question file + coco/coco_pope_<split>.json label files, MME's
jsonl + per-image "question<TAB>Yes|No" files, ScienceQA's problems.json / pid_splits.json / llava_test_CQM-A.json,
MMBench's TSV with base64 images and circular copies, TextVQA's OCR-prompt jsonl + annotation json.
`write_benchmark_data` returns the keys of every scene it used, so training data can leave them out.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

from mobilevlm.demo import questions as Q
from mobilevlm.demo.scenes import COLORS, SHAPES, Scene, render, sample_shapes, sample_words

BENCHMARKS = ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")
POPE_SPLITS = (("adversarial", 1), ("random", 10000001), ("popular", 20000001))  # LLaVA's file order and id ranges
MME_SUBTASKS = ("existence", "count", "position", "color", "OCR")
FULL_SIZES = {"gqa": 120, "sqa": 80, "textvqa": 80, "pope": 20, "mme": 16, "mmbench": 40}
FAST_SIZES = {"gqa": 40, "sqa": 30, "textvqa": 30, "pope": 10, "mme": 6, "mmbench": 16}


class _SceneBook:
    """Draws evaluation scenes, held-out ones only (`Scene.held_out`: never in any training data) and never the
    same one twice, and remembers them."""

    def __init__(self, seed: int):
        self.seed = seed
        self.keys: set = set()

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}:eval:{name}")

    def draw(self, sampler, rng: random.Random, accept=lambda scene: True) -> Scene:
        while True:
            scene = sampler(rng)
            if scene.held_out and scene.key() not in self.keys and accept(scene):
                self.keys.add(scene.key())
                return scene


def _save(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render(scene).save(path)


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _pick_balanced(qas: list[Q.QA], rng: random.Random, k: int) -> list[Q.QA]:
    """k questions of different kinds where possible, so no question type dominates a set."""
    by_kind: dict[str, list[Q.QA]] = {}
    for qa in qas:
        by_kind.setdefault(qa.kind, []).append(qa)
    kinds = rng.sample(sorted(by_kind), min(k, len(by_kind)))
    return [rng.choice(by_kind[kind]) for kind in kinds]


def write_gqa(root: Path, book: _SceneBook, n_images: int) -> None:
    rng = book.rng("gqa")
    lines, questions = [], {}
    for i in range(n_images):
        scene = book.draw(sample_shapes if i % 4 else sample_words, rng)
        image_id = f"n{100000 + i}"
        _save(scene, root / "gqa" / "images" / f"{image_id}.png")
        for j, qa in enumerate(_pick_balanced(Q.short_questions(scene), rng, 2)):
            qid = f"{2000000 + 10 * i + j}"
            lines.append({"question_id": qid, "image": f"{image_id}.png", "text": Q.short_prompt(qa.question), "category": "default"})
            questions[qid] = {
                "question": qa.question, "imageId": image_id, "answer": qa.answer, "fullAnswer": f"{qa.answer}.",
                "isBalanced": True, "groups": {"global": None, "local": qa.kind},
                "types": {"structural": "query", "semantic": "attr" if qa.kind in ("color", "size") else "obj", "detailed": qa.kind},
                "semantic": [], "entailed": [], "equivalent": [qid], "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
            }
    _write_jsonl(root / "gqa" / "llava_gqa_testdev_balanced.jsonl", lines)
    (root / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(questions))


def write_pope(root: Path, book: _SceneBook, n_images: int, popularity: list[str]) -> None:
    rng = book.rng("pope")
    scenes = [book.draw(lambda r: sample_shapes(r, count=3), rng) for _ in range(n_images)]
    names = [f"COCO_val2014_{100000 + i:012d}.png" for i in range(n_images)]
    for scene, name in zip(scenes, names):
        _save(scene, root / "pope" / "val2014" / name)
    lines = []
    for split, first_id in POPE_SPLITS:
        labels = []
        for scene, name in zip(scenes, names):
            yes = [o.name for o in scene.objects]
            no = Q.absent_objects(scene, split, rng, len(yes), popularity)
            for obj, label in [(n, "yes") for n in yes] + [(n, "no") for n in no]:
                labels.append({"question_id": first_id + len(labels), "image": name, "text": Q.exists_question(obj), "label": label})
        (root / "pope" / "coco").mkdir(parents=True, exist_ok=True)
        _write_jsonl(root / "pope" / "coco" / f"coco_pope_{split}.json", labels)
        lines += [{"question_id": row["question_id"], "image": row["image"], "text": Q.short_prompt(row["text"]), "category": split}
                  for row in labels]
    _write_jsonl(root / "pope" / "llava_pope_test.jsonl", lines)


def write_mme(root: Path, book: _SceneBook, n_images: int) -> None:
    rng = book.rng("mme")
    lines = []
    for subtask in MME_SUBTASKS:
        sampler = sample_words if subtask == "OCR" else sample_shapes
        for i in range(n_images):
            scene = book.draw(sampler, rng, lambda s: any(qa.kind == subtask for qa in Q.yes_no_questions(s, random.Random(0))))
            pair = [qa for qa in Q.yes_no_questions(scene, rng) if qa.kind == subtask]
            stem = f"{i:04d}"
            folder = root / "mme" / "images" / subtask
            _save(scene, folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(
                "".join(f"{qa.question} Please answer yes or no.\t{qa.answer.capitalize()}\n" for qa in pair))
            lines += [{"question_id": f"{subtask}/{stem}.png", "image": f"{subtask}/{stem}.png",
                       "text": Q.short_prompt(qa.question), "category": subtask} for qa in pair]
    _write_jsonl(root / "mme" / "llava_mme.jsonl", lines)


def write_sqa(root: Path, book: _SceneBook, n_problems: int) -> None:
    rng = book.rng("sqa")
    problems, conversations = {}, []
    for i in range(n_problems):
        pid = str(1000 + i)
        with_image = i % 5 != 4  # a fifth are text-only, as in ScienceQA (they do not count for SQA-IMG)
        if with_image:
            scene = book.draw(sample_shapes if i % 3 else sample_words, rng)
            _save(scene, root / "sqa" / "images" / "test" / pid / "image.png")
            qa = rng.choice(Q.short_questions(scene))
            hint = rng.choice(["", "The picture shows shapes or words on a grey background."])
        else:
            qa, hint = Q.text_only_question(rng), ""
        choices, answer = Q.options_for(qa, rng, rng.randint(2, 4))
        problems[pid] = {
            "question": qa.question, "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if with_image else None, "task": "closed choice", "grade": "grade1",
            "subject": "natural science", "topic": "shapes", "category": qa.kind, "skill": qa.kind,
            "lecture": "", "solution": "", "split": "test",
        }
        human = ("<image>\n" if with_image else "") + (f"Context: {hint}\n" if hint else "") + qa.question + Q.option_lines(choices)
        sample = {"id": pid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": Q.LETTERS[answer]}]}
        if with_image:
            sample["image"] = f"{pid}/image.png"
        conversations.append(sample)
    (root / "sqa").mkdir(parents=True, exist_ok=True)
    (root / "sqa" / "problems.json").write_text(json.dumps(problems))
    splits = {name: [] for name in ("train", "val", "trainval", "minitrain", "minival", "minitest")}
    (root / "sqa" / "pid_splits.json").write_text(json.dumps({**splits, "test": sorted(problems)}))
    (root / "sqa" / "llava_test_CQM-A.json").write_text(json.dumps(conversations))


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "comment", "split")


def write_mmbench(root: Path, book: _SceneBook, n_questions: int) -> None:
    """Main rows plus their circular copies (index + k * 1e6, options rotated by k), as the dev TSV holds them."""
    rng = book.rng("mmbench")
    rows = []
    for i in range(n_questions):
        scene = book.draw(sample_shapes if i % 4 else sample_words, rng)
        qa = rng.choice(Q.short_questions(scene))
        options, answer = Q.options_for(qa, rng, 4)
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        hint = "The image shows shapes or words." if i % 3 == 0 else ""
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            cells = {letter: (rotated[j] if j < len(rotated) else "") for j, letter in enumerate("ABCD")}
            rows.append({"index": i + k * 1_000_000, "question": qa.question, "hint": hint, **cells,
                         "answer": Q.LETTERS[rotated.index(options[answer])], "category": f"{qa.kind}_recognition",
                         "image": image, "source": "mobilevlm-demo", "l2-category": "attribute_reasoning" if qa.kind != "ocr" else "ocr",
                         "comment": "", "split": "dev"})
    rows.sort(key=lambda row: row["index"])
    path = root / "mmbench" / "mmbench_dev_en_20231003.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MMBENCH_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_textvqa(root: Path, book: _SceneBook, n_images: int) -> None:
    rng = book.rng("textvqa")
    lines, annotations = [], []
    for i in range(n_images):
        # Two words each, so that copying an OCR token at random scores 50, not 100: the image decides.
        scene = book.draw(lambda r: sample_words(r, count=2), rng)
        image_id = f"{rng.getrandbits(64):016x}"
        _save(scene, root / "textvqa" / "train_images" / f"{image_id}.png")
        qa = rng.choice([qa for qa in Q.short_questions(scene) if qa.kind == "ocr"])
        lines.append({"question_id": image_id, "image": f"{image_id}.png", "text": Q.ocr_prompt(qa.question, scene), "category": "default"})
        answers = [qa.answer] * 7 + [qa.answer.capitalize()] * 3  # ten annotators, some capitalising
        annotations.append({"question": qa.question, "image_id": image_id, "question_id": 30000 + i, "answers": answers,
                            "image_width": 96, "image_height": 96, "set_name": "val"})
    _write_jsonl(root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", lines)
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "data": annotations}))


def popularity_order(scenes: list[Scene]) -> list[str]:
    """Objects from most to least frequent in the training scenes: POPE's "popular" negatives come first."""
    counts = Counter(o.name for scene in scenes for o in scene.objects)
    return sorted((f"{c} {s}" for c in COLORS for s in SHAPES), key=lambda name: (-counts[name], name))


def write_benchmark_data(root: Path, seed: int, sizes: dict[str, int], training_scenes: list[Scene]) -> set:
    """Write all six sets under `root` (the benchmark_data directory), from held-out scenes only.

    Returns the keys of the scenes used. POPE's "popular" negatives follow the object frequencies of the
    training scenes, as POPE's follow COCO's.
    """
    root = Path(root)
    book = _SceneBook(seed)
    write_gqa(root, book, sizes["gqa"])
    write_pope(root, book, sizes["pope"], popularity_order(training_scenes))
    write_mme(root, book, sizes["mme"])
    write_sqa(root, book, sizes["sqa"])
    write_mmbench(root, book, sizes["mmbench"])
    write_textvqa(root, book, sizes["textvqa"])
    return book.keys
