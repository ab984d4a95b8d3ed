"""Generation for one benchmark: one chunk in this process, or all chunks as subprocesses, merged in order.

Chunk k of K writes `<out>/<benchmark>/chunks/<K>_<k>.jsonl`; the merged `<out>/<benchmark>/answers.jsonl`
is their concatenation in chunk order, i.e. question-file order, as the original's shell scripts do.
Chunk files are kept, so an interrupted run picks up where each chunk stopped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mobilevlm.errors import MobileVLMError
from mobilevlm.eval.benchmarks import read_items
from mobilevlm.eval.generate import generate_answers, get_chunk, model_name


class ChunkFailed(MobileVLMError):
    """A generation subprocess exited with an error; its log file says why."""


def chunk_path(out_dir: Path, benchmark: str, num_chunks: int, chunk_idx: int) -> Path:
    return Path(out_dir) / benchmark / "chunks" / f"{num_chunks}_{chunk_idx}.jsonl"


def answers_path(out_dir: Path, benchmark: str) -> Path:
    return Path(out_dir) / benchmark / "answers.jsonl"


def selected_items(benchmark: str, data_dir: Path, limit: int | None = None) -> list:
    items = read_items(benchmark, Path(data_dir))
    return items[:limit] if limit is not None else items


def run_chunk(model: str, benchmark: str, data_dir: Path, answers: Path, num_chunks: int = 1, chunk_idx: int = 0,
              batch_size: int = 1, limit: int | None = None, device: str = "cpu", dtype: str | None = None,
              conv_mode: str | None = None, max_new_tokens: int | None = None, pipe=None, on_progress=None) -> int:
    """Generate the answers of one chunk into `answers`; returns how many were generated now."""
    items = get_chunk(selected_items(benchmark, data_dir, limit), num_chunks, chunk_idx)
    if pipe is None:
        from mobilevlm.generation import Pipeline

        pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype)
    return generate_answers(pipe, benchmark, items, Path(answers), model_name(model), batch_size, conv_mode,
                            max_new_tokens, on_progress)


def merge(parts: list[Path], merged: Path) -> Path:
    partial = merged.with_suffix(".jsonl.partial")
    with open(partial, "wb") as out:
        for part in parts:
            if part.is_file():
                out.write(part.read_bytes())
    partial.replace(merged)
    return merged


def _chunk_env(num_chunks: int, chunk_idx: int, device: str) -> dict:
    env = dict(os.environ)
    if device.startswith("cuda"):
        gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g] or [str(i) for i in range(_gpu_count())]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[chunk_idx % len(gpus)]
    else:
        # Chunks share the CPU: split its cores instead of oversubscribing them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_chunks))
    return env


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_generation(model: str, benchmark: str, data_dir: Path, out_dir: Path, num_chunks: int = 1,
                   batch_size: int = 1, limit: int | None = None, device: str = "cpu", dtype: str | None = None,
                   conv_mode: str | None = None, max_new_tokens: int | None = None, pipe=None,
                   on_progress=None) -> Path:
    """All chunks of one benchmark, then the merged answer file (returned). `on_progress(done, total)`
    follows an in-process run."""
    parts = [chunk_path(out_dir, benchmark, num_chunks, k) for k in range(num_chunks)]
    parts[0].parent.mkdir(parents=True, exist_ok=True)
    if num_chunks == 1:
        run_chunk(model, benchmark, data_dir, parts[0], 1, 0, batch_size, limit, device, dtype, conv_mode,
                  max_new_tokens, pipe, on_progress)
        return merge(parts, answers_path(out_dir, benchmark))
    running = []
    for k, part in enumerate(parts):
        # Each GPU chunk sees one device (CUDA_VISIBLE_DEVICES), which it calls "cuda".
        chunk_device = "cuda" if device.startswith("cuda") else device
        command = [sys.executable, "-m", "mobilevlm.cli", "eval", "generate", benchmark, "--model", str(model),
                   "--data-dir", str(data_dir), "--answers", str(part), "--num-chunks", str(num_chunks),
                   "--chunk-idx", str(k), "--batch-size", str(batch_size), "--device", chunk_device]
        command += ["--limit", str(limit)] if limit is not None else []
        command += ["--dtype", dtype] if dtype else []
        command += ["--conv-mode", conv_mode] if conv_mode else []
        command += ["--max-new-tokens", str(max_new_tokens)] if max_new_tokens else []
        log = open(part.with_suffix(".log"), "w")
        running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env=_chunk_env(num_chunks, k, device)), log, part))
    failed = []
    for process, log, part in running:
        if process.wait() != 0:
            failed.append(str(part.with_suffix(".log")))
        log.close()
    if failed:
        raise ChunkFailed(f"{benchmark}: {len(failed)} generation chunk(s) failed; see {', '.join(failed)}")
    return merge(parts, answers_path(out_dir, benchmark))
