"""One entry point over the six scorers: answer file + benchmark data folder -> metrics dict."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable

from mobilevlm.errors import DataError
from mobilevlm.eval import BENCHMARKS
from mobilevlm.eval.records import read_answers


def scorer(benchmark: str):
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"mobilevlm.eval.{benchmark}").score


def score_answers(benchmark: str, answers: list[dict], data_dir: Path, only_ids: Iterable | None = None) -> dict:
    """Metrics with the headline under "score" (percent; MME perception in points). `only_ids`
    restricts the expected questions, for runs that answered only some of them on purpose."""
    return scorer(benchmark)(answers, Path(data_dir), only_ids=only_ids)


def score_file(benchmark: str, answers_path: Path, data_dir: Path, only_ids: Iterable | None = None) -> dict:
    metrics = score_answers(benchmark, read_answers(Path(answers_path)), data_dir, only_ids)
    metrics["answers_file"] = str(answers_path)
    return metrics
