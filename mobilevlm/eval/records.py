"""Reading benchmark and answer files, and matching answers to the questions they answer.

Every reader raises DataError naming the file (and line, for JSON lines) instead of a bare
KeyError/JSONDecodeError, because benchmark bundles are assembled by hand and often half-copied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

from mobilevlm.errors import DataError

# How many ids a report lists; the counts are always complete.
MAX_LISTED_IDS = 50


def require_file(path: Path, what: str = "benchmark file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


def read_json(path: Path, what: str = "benchmark file") -> Any:
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err


def read_jsonl(path: Path, required: Sequence[str] = (), what: str = "benchmark file") -> list[dict]:
    """All objects of a JSON-lines file; blank lines are skipped, every other line must be an object
    holding the `required` keys. Each object gets its 1-based line number under `_line`."""
    path = require_file(path, what)
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: malformed JSON line ({err.msg})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                absent = [key for key in required if key not in record]
                if absent:
                    raise DataError(f"{path}:{number}: missing field(s) {', '.join(absent)}")
                record["_line"] = number
                records.append(record)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    return records


def read_answers(path: Path) -> list[dict]:
    """An answer file in the LLaVA/MobileVLM format; `text` and `prompt` must be strings."""
    answers = read_jsonl(path, required=("question_id", "text"), what="answer file")
    for answer in answers:
        for key in ("text", "prompt"):
            if key in answer and not isinstance(answer[key], str):
                raise DataError(f"{path}:{answer['_line']}: field {key!r} must be a string")
        answer.setdefault("prompt", "")
        answer["_file"] = str(path)
    return answers


def qid(value: Any) -> str:
    """Question ids are ints in some files and strings in others; they are compared as strings."""
    return str(value)


def _listing(ids: list) -> dict:
    return {"count": len(ids), "ids": ids[:MAX_LISTED_IDS]}


@dataclass
class Matching:
    """Answers lined up with the expected questions (None where unanswered), plus what did not fit."""

    answers: list[dict | None]
    missing: list = field(default_factory=list)
    unknown: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)

    def report(self) -> dict:
        return {
            "n_questions": len(self.answers),
            "n_answered": len(self.answers) - len(self.missing),
            "missing": _listing(self.missing),
            "unknown": _listing(self.unknown),
            "duplicates": _listing(self.duplicates),
        }


def match_answers(
    expected: Sequence[Hashable],
    answers: Iterable[dict],
    answer_key: Callable[[dict], Hashable],
    shown_id: Callable[[Hashable], Any] = lambda key: key,
) -> Matching:
    """Pair each expected question key with an answer of the same key.

    Keys may repeat (TextVQA and MME ids name an image, not a question); repeated keys are paired in
    order. Answers with keys not expected are `unknown`, surplus answers for a key are `duplicates`;
    expected keys left without an answer are `missing` and stay in every denominator.
    """
    slots: dict[Hashable, list[int]] = {}
    for position, key in enumerate(expected):
        slots.setdefault(key, []).append(position)
    paired: list[dict | None] = [None] * len(expected)
    result = Matching(paired)
    for answer in answers:
        key = answer_key(answer)
        free = slots.get(key)
        if free is None:
            result.unknown.append(answer["question_id"])
        elif not free:
            result.duplicates.append(answer["question_id"])
        else:
            paired[free.pop(0)] = answer
    result.missing = [shown_id(key) for key, answer in zip(expected, paired) if answer is None]
    return result


def restrict(items: list, key: Callable[[Any], str], only_ids: Iterable | None) -> list:
    """Items whose question id is in `only_ids` (all items when it is None): scoring a --limit run."""
    if only_ids is None:
        return items
    wanted = {qid(value) for value in only_ids}
    return [item for item in items if key(item) in wanted]


def percent(numerator: float, denominator: int) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0
