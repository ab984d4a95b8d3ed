"""`run_evaluation`: generation + scoring over the benchmarks, and the README model-zoo row.

The row's Avg is the mean of the six columns with MME^P divided by 20 (points out of 2000 -> percent),
which is how the MobileVLM README computes it; with fewer benchmarks it is the mean of those present.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from mobilevlm.errors import DataError
from mobilevlm.eval import BENCHMARKS
from mobilevlm.eval.launcher import run_generation, selected_items
from mobilevlm.eval.records import read_answers
from mobilevlm.eval.scoring import score_answers

COLUMNS = {"gqa": "GQA", "sqa": "SQA^I", "textvqa": "VQA^T", "pope": "POPE", "mme": "MME^P", "mmbench": "MMB^dev"}
MME_TO_PERCENT = 1 / 20


def model_zoo_row(scores: dict[str, float]) -> dict[str, float]:
    """Column -> value in model-zoo order, plus Avg."""
    row = {COLUMNS[name]: scores[name] for name in BENCHMARKS if name in scores}
    percents = [value * MME_TO_PERCENT if name == "mme" else value for name, value in scores.items()]
    row["Avg"] = sum(percents) / len(percents) if percents else 0.0
    return row


def markdown_row(model_id: str, row: dict[str, float]) -> str:
    header = ["Model", *row]
    cells = [model_id] + [f"{value:.1f}" for value in row.values()]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |"]) + "\n"


def _progress(name: str, log: Callable[[str], None]) -> Callable[[int, int], None]:
    """Logs generation progress about every tenth of the way."""
    reported = [-1]

    def report(done: int, total: int) -> None:
        step = done * 10 // max(total, 1)
        if step > reported[0]:
            reported[0] = step
            log(f"{name}: {done}/{total} new answers")

    return report


def parse_benchmarks(names: str | Sequence[str]) -> list[str]:
    chosen = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    chosen = list(dict.fromkeys(chosen))
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown or not chosen:
        raise DataError(f"unknown benchmark(s) {unknown or chosen}; choose from {', '.join(BENCHMARKS)}")
    return chosen


def run_evaluation(model: str | Path, data_dir: str | Path, benchmarks: str | Sequence[str] = BENCHMARKS,
                   out_dir: str | Path | None = None, batch_size: int = 1, num_chunks: int = 1,
                   limit: int | None = None, device: str = "cpu", dtype: str | None = None,
                   conv_mode: str | None = None, max_new_tokens: int | None = None, pipe=None,
                   log: Callable[[str], None] = lambda message: None) -> dict:
    """Generate (resuming) and score each benchmark; writes `results.json` and `results.md` in `out_dir`
    and returns {"model_id", "row", "metrics", "answers", "files"}. With `limit`, only the first `limit`
    questions of each benchmark are asked and scored. `pipe` (a loaded `Pipeline`) is used as is when
    everything runs in this process; `max_new_tokens` overrides the original budgets (smoke runs only)."""
    from mobilevlm.eval.generate import model_name

    chosen = parse_benchmarks(benchmarks)
    model_id = model_name(model)
    out_dir = Path(out_dir) if out_dir is not None else Path("eval_results") / model_id
    out_dir.mkdir(parents=True, exist_ok=True)
    if pipe is None and num_chunks == 1:
        from mobilevlm.generation import Pipeline

        pipe = Pipeline.from_pretrained(str(model), device=device, dtype=dtype)
    metrics, answer_files = {}, {}
    for name in chosen:
        log(f"{name}: generating")
        answers = run_generation(str(model), name, Path(data_dir), out_dir, num_chunks, batch_size, limit,
                                 device, dtype, conv_mode, max_new_tokens, pipe, _progress(name, log))
        only_ids = [item.question_id for item in selected_items(name, Path(data_dir), limit)] if limit is not None else None
        metrics[name] = score_answers(name, read_answers(answers), Path(data_dir), only_ids)
        answer_files[name] = str(answers)
        log(f"{name}: score {metrics[name]['score']:.2f}")
    row = model_zoo_row({name: m["score"] for name, m in metrics.items()})
    result = {"model_id": model_id, "row": row, "metrics": metrics, "answers": answer_files, "limit": limit,
              "max_new_tokens": max_new_tokens}
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown_row(model_id, row))
    result["files"] = {"json": str(json_path), "markdown": str(md_path)}
    return result
