"""POPE (COCO, LLaVA's 8,910-question file): LLaVA `eval_pope.py` semantics, reported as mean F1.

Labels come from `pope/coco/coco_pope_<category>.json` and line up with the question file by
position within each category (their own question ids differ). The original also pairs answers by
position; here answers are matched by question id, which is the same thing for a complete answer
file in question order and stays right for shuffled or partial ones. A missing answer counts as the
wrong one of yes/no, so it stays in the denominator.
"""
from __future__ import annotations

from pathlib import Path

from mobilevlm.errors import DataError
from mobilevlm.eval.records import match_answers, percent, qid, read_jsonl, restrict

QUESTION_FILE = "llava_pope_test.jsonl"
LABEL_DIR = "coco"
LABEL_PREFIX = "coco_pope_"


def parse_answer(text: str) -> str:
    """First sentence, commas removed, "no" iff a space-separated word is exactly No / not / no."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in ("No", "not", "no") for word in words) else "yes"


def read_labels(pope_dir: Path, questions: list[dict]) -> dict[str, str]:
    """question id -> "yes"/"no", checking each label file against the questions it is paired with."""
    label_dir = pope_dir / LABEL_DIR
    files = sorted(label_dir.glob(f"{LABEL_PREFIX}*.json")) if label_dir.is_dir() else []
    if not files:
        raise DataError(f"{label_dir}: no {LABEL_PREFIX}<category>.json label files")
    by_category: dict[str, list[dict]] = {}
    for question in questions:
        by_category.setdefault(question["category"], []).append(question)
    labels: dict[str, str] = {}
    for path in files:
        category = path.name[len(LABEL_PREFIX):-len(".json")]
        rows = read_jsonl(path, required=("label", "text"))
        asked = by_category.pop(category, [])
        if len(rows) != len(asked):
            raise DataError(
                f"{path}: {len(rows)} labels but {len(asked)} questions of category {category!r} in "
                f"{QUESTION_FILE} (a POPE label file of another version?)"
            )
        for row, question in zip(rows, asked):
            if row["label"] not in ("yes", "no"):
                raise DataError(f"{path}:{row['_line']}: label must be 'yes' or 'no', got {row['label']!r}")
            same_image = row.get("image", question.get("image")) == question.get("image")
            if not same_image or not question["text"].startswith(row["text"]):
                raise DataError(
                    f"{path}:{row['_line']}: does not match {QUESTION_FILE} line {question['_line']} "
                    f"(question id {question['question_id']}); label and question files are out of step"
                )
            labels[qid(question["question_id"])] = row["label"]
    if by_category:
        raise DataError(f"{label_dir}: no label file for categories {sorted(by_category)} of {QUESTION_FILE}")
    return labels


def category_metrics(pairs: list[tuple[str, str]]) -> dict:
    """pairs of (prediction, label); "yes" is the positive class."""
    tp = sum(pred == "yes" and gold == "yes" for pred, gold in pairs)
    fp = sum(pred == "yes" and gold == "no" for pred, gold in pairs)
    tn = sum(pred == "no" and gold == "no" for pred, gold in pairs)
    fn = sum(pred == "no" and gold == "yes" for pred, gold in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "accuracy": percent(tp + tn, len(pairs)),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": percent(tp + fp, len(pairs)),
    }


def score(answers: list[dict], data_dir: Path, only_ids=None) -> dict:
    pope_dir = Path(data_dir) / "pope"
    questions = read_jsonl(pope_dir / QUESTION_FILE, required=("question_id", "text", "category"))
    labels = read_labels(pope_dir, questions)
    questions = restrict(questions, lambda q: qid(q["question_id"]), only_ids)
    matching = match_answers([qid(q["question_id"]) for q in questions], answers, lambda a: qid(a["question_id"]))
    per_category: dict[str, list[tuple[str, str]]] = {}
    for question, answer in zip(questions, matching.answers):
        gold = labels[qid(question["question_id"])]
        # An unanswered question is scored as the wrong answer.
        pred = parse_answer(answer["text"]) if answer is not None else ("no" if gold == "yes" else "yes")
        per_category.setdefault(question["category"], []).append((pred, gold))
    categories = {name: category_metrics(pairs) for name, pairs in sorted(per_category.items())}
    mean_f1 = sum(m["f1"] for m in categories.values()) / len(categories) if categories else 0.0
    mean_acc = sum(m["accuracy"] for m in categories.values()) / len(categories) if categories else 0.0
    return {
        "benchmark": "pope",
        "score": mean_f1,
        "mean_accuracy": mean_acc,
        "categories": categories,
        **matching.report(),
    }
