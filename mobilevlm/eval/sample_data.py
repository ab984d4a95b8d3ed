"""A tiny `benchmark_data/` tree in the exact formats of the six benchmarks, with drawn images.

For tests and demos: a handful of questions per benchmark, enough to run generation and every scorer
end to end (circular MMBench copies, MME image pairs, POPE label files, ScienceQA image and text
problems, TextVQA questions sharing an image).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

SINGLE_WORD = "\nAnswer the question using a single word or phrase."
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


def _image(colour: str, size=(40, 28), text: str | None = None):
    """A grey canvas with a coloured square (non-square on purpose: the pad path gets exercised)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4], fill=COLOURS[colour])
    if text:
        draw.text((1, 1), text, fill=(0, 0, 0))
    return image


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _gqa(root: Path) -> None:
    questions = [("201", "n1.jpg", "What colour is the square?", "red", "query"),
                 ("202", "n1.jpg", "Is the square red?", "yes", "verify"),
                 ("203", "n2.jpg", "What colour is the square?", "blue", "query"),
                 ("204", "n2.jpg", "Is there a square?", "yes", "verify")]
    _save(_image("red"), root / "gqa" / "images" / "n1.jpg")
    _save(_image("blue", (30, 44)), root / "gqa" / "images" / "n2.jpg")
    _jsonl(root / "gqa" / "llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": img, "text": text + SINGLE_WORD, "category": "default"} for q, img, text, _, _ in questions])
    gold = {q: {"question": text, "imageId": img[:-4], "answer": ans, "isBalanced": True,
                "types": {"structural": kind, "semantic": "attr", "detailed": "color"}} for q, img, text, ans, kind in questions}
    (root / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(gold))


def _mmbench(root: Path) -> None:
    def b64(colour):
        buffer = io.BytesIO()
        _image(colour).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "comment", "split"]
    rows = [
        [0, "What colour is the square?", "", "red", "blue", "green", "", "A", "colour", b64("red"), "s", "attr", "", "dev"],
        [1, "Which shape is shown?", "Look at the centre.", "square", "circle", "", "", "A", "shape", b64("blue"), "s", "attr", "", "dev"],
        [1000000, "What colour is the square?", "", "blue", "green", "red", "", "C", "colour", b64("red"), "s", "attr", "", "dev"],
        [2000000, "What colour is the square?", "", "green", "red", "blue", "", "B", "colour", b64("red"), "s", "attr", "", "dev"],
        [1000001, "Which shape is shown?", "Look at the centre.", "circle", "square", "", "", "B", "shape", b64("blue"), "s", "attr", "", "dev"],
    ]
    path = root / "mmbench" / "mmbench_dev_en_20231003.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, row)) + "\n" for row in rows))


def _mme(root: Path) -> None:
    base = root / "mme" / "images"
    suffix = " Please answer yes or no."
    layout = [  # (subtask, image path inside the subtask, QA folder, [(question, answer), ...])
        ("color", "01.png", "", [("Is the square red?", "Yes"), ("Is the square blue?", "No")]),
        ("color", "02.png", "", [("Is the square green?", "Yes"), ("Is the square yellow?", "No")]),
        ("artwork", "images/7.jpg", "questions_answers_YN", [("Is this painting grey?", "Yes"), ("Is this a photo of a cat?", "No")]),
        ("code_reasoning", "c1.png", "", [("Does the code print 1?", "No"), ("Does the code print 2?", "Yes")]),
    ]
    questions = []
    for colour, (subtask, image, qa_folder, pairs) in zip(COLOURS, layout):
        _save(_image(colour), base / subtask / image)
        stem = image.split("/")[-1].split(".")[0]
        qa_file = base / subtask / qa_folder / f"{stem}.txt"
        qa_file.parent.mkdir(parents=True, exist_ok=True)
        qa_file.write_text("".join(f"{q}{suffix}\t{a}\n" for q, a in pairs))
        for q, _ in pairs:
            questions.append({"question_id": f"{subtask}/{image}", "image": f"{subtask}/{image}", "text": q + SINGLE_WORD, "category": subtask})
    _jsonl(root / "mme" / "llava_mme.jsonl", questions)


def _pope(root: Path) -> None:
    images = {"COCO_val2014_000000000001.jpg": "red", "COCO_val2014_000000000002.jpg": "green"}
    for name, colour in images.items():
        _save(_image(colour), root / "pope" / "val2014" / name)
    asked = [("COCO_val2014_000000000001.jpg", "Is there a square in the image?", "yes"),
             ("COCO_val2014_000000000002.jpg", "Is there a dog in the image?", "no")]
    questions = []
    for offset, category in ((0, "adversarial"), (10000000, "random"), (20000000, "popular")):
        labels = []
        for i, (image, text, label) in enumerate(asked, start=1):
            questions.append({"question_id": offset + i, "image": image, "text": text + SINGLE_WORD, "category": category})
            labels.append({"question_id": i, "image": image, "text": text, "label": label})
        _jsonl(root / "pope" / "coco" / f"coco_pope_{category}.json", labels)
    _jsonl(root / "pope" / "llava_pope_test.jsonl", questions)


def _sqa(root: Path) -> None:
    problems = {
        "11": {"question": "Which colour is the square?", "choices": ["red", "blue"], "answer": 0, "hint": "", "image": "image.png"},
        "12": {"question": "Which is a mammal?", "choices": ["cat", "trout", "frog"], "answer": 0, "hint": "Animals differ.", "image": None},
        "13": {"question": "Which colour is the square?", "choices": ["green", "red", "blue"], "answer": 2, "hint": "Look closely.", "image": "image.png"},
        "14": {"question": "Which is bigger?", "choices": ["the sun", "a pea"], "answer": 0, "hint": "", "image": None},
        "90": {"question": "Train only", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None},
    }
    for pid, problem in problems.items():
        problem.update(split="train" if pid == "90" else "test", subject="natural science", grade="grade4")
    folder = root / "sqa"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": ["90"], "val": [], "test": ["11", "12", "13", "14"]}))
    converted = []
    for pid in ("11", "12", "13", "14"):
        problem = problems[pid]
        text = ("<image>\n" if problem["image"] else "") + (f"Context: {problem['hint']}\n" if problem["hint"] else "")
        text += problem["question"] + "".join(f"\n{'ABCDE'[i]}. {c}" for i, c in enumerate(problem["choices"]))
        entry = {"id": pid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ABCDE"[problem["answer"]]}]}
        if problem["image"]:
            entry["image"] = f"{pid}/image.png"
            _save(_image("red" if pid == "11" else "blue", (36, 36)), folder / "images" / "test" / pid / "image.png")
        converted.append(entry)
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(converted))


def _textvqa(root: Path) -> None:
    folder = root / "textvqa"
    _save(_image("yellow", text="STOP"), folder / "train_images" / "a1b2.jpg")
    _save(_image("green", text="EXIT"), folder / "train_images" / "c3d4.jpg")
    asked = [("a1b2", "what does the sign say?", ["stop"] * 7 + ["halt"] * 3, "STOP"),
             ("a1b2", "what colour is the square?", ["yellow"] * 10, "STOP"),
             ("c3d4", "what does the sign say?", ["exit"] * 2 + ["way out"] * 8, "EXIT")]
    _jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": image, "image": f"{image}.jpg",
             "text": f"{question}\nReference OCR token: {ocr}" + SINGLE_WORD, "category": "default"}
            for image, question, _, ocr in asked])
    data = [{"image_id": image, "question": question, "question_id": i, "answers": answers, "image_classes": []}
            for i, (image, question, answers, _) in enumerate(asked)]
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "data": data}))


def write_sample_benchmarks(root: str | Path) -> Path:
    """Write the six benchmark folders under `root` (created) and return it."""
    root = Path(root)
    for writer in (_gqa, _mmbench, _mme, _pope, _sqa, _textvqa):
        writer(root)
    return root
