"""The demo's closing summary: phase times, the model-zoo row with chance levels, example answers, next commands."""
from __future__ import annotations

# Expected score of answering at random on the generated sets: GQA-style has 2-5 candidate answers per
# question type, SQA-style 2-4 options, TextVQA-style two OCR tokens per image, POPE yes/no, MME 5 subtasks x
# (50 + 25), MMBench 3-4 options under circular evaluation.
CHANCE = {"GQA": 30.0, "SQA^I": 36.0, "VQA^T": 50.0, "POPE": 50.0, "MME^P": 375.0, "MMB^dev": 2.0}
# "Clearly above chance", what the --fast demo must reach on every set (POPE: answering "yes" always gives 66.7).
ABOVE_CHANCE = {"GQA": 45.0, "SQA^I": 50.0, "VQA^T": 65.0, "POPE": 72.0, "MME^P": 475.0, "MMB^dev": 15.0}


def below_expectation(row: dict) -> list[str]:
    """The columns of a model-zoo row that are not clearly above chance (empty when all are)."""
    return [column for column, floor in ABOVE_CHANCE.items() if row.get(column, 0.0) < floor]


def format_summary(summary: dict) -> str:
    where = f"on {summary.get('device', 'cpu')}, training x{summary.get('scale', 1.0):g}"
    lines = ["", "=" * 72, "MobileVLM demo summary", "=" * 72, "", f"Time per phase ({where}):"]
    for name, seconds in summary["phases"].items():
        lines.append(f"  {name:<45} {seconds:7.0f} s")
    lines.append(f"  {'total':<45} {summary['total_seconds']:7.0f} s")
    lookup = summary.get("llm", {}).get("context_lookup_auc")
    if lookup is not None:
        lines += ["", f"Language model's context lookup before any image (AUC, 0.5 = chance): {lookup:.3f}"]
    row = summary["row"]
    columns = [c for c in row if c != "Avg"] + (["Avg"] if "Avg" in row else [])
    lines += ["", "Model-zoo row (generated benchmarks; MME^P is out of 1000: 5 perception subtasks):", "",
              "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
              f"| demo {summary['projector']} | " + " | ".join(_fmt(row[c]) for c in columns) + " |",
              "| chance | " + " | ".join(_fmt(CHANCE[c]) if c in CHANCE else "" for c in columns) + " |", ""]
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
