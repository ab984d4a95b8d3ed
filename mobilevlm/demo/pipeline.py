"""`run_demo`: shipped bases + generated data -> stage I -> stage II -> evaluation -> examples.

As the real recipe starts from a pre-trained MobileLLaMA and CLIP ViT, the demo starts from the small bases
shipped in the package (`shipped.py`; `--from-scratch` trains them inside the run instead). Stages I and II run
through the project's own training pipeline (`mobilevlm.train.pipeline.run_pipeline`, the run.sh equivalent,
with the CPU-sized V2 or V1 recipe) and the evaluation through `mobilevlm.eval`, on the generated
benchmark_data tree: the demo exercises the real code paths end to end, only smaller.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from mobilevlm.demo import benchmarks, report, shipped, trainsets
from mobilevlm.errors import MobileVLMError

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Stage I and stage II of one demo run (the bases are `shipped.BaseSettings`)."""
    train_images: int = 6000
    pretrain_samples: int = 4000
    finetune_samples: int = 2200
    # text-only reading conversations in stage II, so that the bases' text skills survive instruction tuning
    reading_in_finetune: int = 300
    eval_sizes: dict = field(default_factory=lambda: dict(benchmarks.FULL_SIZES))
    # Tiny models learn from the number of updates more than from the batch: small batches, two epochs.
    pretrain_epochs: float = 2.0
    finetune_epochs: float = 2.0
    pretrain_lr: float = 1e-3
    pretrain_projector_lr: float = 3e-3
    finetune_lr: float = 1e-3
    batch_size: int = 8
    word_fraction: float = 0.25
    mix: trainsets.Mix = trainsets.Mix()


FULL = DemoSettings()
# The full demo's training with the small test sets: what CI runs.
FAST = replace(FULL, eval_sizes=dict(benchmarks.FAST_SIZES))
PROJECTORS = {"ldpnetv2": "tiny_v2", "ldpnet": "tiny_v1"}
# `--from-scratch`: the bases trained inside the run, at a size that fits beside the two stages.
FROM_SCRATCH = replace(shipped.BaseSettings(), corpus_scenes=6000, clip_steps=60, patch_weight=0.0, reading_samples=4000,
                       llm_steps=400, llm_batch=8)


def scaled(settings: DemoSettings, factor: float) -> DemoSettings:
    """The same recipe with `factor` times the stage data and updates (the test sets stay): how far the demo's
    scores go with more compute, e.g. on a GPU."""
    def times(n: int) -> int:
        return max(1, round(n * factor))

    return replace(settings, train_images=times(settings.train_images), pretrain_samples=times(settings.pretrain_samples),
                   finetune_samples=times(settings.finetune_samples), reading_in_finetune=times(settings.reading_in_finetune))


class _Clock:
    """Named phases with their wall time, printed as they finish and kept for the summary."""

    def __init__(self, log: Log):
        self.log = log
        self.start = time.time()
        self.phases: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        self.log(f"==> {name}")
        begin = time.time()
        result = fn(*args, **kwargs)
        self.phases[name] = time.time() - begin
        self.log(f"    {name}: done in {self.phases[name]:.0f}s (total {time.time() - self.start:.0f}s)")
        return result


def _progress_callback(log: Log):
    from transformers import PrinterCallback

    class Progress(PrinterCallback):  # replaces the Trainer's own printer: one line per logged update
        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                done = state.global_step / max(1, state.max_steps)
                log(f"    step {state.global_step}/{state.max_steps} [{'#' * int(20 * done):<20}] "
                    f"loss {logs['loss']:.3f} lr {logs.get('learning_rate', 0):.1e} ({time.time() - self.begin:.0f}s)")

    return Progress()


def prepare_data(out: Path, seed: int, settings: DemoSettings) -> dict:
    """Images, stage-I / stage-II JSON and the benchmark_data tree; evaluation scenes never occur in training."""
    scenes = trainsets.training_scenes(seed, settings.train_images, settings.word_fraction)
    names = trainsets.save_images(scenes, out / "data" / "images")
    captions = trainsets.caption_samples(scenes[: settings.pretrain_samples], names, seed)
    rng = random.Random(f"{seed}:finetune-order")
    order = rng.sample(range(len(scenes)), min(settings.finetune_samples, len(scenes)))
    instructions = trainsets.instruction_samples([scenes[i] for i in order], [names[i] for i in order], seed,
                                                  mix=settings.mix)
    finetune = instructions + trainsets.reading_samples(scenes, seed, settings.reading_in_finetune)
    benchmarks.write_benchmark_data(out / "benchmark_data", seed, settings.eval_sizes, scenes)
    return {
        "scenes": scenes,
        "pretrain_json": trainsets.write_json(out / "data" / "pretrain.json", captions),
        "finetune_json": trainsets.write_json(out / "data" / "finetune.json", finetune),
        "images": out / "data" / "images",
        "benchmark_data": out / "benchmark_data",
    }


def clear_previous_run(out: Path) -> None:
    """Make `out` ready for a new demo. The training pipeline and the evaluation resume from what they find
    (finished stage checkpoints, answer files), so a previous demo's train/ and eval/ would be taken for this
    run's: they are removed. Anything else in a non-empty folder that is not a demo's is left alone, and the
    demo refuses to write there."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not ((out / "demo_summary.json").exists() or (out / "data" / "pretrain.json").exists()):
        raise MobileVLMError(f"--out {out}: the folder is not empty and holds no previous demo; choose a new or empty folder")
    for stale in ("train", "eval", "eval_blank", "benchmark_data_blank"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "demo_summary.json").unlink(missing_ok=True)


def _stage_args(epochs: float, lr: float, batch: int, device: str, seed: int, extra: list[str] = ()) -> list[str]:
    # the Trainer takes a GPU whenever there is one: --use_cpu keeps a CPU demo on the CPU
    where = ["--use_cpu", "True"] if device == "cpu" else []
    return ["--num_train_epochs", str(epochs), "--learning_rate", str(lr), "--per_device_train_batch_size", str(batch),
            "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05", "--save_strategy", "no", "--logging_steps", "10",
            "--disable_tqdm", "True", "--model_max_length", "256", "--seed", str(seed), *where, *extra]


def run_demo(out: str | Path, seed: int = 0, fast: bool = False, projector: str = "ldpnetv2",
             settings: DemoSettings | None = None, log: Log = print, examples: int = 4, device: str = "cpu",
             scale: float = 1.0, bases_dir: str | Path | None = None, from_scratch: bool = False,
             base_settings: shipped.BaseSettings | None = None) -> dict:
    """The whole demo; returns {"model", "row", "metrics", "phases", "examples", ...} and writes demo_summary.json.
    Everything trains and runs on `device` ("cpu" or "cuda"), in float32; `scale` multiplies the stage training
    (`scaled`). The run starts from the shipped bases, from `bases_dir`, or (`from_scratch`) from bases trained
    first inside the run (`base_settings`, default `FROM_SCRATCH`)."""
    import torch

    if projector not in PROJECTORS:
        raise MobileVLMError(f"--projector {projector!r}: use one of {', '.join(PROJECTORS)}")
    if scale <= 0:
        raise MobileVLMError(f"--scale {scale}: must be positive")
    if device == "cuda" and not torch.cuda.is_available():
        raise MobileVLMError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if from_scratch and bases_dir:
        raise MobileVLMError("--from-scratch trains its own bases: leave out --bases")
    base = Path(out) / "base" if from_scratch else Path(bases_dir) if bases_dir else shipped.SHIPPED
    manifest = None if from_scratch else shipped.verify(base)  # before any work

    from mobilevlm.eval.evaluate import run_evaluation
    from mobilevlm.train.pipeline import run_pipeline

    settings = scaled(settings or (FAST if fast else FULL), scale)
    out = Path(out)
    clear_previous_run(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clock = _Clock(log)
    if from_scratch:
        manifest = clock.run("pre-train tokenizer, CLIP tower and MobileLLaMA", shipped.build_bases, base,
                             replace(base_settings or FROM_SCRATCH, seed=seed), log=log, device=device,
                             command=f"mobilevlm demo --from-scratch --seed {seed}")
    else:
        log(f"starting from the bases in {base} (built by `{manifest['built_by']}`)")
    data = clock.run("generate data", prepare_data, out, seed, settings)
    recipe = PROJECTORS[projector]
    train_dir = out / "train"
    common = dict(language_model=str(base / shipped.LLM_DIR), vision_model=str(base / shipped.TOWER_DIR),
                  output_dir=str(train_dir), pretrain_data=str(data["pretrain_json"]), pretrain_images=str(data["images"]),
                  finetune_data=str(data["finetune_json"]), finetune_images=str(data["images"]),
                  callbacks=[_progress_callback(log)])
    projector_lr = ["--mm_projector_lr", str(settings.pretrain_projector_lr)] if recipe == "tiny_v2" else []
    pretrain_lr = settings.pretrain_projector_lr if recipe == "tiny_v1" else settings.pretrain_lr
    pretrain_args = _stage_args(settings.pretrain_epochs, pretrain_lr, settings.batch_size, device, seed, projector_lr)
    finetune_args = _stage_args(settings.finetune_epochs, settings.finetune_lr, settings.batch_size, device, seed)
    clock.run("stage I: pre-training (plain captions)", run_pipeline, recipe, "pretrain", pretrain_args=pretrain_args, **common)
    trained = clock.run("stage II: instruction tuning (v1)", run_pipeline, recipe, "pretrain-finetune",
                        pretrain_args=pretrain_args, finetune_args=finetune_args, **common)
    model_dir = trained["finetune"]
    evaluation = clock.run("evaluate on the six generated benchmarks", run_evaluation, model_dir, data["benchmark_data"],
                           out_dir=out / "eval", batch_size=16, device=device, dtype="float32", log=lambda m: log(f"    {m}"))
    blank = clock.run("the same model on blank images (GQA-, POPE-style)", blank_image_scores, model_dir,
                      data["benchmark_data"], out, device)
    shown = clock.run("example questions on held-out images", example_answers, model_dir, data["benchmark_data"], examples,
                      seed, device)
    summary = {"model": model_dir, "projector": projector, "recipe": recipe, "seed": seed, "fast": fast,
               "device": device, "scale": scale, "bases": str(base), "from_scratch": from_scratch,
               "row": evaluation["row"], "metrics": {k: v["score"] for k, v in evaluation["metrics"].items()},
               "blank_images": blank,
               "gqa_by_type": report.gqa_accuracy_by_type(data["benchmark_data"], evaluation["answers"]["gqa"]),
               "pope_yes_by_kind": report.pope_yes_by_kind(data["benchmark_data"], evaluation["answers"]["pope"]),
               "phases": clock.phases, "total_seconds": time.time() - clock.start, "examples": shown,
               "base_probes": {"tower": manifest["tower"]["probes"], "language_model": manifest["language_model"]["probes"]},
               "settings": asdict(settings), "results_markdown": evaluation["files"]["markdown"]}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def blank_image_scores(model_dir: str, benchmark_data: Path, out: Path, device: str = "cpu") -> dict[str, float]:
    """GQA- and POPE-style scores of the model with every image replaced by the empty background: what the
    questions alone give. Near chance means the answers come from the images."""
    from PIL import Image

    from mobilevlm.demo.scenes import BACKGROUND, IMAGE_SIZE
    from mobilevlm.eval.evaluate import run_evaluation

    blank_root = out / "benchmark_data_blank"
    shutil.rmtree(blank_root, ignore_errors=True)
    for name in ("gqa", "pope"):
        shutil.copytree(Path(benchmark_data) / name, blank_root / name)
    empty = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    for image in blank_root.rglob("*.png"):
        empty.save(image)
    result = run_evaluation(model_dir, blank_root, benchmarks="gqa,pope", out_dir=out / "eval_blank", batch_size=16,
                            device=device, dtype="float32")
    return {column: value for column, value in result["row"].items() if column != "Avg"}


def example_answers(model_dir: str, benchmark_data: Path, count: int, seed: int, device: str = "cpu") -> list[dict]:
    """A few GQA-style questions on held-out images, answered by the trained model."""
    from mobilevlm.generation import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, device=device, dtype="float32")
    lines = [json.loads(line) for line in (benchmark_data / "gqa" / "llava_gqa_testdev_balanced.jsonl").read_text().splitlines()]
    truth = json.loads((benchmark_data / "gqa" / "testdev_balanced_questions.json").read_text())
    shown = []
    for line in random.Random(f"{seed}:examples").sample(lines, min(count, len(lines))):
        question = truth[line["question_id"]]["question"]
        image = benchmark_data / "gqa" / "images" / line["image"]
        answer = pipe.generate(pipe.build_prompt(line["text"]), images=[str(image)], max_new_tokens=16)
        shown.append({"image": str(image), "question": question, "answer": answer, "expected": truth[line["question_id"]]["answer"]})
    return shown
