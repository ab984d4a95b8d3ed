"""MMBench dev (EN): CircularEval with OpenCompass's rule-based option-letter extraction.

The TSV holds each question once per circular pass (index i, i + 1e6, i + 2e6, ...); a question
counts only if every pass is right. Rows whose letter cannot be inferred would go to an LLM judge in
the original; with no judge here they count as wrong and are reported under "unparsed" (single-letter
outputs never need the judge).
"""
from __future__ import annotations

import math
from pathlib import Path

from mobilevlm.errors import DataError
from mobilevlm.eval.records import MAX_LISTED_IDS, match_answers, percent, qid, require_file, restrict

TSV_FILE = "mmbench_dev_en_20231003.tsv"
OPTION_COLUMNS = ("A", "B", "C", "D")
CIRCULAR_STRIDE = 1_000_000
REQUIRED_COLUMNS = ("index", "question", "answer", *OPTION_COLUMNS)
# (prefix, suffix) wrappers tried, in this order, when no bare letter is found.
LETTER_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                   (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def is_missing_cell(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_missing(value) -> bool:
    """How the original generator tells an absent option or hint."""
    return is_missing_cell(value) or (isinstance(value, str) and value.lower() in ("nan", "none"))


def _as_index(value) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def read_tsv(path: Path) -> list[dict]:
    """Rows of an MMBench TSV read with pandas defaults (so "", "NA", "None"... become missing, as in
    the original), NaN turned into None; each row gets its file line under `_line`."""
    import pandas

    path = require_file(path)
    try:
        frame = pandas.read_csv(path, sep="\t")
    except ValueError as err:  # pandas' parser errors and decoding errors are ValueErrors
        raise DataError(f"{path}: malformed TSV ({err})") from err
    absent = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)}")
    rows = []
    for position, record in enumerate(frame.to_dict("records")):
        row = {key: (None if is_missing_cell(value) else value) for key, value in record.items()}
        row["_line"] = position + 2  # header is line 1
        row["index"] = _as_index(row["index"])
        if row["index"] is None:
            raise DataError(f"{path}:{row['_line']}: 'index' must be an integer")
        rows.append(row)
    return rows


def options_of(row: dict) -> list[str]:
    """Options A, B, ... up to the first absent one (the generator's rule)."""
    options = []
    for column in OPTION_COLUMNS:
        if is_missing(row.get(column)):
            break
        options.append(str(row[column]))
    return options


def infer_option(answer: str) -> str | None:
    """A letter A-E standing alone (or in one of the wrappers) exactly once in the answer."""
    if "Failed to obtain answer via API" in answer:
        return None
    tokens = [token.strip() for token in answer.split()]
    letters = "ABCDE"
    bare = [letter for letter in letters if letter in tokens]
    if len(bare) == 1:
        # A lone "A" in a longer answer is more likely the article.
        if bare[0] == "A" and len(tokens) > 3:
            return None
        return bare[0]
    for prefix, suffix in LETTER_WRAPPERS:
        wrapped = [letter for letter in letters if prefix + letter + suffix in tokens]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """The one option whose full text occurs in the answer (case-insensitive)."""
    answer = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    return infer_option(answer) or infer_text(answer, choices)


def _breakdown(groups: list[tuple[dict, bool]], column: str) -> dict[str, float]:
    buckets: dict[str, list[bool]] = {}
    for main_row, hit in groups:
        if main_row.get(column) is not None:
            buckets.setdefault(str(main_row[column]), []).append(hit)
    return {name: percent(sum(hits), len(hits)) for name, hits in sorted(buckets.items())}


def score(answers: list[dict], data_dir: Path, only_ids=None) -> dict:
    path = Path(data_dir) / "mmbench" / TSV_FILE
    rows = restrict(read_tsv(path), lambda row: qid(row["index"]), only_ids)
    matching = match_answers([qid(row["index"]) for row in rows], answers, lambda a: qid(a["question_id"]))
    row_hits: dict[int, bool] = {}
    unparsed = 0
    for row, answer in zip(rows, matching.answers):
        if row["answer"] is None:
            raise DataError(f"{path}:{row['_line']}: no ground-truth 'answer' (not a dev split file?)")
        choices = {column: row[column] for column in OPTION_COLUMNS if row.get(column) is not None}
        letter = can_infer(str(answer["text"]), choices) if answer is not None else None
        unparsed += answer is not None and letter is None
        row_hits[row["index"]] = letter is not None and letter == str(row["answer"])
    mains = sorted((row for row in rows if row["index"] < CIRCULAR_STRIDE), key=lambda row: row["index"])
    passes: dict[int, list[bool]] = {}
    for index, hit in row_hits.items():
        passes.setdefault(index % CIRCULAR_STRIDE, []).append(hit)
    groups = [(row, all(passes[row["index"]])) for row in mains]
    main_indices = {row["index"] for row in mains}
    # Circular copies whose main row is absent belong to no question, as in the original.
    orphans = sorted(index for index in row_hits if index % CIRCULAR_STRIDE not in main_indices)
    return {
        "benchmark": "mmbench",
        "score": percent(sum(hit for _, hit in groups), len(groups)),
        "n_main_questions": len(groups),
        "single_pass_accuracy": percent(sum(row_hits[row["index"]] for row in mains), len(mains)),
        "unparsed": unparsed,
        "rows_without_main_question": {"count": len(orphans), "ids": orphans[:MAX_LISTED_IDS]},
        "split": _breakdown(groups, "split"),
        "category": _breakdown(groups, "category"),
        "l2_category": _breakdown(groups, "l2-category"),
        **matching.report(),
    }
