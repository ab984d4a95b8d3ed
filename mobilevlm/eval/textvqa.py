"""TextVQA val (with OCR tokens in the prompt): LLaVA `eval_textvqa.py` + the M4C soft accuracy.

Answers are tied to annotations by (image id, question recovered from the prompt, lower-cased): the
answer's `question_id` is the image id and repeats across questions of one image. The expected
questions are the lines of the question file, so a missing answer scores 0 instead of vanishing.
"""
from __future__ import annotations

import re
from pathlib import Path

from mobilevlm.errors import DataError
from mobilevlm.eval.answer_processor import normalize_answer
from mobilevlm.eval.records import match_answers, percent, qid, read_json, read_jsonl, restrict

QUESTION_FILE = "llava_textvqa_val_v051_ocr.jsonl"
ANNOTATION_FILE = "TextVQA_0.5.1_val.json"
NUM_HUMAN_ANSWERS = 10
_OCR_PROMPT_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def recover_question(prompt: str) -> str | None:
    """The question inside a prompt, lower-cased, for the prompt layouts the original accepts."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = _OCR_PROMPT_QUESTION.search(prompt)
        question = found.group(1) if found else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return question.lower() if question is not None else None


def soft_scores(human_answers: list[str]) -> dict[str, float]:
    """Score of every distinct normalised human answer: mean over the 10 leave-one-out subsets of
    min(1, matches / 3)."""
    answers = [normalize_answer(answer) for answer in human_answers]
    scores = {}
    for candidate in set(answers):
        total = 0.0
        for left_out in range(len(answers)):
            matches = sum(other == candidate for i, other in enumerate(answers) if i != left_out)
            total += min(1.0, matches / 3)
        scores[candidate] = total / len(answers)
    return scores


def read_annotations(path: Path) -> dict[tuple[str, str], dict]:
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list")
    annotations = {}
    for position, entry in enumerate(content["data"]):
        if not isinstance(entry, dict) or any(key not in entry for key in ("image_id", "question", "answers")):
            raise DataError(f"{path}: data[{position}] lacks image_id, question or answers")
        if len(entry["answers"]) != NUM_HUMAN_ANSWERS:
            raise DataError(f"{path}: data[{position}] has {len(entry['answers'])} answers, expected 10")
        # Later duplicates overwrite earlier ones, as in the original.
        annotations[(qid(entry["image_id"]), entry["question"].lower())] = entry
    return annotations


def _answer_key(answer: dict) -> tuple[str, str]:
    question = recover_question(answer["prompt"])
    if question is None:
        raise DataError(f"{answer['_file']}:{answer['_line']}: cannot find the question in this prompt")
    return qid(answer["question_id"]), question


def score(answers: list[dict], data_dir: Path, only_ids=None) -> dict:
    textvqa_dir = Path(data_dir) / "textvqa"
    questions = read_jsonl(textvqa_dir / QUESTION_FILE, required=("question_id", "text"))
    questions = restrict(questions, lambda q: qid(q["question_id"]), only_ids)
    annotations = read_annotations(textvqa_dir / ANNOTATION_FILE)
    expected = []
    for question in questions:
        key = (qid(question["question_id"]), recover_question(question["text"]))
        if key not in annotations:
            raise DataError(
                f"{textvqa_dir / QUESTION_FILE}:{question['_line']}: no annotation in {ANNOTATION_FILE} "
                f"for image {key[0]!r} and this question"
            )
        expected.append(key)
    matching = match_answers(expected, answers, _answer_key, shown_id=lambda key: key[0])
    total = 0.0
    for key, answer in zip(expected, matching.answers):
        if answer is not None:
            total += soft_scores(annotations[key]["answers"]).get(normalize_answer(answer["text"]), 0.0)
    return {
        "benchmark": "textvqa",
        "score": percent(total, len(expected)),
        **matching.report(),
    }
