"""The inference and training paths on a CUDA GPU (skipped without one): device placement, the lean decoder against
the transformers path, CPU/GPU agreement, and training with the official recipe's bf16 / tf32 flags. Run on a lent GPU
machine; CI has none."""
import json

import pytest
import torch
from PIL import Image

from mobilevlm.demo.toy import toy_demo_settings
from mobilevlm.fast.decoder import LeanDecoder
from mobilevlm.fast.pipeline import FastPipeline
from mobilevlm.generation import GenerationSettings, Pipeline
from mobilevlm.testing import make_tiny_checkpoint
from mobilevlm.train import run_training
from mobilevlm.train.synthetic import make_training_setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMAGE = Image.new("RGB", (120, 90), (200, 30, 40))
QUESTION = "Is there a blue triangle? Please answer yes or no."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "tiny_v2", "tiny_v2", seed=5)


def _ids(pipe, n=24):
    ids, pixels, budget = pipe.encode(pipe.build_prompt(QUESTION, num_images=1), [IMAGE], n)
    return pipe._generate_ids([ids], pixels, GenerationSettings(max_new_tokens=n), budget)[0].tolist()


def test_default_dtype_on_gpu_is_fp16_and_everything_is_on_the_gpu(checkpoint):
    pipe = Pipeline.from_pretrained(checkpoint, device="cuda")
    assert {p.device.type for p in pipe.model.parameters()} == {"cuda"}
    assert pipe.model.dtype == torch.float16
    assert len(_ids(pipe)) == 24


def test_gpu_logits_equal_cpu_logits_in_fp32(checkpoint):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = Pipeline.from_pretrained(checkpoint, device="cpu", dtype="float32")
    gpu = Pipeline.from_pretrained(checkpoint, device="cuda", dtype="float32")
    ids, pixels, _ = cpu.encode(cpu.build_prompt(QUESTION, num_images=1), [IMAGE], 8)
    with torch.inference_mode():
        expected = cpu.model(input_ids=torch.tensor([ids]), images=pixels).logits
        got = gpu.model(input_ids=torch.tensor([ids], device="cuda"), images=pixels.cuda()).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decoder_on_gpu_gives_the_transformers_greedy_tokens(checkpoint, dtype):
    reference = Pipeline.from_pretrained(checkpoint, device="cuda", dtype=dtype)
    fast = FastPipeline.from_pretrained(checkpoint, device="cuda", dtype=dtype)
    assert fast.decoder.k_cache.device.type == "cuda"
    assert _ids(fast) == _ids(reference)


def test_cuda_graph_steps_equal_eager_steps(checkpoint):
    fast = FastPipeline.from_pretrained(checkpoint, device="cuda", dtype="float32")
    assert fast.decoder.cuda_graph
    eager = LeanDecoder(fast.model, fast.decoder.max_len, cuda_graph=False)
    embeds = fast.decoder.embed_prompt(list(range(3, 40)), None)
    for decoder in (fast.decoder, eager):  # two sequences: the graph outlives a new prefill
        decoder.prefill(embeds[:5])
        decoder.step(7)
    graphed, plain = fast.decoder.prefill(embeds), eager.prefill(embeds)
    for token in range(50, 70):
        torch.testing.assert_close(graphed, plain, atol=1e-4, rtol=1e-4)
        graphed, plain = fast.decoder.step(token), eager.step(token)
    assert fast.decoder._graph is not None


def test_generate_command_on_gpu_streams_the_lean_decoders_answer(checkpoint, tmp_path, capsys):
    # `mobilevlm generate --device cuda` runs FastPipeline; its streaming runs generation in a second thread, where
    # the CUDA graph is captured
    from mobilevlm.cli import main

    IMAGE.save(tmp_path / "red.png")
    reference = Pipeline.from_pretrained(checkpoint, device="cuda")  # fp16, the GPU default
    expected = reference.generate(reference.build_prompt(QUESTION, num_images=1), [IMAGE], max_new_tokens=16)
    assert main(["generate", "--model", str(checkpoint), "--image", str(tmp_path / "red.png"), "--prompt", QUESTION,
                 "--device", "cuda", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def _stage1_losses(setup, out, *flags):
    run_training(["--model_name_or_path", str(setup.llm), "--vision_tower", str(setup.clip), "--version", "plain",
                  "--data_path", str(setup.pretrain_data), "--image_folder", str(setup.images), "--output_dir", str(out),
                  "--mm_projector_type", "ldpnetv2", "--mm_vision_select_layer", "-2", "--tune_mm_mlp_adapter", "True",
                  "--per_device_train_batch_size", "4", "--max_steps", "6", "--learning_rate", "5e-3",
                  "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none", "--seed", "0",
                  "--dataloader_num_workers", "0", "--save_strategy", "no", "--disable_tqdm", "True", *flags])
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def training_setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("gpu_train"))


def test_stage1_on_gpu_in_fp32_follows_the_cpu_losses(training_setup, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _stage1_losses(training_setup, tmp_path / "cpu", "--use_cpu", "True")
    gpu = _stage1_losses(training_setup, tmp_path / "gpu")
    assert len(gpu) == 6 and gpu[-1] < gpu[0]
    assert gpu == pytest.approx(cpu, rel=1e-3, abs=1e-3)


def test_stage1_with_the_official_bf16_tf32_flags_trains_and_its_checkpoint_generates_on_gpu(training_setup, tmp_path):
    losses = _stage1_losses(training_setup, tmp_path / "bf16", "--bf16", "True", "--tf32", "True")
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0]
    pipe = Pipeline.from_pretrained(tmp_path / "bf16", device="cuda", dtype="bfloat16")
    assert len(_ids(pipe, 8)) == 8


def test_demo_trains_and_evaluates_on_the_gpu(tmp_path):
    from mobilevlm.demo import pipeline as demo

    from mobilevlm.demo import shipped

    summary = demo.run_demo(tmp_path, settings=toy_demo_settings(), device="cuda", log=lambda m: None, examples=1,
                            from_scratch=True, base_settings=shipped.FAST_SETTINGS)
    assert summary["device"] == "cuda" and set(summary["metrics"]) == {"gqa", "sqa", "textvqa", "pope", "mme", "mmbench"}
    pipe = Pipeline.from_pretrained(summary["model"], device="cuda", dtype="float32")
    assert {p.device.type for p in pipe.model.parameters()} == {"cuda"}
    # a trained toy model may end its answer at once: only that it answers is checked
    assert isinstance(pipe.generate(pipe.build_prompt(QUESTION), images=[IMAGE], max_new_tokens=4), str)
