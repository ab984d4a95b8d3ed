"""ScienceQA-IMG: LLaVA `eval_science_qa.py` semantics; the reported number is IMG-Accuracy.

The original decides "image question" from the answer's prompt (it contains "<image>") and turns
a missing answer into a FAILED non-image one, which quietly drops it from the IMG denominator. Here a
missing answer is FAILED too, but whether it counts as an image question comes from problems.json.
"""
from __future__ import annotations

import re
from pathlib import Path

from mobilevlm.errors import DataError
from mobilevlm.eval.records import match_answers, percent, qid, read_json, restrict

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
# The original pattern leaves the dot unescaped: any one character must follow the letter.
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_letter(text: str) -> str:
    """The answer letter, or FAILED; no stripping or case folding, as in the original."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def letter_index(letter: str, num_choices: int) -> int:
    """Index of the letter among the problem's choices, -1 when FAILED or out of range."""
    return OPTIONS.index(letter) if letter in OPTIONS[:num_choices] else -1


def read_test_problems(sqa_dir: Path) -> list[tuple[str, dict]]:
    problems_path, splits_path = sqa_dir / "problems.json", sqa_dir / "pid_splits.json"
    problems = read_json(problems_path)
    splits = read_json(splits_path)
    if not isinstance(splits, dict) or "test" not in splits:
        raise DataError(f"{splits_path}: no 'test' split")
    if not isinstance(problems, dict):
        raise DataError(f"{problems_path}: expected an object keyed by problem id")
    test = []
    for pid in splits["test"]:
        problem = problems.get(qid(pid))
        if problem is None:
            raise DataError(f"{splits_path}: test problem {pid!r} is not in {problems_path}")
        for key in ("choices", "answer"):
            if key not in problem:
                raise DataError(f"{problems_path}: problem {pid!r} has no field {key!r}")
        test.append((qid(pid), problem))
    return test


def score(answers: list[dict], data_dir: Path, only_ids=None) -> dict:
    sqa_dir = Path(data_dir) / "sqa"
    test = restrict(read_test_problems(sqa_dir), lambda item: item[0], only_ids)
    matching = match_answers([pid for pid, _ in test], answers, lambda a: qid(a["question_id"]))
    correct = img_total = img_correct = failed = 0
    for (pid, problem), answer in zip(test, matching.answers):
        if answer is not None:
            letter = extract_letter(answer["text"])
            is_image = "<image>" in answer["prompt"]
        else:
            letter, is_image = FAILED, bool(problem.get("image"))
        failed += letter == FAILED
        hit = letter_index(letter, len(problem["choices"])) == problem["answer"]
        correct += hit
        if is_image:
            img_total += 1
            img_correct += hit
    return {
        "benchmark": "sqa",
        "score": percent(img_correct, img_total),
        "img_correct": img_correct,
        "img_total": img_total,
        "accuracy": percent(correct, len(test)),
        "correct": correct,
        "total": len(test),
        "failed_extractions": failed,
        **matching.report(),
    }
