"""GQA testdev-balanced: LLaVA's `convert_gqa_for_eval.py` then the official GQA `eval.py` accuracy.

Conversion: trailing "." removed (periods only), lower-cased. Scoring: exact string equality with the
gold answer over the balanced questions of `testdev_balanced_questions.json`. The original raises on
a missing prediction; here it is reported and counted wrong. Validity, plausibility and distribution
are not computed (the first two are 0 on testdev anyway, the choices file being absent).
"""
from __future__ import annotations

from pathlib import Path

from mobilevlm.errors import DataError
from mobilevlm.eval.records import match_answers, percent, qid, read_json, restrict

QUESTIONS_FILE = "testdev_balanced_questions.json"


def convert_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def read_balanced_questions(path: Path) -> list[tuple[str, dict]]:
    questions = read_json(path)
    if not isinstance(questions, dict):
        raise DataError(f"{path}: expected an object keyed by question id")
    balanced = []
    for question_id, question in questions.items():
        if not isinstance(question, dict) or "answer" not in question:
            raise DataError(f"{path}: question {question_id!r} has no 'answer'")
        if question.get("isBalanced", False):
            balanced.append((qid(question_id), question))
    return balanced


def score(answers: list[dict], data_dir: Path, only_ids=None) -> dict:
    questions = read_balanced_questions(Path(data_dir) / "gqa" / QUESTIONS_FILE)
    questions = restrict(questions, lambda item: item[0], only_ids)
    matching = match_answers([question_id for question_id, _ in questions], answers, lambda a: qid(a["question_id"]))
    totals = {"all": [0, 0], "open": [0, 0], "binary": [0, 0]}
    for (_, question), answer in zip(questions, matching.answers):
        hit = answer is not None and convert_prediction(answer["text"]) == question["answer"]
        # The official script calls questions of structural type "query" open, all others binary.
        kind = "open" if question.get("types", {}).get("structural") == "query" else "binary"
        for name in ("all", kind):
            totals[name][0] += hit
            totals[name][1] += 1
    return {
        "benchmark": "gqa",
        "score": percent(*totals["all"]),
        "correct": totals["all"][0],
        "open_accuracy": percent(*totals["open"]),
        "binary_accuracy": percent(*totals["binary"]),
        **matching.report(),
    }
