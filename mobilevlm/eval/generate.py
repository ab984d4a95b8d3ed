"""Answer files as the original generators write them: greedy, v1 template, one flushed line per answer.

A run over chunk k of K takes the k-th of the contiguous ceil(N/K)-sized chunks of the question list,
like the original's `--num-chunks/--chunk-idx`. Re-running on an existing answer file skips the
questions it already answers (a half-written last line from a killed run is dropped and redone).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

from mobilevlm.eval.benchmarks import MAX_NEW_TOKENS, Item
from mobilevlm.eval.records import read_answers


def model_name(model_path: str | Path) -> str:
    """The answer files' `model_id`: the checkpoint folder name, with its parent for `checkpoint-N` folders."""
    parts = str(model_path).rstrip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk index {chunk_idx} is outside 0..{num_chunks - 1}")
    size = math.ceil(len(items) / num_chunks) if items else 0
    return list(items[chunk_idx * size:(chunk_idx + 1) * size]) if size else []


def answered_keys(path: Path) -> Counter:
    """(question id, prompt) of the answers already in `path`, after cutting off a partial last line."""
    if not path.is_file():
        return Counter()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
    return Counter((str(a["question_id"]), a["prompt"]) for a in read_answers(path))


@contextmanager
def preprocessing(pipe, pad: bool):
    """ScienceQA feeds the raw CLIP processor (no padding to a square) whatever the checkpoint says."""
    saved = pipe.image_aspect_ratio
    pipe.image_aspect_ratio = saved if pad else None
    try:
        yield
    finally:
        pipe.image_aspect_ratio = saved


def answer_line(item: Item, text: str, model_id: str) -> dict:
    import shortuuid

    line = {"question_id": item.question_id}
    line.update({k: v for k, v in item.extra.items() if k == "round_id"})
    line.update(prompt=item.prompt, text=text)
    line.update({k: v for k, v in item.extra.items() if k != "round_id"})
    line.update(answer_id=shortuuid.uuid(), model_id=model_id, metadata={})
    return line


def generate_answers(pipe, benchmark: str, items: Sequence[Item], answers_path: Path, model_id: str,
                     batch_size: int = 1, conv_mode: str | None = None, max_new_tokens: int | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> int:
    """Append answers for the items not yet in `answers_path`; returns how many were generated.
    `max_new_tokens` overrides the original's per-benchmark budget (for smoke runs only)."""
    answers_path = Path(answers_path)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    done = answered_keys(answers_path)
    pending = []
    for item in items:
        if done[item.key]:
            done[item.key] -= 1
        else:
            pending.append(item)
    settings = dict(temperature=0, top_p=None, num_beams=1, max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[benchmark])
    with open(answers_path, "a", encoding="utf-8") as out:
        for start in range(0, len(pending), max(1, batch_size)):
            batch = pending[start:start + max(1, batch_size)]
            requests = []
            for item in batch:
                images = [item.open_image()] if item.open_image else []
                requests.append((pipe.build_prompt(item.question, num_images=len(images), conv_mode=conv_mode), images))
            with preprocessing(pipe, batch[0].pad):
                texts = pipe.generate_batch(requests, **settings)
            for item, text in zip(batch, texts):
                out.write(json.dumps(answer_line(item, text, model_id)) + "\n")
            out.flush()
            if on_progress:
                on_progress(start + len(batch), len(pending))
    return len(pending)
