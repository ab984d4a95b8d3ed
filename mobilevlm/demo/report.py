"""The demo's closing summary: phase times, the model-zoo row with chance levels, what the yes/no answers check,
example answers, next commands."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mobilevlm.demo.questions import asked_object
from mobilevlm.eval.gqa import QUESTIONS_FILE, convert_prediction, read_balanced_questions
from mobilevlm.eval.records import qid, read_answers, read_jsonl

# Expected score of answering at random on the generated sets: GQA-style has 2-5 candidate answers per
# question type, SQA-style 2-4 options, TextVQA-style two OCR tokens per image, POPE yes/no, MME 5 subtasks x
# (50 + 25), MMBench 3-4 options under circular evaluation.
CHANCE = {"GQA": 30.0, "SQA^I": 36.0, "VQA^T": 50.0, "POPE": 50.0, "MME^P": 375.0, "MMB^dev": 2.0}
# "Clearly above chance", what the --fast demo must reach on every set (POPE: answering "yes" always gives 66.7).
ABOVE_CHANCE = {"GQA": 45.0, "SQA^I": 50.0, "VQA^T": 65.0, "POPE": 72.0, "MME^P": 475.0, "MMB^dev": 15.0}


def below_expectation(row: dict) -> list[str]:
    """The columns of a model-zoo row that are not clearly above chance (empty when all are)."""
    return [column for column, floor in ABOVE_CHANCE.items() if row.get(column, 0.0) < floor]


def gqa_accuracy_by_type(benchmark_data: str | Path, answers: str | Path) -> dict[str, dict]:
    """{question type: {"questions": n, "accuracy": %}} of the GQA-style set (colour, shape, count, position,
    size, ocr), scored as the GQA scorer scores (`gqa.convert_prediction`, exact match)."""
    replies = {qid(row["question_id"]): row["text"] for row in read_answers(Path(answers))}
    asked, right = defaultdict(int), defaultdict(int)
    for question_id, question in read_balanced_questions(Path(benchmark_data) / "gqa" / QUESTIONS_FILE):
        if question_id in replies:
            kind = question["types"]["detailed"]
            asked[kind] += 1
            right[kind] += convert_prediction(replies[question_id]) == question["answer"]
    return {kind: {"questions": asked[kind], "accuracy": 100.0 * right[kind] / asked[kind]} for kind in sorted(asked)}


# The kinds of POPE-style question, by what the image holds of the object asked about. Which of them get "yes"
# shows what a model checks: one that looks up colour and shape together answers "yes" to the first only, one that
# checks the colour alone also to "colour only" and "both elsewhere".
POPE_KINDS = {"present": "present",
              "both elsewhere": "absent; its colour and its shape both on other objects",
              "colour only": "absent; its colour on another object, its shape nowhere",
              "shape only": "absent; its shape on another object, its colour nowhere",
              "neither": "absent; neither its colour nor its shape in the image"}


def pope_yes_by_kind(benchmark_data: str | Path, answers: str | Path) -> dict[str, dict]:
    """{kind: {"questions": n, "yes": % answered yes}} over the three POPE-style splits of a generated
    benchmark_data tree ("Is there a <colour> <shape> in the image?"; every object of an image is asked about
    with label "yes", so the "yes" labels list what it holds)."""
    replies = {qid(row["question_id"]): row["text"].strip().lower().startswith("yes") for row in read_answers(Path(answers))}
    asked, said_yes = defaultdict(int), defaultdict(int)
    for labels_file in sorted((Path(benchmark_data) / "pope" / "coco").glob("coco_pope_*.json")):
        labels = read_jsonl(labels_file, required=("question_id", "image", "text", "label"), what="POPE label file")
        colors, shapes = defaultdict(set), defaultdict(set)  # per image, from its "yes" questions
        for row in labels:
            if row["label"] == "yes":
                color, shape = asked_object(row["text"]).split()
                colors[row["image"]].add(color)
                shapes[row["image"]].add(shape)
        for row in labels:
            if qid(row["question_id"]) not in replies:
                continue
            color, shape = asked_object(row["text"]).split()
            colors_held, shapes_held = colors[row["image"]], shapes[row["image"]]
            if row["label"] == "yes":
                kind = "present"
            elif color in colors_held:
                kind = "both elsewhere" if shape in shapes_held else "colour only"
            else:
                kind = "shape only" if shape in shapes_held else "neither"
            asked[kind] += 1
            said_yes[kind] += replies[qid(row["question_id"])]
    return {kind: {"questions": asked[kind], "yes": 100.0 * said_yes[kind] / asked[kind]} for kind in POPE_KINDS if asked[kind]}


def format_summary(summary: dict) -> str:
    where = f"on {summary.get('device', 'cpu')}, training x{summary.get('scale', 1.0):g}"
    lines = ["", "=" * 72, "MobileVLM demo summary", "=" * 72, "", f"Time per phase ({where}):"]
    for name, seconds in summary["phases"].items():
        lines.append(f"  {name:<52} {seconds:7.0f} s")
    lines.append(f"  {'total':<52} {summary['total_seconds']:7.0f} s")
    probes = summary.get("base_probes")
    if probes:
        tower, llm = probes["tower"], probes["language_model"]
        lines += ["", "Starting point (the bases' probes on held-out scenes; " + ("trained in this run" if summary.get("from_scratch")
                  else f"from {summary['bases']}") + "):",
                  "  tower, linear probes: " + ", ".join(f"{k} {tower[k]:.0f} %" for k in ("color", "shape", "size", "position", "word")),
                  f"  language model: context lookup AUC {llm['context_lookup_auc']:.3f} (chance 0.5), OCR-token copy "
                  f"{llm['ocr_copy_rate']:.0f} % (50), option letter {llm['option_letter_accuracy']:.0f} % (36)"]
    row = summary["row"]
    columns = [c for c in row if c != "Avg"] + (["Avg"] if "Avg" in row else [])
    lines += ["", "Model-zoo row (generated benchmarks; MME^P is out of 1000: 5 perception subtasks):", "",
              "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
              f"| demo {summary['projector']} | " + " | ".join(_fmt(row[c]) for c in columns) + " |",
              "| chance | " + " | ".join(_fmt(CHANCE[c]) if c in CHANCE else "" for c in columns) + " |", ""]
    blank = summary.get("blank_images")
    if blank:
        lines += ["The same model with blank images (the questions alone; chance " + ", ".join(f"{c} {CHANCE[c]:g}" for c in blank)
                  + "): " + ", ".join(f"{c} {_fmt(v)}" for c, v in blank.items()), ""]
    by_type = summary.get("gqa_by_type")
    if by_type:
        lines += ["GQA-style accuracy by question type: " + ", ".join(f"{kind} {share['accuracy']:.0f} % of {share['questions']}"
                                                                  for kind, share in by_type.items()), ""]
    by_kind = summary.get("pope_yes_by_kind")
    if by_kind:
        lines += ["POPE-style questions answered \"yes\", by what the image holds of the object asked about:"]
        lines += [f"  {POPE_KINDS[kind]:<58} {share['yes']:5.1f} % of {share['questions']}" for kind, share in by_kind.items()]
        lines.append("")
    weak = below_expectation(row)
    if weak:
        lines += [f"Not clearly above chance yet (below {', '.join(f'{c} {ABOVE_CHANCE[c]:g}' for c in weak)}): see docs/demo.md.", ""]
    lines += ["Examples on held-out images:"]
    for ex in summary["examples"]:
        mark = "ok" if ex["answer"].strip().lower().rstrip(".") == ex["expected"] else f"expected {ex['expected']}"
        lines.append(f"  {ex['image']}\n    Q: {ex['question']}\n    A: {ex['answer']}   ({mark})")
    model = summary["model"]
    lines += ["", f"Final checkpoint: {model}", "Try it:",
              f"  mobilevlm generate --model {model} --image <image.png> --prompt \"What color is the circle?\"",
              f"  mobilevlm chat --model {model}", f"  mobilevlm serve --model {model}",
              f"  mobilevlm export gguf --model {model} --outdir demo-gguf", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else str(value)
