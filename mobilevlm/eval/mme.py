"""MME: LLaVA's `convert_answer_to_mme.py` + MME's `calculation.py`; MME^P = perception sum.

Ground truth lives in the MME release folder (`mme/images/<subtask>/...txt`, or
`questions_answers_YN/` for subtasks that keep images in `images/`). Answers are matched to the
question file by (image path, prompt), since both questions of an image share the question id.
A missing answer counts as "other" (wrong). The original writes the raw model text into TAB-separated
files, so a text holding a TAB or newline corrupts its result files; here texts are scored as they are.
"""
from __future__ import annotations

from pathlib import Path

from mobilevlm.errors import DataError
from mobilevlm.eval.records import match_answers, percent, qid, read_jsonl, require_file, restrict

QUESTION_FILE = "llava_mme.jsonl"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SINGLE_WORD_SUFFIX = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."


def label(text: str) -> str:
    """yes / no / other from the first four characters, lower-cased (MME's rule)."""
    head = text.lower()[:4]
    if "yes" in head:
        return "yes"
    return "no" if "no" in head else "other"


def _qa_folder(subtask_dir: Path) -> Path:
    return subtask_dir / "questions_answers_YN" if (subtask_dir / "images").is_dir() else subtask_dir


def read_ground_truth(mme_images: Path, subtask: str, txt_name: str) -> dict[str, str]:
    """question text -> "yes"/"no" for one image's QA file."""
    path = require_file(_qa_folder(mme_images / subtask) / txt_name, "MME ground-truth file")
    truth = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.strip().split("\t")
            if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                raise DataError(f"{path}:{number}: expected 'question<TAB>Yes|No'")
            truth[fields[0]] = fields[1].lower()
    return truth


def gt_question(prompt: str, truth: dict[str, str]) -> str:
    """The QA-file form of a prompt: single-word suffix dropped, MME's suffix restored (with the
    two-space variant some MME questions have)."""
    question = prompt.replace(SINGLE_WORD_SUFFIX, "").strip()
    if MME_SUFFIX in question:
        return question
    base = question
    question = f"{base} {MME_SUFFIX}"
    return question if question in truth else f"{base}  {MME_SUFFIX}"


def score(answers: list[dict], data_dir: Path, only_ids=None) -> dict:
    mme_dir = Path(data_dir) / "mme"
    question_path = mme_dir / QUESTION_FILE
    questions = restrict(read_jsonl(question_path, required=("question_id", "text")), lambda q: qid(q["question_id"]), only_ids)
    expected = [(qid(q["question_id"]), q["text"]) for q in questions]
    matching = match_answers(expected, answers, lambda a: (qid(a["question_id"]), a["prompt"]),
                             shown_id=lambda key: key[0])
    truth_files: dict[tuple[str, str], dict[str, str]] = {}
    # subtask -> image -> list of per-question hits
    hits: dict[str, dict[str, list[bool]]] = {}
    for question, answer in zip(questions, matching.answers):
        image = qid(question["question_id"])
        subtask = image.split("/")[0]
        txt_name = image.split("/")[-1].split(".")[0] + ".txt"
        if (subtask, txt_name) not in truth_files:
            truth_files[(subtask, txt_name)] = read_ground_truth(mme_dir / "images", subtask, txt_name)
        truth = truth_files[(subtask, txt_name)]
        key = gt_question(question["text"], truth)
        if key not in truth:
            raise DataError(f"{question_path}:{question['_line']}: question not found in the ground truth of {image}")
        hit = answer is not None and label(answer["text"]) == truth[key]
        hits.setdefault(subtask, {}).setdefault(image, []).append(hit)
    subtasks = {}
    for subtask, images in sorted(hits.items()):
        flat = [hit for per_image in images.values() for hit in per_image]
        acc = percent(sum(flat), len(flat))
        acc_plus = percent(sum(all(per_image) for per_image in images.values()), len(images))
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(subtasks[name]["score"] for name in PERCEPTION if name in subtasks)
    cognition = sum(subtasks[name]["score"] for name in COGNITION if name in subtasks)
    return {
        "benchmark": "mme",
        "score": perception,
        "perception": perception,
        "cognition": cognition,
        "subtasks": subtasks,
        **matching.report(),
    }
